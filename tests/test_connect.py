"""Connecting a Brex account: the authorization code flow against the fake Brex over HTTP."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.db import connection as db_connection
from django.urls import reverse
from django.utils import timezone

from django_brex_oauth import signals
from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
)

pytestmark = pytest.mark.django_db(transaction=True)


def nothing_stored():
    return not BrexConnection.objects.exists() and not BrexToken.objects.exists()


def query(url):
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_connect_redirects_to_brex_with_state_pkce_and_nonce(flow, fake_brex, user):
    authorize_url = flow.start()
    params = query(authorize_url)
    assert authorize_url.startswith(fake_brex.issuer + "/v1/authorize?")
    assert params["client_id"] == fake_brex.client_id
    assert params["response_type"] == "code"
    assert params["redirect_uri"] == "https://testserver/brex/callback/"  # SITE_URL + path
    assert params["scope"].split() == [
        "openid", "offline_access", "users.readonly", "companies.readonly"
    ]
    assert len(params["state"]) >= 43  # 32 random bytes
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["nonce"]) >= 32
    assert "prompt" not in params
    pending = AuthorizationRequest.objects.get(state=params["state"])
    assert pending.user == user
    assert pending.expires_at - pending.created_at == timedelta(minutes=10)
    assert pending.consumed_at is None


def test_full_flow_stores_an_encrypted_connection_and_calls_brex(flow, fake_brex, user):
    received = []
    signals.connected.connect(lambda **kw: received.append(kw), weak=False,
                              dispatch_uid="test-connected")
    try:
        response = flow.connect(next="/dashboard/")
    finally:
        signals.connected.disconnect(dispatch_uid="test-connected")

    assert response.status_code == 302
    assert response["Location"] == "/dashboard/"
    connection = BrexConnection.objects.get()
    assert connection.owner == user
    assert connection.status == "active"
    assert connection.environment == "staging"
    assert connection.brex_user_id == fake_brex.default_user["id"]
    assert connection.brex_user_email == fake_brex.default_user["email"]
    assert connection.brex_company_id == fake_brex.company["id"]
    assert connection.brex_company_name == fake_brex.company["legal_name"]
    assert set(connection.scopes) == {
        "openid", "offline_access", "users.readonly", "companies.readonly"
    }
    token = connection.token
    assert fake_brex.is_access_token_active(token.access_token)
    assert fake_brex.is_refresh_token_active(token.refresh_token)
    assert token.access_token_expires_at > timezone.now() + timedelta(minutes=55)
    assert token.refresh_token_expires_at - token.refresh_token_issued_at == timedelta(days=90)

    # The raw columns hold ciphertext, not the tokens.
    with db_connection.cursor() as cursor:
        cursor.execute(
            "SELECT access_token, refresh_token FROM brex_oauth_brextoken "
            "WHERE connection_id = %s", [connection.pk]
        )
        raw_access, raw_refresh = (bytes(v) for v in cursor.fetchone())
    for raw, plain in ((raw_access, token.access_token), (raw_refresh, token.refresh_token)):
        assert plain.encode() not in raw
        assert len(raw) > len(plain)

    # The stored access token works against the API.
    me = requests.get(
        fake_brex.api_base_url + "/v2/users/me",
        headers={"Authorization": f"Bearer {token.access_token}"},
        timeout=5,
    )
    assert me.status_code == 200
    assert me.json()["id"] == connection.brex_user_id

    assert [e.kind for e in ConnectionEvent.objects.all()] == ["connected"]
    assert len(received) == 1
    assert received[0]["connection"] == connection
    assert received[0]["created"] is True
    assert received[0]["user"] == user
    assert not AuthorizationRequest.objects.filter(consumed_at__isnull=True).exists()


def test_partial_consent_records_only_granted_scopes(flow):
    response = flow.connect(scopes=["users.readonly"])
    assert response.status_code == 302
    connection = BrexConnection.objects.get()
    assert connection.api_scopes == ["users.readonly"]
    # Without companies.readonly the company cannot be read.
    assert connection.brex_company_id == ""


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [(None, ["users.readonly", "companies.readonly"]), (["users.readonly"], ["users.readonly"])],
)
def test_a_token_response_without_scope_takes_the_callbacks_scopes(
    flow, fake_brex, scopes, expected
):
    # Brex documents a token response with no scope (RFC 6749: then the scope is the one
    # asked for); the callback's scope says what the customer granted.
    fake_brex.include_scope = False
    response = flow.connect(scopes=scopes)
    assert response.status_code == 302, response.content
    assert BrexConnection.objects.get().api_scopes == expected


def test_a_token_response_without_scope_and_a_callback_without_scope(flow, fake_brex):
    fake_brex.include_scope = False
    location = flow.fake.consent(flow.start())
    params = {k: v for k, v in query(location).items() if k != "scope"}
    response = flow.client.get(urlsplit(location).path, params)
    assert response.status_code == 302, response.content
    assert BrexConnection.objects.get().api_scopes == ["users.readonly", "companies.readonly"]


def test_reconnecting_the_same_brex_user_updates_the_connection(flow, fake_brex):
    flow.connect()
    first = BrexConnection.objects.get()
    old_refresh = first.token.refresh_token
    flow.connect(scopes=["users.readonly"])
    assert BrexConnection.objects.count() == 1
    again = BrexConnection.objects.get()
    assert again.pk == first.pk
    assert again.api_scopes == ["users.readonly"]
    assert again.token.refresh_token != old_refresh
    # The replaced refresh token is revoked at Brex.
    assert not fake_brex.is_refresh_token_active(old_refresh)
    assert [e.kind for e in ConnectionEvent.objects.order_by("pk")] == [
        "connected", "reconnected"
    ]


def test_a_connected_receiver_that_raises_does_not_keep_the_old_token_alive(flow, fake_brex):
    flow.connect()
    old_refresh = BrexConnection.objects.get().token.refresh_token

    def broken_receiver(sender, **kwargs):
        raise RuntimeError("the partner's receiver is broken")

    signals.connected.connect(broken_receiver, weak=False, dispatch_uid="broken")
    try:
        with pytest.raises(RuntimeError, match="receiver is broken"):
            flow.connect()
    finally:
        signals.connected.disconnect(dispatch_uid="broken")
    assert not fake_brex.is_refresh_token_active(old_refresh)


def test_force_login_adds_prompt_login(flow, settings):
    assert query(flow.start(force_login="1"))["prompt"] == "login"
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "FORCE_LOGIN": True}
    assert query(flow.start())["prompt"] == "login"


def test_connect_requires_login(client, brex_settings):
    response = client.get(reverse("brex_oauth:connect"))
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    assert not AuthorizationRequest.objects.exists()


@pytest.mark.parametrize(
    "next_url",
    ["https://evil.example/", "//evil.example/path", "javascript:alert(1)",
     "http://testserver.evil.example/"],
)
def test_open_redirect_in_next_is_refused(flow, next_url):
    response = flow.client.get(reverse("brex_oauth:connect"), {"next": next_url})
    assert response.status_code == 400
    assert b"points outside this site" in response.content
    assert not AuthorizationRequest.objects.exists()


# The callback's failures: each shows a page a person understands and stores nothing.


def test_access_denied(flow):
    response = flow.connect(deny=True)
    assert response.status_code == 400
    assert b"declined access at Brex" in response.content
    assert nothing_stored()


def test_zero_granted_scopes(flow, fake_brex):
    response = flow.connect(scopes=[])
    assert response.status_code == 400
    assert b"did not grant any of the permissions" in response.content
    assert nothing_stored()
    assert fake_brex.stats.get("token_authorization_code", 0) == 0


def test_missing_state(flow):
    location = flow.fake.consent(flow.start())
    parts = urlsplit(location)
    params = {k: v for k, v in query(location).items() if k != "state"}
    response = flow.client.get(parts.path, params)
    assert response.status_code == 400
    assert b"did not say which connection attempt" in response.content
    assert nothing_stored()


def test_wrong_state(flow):
    location = flow.fake.consent(flow.start())
    params = {**query(location), "state": "x" * 43}
    response = flow.client.get(urlsplit(location).path, params)
    assert response.status_code == 400
    assert b"no longer valid" in response.content
    assert nothing_stored()


def test_replayed_state_and_code(flow):
    location = flow.fake.consent(flow.start())
    assert flow.callback(location).status_code == 302
    BrexConnection.objects.all().delete()
    response = flow.callback(location)
    assert response.status_code == 400
    assert b"no longer valid" in response.content
    assert nothing_stored()


def test_state_replayed_from_the_database_is_refused_once_used(flow, user):
    location = flow.fake.consent(flow.start())
    state = query(location)["state"]
    # Even with the state still in the session, a consumed request cannot be used again.
    AuthorizationRequest.objects.filter(state=state).update(consumed_at=timezone.now())
    response = flow.callback(location)
    assert response.status_code == 400
    assert b"used already" in response.content
    assert nothing_stored()


def test_expired_state(flow):
    location = flow.fake.consent(flow.start())
    AuthorizationRequest.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = flow.callback(location)
    assert response.status_code == 400
    assert b"attempt expired" in response.content
    assert nothing_stored()


def test_state_from_another_session_is_refused(flow, client, other_user, fake_brex):
    location = fake_brex.consent(flow.start())
    client.force_login(other_user)  # another browser, another person
    parts = urlsplit(location)
    response = client.get(parts.path + "?" + parts.query)
    assert response.status_code == 400
    assert nothing_stored()


def test_token_endpoint_error(flow, fake_brex):
    location = fake_brex.consent(flow.start())
    fake_brex.fail_next("/v1/token", status=400,
                        body={"error": "invalid_grant", "error_description": "bad code"})
    response = flow.callback(location)
    assert response.status_code == 400
    assert b"Brex refused to complete the connection" in response.content
    assert nothing_stored()


def test_token_endpoint_outage(flow, fake_brex):
    location = fake_brex.consent(flow.start())
    fake_brex.fail_next("/v1/token", status=503)
    response = flow.callback(location)
    assert response.status_code == 502
    assert b"did not answer in time" in response.content
    assert nothing_stored()


def test_a_consent_without_a_required_scope_stores_nothing(flow, fake_brex, brex_settings):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH, "REQUIRED_API_SCOPES": ["companies.readonly"]
    }
    response = flow.connect(scopes=["users.readonly"])
    assert response.status_code == 400
    assert b"You did not grant a permission this site needs (companies.readonly)" in (
        response.content
    )
    assert nothing_stored()
    [revocation] = [r for r in fake_brex.requests if r["path"].endswith("/v1/revoke")]
    assert not fake_brex.is_refresh_token_active(revocation["form"]["token"])


@pytest.mark.parametrize("spoil", [{"access_token": None}, {"expires_in": "soon"}, {"body": []}])
def test_a_malformed_token_answer_stores_nothing_and_revokes_what_came(flow, fake_brex, spoil):
    location = fake_brex.consent(flow.start())
    fake_brex.tamper_next("/v1/token", **spoil)
    response = flow.callback(location)
    assert response.status_code == 502
    assert b"Brex sent an answer this site cannot use" in response.content
    assert nothing_stored()
    if "body" not in spoil:
        # The refresh token that did arrive is revoked, so no grant is left behind.
        [revocation] = [r for r in fake_brex.requests if r["path"].endswith("/v1/revoke")]
        assert not fake_brex.is_refresh_token_active(revocation["form"]["token"])


def test_replayed_code_is_refused_by_brex(flow, fake_brex, user):
    """A code used once cannot connect again even through a fresh state."""
    location = fake_brex.consent(flow.start())
    code = query(location)["code"]
    assert flow.callback(location).status_code == 302
    BrexConnection.objects.all().delete()
    fresh = fake_brex.consent(flow.start())
    params = {**query(fresh), "code": code}
    response = flow.client.get(urlsplit(fresh).path, params)
    assert response.status_code == 400
    assert nothing_stored()


@pytest.mark.parametrize(
    "fault",
    ["bad_signature", "alg_none", "wrong_aud", "wrong_iss", "expired", "wrong_nonce",
     "missing_nonce", "unknown_kid", "future_iat"],
)
def test_bad_id_token_is_refused(flow, fake_brex, fault):
    fake_brex.id_token_fault = fault
    location = fake_brex.consent(flow.start())
    jwks_before = fake_brex.stats.get("jwks", 0)
    response = flow.callback(location)
    assert response.status_code == 400
    assert b"could not be verified" in response.content
    assert nothing_stored()
    if fault == "unknown_kid":
        # The JWKS is fetched, then fetched once more for the unknown key, then refused.
        assert fake_brex.stats["jwks"] - jwks_before == 2
    # The tokens Brex issued for the refused sign-in are revoked.
    assert fake_brex.stats.get("revocations", 0) == 1


def test_rotated_signing_key_is_picked_up(flow, fake_brex):
    flow.connect()
    fake_brex.rotate_signing_key()
    BrexConnection.objects.all().delete()
    response = flow.connect()
    assert response.status_code == 302
    assert BrexConnection.objects.count() == 1


def test_discovery_issuer_mismatch_is_refused(user_client, fake_brex, settings):
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ISSUER": fake_brex.base_url.replace("127.0.0.1", "localhost") + "/oauth2/default",
        "CLIENT_ID": fake_brex.client_id,
        "CLIENT_SECRET": fake_brex.client_secret,
    }
    response = user_client.get(reverse("brex_oauth:connect"))
    assert response.status_code == 502
    assert b"could not read Brex" in response.content
    assert not AuthorizationRequest.objects.exists()


def test_brex_unreachable_on_connect(user_client, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ISSUER": "http://127.0.0.1:9/oauth2/default"}
    response = user_client.get(reverse("brex_oauth:connect"))
    assert response.status_code == 502
    assert not AuthorizationRequest.objects.exists()


def test_error_template_is_overridable(flow, settings, tmp_path):
    (tmp_path / "brex_oauth").mkdir()
    (tmp_path / "brex_oauth" / "error.html").write_text("CUSTOM: {{ title }}")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]
    response = flow.connect(deny=True)
    assert response.content.startswith(b"CUSTOM: Brex access was not granted")


def test_whole_journey_over_real_http(live_server, fake_brex, brex_settings, user):
    """The site served over HTTP too: a requests session plays the browser."""
    # The site's configured address is where the live server listens.
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "SITE_URL": live_server.url}
    browser = requests.Session()
    login_page = browser.get(live_server.url + "/login/", timeout=5)
    browser.post(
        live_server.url + "/login/",
        data={"username": "ada", "password": "pw",
              "csrfmiddlewaretoken": login_page.cookies["csrftoken"]},
        headers={"Referer": live_server.url + "/login/"},
        timeout=5,
    )
    start = browser.get(live_server.url + "/brex/connect/?next=/", allow_redirects=False,
                        timeout=5)
    assert start.status_code == 302
    assert query(start.headers["Location"])["redirect_uri"] == live_server.url + "/brex/callback/"
    back = fake_brex.consent(start.headers["Location"])
    assert back.startswith(live_server.url + "/brex/callback/?")
    landed = browser.get(back, timeout=10)
    assert landed.status_code == 200
    assert landed.text == "home"
    connection = BrexConnection.objects.get(owner=user)
    assert connection.status == "active"
    assert fake_brex.is_access_token_active(connection.token.access_token)
