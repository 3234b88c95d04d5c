"""Calling Brex through a connection (BrexClient) and the onboarding API (OnboardingClient),
against the fake Brex over loopback HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core.cache import caches

from django_brex_oauth import client as client_module
from django_brex_oauth.client import BrexClient, OnboardingClient, get_with_token
from django_brex_oauth.exceptions import (
    BrexAPIError,
    BrexAPIUnavailable,
    BrexUnavailable,
    ConnectionNotUsable,
)
from django_brex_oauth.models import ConnectionStatus
from django_brex_oauth.services import client_credentials
from django_brex_oauth.services.client_credentials import get_client_credentials_token
from django_brex_oauth.testing.fake_brex import REFERRALS_SCOPE
from tests.factories import create_connection, stored_token, strict_rotation_fake_brex

pytestmark = pytest.mark.django_db(transaction=True)

BACKOFF = 0.02


fake_brex = pytest.fixture(strict_rotation_fake_brex, name="fake_brex")


@pytest.fixture
def brex(brex_settings, fake_brex):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH,
        "RETRY_BACKOFF": BACKOFF,
        "API_MAX_RETRIES": 3,
        "HTTP_TIMEOUT": 2.0,
    }
    return fake_brex


@pytest.fixture
def sleeps(monkeypatch):
    """Record the API clients' backoff pauses (and still pause)."""
    recorded = []

    def sleep(seconds):
        recorded.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(client_module._APIClient, "sleep", staticmethod(sleep))
    return recorded


def api_requests(brex, path):
    return [r for r in brex.requests if r["path"] == path]


def token_requests(brex):
    return [r for r in brex.requests if r["path"].endswith("/v1/token")]


# Calls with the connection's token ------------------------------------------------------


def test_calls_the_api_server_with_the_bearer_token(brex):
    connection = create_connection(brex, expires_in=3000)
    token = stored_token(connection)
    client = BrexClient(connection)

    me = client.get_me()
    company = client.get_company()

    assert me["id"] == brex.default_user["id"]
    assert me["email"] == brex.default_user["email"]
    assert company == brex.company
    assert client.base_url == brex.api_base_url
    calls = api_requests(brex, "/v2/users/me") + api_requests(brex, "/v2/company")
    assert [r["headers"]["Authorization"] for r in calls] == [f"Bearer {token.access_token}"] * 2
    assert token_requests(brex) == []


def test_refreshes_first_when_the_token_is_about_to_expire(brex):
    connection = create_connection(brex, expires_in=30)
    old = stored_token(connection)

    BrexClient(connection).get_me()

    new = stored_token(connection)
    assert new.access_token != old.access_token
    paths = [r["path"] for r in brex.requests if not r["path"].endswith("openid-configuration")]
    # The refresh answer's id_token is checked against the issuer's keys before it is used.
    assert paths == ["/oauth2/default/v1/token", "/oauth2/default/v1/keys", "/v2/users/me"]
    assert api_requests(brex, "/v2/users/me")[0]["headers"]["Authorization"] == (
        f"Bearer {new.access_token}"
    )


def test_refreshes_once_on_401_and_calls_again(brex):
    connection = create_connection(brex, expires_in=3000)
    old = stored_token(connection)
    brex.expire_access_tokens()  # Brex no longer takes the token we believe valid

    me = BrexClient(connection).get_me()

    assert me["id"] == brex.default_user["id"]
    calls = api_requests(brex, "/v2/users/me")
    assert [r["status"] for r in calls] == [401, 200]
    assert len(token_requests(brex)) == 1
    new = stored_token(connection)
    assert calls[1]["headers"]["Authorization"] == f"Bearer {new.access_token}"
    assert new.refresh_token != old.refresh_token


def test_a_second_401_is_raised_with_brex_error_body(brex):
    connection = create_connection(brex, expires_in=3000)
    brex.fail_next(
        "/v2/users/me",
        status=401,
        times=2,
        body={"type": "UNAUTHORIZED", "message": "PERMISSION_DENIED: Invalid or Revoked Token"},
    )

    with pytest.raises(BrexAPIError) as caught:
        BrexClient(connection).get_me()

    err = caught.value
    assert not isinstance(err, BrexUnavailable)
    assert err.status == 401
    assert err.error_type == "UNAUTHORIZED"
    assert err.error_message == "PERMISSION_DENIED: Invalid or Revoked Token"
    assert len(api_requests(brex, "/v2/users/me")) == 2
    assert len(token_requests(brex)) == 1
    token = stored_token(connection)
    assert token.access_token not in str(err) and token.access_token not in repr(err)


