"""Tests of the fake Brex server, over real loopback HTTP with plain ``requests``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from django_brex_oauth.testing import FakeBrex
from django_brex_oauth.testing.fake_brex import (
    DEFAULT_CLIENT_NAME,
    DROP,
    FOREIGN_ISSUER,
    ID_TOKEN_FAULTS,
    MALFORMED_TOKEN_ANSWERS,
    REFERRALS_SCOPE,
    UNTRUSTED_AUDIENCE,
)

REDIRECT_URI = "http://app.example.com/brex/callback"
STATE = "state-0123456789"
ALL_SCOPES = "openid offline_access users.readonly companies.readonly"
UNAUTHORIZED = {"type": "UNAUTHORIZED", "message": "PERMISSION_DENIED: Invalid or Revoked Token"}


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture
def brex() -> Iterator[FakeBrex]:
    with FakeBrex(redirect_uris=[REDIRECT_URI]) as fake:
        yield fake


def authorize_url(fake: FakeBrex, **overrides: str | None) -> str:
    params: dict[str, str | None] = {
        "client_id": fake.client_id,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "scope": ALL_SCOPES,
        "state": STATE,
        "nonce": "nonce-abc",
        **overrides,
    }
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return f"{fake.issuer}/v1/authorize?{query}"


def query_of(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def token_request(
    http: requests.Session, fake: FakeBrex, *, auth: str = "post", **data: str
) -> requests.Response:
    if auth == "post":
        data = {"client_id": fake.client_id, "client_secret": fake.client_secret, **data}
        return http.post(f"{fake.issuer}/v1/token", data=data, timeout=5)
    return http.post(
        f"{fake.issuer}/v1/token",
        data=data,
        auth=(fake.client_id, fake.client_secret),
        timeout=5,
    )


def exchange(
    http: requests.Session, fake: FakeBrex, location: str, **extra: str
) -> requests.Response:
    code = query_of(location)["code"]
    return token_request(
        http, fake, grant_type="authorization_code", code=code, redirect_uri=REDIRECT_URI, **extra
    )


def login(http: requests.Session, fake: FakeBrex, **consent: Any) -> dict[str, Any]:
    response = exchange(http, fake, fake.consent(authorize_url(fake), **consent))
    assert response.status_code == 200, response.text
    return response.json()


def refresh(http: requests.Session, fake: FakeBrex, token: str, **extra: str) -> requests.Response:
    return token_request(http, fake, grant_type="refresh_token", refresh_token=token, **extra)


def api(http: requests.Session, fake: FakeBrex, path: str, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.get(fake.api_base_url + path, headers=headers, timeout=5)


def verify_id_token(fake: FakeBrex, id_token: str, **options: Any) -> dict[str, Any]:
    client = jwt.PyJWKClient(f"{fake.issuer}/v1/keys", cache_keys=False)
    key = client.get_signing_key_from_jwt(id_token)
    return jwt.decode(
        id_token,
        key.key,
        algorithms=["RS256"],
        audience=fake.client_id,
        issuer=fake.issuer,
        **options,
    )


# ------------------------------------------------------------------------- discovery, keys


def test_discovery_document(brex: FakeBrex, http: requests.Session) -> None:
    doc = http.get(f"{brex.issuer}/.well-known/openid-configuration", timeout=5).json()
    assert brex.issuer == brex.base_url + "/oauth2/default"
    assert brex.api_base_url == brex.base_url
    assert doc["issuer"] == brex.issuer
    assert doc["authorization_endpoint"] == f"{brex.issuer}/v1/authorize"
    assert doc["token_endpoint"] == f"{brex.issuer}/v1/token"
    assert doc["jwks_uri"] == f"{brex.issuer}/v1/keys"
    assert doc["revocation_endpoint"] == f"{brex.issuer}/v1/revoke"
    for key in ("userinfo_endpoint", "introspection_endpoint", "end_session_endpoint"):
        assert doc[key].startswith(brex.issuer + "/v1/")
    assert doc["response_types_supported"] == ["code"]
    assert doc["subject_types_supported"] == ["public"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "client_secret_post",
        "client_secret_basic",
    }
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        doc["grant_types_supported"]
    )
    assert {"openid", "offline_access", "users.readonly"} <= set(doc["scopes_supported"])
    keys = http.get(doc["jwks_uri"], timeout=5).json()["keys"]
    assert [(k["kty"], k["use"], k["alg"], k["kid"]) for k in keys] == [
        ("RSA", "sig", "RS256", brex.signing_kid)
    ]
    assert "d" not in keys[0]
    assert brex.stats["discovery"] == 1 and brex.stats["jwks"] == 1


def test_id_token_verifies_against_jwks(brex: FakeBrex, http: requests.Session) -> None:
    tokens = login(http, brex)
    claims = verify_id_token(brex, tokens["id_token"])
    assert jwt.get_unverified_header(tokens["id_token"])["kid"] == brex.signing_kid
    assert claims["sub"] == brex.default_user["id"]
    assert claims["email"] == brex.default_user["email"]
    assert claims["nonce"] == "nonce-abc"
    assert claims["exp"] == claims["iat"] + 3600
    assert abs(claims["auth_time"] - time.time()) < 60
    assert claims["jti"]
    digest = hashlib.sha256(tokens["access_token"].encode()).digest()[:16]
    assert claims["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 3600
    assert tokens["scope"] == ALL_SCOPES
    assert brex.is_access_token_active(tokens["access_token"])
    assert brex.is_refresh_token_active(tokens["refresh_token"])


# ------------------------------------------------------------------------- authorize, consent


def test_consent_page_shape_and_authorize_log(brex: FakeBrex, http: requests.Session) -> None:
    url = authorize_url(brex, scope="openid offline_access users.readonly cards.readonly")
    page = http.get(url, timeout=5)
    assert page.status_code == 200
    assert "text/html" in page.headers["Content-Type"]
    assert f"<title>Authorize {DEFAULT_CLIENT_NAME}</title>" in page.text
    assert f"<h1>Authorize {DEFAULT_CLIENT_NAME}</h1>" in page.text
    assert f'<p class="client-id">Client ID <code>{brex.client_id}</code></p>' in page.text
    assert 'id="consent-form"' in page.text
    assert 'id="allow"' in page.text and 'id="deny"' in page.text
    assert 'name="scope" value="users.readonly" checked' in page.text
    assert 'name="scope" value="cards.readonly" checked' in page.text
    assert 'value="openid"' not in page.text and 'value="offline_access"' not in page.text
    assert 'id="email"' not in page.text
    assert brex.stats["authorize"] == 1
    assert brex.authorize_requests[-1]["state"] == STATE
    assert brex.authorize_requests[-1]["client_id"] == brex.client_id


def test_consent_allow_grants_everything_requested(brex: FakeBrex) -> None:
    location = brex.consent(authorize_url(brex))
    assert location.startswith(REDIRECT_URI + "?")
    params = query_of(location)
    assert params["state"] == STATE
    assert params["scope"] == ALL_SCOPES
    assert len(params["code"]) >= 32


def test_consent_deny(brex: FakeBrex) -> None:
    params = query_of(brex.consent(authorize_url(brex), deny=True))
    assert params["error"] == "access_denied"
    assert params["error_description"]
    assert params["state"] == STATE
    assert "code" not in params


def test_consent_partial_scopes_limit_the_api(brex: FakeBrex, http: requests.Session) -> None:
    location = brex.consent(authorize_url(brex), scopes=["users.readonly"])
    assert query_of(location)["scope"] == "openid offline_access users.readonly"
    tokens = exchange(http, brex, location).json()
    assert tokens["scope"] == "openid offline_access users.readonly"
    assert api(http, brex, "/v2/users/me", tokens["access_token"]).status_code == 200
    company = api(http, brex, "/v2/company", tokens["access_token"])
    assert company.status_code == 403
    assert company.json()["type"] == "FORBIDDEN"


def test_consent_with_no_scopes(brex: FakeBrex, http: requests.Session) -> None:
    location = brex.consent(authorize_url(brex), scopes=[])
    assert query_of(location)["scope"] == "openid offline_access"
    tokens = exchange(http, brex, location).json()
    assert tokens["scope"] == "openid offline_access"
    assert "refresh_token" in tokens and "id_token" in tokens
    assert api(http, brex, "/v2/users/me", tokens["access_token"]).status_code == 403
    assert api(http, brex, "/v2/company", tokens["access_token"]).status_code == 403


def test_prompt_login_lets_another_user_sign_in(brex: FakeBrex, http: requests.Session) -> None:
    url = authorize_url(brex, prompt="login")
    page = http.get(url, timeout=5).text
    assert "<title>Sign in to Brex</title>" in page
    assert f'id="email" name="email" value="{brex.default_user["email"]}"' in page
    assert brex.authorize_requests[-1]["prompt"] == "login"
    other = brex.users[1]
    tokens = exchange(http, brex, brex.consent(url, user=other["email"])).json()
    assert verify_id_token(brex, tokens["id_token"])["sub"] == other["id"]
    me = api(http, brex, "/v2/users/me", tokens["access_token"]).json()
    assert me["id"] == other["id"] and me["email"] == other["email"]
    with pytest.raises(AssertionError, match="Sign-in failed"):
        brex.consent(url, user="nobody@example.com")


def test_consent_user_without_prompt_login(brex: FakeBrex, http: requests.Session) -> None:
    third = brex.users[2]
    tokens = exchange(http, brex, brex.consent(authorize_url(brex), user=third["id"])).json()
    assert verify_id_token(brex, tokens["id_token"])["sub"] == third["id"]


def test_consent_page_names_the_app_and_keeps_the_client_id_as_small_print(
    http: requests.Session,
) -> None:
    with FakeBrex(client_name='Ledger & <Co>', redirect_uris=[REDIRECT_URI]) as fake:
        assert fake.client_name == "Ledger & <Co>"
        page = http.get(authorize_url(fake), timeout=5).text
        login = http.get(authorize_url(fake, prompt="login"), timeout=5).text
    name = "Ledger &amp; &lt;Co&gt;"
    assert f"<title>Authorize {name}</title>" in page
    assert f"<h1>Authorize {name}</h1>" in page
    assert f"<strong>{name}</strong> wants to access your Brex account" in page
    assert "<Co>" not in page and "<Co>" not in login
    # The client id is still there, once, as a detail below the heading.
    assert page.count(fake.client_id) == 2  # the detail, and the form's hidden client_id
    assert f'<p class="client-id">Client ID <code>{fake.client_id}</code></p>' in page
    assert f"to continue to <strong>{name}</strong>" in login
    assert f'<p class="client-id">Client ID <code>{fake.client_id}</code></p>' in login


def test_consent_page_lets_long_scopes_wrap_after_their_dots(
    brex: FakeBrex, http: requests.Session
) -> None:
    page = http.get(authorize_url(brex, scope="openid accounting.record.write"), timeout=5).text
    assert "<code>accounting.<wbr>record.<wbr>write</code>" in page
    assert 'name="scope" value="accounting.record.write" checked' in page


def _icon_of(page: str) -> bytes:
    match = re.search(r'<link rel="icon" type="image/svg\+xml" href="data:image/svg\+xml;'
                      r'base64,([A-Za-z0-9+/=]+)">', page)
    assert match, "no inline icon in the page's head"
    assert page.index(match.group(0)) < page.index("</head>")
    return base64.b64decode(match.group(1))


def test_every_page_has_an_icon_and_favicon_ico_answers(
    brex: FakeBrex, http: requests.Session
) -> None:
    pages = [
        http.get(authorize_url(brex), timeout=5),
        http.get(authorize_url(brex, client_id="someone-else"), timeout=5),  # an error page
        http.get(f"{brex.issuer}/v1/logout", timeout=5),
        http.get(f"{brex.base_url}/account", timeout=5),  # the webhooks' page
    ]
    for response in pages:
        assert "text/html" in response.headers["Content-Type"]
        assert _icon_of(response.text).startswith(b'<svg xmlns="http://www.w3.org/2000/svg"')
    icon = http.get(f"{brex.base_url}/favicon.ico", timeout=5)
    assert icon.status_code == 200
    assert icon.headers["Content-Type"] == "image/svg+xml"
    assert icon.content == _icon_of(pages[0].text)
    assert http.post(f"{brex.base_url}/favicon.ico", timeout=5).status_code == 405
    assert brex.errors == []


def test_unknown_client_and_redirect_mismatch_show_error_pages(
    brex: FakeBrex, http: requests.Session
) -> None:
    for url in (
        authorize_url(brex, client_id="someone-else"),
        authorize_url(brex, redirect_uri="http://app.example.com/other"),
        authorize_url(brex, redirect_uri=REDIRECT_URI + "/"),
    ):
        response = http.get(url, allow_redirects=False, timeout=5)
        assert response.status_code == 400
        assert "Location" not in response.headers
        assert "text/html" in response.headers["Content-Type"]
        assert 'id="consent-form"' not in response.text
        with pytest.raises(AssertionError, match="HTTP 400"):
            brex.consent(url)
    page = http.get(authorize_url(brex, redirect_uri="http://evil.example.com/cb"), timeout=5)
    assert "redirect_uri" in page.text


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"state": "short"}, "invalid_request"),
        ({"state": None}, "invalid_request"),
        ({"scope": "users.readonly"}, "invalid_scope"),
        ({"scope": "openid made.up.scope"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"code_challenge": "x" * 43, "code_challenge_method": "plain"}, "invalid_request"),
    ],
)
def test_authorize_errors_redirect_back(
    brex: FakeBrex, overrides: dict[str, str | None], error: str
) -> None:
    location = brex.consent(authorize_url(brex, **overrides))
    assert location.startswith(REDIRECT_URI)
    params = query_of(location)
    assert params["error"] == error
    assert "code" not in params
    if overrides.get("state", STATE):
        assert params["state"] == overrides.get("state", STATE)


def test_any_redirect_uri_when_none_configured(http: requests.Session) -> None:
    with FakeBrex() as fake:
        target = "http://localhost:9999/cb?x=1"
        location = fake.consent(authorize_url(fake, redirect_uri=target))
        assert location.startswith("http://localhost:9999/cb?x=1&code=")
        response = token_request(
            http,
            fake,
            grant_type="authorization_code",
            code=query_of(location)["code"],
            redirect_uri=target,
        )
        assert response.status_code == 200


# ------------------------------------------------------------------------- authorization code


def test_pkce_success(brex: FakeBrex, http: requests.Session) -> None:
    verifier, challenge = pkce_pair()
    url = authorize_url(brex, code_challenge=challenge, code_challenge_method="S256")
    location = brex.consent(url)
    assert brex.authorize_requests[-1]["code_challenge"] == challenge
    response = exchange(http, brex, location, code_verifier=verifier)
    assert response.status_code == 200
    assert response.json()["access_token"]


@pytest.mark.parametrize("verifier", [None, "w" * 43, "short"])
def test_pkce_failure(brex: FakeBrex, http: requests.Session, verifier: str | None) -> None:
    _, challenge = pkce_pair()
    url = authorize_url(brex, code_challenge=challenge, code_challenge_method="S256")
    extra = {"code_verifier": verifier} if verifier else {}
    response = exchange(http, brex, brex.consent(url), **extra)
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_grant",
        "error_description": "PKCE verification failed.",
    }


def test_code_is_single_use_and_replay_revokes_tokens(
    brex: FakeBrex, http: requests.Session
) -> None:
    location = brex.consent(authorize_url(brex))
    first = exchange(http, brex, location)
    assert first.status_code == 200
    second = exchange(http, brex, location)
    assert second.status_code == 400
    assert second.json() == {
        "error": "invalid_grant",
        "error_description": "The authorization code is invalid or has expired.",
    }
    assert not brex.is_access_token_active(first.json()["access_token"])
    assert not brex.is_refresh_token_active(first.json()["refresh_token"])
    assert brex.stats["token_authorization_code"] == 2


def test_code_expires_and_redirect_uri_must_match(http: requests.Session) -> None:
    with FakeBrex(authorization_code_ttl=0) as fake:
        response = exchange(http, fake, fake.consent(authorize_url(fake)))
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
    with FakeBrex() as fake:
        code = query_of(fake.consent(authorize_url(fake)))["code"]
        response = token_request(
            http,
            fake,
            grant_type="authorization_code",
            code=code,
            redirect_uri="http://app.example.com/elsewhere",
        )
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
        assert "redirect_uri" in response.json()["error_description"]


def test_client_authentication(brex: FakeBrex, http: requests.Session) -> None:
    location = brex.consent(authorize_url(brex))
    code = query_of(location)["code"]
    bad = http.post(
        f"{brex.issuer}/v1/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": brex.client_id,
            "client_secret": "wrong",
        },
        timeout=5,
    )
    assert bad.status_code == 401
    assert bad.json()["error"] == "invalid_client"
    missing = http.post(
        f"{brex.issuer}/v1/token", data={"grant_type": "client_credentials"}, timeout=5
    )
    assert missing.status_code == 401
    as_json = http.post(
        f"{brex.issuer}/v1/token",
        json={"grant_type": "authorization_code", "code": code},
        auth=(brex.client_id, brex.client_secret),
        timeout=5,
    )
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"
    basic = token_request(
        http,
        brex,
        auth="basic",
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT_URI,
    )
    assert basic.status_code == 200, basic.text
    assert basic.headers["Cache-Control"] == "no-store"
    unsupported = token_request(http, brex, grant_type="password")
    assert unsupported.status_code == 400
    assert unsupported.json()["error"] == "unsupported_grant_type"


def test_include_expires_in_false(http: requests.Session) -> None:
    with FakeBrex(include_expires_in=False, access_token_ttl=120) as fake:
        tokens = login(http, fake)
        assert "expires_in" not in tokens
        assert tokens["access_token"] and tokens["refresh_token"]
        assert "expires_in" not in refresh(http, fake, tokens["refresh_token"]).json()
        assert fake.issue_tokens()["expires_in"] == 120


def test_no_refresh_token_without_offline_access(brex: FakeBrex, http: requests.Session) -> None:
    location = brex.consent(authorize_url(brex, scope="openid users.readonly"))
    tokens = exchange(http, brex, location).json()
    assert tokens["scope"] == "openid users.readonly"
    assert "refresh_token" not in tokens
    assert "id_token" in tokens


# ------------------------------------------------------------------------- refresh


def test_rotation_with_zero_grace_detects_reuse(http: requests.Session) -> None:
    with FakeBrex(refresh_grace_period=0) as fake:
        tokens = login(http, fake)
        old = tokens["refresh_token"]
        rotated = refresh(http, fake, old)
        assert rotated.status_code == 200
        new = rotated.json()
        assert new["refresh_token"] != old
        assert new["access_token"] != tokens["access_token"]
        assert new["scope"] == ALL_SCOPES
        claims = verify_id_token(fake, new["id_token"])
        assert "nonce" not in claims and claims["sub"] == fake.default_user["id"]
        assert not fake.is_refresh_token_active(old)

        reused = refresh(http, fake, old)
        assert reused.status_code == 400
        assert reused.json() == {
            "error": "invalid_grant",
            "error_description": "The refresh token is invalid or expired.",
        }
        assert fake.stats["refresh_token_reuse"] == 1
        assert fake.stats["refresh_token_reuse_rejected"] == 1
        assert not fake.is_refresh_token_active(new["refresh_token"])
        assert refresh(http, fake, new["refresh_token"]).status_code == 400
        assert api(http, fake, "/v2/users/me", new["access_token"]).json() == UNAUTHORIZED
        assert fake.stats["token_refresh_token"] == 3


def test_rotation_within_grace_accepts_old_token(brex: FakeBrex, http: requests.Session) -> None:
    tokens = login(http, brex)
    old = tokens["refresh_token"]
    first = refresh(http, brex, old).json()
    again = refresh(http, brex, old)
    assert again.status_code == 200
    assert again.json()["refresh_token"] not in (old, first["refresh_token"])
    assert brex.stats["refresh_token_reuse"] == 1
    assert brex.stats["refresh_token_reuse_rejected"] == 0
    assert brex.is_refresh_token_active(old)
    assert brex.is_refresh_token_active(first["refresh_token"])
    assert api(http, brex, "/v2/users/me", first["access_token"]).status_code == 200
    brex.advance_time(31)
    assert not brex.is_refresh_token_active(old)
    assert refresh(http, brex, old).status_code == 400
    assert brex.stats["refresh_token_reuse_rejected"] == 1
    assert not brex.is_refresh_token_active(first["refresh_token"])


def test_rotation_keeps_the_original_expiry(http: requests.Session) -> None:
    with FakeBrex(refresh_token_lifetime=100, access_token_ttl=1000) as fake:
        tokens = login(http, fake)
        fake.advance_time(60)
        new = refresh(http, fake, tokens["refresh_token"]).json()["refresh_token"]
        fake.advance_time(50)
        assert not fake.is_refresh_token_active(new)
        response = refresh(http, fake, new)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"


def test_without_rotation_refresh_token_is_kept(http: requests.Session) -> None:
    with FakeBrex(rotate_refresh_tokens=False) as fake:
        tokens = login(http, fake)
        for _ in range(2):
            response = refresh(http, fake, tokens["refresh_token"])
            assert response.status_code == 200
            assert "refresh_token" not in response.json()
            assert response.json()["access_token"] != tokens["access_token"]
        assert fake.is_refresh_token_active(tokens["refresh_token"])
        assert fake.stats["refresh_token_reuse"] == 0


def test_refresh_scope_narrowing(brex: FakeBrex, http: requests.Session) -> None:
    tokens = login(http, brex)
    narrowed = refresh(http, brex, tokens["refresh_token"], scope="openid users.readonly")
    assert narrowed.status_code == 200
    assert narrowed.json()["scope"] == "openid users.readonly"
    assert api(http, brex, "/v2/company", narrowed.json()["access_token"]).status_code == 403
    widened = refresh(http, brex, narrowed.json()["refresh_token"], scope="openid cards")
    assert widened.status_code == 400
    assert widened.json()["error"] == "invalid_scope"


def test_expired_and_unknown_refresh_tokens(brex: FakeBrex, http: requests.Session) -> None:
    tokens = login(http, brex)
    assert refresh(http, brex, "not-a-token").json()["error"] == "invalid_grant"
    brex.expire_refresh_token(tokens["refresh_token"])
    assert not brex.is_refresh_token_active(tokens["refresh_token"])
    response = refresh(http, brex, tokens["refresh_token"])
    assert response.status_code == 400
    assert response.json()["error_description"] == "The refresh token is invalid or expired."
    with pytest.raises(KeyError):
        brex.expire_refresh_token("never-issued")


def test_revoke_all_kills_grants(brex: FakeBrex, http: requests.Session) -> None:
    tokens = login(http, brex)
    brex.revoke_all()
    assert api(http, brex, "/v2/users/me", tokens["access_token"]).status_code == 401
    assert refresh(http, brex, tokens["refresh_token"]).json()["error"] == "invalid_grant"


# ------------------------------------------------------------------------- client credentials


def test_client_credentials_and_referrals(brex: FakeBrex, http: requests.Session) -> None:
    missing = token_request(http, brex, grant_type="client_credentials")
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_scope"
    refused = token_request(http, brex, grant_type="client_credentials", scope="openid")
    assert refused.json()["error"] == "invalid_scope"
    response = token_request(http, brex, grant_type="client_credentials", scope=REFERRALS_SCOPE)
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == REFERRALS_SCOPE
    assert "refresh_token" not in body and "id_token" not in body
    assert brex.stats["token_client_credentials"] == 3

    url = brex.api_base_url + "/v1/referrals"
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    payload = {"referral_code": "PARTNER", "applicant": {"email": "founder@example.com"}}
    no_key = http.post(url, json=payload, headers=auth, timeout=5)
    assert no_key.status_code == 400 and no_key.json()["type"] == "BAD_REQUEST"
    headers = {**auth, "Idempotency-Key": "key-1"}
    created = http.post(url, json=payload, headers=headers, timeout=5).json()
    assert created["id"] and created["referral_signup_url"]
    assert created["applicant"] == {"email": "founder@example.com"}
    same = http.post(url, json=payload, headers=headers, timeout=5).json()
    assert same == created
    other = http.post(url, json=payload, headers={**auth, "Idempotency-Key": "key-2"}, timeout=5)
    assert other.json()["id"] != created["id"]
    assert brex.idempotency_keys == {"key-1": created["id"], "key-2": other.json()["id"]}
    fetched = http.get(f"{url}/{created['id']}", headers=auth, timeout=5)
    assert fetched.json() == created
    assert http.get(f"{url}/nope", headers=auth, timeout=5).status_code == 404
    logged = [r for r in brex.requests if r["path"] == "/v1/referrals"]
    assert [r["headers"].get("idempotency-key") for r in logged] == [
        None,
        "key-1",
        "key-1",
        "key-2",
    ]

    user_token = brex.issue_tokens()["access_token"]
    forbidden = http.post(
        url, json=payload, headers={"Authorization": f"Bearer {user_token}", "Idempotency-Key": "k"}
    )
    assert forbidden.status_code == 403


# ------------------------------------------------------------------------- revocation


def test_revoke_refresh_token_revokes_chain(brex: FakeBrex, http: requests.Session) -> None:
    tokens = login(http, brex)
    rotated = refresh(http, brex, tokens["refresh_token"]).json()
    response = http.post(
        f"{brex.issuer}/v1/revoke",
        data={
            "token": rotated["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": brex.client_id,
            "client_secret": brex.client_secret,
        },
        timeout=5,
    )
    assert response.status_code == 200 and response.content == b""
    for token in (tokens["refresh_token"], rotated["refresh_token"]):
        assert not brex.is_refresh_token_active(token)
    for token in (tokens["access_token"], rotated["access_token"]):
        assert not brex.is_access_token_active(token)
        assert api(http, brex, "/v2/users/me", token).status_code == 401
    assert brex.stats["revocations"] == 1


def test_revoke_access_token_unknown_token_and_bad_client(
    brex: FakeBrex, http: requests.Session
) -> None:
    tokens = login(http, brex)
    url = f"{brex.issuer}/v1/revoke"
    creds = (brex.client_id, brex.client_secret)
    assert http.post(url, data={"token": tokens["access_token"]}, auth=creds).status_code == 200
    assert not brex.is_access_token_active(tokens["access_token"])
    assert brex.is_refresh_token_active(tokens["refresh_token"])
    assert http.post(url, data={"token": "unknown"}, auth=creds).status_code == 200
    bad = http.post(url, data={"token": tokens["refresh_token"]}, auth=(brex.client_id, "x"))
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
    assert brex.is_refresh_token_active(tokens["refresh_token"])
    assert brex.stats["revocations"] == 2


# ------------------------------------------------------------------------- API


def test_api_authentication_errors(brex: FakeBrex, http: requests.Session) -> None:
    tokens = brex.issue_tokens()
    assert api(http, brex, "/v2/users/me", tokens["access_token"]).status_code == 200
    for token in (None, "garbage"):
        response = api(http, brex, "/v2/users/me", token)
        assert response.status_code == 401
        assert response.json() == UNAUTHORIZED
    brex.expire_access_tokens()
    assert not brex.is_access_token_active(tokens["access_token"])
    assert api(http, brex, "/v2/company", tokens["access_token"]).json() == UNAUTHORIZED
    assert brex.is_refresh_token_active(tokens["refresh_token"])


def test_api_company_and_scopes(brex: FakeBrex, http: requests.Session) -> None:
    token = brex.issue_tokens(scopes=["openid", "companies.readonly"])["access_token"]
    company = api(http, brex, "/v2/company", token).json()
    assert company == brex.company
    assert company["id"].startswith("cuacc_")
    assert {"legal_name", "mailing_address", "accountType"} <= set(company)
    forbidden = api(http, brex, "/v2/users/me", token)
    assert forbidden.status_code == 403
    assert forbidden.json()["type"] == "FORBIDDEN"
    assert forbidden.json()["code"]
    assert "users" in forbidden.json()["message"]


def test_users_me_and_issue_tokens_for_a_user(brex: FakeBrex, http: requests.Session) -> None:
    user = brex.users[3]
    tokens = brex.issue_tokens(user=user["email"])
    assert set(tokens) >= {"access_token", "refresh_token", "expires_in", "scope", "id_token"}
    assert verify_id_token(brex, tokens["id_token"])["sub"] == user["id"]
    me = api(http, brex, "/v2/users/me", tokens["access_token"]).json()
    assert me == user
    assert me["id"].startswith("cuuser_") and me["status"] == "ACTIVE"
    assert brex.default_user is brex.users[0]
    with pytest.raises(LookupError):
        brex.issue_tokens(user="nobody")


def test_users_pagination(brex: FakeBrex, http: requests.Session) -> None:
    token = brex.issue_tokens()["access_token"]
    seen: list[str] = []
    cursor: str | None = ""
    pages = 0
    while cursor is not None:
        response = http.get(
            f"{brex.api_base_url}/v2/users",
            params={"limit": 2, "cursor": cursor},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        ).json()
        assert len(response["items"]) <= 2
        seen += [user["id"] for user in response["items"]]
        cursor = response["next_cursor"]
        pages += 1
    assert pages == 3
    assert seen == [user["id"] for user in brex.users]
    assert len(brex.users) == 5
    bad = http.get(
        f"{brex.api_base_url}/v2/users",
        params={"cursor": "%%%"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert bad.status_code == 400


def test_custom_users_and_company(http: requests.Session) -> None:
    users = [{"id": "cuuser_owner", "email": "owner@acme.test", "first_name": "O"}, {}]
    with FakeBrex(users=users, company={"legal_name": "Acme Test LLC"}) as fake:
        assert fake.default_user["id"] == "cuuser_owner"
        assert fake.default_user["last_name"] == "User"
        assert fake.users[1]["id"].startswith("cuuser_")
        assert fake.company["legal_name"] == "Acme Test LLC"
        assert fake.company["id"].startswith("cuacc_")
        tokens = login(http, fake)
        assert verify_id_token(fake, tokens["id_token"])["email"] == "owner@acme.test"


def test_userinfo(brex: FakeBrex, http: requests.Session) -> None:
    tokens = brex.issue_tokens()
    response = http.get(
        f"{brex.issuer}/v1/userinfo",
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=5,
    )
    user = brex.default_user
    assert response.json()["sub"] == user["id"]
    assert response.json()["email"] == user["email"]
    assert response.json()["given_name"] == user["first_name"]
    assert response.json()["family_name"] == user["last_name"]
    assert response.json()["name"] == f"{user['first_name']} {user['last_name']}"
    assert http.get(f"{brex.issuer}/v1/userinfo", timeout=5).status_code == 401


def test_unknown_paths_are_json_404(brex: FakeBrex, http: requests.Session) -> None:
    for url in (brex.base_url + "/v9/nothing", brex.issuer + "/v1/nothing"):
        response = http.get(url, timeout=5)
        assert response.status_code == 404
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()


# ------------------------------------------------------------------------- failure controls


def test_fail_next_then_recover(brex: FakeBrex, http: requests.Session) -> None:
    tokens = brex.issue_tokens()
    brex.fail_next("/v1/token", status=503, times=2)
    for _ in range(2):
        failed = refresh(http, brex, tokens["refresh_token"])
        assert failed.status_code == 503
        assert failed.json()["error"] == "temporarily_unavailable"
    assert brex.stats["token_refresh_token"] == 0
    assert brex.is_refresh_token_active(tokens["refresh_token"])
    assert refresh(http, brex, tokens["refresh_token"]).status_code == 200

    brex.fail_next("/v2/users/me", status=429)
    limited = api(http, brex, "/v2/users/me", tokens["access_token"])
    assert limited.status_code == 429
    assert limited.json()["type"] == "TOO_MANY_REQUESTS"
    assert api(http, brex, "/v2/users/me", tokens["access_token"]).status_code == 200

    brex.fail_next("/v2/company", status=500, body="<html>oops</html>")
    raw = api(http, brex, "/v2/company", tokens["access_token"])
    assert raw.status_code == 500 and raw.text == "<html>oops</html>"
    brex.fail_next("/v2/company", status=502, body={"custom": True})
    assert api(http, brex, "/v2/company", tokens["access_token"]).json() == {"custom": True}
    statuses = [r["status"] for r in brex.requests if r["path"].endswith("/v1/token")]
    assert statuses == [503, 503, 200]


def test_fail_next_delay_and_latency(brex: FakeBrex, http: requests.Session) -> None:
    brex.fail_next("/v1/keys", status=504, delay=0.3)
    started = time.monotonic()
    assert http.get(f"{brex.issuer}/v1/keys", timeout=5).status_code == 504
    assert time.monotonic() - started >= 0.3

    brex.set_latency(0.3, path="/v1/keys")
    started = time.monotonic()
    assert http.get(f"{brex.issuer}/v1/keys", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    http.get(f"{brex.issuer}/.well-known/openid-configuration", timeout=5)
    assert time.monotonic() - started < 0.25

    with pytest.raises(requests.Timeout):
        http.get(f"{brex.issuer}/v1/keys", timeout=0.1)
    brex.set_latency(0, path="/v1/keys")
    brex.set_latency(0.2)
    started = time.monotonic()
    http.get(f"{brex.issuer}/.well-known/openid-configuration", timeout=5)
    assert time.monotonic() - started >= 0.2


def test_tamper_next_spoils_the_answer_after_rotating(
    brex: FakeBrex, http: requests.Session
) -> None:
    tokens = brex.issue_tokens()
    brex.tamper_next("/v1/token", access_token=None, token_type=DROP, expires_in=10**12)
    spoilt = refresh(http, brex, tokens["refresh_token"])
    assert spoilt.status_code == 200
    body = spoilt.json()
    assert body["access_token"] is None
    assert "token_type" not in body
    assert body["expires_in"] == 10**12
    # The request had its effect: the refresh token in the spoilt answer is the rotated one.
    assert brex.stats["token_refresh_token"] == 1
    assert brex.is_refresh_token_active(body["refresh_token"])
    assert body["refresh_token"] != tokens["refresh_token"]
    # One answer only; the next one is whole again.
    assert isinstance(refresh(http, brex, body["refresh_token"]).json()["access_token"], str)

    brex.tamper_next("/v1/token", body=[])
    assert refresh(http, brex, body["refresh_token"]).json() == []
    assert brex.stats["token_refresh_token"] == 3


def test_every_named_malformed_token_answer_is_sent(
    brex: FakeBrex, http: requests.Session
) -> None:
    refresh_token = brex.issue_tokens()["refresh_token"]
    for name, spoil in MALFORMED_TOKEN_ANSWERS.items():
        brex.tamper_next("/v1/token", **spoil)
        body = refresh(http, brex, refresh_token).json()
        if "body" in spoil:
            assert body == spoil["body"], name
        else:
            for key, value in spoil.items():
                assert (key not in body) if value is DROP else body[key] == value, name
        refresh_token = brex.issue_tokens()["refresh_token"]


def test_hold_next_keeps_the_answer_until_released(
    brex: FakeBrex, http: requests.Session
) -> None:
    tokens = brex.issue_tokens()
    answers: list[requests.Response] = []
    with brex.hold_next("/v1/token") as held:
        caller = threading.Thread(
            target=lambda: answers.append(refresh(http, brex, tokens["refresh_token"]))
        )
        caller.start()
        assert held.wait(timeout=5)
        # Processed already (the refresh token rotated), but not answered yet.
        assert brex.stats["token_refresh_token"] == 1
        caller.join(timeout=0.3)
        assert caller.is_alive() and answers == []
        # Other requests, the token endpoint included, are not held.
        assert refresh(http, brex, held.answers[0]["refresh_token"]).status_code == 200
    caller.join(timeout=5)
    assert answers[0].status_code == 200
    assert answers[0].json() == held.answers[0]
    assert not held.wait(timeout=0.1)


def test_narrow_grant_answers_later_refreshes_with_fewer_scopes(
    brex: FakeBrex, http: requests.Session
) -> None:
    tokens = brex.issue_tokens()
    brex.narrow_grant(tokens["refresh_token"], ["users.readonly", "cards.readonly"])
    body = refresh(http, brex, tokens["refresh_token"]).json()
    assert body["scope"].split() == ["openid", "offline_access", "users.readonly"]
    assert api(http, brex, "/v2/company", body["access_token"]).status_code == 403
    assert api(http, brex, "/v2/users/me", body["access_token"]).status_code == 200
    with pytest.raises(KeyError):
        brex.narrow_grant("never-issued", [])


def test_request_log(brex: FakeBrex, http: requests.Session) -> None:
    login(http, brex)
    token_calls = [r for r in brex.requests if r["path"].endswith("/v1/token")]
    assert len(token_calls) == 1
    call = token_calls[0]
    assert call["method"] == "POST"
    assert call["form"]["grant_type"] == "authorization_code"
    assert call["form"]["client_secret"] == brex.client_secret
    assert call["headers"]["content-type"] == "application/x-www-form-urlencoded"
    authorize = [r for r in brex.requests if r["path"].endswith("/v1/authorize")]
    assert [r["method"] for r in authorize] == ["GET", "POST"]
    assert authorize[0]["query"]["state"] == STATE
    assert authorize[1]["form"]["decision"] == "allow"


# ------------------------------------------------------------------------- id_token faults


def test_every_id_token_fault_is_detected(brex: FakeBrex, http: requests.Session) -> None:
    expected: dict[str, type[Exception]] = {
        "bad_signature": jwt.InvalidSignatureError,
        "alg_none": jwt.InvalidAlgorithmError,
        "alg_hs256": jwt.InvalidAlgorithmError,
        "wrong_aud": jwt.InvalidAudienceError,
        "wrong_iss": jwt.InvalidIssuerError,
        "expired": jwt.ExpiredSignatureError,
        "future_iat": jwt.ImmatureSignatureError,
        "unknown_kid": jwt.PyJWKClientError,
        "missing_kid": jwt.PyJWKClientError,
    }
    for fault, error in expected.items():
        brex.id_token_fault = fault
        id_token = login(http, brex)["id_token"]
        with pytest.raises(error):
            verify_id_token(brex, id_token)
    brex.id_token_fault = "unknown_kid"
    header = jwt.get_unverified_header(login(http, brex)["id_token"])
    assert header["kid"] not in [k["kid"] for k in brex.jwks()["keys"]]

    brex.id_token_fault = "alg_none"
    id_token = login(http, brex)["id_token"]
    assert jwt.get_unverified_header(id_token)["alg"] == "none"
    assert id_token.endswith(".")

    # HS256 "signed" with the published public key as the secret: the key-confusion attack.
    brex.id_token_fault = "alg_hs256"
    id_token = login(http, brex)["id_token"]
    header = jwt.get_unverified_header(id_token)
    assert header["alg"] == "HS256" and header["kid"] == brex.signing_kid
    public_pem = jwt.PyJWK(brex.jwks()["keys"][0]).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input, _, signature = id_token.rpartition(".")
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == signature

    brex.id_token_fault = "missing_kid"
    id_token = login(http, brex)["id_token"]
    assert "kid" not in jwt.get_unverified_header(id_token)

    # The faults below keep a valid signature: only the claims are wrong.
    def claims_with(fault: str) -> tuple[dict[str, Any], dict[str, Any]]:
        brex.id_token_fault = fault
        tokens = login(http, brex)
        claims = verify_id_token(
            brex, tokens["id_token"], options={"verify_aud": False, "verify_iat": False}
        )
        return claims, tokens

    claims, _ = claims_with("extra_aud")
    assert claims["aud"] == [brex.client_id, UNTRUSTED_AUDIENCE]
    assert claims["azp"] == brex.client_id
    claims, _ = claims_with("extra_aud_no_azp")
    assert claims["aud"] == [brex.client_id, UNTRUSTED_AUDIENCE] and "azp" not in claims
    claims, _ = claims_with("wrong_azp")
    assert claims["aud"] == brex.client_id and claims["azp"] == UNTRUSTED_AUDIENCE
    claims, _ = claims_with("wrong_sub")
    assert claims["sub"] != brex.default_user["id"]
    assert claims["sub"] in [user["id"] for user in brex.users]
    claims, _ = claims_with("stale_iat")
    assert time.time() - claims["iat"] > 6 * 24 * 3600
    assert claims["exp"] > time.time() + 3000
    claims, tokens = claims_with("bad_at_hash")
    digest = hashlib.sha256(tokens["access_token"].encode()).digest()[:16]
    assert claims["at_hash"] != base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    brex.id_token_fault = "wrong_nonce"
    claims = verify_id_token(brex, login(http, brex)["id_token"])
    assert claims["nonce"] != "nonce-abc"
    brex.id_token_fault = "missing_nonce"
    assert "nonce" not in verify_id_token(brex, login(http, brex)["id_token"])

    covered = {*expected, "extra_aud", "extra_aud_no_azp", "wrong_azp", "wrong_sub",
               "stale_iat", "bad_at_hash", "wrong_nonce", "missing_nonce"}
    assert covered == set(ID_TOKEN_FAULTS)

    brex.id_token_fault = None
    assert verify_id_token(brex, login(http, brex)["id_token"])["nonce"] == "nonce-abc"
    with pytest.raises(ValueError):
        brex.id_token_fault = "sneaky"


def test_refresh_id_token_fault_spares_sign_ins(brex: FakeBrex, http: requests.Session) -> None:
    brex.refresh_id_token_fault = "wrong_sub"
    tokens = login(http, brex)
    assert verify_id_token(brex, tokens["id_token"])["sub"] == brex.default_user["id"]
    refreshed = refresh(http, brex, tokens["refresh_token"]).json()
    assert verify_id_token(brex, refreshed["id_token"])["sub"] != brex.default_user["id"]
    # It wins over id_token_fault on a refresh, and leaves it alone at sign-in.
    brex.id_token_fault = "wrong_iss"
    with pytest.raises(jwt.InvalidIssuerError):
        verify_id_token(brex, login(http, brex)["id_token"])
    refreshed = refresh(http, brex, refreshed["refresh_token"]).json()
    claims = verify_id_token(brex, refreshed["id_token"])
    assert claims["sub"] != brex.default_user["id"]
    brex.refresh_id_token_fault = None
    with pytest.raises(jwt.InvalidIssuerError):
        verify_id_token(brex, refresh(http, brex, refreshed["refresh_token"]).json()["id_token"])
    with pytest.raises(ValueError):
        brex.refresh_id_token_fault = "sneaky"


def test_authorization_responses_carry_iss(brex: FakeBrex, http: requests.Session) -> None:
    doc = http.get(f"{brex.issuer}/.well-known/openid-configuration", timeout=5).json()
    assert doc["authorization_response_iss_parameter_supported"] is True
    # Codes, denials and errors alike (RFC 9207 section 2).
    for location in (
        brex.consent(authorize_url(brex)),
        brex.consent(authorize_url(brex), deny=True),
        brex.consent(authorize_url(brex, response_type="token")),
    ):
        assert query_of(location)["iss"] == brex.issuer

    brex.authorization_response_fault = "wrong_iss"
    assert query_of(brex.consent(authorize_url(brex)))["iss"] == FOREIGN_ISSUER
    assert query_of(brex.consent(authorize_url(brex), deny=True))["iss"] == FOREIGN_ISSUER
    brex.authorization_response_fault = "missing_iss"
    params = query_of(brex.consent(authorize_url(brex)))
    assert "code" in params and "iss" not in params
    assert "iss" not in query_of(brex.consent(authorize_url(brex), deny=True))
    brex.authorization_response_fault = None
    assert query_of(brex.consent(authorize_url(brex)))["iss"] == brex.issuer
    with pytest.raises(ValueError):
        brex.authorization_response_fault = "sneaky"

    with FakeBrex(authorization_response_iss_parameter_supported=False) as quiet:
        doc = http.get(f"{quiet.issuer}/.well-known/openid-configuration", timeout=5).json()
        assert "authorization_response_iss_parameter_supported" not in doc


def test_rotate_signing_key(brex: FakeBrex, http: requests.Session) -> None:
    old_token = login(http, brex)["id_token"]
    old_kid = brex.signing_kid
    brex.rotate_signing_key(keep_old_in_jwks=True)
    assert brex.signing_kid != old_kid
    kids = [k["kid"] for k in http.get(f"{brex.issuer}/v1/keys", timeout=5).json()["keys"]]
    assert kids == [brex.signing_kid, old_kid]
    new_token = login(http, brex)["id_token"]
    assert jwt.get_unverified_header(new_token)["kid"] == brex.signing_kid
    verify_id_token(brex, old_token)
    verify_id_token(brex, new_token)

    brex.rotate_signing_key()
    kids = [k["kid"] for k in http.get(f"{brex.issuer}/v1/keys", timeout=5).json()["keys"]]
    assert kids == [brex.signing_kid]
    with pytest.raises(jwt.PyJWKClientError):
        verify_id_token(brex, new_token)
    verify_id_token(brex, login(http, brex)["id_token"])


# ------------------------------------------------------------------------- misc


def test_django_settings(brex: FakeBrex) -> None:
    settings = brex.django_settings(TIMEOUT=3)
    assert settings == {
        "CLIENT_ID": "test-client-id",
        "CLIENT_SECRET": "test-client-secret",
        "ENVIRONMENT": "staging",
        "ISSUER": brex.issuer,
        "API_BASE_URL": brex.base_url,
        "SCOPES": ["openid", "offline_access", "users.readonly", "companies.readonly"],
        "TIMEOUT": 3,
    }


def test_concurrent_refreshes_are_consistent(brex: FakeBrex, http: requests.Session) -> None:
    tokens = brex.issue_tokens()
    results: list[int] = []

    def worker() -> None:
        with requests.Session() as session:
            session.trust_env = False
            results.append(refresh(session, brex, tokens["refresh_token"]).status_code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8
    assert brex.stats["token_refresh_token"] == 8
    assert brex.stats["refresh_token_reuse"] == 7


def test_stop_releases_the_port(http: requests.Session) -> None:
    fake = FakeBrex().start()
    url = f"{fake.issuer}/v1/keys"
    assert http.get(url, timeout=5).status_code == 200
    fake.stop()
    assert not fake.running
    with pytest.raises(requests.ConnectionError):
        http.get(url, timeout=2)
    fake.stop()
    with pytest.raises(RuntimeError):
        _ = FakeBrex().base_url


def test_module_does_not_import_django() -> None:
    code = (
        "import sys; from django_brex_oauth.testing import FakeBrex; "
        "FakeBrex().start().stop(); print('django' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert output.stdout.strip() == "False"


def test_every_command_line_option_says_what_it_does() -> None:
    from django_brex_oauth.testing.fake_brex.cli import _parser

    options = [action for action in _parser()._actions if action.option_strings]
    assert len(options) > 10
    assert [action.option_strings for action in options if not action.help] == []


@pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM")
def test_command_line(http: requests.Session) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "django_brex_oauth.testing.fake_brex",
            "--port",
            "0",
            "--client-id",
            "cli-id",
            "--client-secret",
            "cli-secret",
            "--access-token-ttl",
            "60",
            "--client-name",
            "CLI App",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("issuer: http://127.0.0.1:")
        issuer = line.split(": ", 1)[1].strip()
        doc = http.get(f"{issuer}/.well-known/openid-configuration", timeout=5).json()
        assert doc["issuer"] == issuer
        response = http.post(
            doc["token_endpoint"],
            data={"grant_type": "client_credentials", "scope": "users.readonly"},
            auth=("cli-id", "cli-secret"),
            timeout=5,
        )
        assert response.json()["expires_in"] == 60
        consent = http.get(
            f"{doc['authorization_endpoint']}?client_id=cli-id&redirect_uri="
            "http%3A%2F%2F127.0.0.1%2Fcb&response_type=code&scope=openid&state=state-0123456789",
            timeout=5,
        )
        assert "<h1>Authorize CLI App</h1>" in consent.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stderr is not None
        assert process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
