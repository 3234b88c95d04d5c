"""Celery tasks: primary keys in, one service call each.

Add the beat entries of :data:`django_brex_oauth.beat.BEAT_SCHEDULE` (or your own) to
``CELERY_BEAT_SCHEDULE`` to run them periodically.
"""

from __future__ import annotations

from celery import shared_task  # noqa: F401

# --- Refresh (token refresh, sweep) -------------------------------------------------------

# --- Revocation and cleanup ---------------------------------------------------------------
