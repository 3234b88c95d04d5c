"""A ready Celery beat schedule for the refresh sweep.

Merge it into your own::

    from django_brex_oauth.beat import BEAT_SCHEDULE as BREX_OAUTH_BEAT_SCHEDULE

    CELERY_BEAT_SCHEDULE = {**CELERY_BEAT_SCHEDULE, **BREX_OAUTH_BEAT_SCHEDULE}

The sweep runs every minute: each run is one indexed query plus a message per connection
that is due, and a connection becomes due ``REFRESH_MARGIN`` (10 minutes) before its access
token expires, so a failed refresh gets several more chances before the token lapses.
"""

from __future__ import annotations

from typing import Any

#: Seconds between two sweeps.
SWEEP_INTERVAL = 60.0

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "brex-oauth-refresh-due-connections": {
        "task": "django_brex_oauth.tasks.refresh_due_connections",
        "schedule": SWEEP_INTERVAL,
        # A sweep nobody ran within its minute is superseded by the next one.
        "options": {"expires": SWEEP_INTERVAL - 5},
    },
    # Revocations still pending at Brex (e.g. the broker lost the retry task).
    "brex-oauth-sweep-revocations": {
        "task": "django_brex_oauth.tasks.sweep_revocations",
        "schedule": 900.0,
        "options": {"expires": 840.0},
    },
    # Expired authorization requests and events past their retention.
    "brex-oauth-prune": {
        "task": "django_brex_oauth.tasks.prune",
        "schedule": 86400.0,
    },
}
