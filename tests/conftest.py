"""Fixtures shared by the test suite.

Tests that need a real service (PostgreSQL, Redis, Chromium) skip with a reason that
says how to run them; with ``BREX_OAUTH_REQUIRE_SERVICES=1`` (as in CI) a missing
service fails the test instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pytest
from django.core.cache import caches
from django.urls import reverse

# The fixtures partners use (fake_brex, brex_oauth_settings) serve this suite too.
pytest_plugins = ["django_brex_oauth.testing.pytest_plugin"]

REQUIRE_SERVICES = os.environ.get("BREX_OAUTH_REQUIRE_SERVICES") == "1"

#: The settings of the team-mode run. BREX_OAUTH_TEAM_MODEL shapes the tables, so the
#: team-mode tests (tests/team_mode/) run in their own process with these settings,
#: started by tests/test_teams.py; the main run leaves them out.
TEAM_SETTINGS = "tests.settings_teams"
if os.environ.get("DJANGO_SETTINGS_MODULE") != TEAM_SETTINGS:
    collect_ignore = ["team_mode"]


def require_service(name: str, available: bool, how: str) -> None:
    """Skip (or, in CI, fail) when ``name`` is not available."""
    if available:
        return
    message = f"{name} is not available; {how}"
    if REQUIRE_SERVICES:
        pytest.fail(f"BREX_OAUTH_REQUIRE_SERVICES=1 but {message}", pytrace=False)
    pytest.skip(message)


def require_postgres() -> None:
    """Skip unless the suite runs on PostgreSQL (the second pass of .ci/run)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip(
            "needs PostgreSQL: run with BREX_OAUTH_TEST_DATABASE=postgres "
            "(127.0.0.1:5432, database 'test', or set DATABASE_URL)"
        )


@pytest.fixture(autouse=True, scope="session")
def celery_app():
    """The suite's Celery app (tests/celery_app.py): configured from Django settings, so
    tasks run eagerly in the pytest process."""
    from tests.celery_app import app

    app.set_current()
    app.set_default()
    return app


@pytest.fixture(autouse=True)
def _clear_caches():
    from django_brex_oauth.services import throttle

    for cache in caches.all():
        cache.clear()
    # The waits this process read belong to the test before (its rows are gone).
    throttle.forget_waits()
    yield


@pytest.fixture
def brex_settings(brex_oauth_settings):
    """Point the app at the fake Brex server (``fake_brex``, from the partners' plugin)."""
    return brex_oauth_settings


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("ada", "ada@example.com", "pw")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", "pw")


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def user_client(client, user):
    client.force_login(user)
    return client


class Flow:
    """Drives the connect flow: the site through Django's test client, Brex over real
    HTTP to the fake server."""

    def __init__(self, client, fake):
        self.client = client
        self.fake = fake

    def start(self, **params):
        response = self.client.get(reverse("brex_oauth:connect"), params)
        assert response.status_code == 302, response.content[:500]
        return response["Location"]

    def callback(self, location: str):
        parts = urlsplit(location)
        return self.client.get(parts.path + ("?" + parts.query if parts.query else ""))

    def connect(self, *, scopes=None, deny=False, **params):
        authorize_url = self.start(**params)
        return self.callback(self.fake.consent(authorize_url, scopes=scopes, deny=deny))


@pytest.fixture
def flow(user_client, fake_brex, brex_settings):
    return Flow(user_client, fake_brex)


@pytest.fixture
def atomic_requests(monkeypatch):
    """ATOMIC_REQUESTS on for the default database; ``atomic_requests.watch(module, name)``
    wraps ``module.name`` so that each call records whether it ran inside a transaction,
    and returns the list of those records."""
    from django.db import connections, transaction

    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)

    class Watcher:
        def watch(self, module, name: str) -> list[bool]:
            seen: list[bool] = []
            original = getattr(module, name)

            def recording(*args, **kwargs):
                seen.append(transaction.get_connection().in_atomic_block)
                return original(*args, **kwargs)

            monkeypatch.setattr(module, name, recording)
            return seen

    return Watcher()


@pytest.fixture
def countdowns(monkeypatch):
    """The countdowns the refresh task asks Celery to retry after."""
    from django_brex_oauth import tasks

    recorded = []
    task = tasks.refresh_connection._get_current_object()
    real_retry = type(task).retry

    def retry(self, *args, **kwargs):
        recorded.append(kwargs.get("countdown"))
        return real_retry(self, *args, **kwargs)

    monkeypatch.setattr(type(task), "retry", retry)
    return recorded