@pytest.mark.parametrize("statuses", [[429], [503], [429, 502, 500]])
def test_get_retries_429_and_5xx_with_growing_jittered_backoff(brex, sleeps, statuses):
    connection = create_connection(brex, expires_in=3000)
    for status in statuses:
        brex.fail_next("/v2/users/me", status=status)

    me = BrexClient(connection).get_me()

    assert me["id"] == brex.default_user["id"]
    assert [r["status"] for r in api_requests(brex, "/v2/users/me")] == [*statuses, 200]
    assert len(sleeps) == len(statuses)
    for attempt, pause in enumerate(sleeps):
        ceiling = BACKOFF * 2**attempt
        assert ceiling / 2 <= pause <= ceiling


def test_gives_up_after_the_retries_with_a_typed_error(brex, sleeps):
    connection = create_connection(brex, expires_in=3000)
    body = {"type": "SERVICE_UNAVAILABLE", "message": "Try again later", "code": "MAINTENANCE"}
    brex.fail_next("/v2/company", status=503, times=10, body=body)

    with pytest.raises(BrexAPIError) as caught:
        BrexClient(connection).get_company()

    err = caught.value
    # Also a BrexUnavailable: callers that treat "try later" alike catch it either way.
    assert isinstance(err, BrexAPIUnavailable) and isinstance(err, BrexUnavailable)
    assert err.http_status == 502 and "try again" in err.user_message
    assert (err.status, err.error_type, err.error_message, err.code) == (
        503, "SERVICE_UNAVAILABLE", "Try again later", "MAINTENANCE"
    )
    assert (err.method, err.path) == ("GET", "/v2/company")
    assert len(api_requests(brex, "/v2/company")) == 4  # 1 + API_MAX_RETRIES
    assert len(sleeps) == 3


def test_non_idempotent_patch_is_not_retried(brex, sleeps):
    connection = create_connection(brex, expires_in=3000)
    brex.fail_next("/v2/users/me", status=503)

    with pytest.raises(BrexAPIError) as caught:
        BrexClient(connection).request("PATCH", "/v2/users/me", json={"first_name": "Ada"})

    assert caught.value.status == 503
    assert len(api_requests(brex, "/v2/users/me")) == 1
    assert sleeps == []


def test_post_always_sends_one_idempotency_key_and_is_retried(brex, sleeps):
    connection = create_connection(brex, expires_in=3000)
    brex.fail_next("/v2/cards", status=503)

    with pytest.raises(BrexAPIError) as caught:
        BrexClient(connection).post("/v2/cards", {"card_name": "Travel"})

    assert caught.value.status == 404  # the fake has no card API; the retry reached it
    calls = api_requests(brex, "/v2/cards")
    keys = [r["headers"].get("Idempotency-Key") for r in calls]
    assert len(calls) == 2 and keys[0] and keys[0] == keys[1]


def test_timeouts_are_retried_then_raised_as_unavailable(brex, sleeps):
    connection = create_connection(brex, expires_in=3000)
    token = stored_token(connection)
    brex.set_latency(1.0, "/v2/users/me")

    started = time.monotonic()
    with pytest.raises(BrexUnavailable) as caught:
        BrexClient(connection, timeout=0.2, max_retries=1).get_me()

    assert time.monotonic() - started < 1.5
    assert len(api_requests(brex, "/v2/users/me")) == 2
    assert "Timeout" in str(caught.value)
    assert token.access_token not in str(caught.value)


def test_iter_items_follows_next_cursor(brex):
    connection = create_connection(brex, expires_in=3000)
    client = BrexClient(connection)

    pages = list(client.iter_pages("/v2/users", limit=2))
    users = list(client.iter_items("/v2/users", limit=2))

    assert [len(page["items"]) for page in pages] == [2, 2, 1]
    assert [user["id"] for user in users] == [user["id"] for user in brex.users]
    cursors = [r["query"].get("cursor") for r in api_requests(brex, "/v2/users")[:3]]
    assert cursors[0] is None and cursors[1] and cursors[2] and cursors[1] != cursors[2]


