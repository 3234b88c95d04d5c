"""The Celery app of the test suite, configured from Django settings (namespace ``CELERY``).

In the pytest process the settings make every task eager. Worker processes started by the
integration tests (``celery -A tests.celery_app worker``) are configured by environment:

* ``BREX_OAUTH_TEST_CELERY_WORKER=1``: real broker (``BREX_OAUTH_TEST_REDIS_URL``), not eager
  (read by ``tests/settings.py``);
* ``BREX_OAUTH_TEST_WORKER_SETTINGS``: a JSON object of Django settings to override before
  Django starts, e.g. ``DATABASES`` naming the test database and a ``BREX_OAUTH`` pointing at
  a FakeBrex that the test runs.
"""

from __future__ import annotations

import json
import os

import django
from celery import Celery
from django.conf import settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def _apply_worker_settings() -> None:
    overrides = json.loads(os.environ.get("BREX_OAUTH_TEST_WORKER_SETTINGS") or "{}")
    for name, value in overrides.items():
        setattr(settings, name, value)


_apply_worker_settings()
django.setup()

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["django_brex_oauth"])
