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

REQUIRE_SERVICES = os.environ.get("BREX_OAUTH_REQUIRE_SERVICES") == "1"


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


@pytest.fixture(autouse=True)
def _clear_caches():
    for cache in caches.all():
        cache.clear()
    yield


@pytest.fixture
def fake_brex():
    """A fake Brex server on loopback, fresh for each test."""
    from django_brex_oauth.testing import FakeBrex

    with FakeBrex() as server:
        yield server


@pytest.fixture
def brex_settings(settings, fake_brex):
    """Point the app at the fake Brex server."""
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ISSUER": fake_brex.issuer,
        "API_BASE_URL": fake_brex.api_base_url,
        "CLIENT_ID": fake_brex.client_id,
        "CLIENT_SECRET": fake_brex.client_secret,
    }
    return settings


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