@pytest.mark.parametrize("status", [ConnectionStatus.NEEDS_REAUTH, ConnectionStatus.REVOKED])
def test_unusable_connection_is_refused_without_calling_brex(brex, status):
    connection = create_connection(brex, expires_in=3000, status=status)

    with pytest.raises(ConnectionNotUsable):
        BrexClient(connection).get_me()

    assert brex.requests == []


def test_refresh_that_finds_the_grant_revoked_raises_not_usable(brex):
    connection = create_connection(brex, expires_in=30)
    brex.revoke_all()

    with pytest.raises(ConnectionNotUsable):
        BrexClient(connection).get_me()

    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.NEEDS_REAUTH
    assert api_requests(brex, "/v2/users/me") == []


def test_get_with_token_still_makes_one_plain_call(brex):
    connection = create_connection(brex, expires_in=3000)
    me = get_with_token(stored_token(connection).access_token, "/v2/users/me")
    assert me["email"] == brex.default_user["email"]
    brex.fail_next("/v2/users/me", status=503)
    with pytest.raises(BrexUnavailable):
        get_with_token(stored_token(connection).access_token, "/v2/users/me")


# Client credentials and the onboarding API -------------------------------------------------


def test_client_credentials_token_is_cached_and_encrypted_in_the_cache(brex):
    first = get_client_credentials_token([REFERRALS_SCOPE])
    second = get_client_credentials_token([REFERRALS_SCOPE])

    assert first == second
    assert brex.is_access_token_active(first)
    assert brex.stats["token_client_credentials"] == 1
    entry = caches["default"].get(client_credentials._key([REFERRALS_SCOPE]))
    assert isinstance(entry, dict) and entry["token"]
    assert first not in repr(entry)


def test_client_credentials_token_is_fetched_once_under_concurrency(brex):
    brex.set_latency(0.3, "/v1/token")
    start = threading.Barrier(8)

    def fetch(_):
        start.wait()
        return get_client_credentials_token([REFERRALS_SCOPE])

    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(fetch, range(8)))

    assert len(set(tokens)) == 1
    assert brex.stats["token_client_credentials"] == 1


def test_client_credentials_token_is_renewed_before_it_expires(brex, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "CLIENT_CREDENTIALS_MARGIN": 300}
    brex.access_token_ttl = 2  # renewed after half its life, as it is shorter than the margin
    first = get_client_credentials_token([REFERRALS_SCOPE])
    assert get_client_credentials_token([REFERRALS_SCOPE]) == first

    time.sleep(1.1)
    second = get_client_credentials_token([REFERRALS_SCOPE])

    assert second != first
    assert brex.is_access_token_active(second)
    assert brex.stats["token_client_credentials"] == 2


def test_onboarding_client_creates_a_referral_once_across_retries(brex, sleeps):
    brex.fail_next("/v1/referrals", status=502)
    onboarding = OnboardingClient()

    referral = onboarding.create_referral(
        {"referral_code": "partner-42", "applicant": {"email": "cfo@example.com"}}
    )

    assert referral["referral_code"] == "partner-42"
    assert onboarding.get_referral(referral["id"])["id"] == referral["id"]
    assert len(brex.referrals) == 1
    posts = api_requests(brex, "/v1/referrals")
    assert [r["status"] for r in posts] == [502, 200]
    assert posts[0]["headers"]["Idempotency-Key"] == posts[1]["headers"]["Idempotency-Key"]
    assert brex.stats["token_client_credentials"] == 1


def test_onboarding_client_fetches_a_new_token_when_brex_rejects_the_cached_one(brex):
    onboarding = OnboardingClient()
    onboarding.create_referral({"referral_code": "one"}, idempotency_key="key-1")
    brex.expire_access_tokens()

    again = onboarding.create_referral({"referral_code": "one"}, idempotency_key="key-1")

    assert again["referral_code"] == "one"
    assert len(brex.referrals) == 1  # the same key: the same referral
    assert brex.stats["token_client_credentials"] == 2
