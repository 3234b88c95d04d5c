"""Relying-party conformance: the app against a fake Brex that misbehaves.

Each test drives the app over real HTTP against :class:`~django_brex_oauth.testing.FakeBrex`
made to break one rule of OpenID Connect Core 3.1.3.7 / 12.2, RFC 9207 or the app's own
security rules, and asserts the refusal: a page a person understands, nothing stored, and
whatever Brex issued revoked. ``docs/security.rst`` maps each threat to these tests.
"""

from __future__ import annotations

import base64
import logging
import pickle
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import jwt
import pytest
from django.core.checks import ERROR, WARNING
from django.core.management import CommandError, call_command
from django.core.signals import got_request_exception
from django.db.models.sql.compiler import SQLInsertCompiler, SQLUpdateCompiler
from django.db.models.sql.subqueries import InsertQuery
from django.urls import reverse
from django.utils import timezone
from django.views.debug import ExceptionReporter
from requests.adapters import HTTPAdapter

from django_brex_oauth import checks, discovery, oauth, signals, tasks, webhooks
from django_brex_oauth.checks import check_settings
from django_brex_oauth.client import BrexClient, OnboardingClient
from django_brex_oauth.conf import brex_settings as app_settings
from django_brex_oauth.exceptions import BrexOAuthConfigurationError, IdTokenError, TokenError
from django_brex_oauth.fields import RotatingFernet, UndecryptableValue
from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    DetachedRevocation,
    EventKind,
)
from django_brex_oauth.services import client_credentials, refresh
from django_brex_oauth.services.refresh import refresh_connection
from django_brex_oauth.services.revoke import disconnect
from django_brex_oauth.testing import make_connection
from django_brex_oauth.testing.fake_brex import FOREIGN_ISSUER
from tests.factories import SignalRecorder, stored_token

# ---------------------------------------------------------------------------------------
# Authorization response and id_token: RFC 9207 mix-up defence, OIDC Core 3.1.3.7, 12.2
# ---------------------------------------------------------------------------------------

# Each refused sign-in shows the error page, stores nothing, and leaves no grant alive at
# Brex: when Brex issued tokens before the refusal, the app revoked them.

signin = pytest.mark.django_db(transaction=True)

UNVERIFIED = b"Brex sign-in could not be verified"
MIXED_UP = b"did not come from the Brex sign-in this site uses"


def refused_sign_in(response, fake, *, page_text: bytes, tokens_issued: bool) -> None:
    assert response.status_code == 400
    assert page_text in response.content
    assert not BrexConnection.objects.exists()
    assert not BrexToken.objects.exists()
    assert fake.stats["token_authorization_code"] == (1 if tokens_issued else 0)
    assert fake.live_grants() == []


def callback_params(location: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(location).query, keep_blank_values=True))


def refused_id_token(flow, fake, fault: str) -> None:
    fake.id_token_fault = fault
    refused_sign_in(flow.connect(), fake, page_text=UNVERIFIED, tokens_issued=True)


# RFC 9207: the authorization response's iss

@signin
def test_rfc9207_a_compliant_answer_names_the_issuer_and_connects(flow, fake_brex):
    location = fake_brex.consent(flow.start())
    assert callback_params(location)["iss"] == fake_brex.issuer
    assert flow.callback(location).status_code == 302
    assert BrexConnection.objects.get().status == "active"


@signin
def test_rfc9207_an_answer_from_another_issuer_is_refused(flow, fake_brex):
    fake_brex.authorization_response_fault = "wrong_iss"
    refused_sign_in(flow.connect(), fake_brex, page_text=MIXED_UP, tokens_issued=False)


@signin
@pytest.mark.parametrize(
    "iss",
    ["{issuer}/", "{issuer_upper}", "{issuer}/../default", ""],
    ids=["trailing-slash", "other-case", "dot-segments", "empty"],
)
def test_rfc9207_iss_must_equal_the_discovered_issuer_exactly(flow, fake_brex, iss):
    location = fake_brex.consent(flow.start())
    params = callback_params(location)
    params["iss"] = iss.format(issuer=fake_brex.issuer, issuer_upper=fake_brex.issuer.upper())
    response = flow.client.get(urlsplit(location).path, params)
    refused_sign_in(response, fake_brex, page_text=MIXED_UP, tokens_issued=False)


@signin
def test_rfc9207_a_missing_iss_is_refused_when_the_issuer_advertises_it(flow, fake_brex):
    fake_brex.authorization_response_fault = "missing_iss"
    refused_sign_in(flow.connect(), fake_brex, page_text=MIXED_UP, tokens_issued=False)


@signin
def test_rfc9207_a_missing_iss_is_accepted_from_an_issuer_that_does_not_send_it(
    flow, fake_brex
):
    fake_brex.authorization_response_iss_parameter_supported = False
    fake_brex.authorization_response_fault = "missing_iss"
    assert flow.connect().status_code == 302
    assert BrexConnection.objects.get().status == "active"


@signin
def test_rfc9207_an_error_answer_from_another_issuer_is_not_believed(flow, fake_brex):
    # The error may be the other server's: the person is told of the mix-up, not of a denial.
    fake_brex.authorization_response_fault = "wrong_iss"
    location = fake_brex.consent(flow.start(), deny=True)
    assert callback_params(location)["iss"] == FOREIGN_ISSUER
    response = flow.callback(location)
    refused_sign_in(response, fake_brex, page_text=MIXED_UP, tokens_issued=False)
    assert b"declined" not in response.content


# RFC 6749 section 3.1: a parameter sent more than once

@signin
@pytest.mark.parametrize("name", ["state", "code", "iss", "error"])
def test_rfc6749_a_callback_repeating_a_parameter_is_refused(flow, fake_brex, name):
    location = fake_brex.consent(flow.start())
    # A second attempt of the same person, whose values make the repeats.
    other = fake_brex.consent(flow.start())
    params = parse_qsl(urlsplit(location).query, keep_blank_values=True)
    if name == "error":
        params += [("error", "access_denied"), ("error", "server_error")]
    else:
        params.append((name, callback_params(other)[name]))
    response = flow.client.get(urlsplit(location).path + "?" + urlencode(params))

    refused_sign_in(response, fake_brex, page_text=b"named a value more than once",
                    tokens_issued=False)
    # The attempt is used up as by any other refusal: its clean answer connects nothing.
    first = AuthorizationRequest.objects.get(state=callback_params(location)["state"])
    assert first.consumed_at is not None
    refused_sign_in(flow.callback(location), fake_brex, page_text=b"used already",
                    tokens_issued=False)
    second = flow.callback(other)
    if name == "state":
        # Both attempts the callback named are used up.
        refused_sign_in(second, fake_brex, page_text=b"used already", tokens_issued=False)
    else:
        # An attempt the callback did not name is left alone.
        assert second.status_code == 302
        assert BrexConnection.objects.get().status == "active"


# OpenID Connect Core 3.1.3.7: the id_token of a sign-in

@signin
def test_oidc_signature_must_verify_against_the_issuers_key(flow, fake_brex):
    refused_id_token(flow, fake_brex, "bad_signature")


@signin
@pytest.mark.parametrize("fault", ["alg_none", "alg_hs256"])
def test_oidc_alg_none_and_hmac_are_refused(flow, fake_brex, fault):
    # alg_hs256 is "signed" with the published public key as the HMAC secret.
    refused_id_token(flow, fake_brex, fault)


@signin
def test_oidc_iss_must_be_the_issuer(flow, fake_brex):
    refused_id_token(flow, fake_brex, "wrong_iss")


@signin
def test_oidc_aud_must_be_this_client(flow, fake_brex):
    refused_id_token(flow, fake_brex, "wrong_aud")


@signin
@pytest.mark.parametrize("fault", ["extra_aud", "extra_aud_no_azp"])
def test_oidc_aud_with_an_untrusted_second_audience_is_refused(flow, fake_brex, fault):
    refused_id_token(flow, fake_brex, fault)


@signin
def test_oidc_azp_must_be_this_client(flow, fake_brex):
    refused_id_token(flow, fake_brex, "wrong_azp")


@signin
def test_oidc_exp_must_not_have_passed(flow, fake_brex):
    refused_id_token(flow, fake_brex, "expired")


@signin
def test_oidc_iat_in_the_future_is_refused(flow, fake_brex):
    refused_id_token(flow, fake_brex, "future_iat")


@signin
def test_oidc_iat_a_week_old_is_refused_though_exp_is_to_come(flow, fake_brex):
    refused_id_token(flow, fake_brex, "stale_iat")


@signin
def test_oidc_iat_window_is_the_id_token_max_age_setting(flow, fake_brex, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ID_TOKEN_MAX_AGE": 8 * 24 * 3600}
    fake_brex.id_token_fault = "stale_iat"
    assert flow.connect().status_code == 302
    assert BrexConnection.objects.get().status == "active"


@signin
@pytest.mark.parametrize("fault", ["wrong_nonce", "missing_nonce"])
def test_oidc_nonce_must_be_this_sign_ins(flow, fake_brex, fault):
    refused_id_token(flow, fake_brex, fault)


@signin
def test_oidc_at_hash_must_match_the_access_token(flow, fake_brex):
    refused_id_token(flow, fake_brex, "bad_at_hash")


@signin
def test_oidc_unknown_kid_refetches_the_jwks_once_then_is_refused(flow, fake_brex):
    discovery.get_jwks()  # the keys are cached, as after any earlier sign-in
    jwks_before = fake_brex.stats["jwks"]
    refused_id_token(flow, fake_brex, "unknown_kid")
    assert fake_brex.stats["jwks"] - jwks_before == 1


@signin
def test_oidc_a_rotated_key_is_found_by_one_jwks_refetch(flow, fake_brex):
    discovery.get_jwks()
    jwks_before = fake_brex.stats["jwks"]
    fake_brex.rotate_signing_key()
    assert flow.connect().status_code == 302
    assert BrexConnection.objects.get().status == "active"
    assert fake_brex.stats["jwks"] - jwks_before == 1


@signin
def test_oidc_no_kid_is_refused_when_the_jwks_has_several_keys(flow, fake_brex):
    fake_brex.rotate_signing_key(keep_old_in_jwks=True)
    refused_id_token(flow, fake_brex, "missing_kid")


# OpenID Connect Core 12.2: the id_token a refresh returns


@pytest.fixture
def refreshable(brex_settings, fake_brex, user):
    """A connection whose tokens the fake issued, due for a refresh."""
    return make_connection(user, fake=fake_brex, expired=True)


@signin
@pytest.mark.parametrize(
    "fault",
    ["wrong_sub", "wrong_iss", "wrong_aud", "extra_aud", "wrong_azp", "bad_signature",
     "alg_none", "expired", "stale_iat", "bad_at_hash"],
)
def test_oidc_refresh_with_a_bad_id_token_fails_and_keeps_the_old_tokens(
    refreshable, fake_brex, fault
):
    before = stored_token(refreshable)
    fake_brex.refresh_id_token_fault = fault
    with SignalRecorder(refreshed=signals.token_refreshed) as received:
        with pytest.raises(TokenError) as failure:
            refresh.refresh_connection(refreshable)
    assert isinstance(failure.value, IdTokenError)
    assert failure.value.error == "invalid_id_token"
    assert fake_brex.stats["token_refresh_token"] == 1  # Brex answered; the answer was refused

    after = stored_token(refreshable)
    assert (after.access_token, after.refresh_token) == (before.access_token, before.refresh_token)
    assert after.access_token_expires_at == before.access_token_expires_at
    assert after.refresh_claimed_until is None
    assert after.connection.status == "active"
    assert "id_token" in after.connection.last_error
    kinds = list(ConnectionEvent.objects.values_list("kind", flat=True))
    assert kinds == [EventKind.REFRESH_FAILED]
    assert received["refreshed"] == []

    # Brex still takes the kept refresh token (its grace period), so the next refresh works.
    fake_brex.refresh_id_token_fault = None
    assert refresh.refresh_connection(refreshable).outcome == refresh.Outcome.REFRESHED
    assert stored_token(refreshable).access_token != before.access_token


@signin
def test_oidc_refresh_id_token_needs_no_nonce(refreshable, fake_brex, monkeypatch):
    answers = []
    real_refresh = oauth.refresh

    def recording_refresh(refresh_token, **kwargs):
        answers.append(real_refresh(refresh_token, **kwargs))
        return answers[-1]

    monkeypatch.setattr(oauth, "refresh", recording_refresh)
    before = stored_token(refreshable)
    assert refresh.refresh_connection(refreshable).outcome == refresh.Outcome.REFRESHED
    # Brex's refresh answer had an id_token without a nonce, as OpenID Connect Core 12.2
    # advises, and the rotated tokens were stored all the same.
    (answer,) = answers
    assert answer.id_token
    assert "nonce" not in jwt.decode(answer.id_token, options={"verify_signature": False})
    assert stored_token(refreshable).refresh_token == answer.refresh_token != before.refresh_token


# ---------------------------------------------------------------------------------------
# Redirect URI, response headers and secrets in error reports
# ---------------------------------------------------------------------------------------


def _redirect_uri_sent(location: str) -> str:
    return parse_qs(urlsplit(location).query)["redirect_uri"][0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("configured", ["SITE_URL", "REDIRECT_URI"])
def test_a_forged_host_header_never_reaches_the_redirect_uri(
    user_client, brex_settings, settings, configured
):
    settings.ALLOWED_HOSTS = ["*"]
    if configured == "REDIRECT_URI":
        settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SITE_URL": None,
                               "REDIRECT_URI": "https://partner.example/brex/callback/"}
        expected = "https://partner.example/brex/callback/"
    else:
        expected = "https://testserver/brex/callback/"

    response = user_client.get(reverse("brex_oauth:connect"), HTTP_HOST="evil.example")

    assert response.status_code == 302
    assert "evil.example" not in response["Location"]
    assert _redirect_uri_sent(response["Location"]) == expected
    assert AuthorizationRequest.objects.get().redirect_uri == expected


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("debug", [False, True])
def test_with_no_callback_url_configured_connect_refuses_and_names_the_setting(
    user_client, brex_settings, settings, fake_brex, debug
):
    settings.DEBUG = debug
    settings.ALLOWED_HOSTS = ["*"]
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SITE_URL": None, "REDIRECT_URI": None}

    response = user_client.get(reverse("brex_oauth:connect"), HTTP_HOST="evil.example")

    assert response.status_code == 503
    assert "Location" not in response
    body = response.content.decode()
    assert "BREX_OAUTH[&#x27;SITE_URL&#x27;]" in body and "REDIRECT_URI" in body
    assert "evil.example" not in body
    assert not AuthorizationRequest.objects.exists()
    assert fake_brex.stats["authorize"] == 0


@pytest.mark.parametrize(("debug", "level", "check_id"),
                         [(False, ERROR, "brex_oauth.E010"), (True, WARNING, "brex_oauth.W004")])
def test_the_system_check_refuses_a_site_with_no_callback_url(settings, debug, level, check_id):
    settings.DEBUG = debug
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SITE_URL": None, "REDIRECT_URI": None}

    (message,) = [m for m in check_settings() if m.id == check_id]

    assert message.level == level
    assert "SITE_URL" in message.msg and "REDIRECT_URI" in message.msg
    assert "Host header" in message.hint


# The site's own header middleware, absent, and present with looser choices of its own.
SITE_HEADER_MIDDLEWARE = {
    "no security middleware": {},
    "looser site policies": {
        "prepend": "django.middleware.security.SecurityMiddleware",
        "append": "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "SECURE_REFERRER_POLICY": "unsafe-url",
        "X_FRAME_OPTIONS": "SAMEORIGIN",
    },
}


@pytest.fixture(params=sorted(SITE_HEADER_MIDDLEWARE))
def site_middleware(request, settings):
    variant = SITE_HEADER_MIDDLEWARE[request.param]
    middleware = list(settings.MIDDLEWARE)
    if "prepend" in variant:
        middleware.insert(0, variant["prepend"])
    if "append" in variant:
        middleware.append(variant["append"])
    settings.MIDDLEWARE = middleware
    for name in ("SECURE_REFERRER_POLICY", "X_FRAME_OPTIONS"):
        if name in variant:
            setattr(settings, name, variant[name])
    return request.param


@pytest.mark.django_db(transaction=True)
def test_every_answer_of_the_callback_sends_no_referrer(
    site_middleware, flow, fake_brex, client, user
):
    answers = {}
    location = fake_brex.consent(flow.start())
    answers["connected (redirect)"] = flow.callback(location)
    answers["replayed (error page)"] = flow.callback(location)
    answers["declined (error page)"] = flow.connect(deny=True)
    answers["unknown state (error page)"] = flow.callback(
        reverse("brex_oauth:callback") + "?code=x&state=" + "s" * 43
    )
    answers["wrong method"] = flow.client.post(reverse("brex_oauth:callback"))
    flow.client.logout()
    answers["signed out (login redirect)"] = flow.client.get(
        reverse("brex_oauth:callback") + "?code=a-code&state=a-state"
    )

    assert answers["connected (redirect)"].status_code == 302
    assert answers["replayed (error page)"].status_code == 400
    assert answers["declined (error page)"].status_code == 400
    assert answers["signed out (login redirect)"]["Location"].startswith("/login/")
    assert answers["wrong method"].status_code == 405
    for name, response in answers.items():
        assert response["Referrer-Policy"] == "no-referrer", name
        assert "no-store" in response.get("Cache-Control", ""), name


@pytest.mark.django_db(transaction=True)
def test_connection_pages_refuse_framing_and_caching(site_middleware, flow):
    flow.connect()
    connection = BrexConnection.objects.get()
    pages = {
        "connections": flow.client.get(reverse("brex_oauth:connections")),
        "disconnect confirmation": flow.client.get(
            reverse("brex_oauth:disconnect_confirm", args=[connection.pk])
        ),
    }
    for name, response in pages.items():
        assert response.status_code == 200, name
        assert response["X-Frame-Options"] == "DENY", name
        assert "no-store" in response["Cache-Control"], name


# Secrets in error reports. Each test plants a failure deep in a token-holding path (inside
# requests, or in the ORM's write of the token row), after the secrets are in the frames'
# locals, and renders Django's ExceptionReporter as the technical 500 page and the error
# e-mail do. With the filter off (DEBUG on) every secret must show, or the test would prove
# nothing; with it on (DEBUG off, as in production) none may.


class DeepFailure(Exception):
    """Planted deep in a token-holding path."""


def _fail_http(monkeypatch, path_suffix: str) -> None:
    original = HTTPAdapter.send

    def send(adapter, request, *args, **kwargs):
        if urlsplit(request.url).path.endswith(path_suffix):
            raise DeepFailure(f"planted in the request to {path_suffix}")
        return original(adapter, request, *args, **kwargs)

    monkeypatch.setattr(HTTPAdapter, "send", send)


def _writes(query, field: str) -> bool:
    if isinstance(query, InsertQuery):
        return any(f.name == field for f in query.fields) and any(
            getattr(obj, field) for obj in query.objs
        )
    return any(f.name == field and value for f, _model, value in query.values)


def _fail_db_write(monkeypatch, model, field: str) -> None:
    """Fail the SQL statement that writes a value into ``model.field``."""
    for compiler in (SQLInsertCompiler, SQLUpdateCompiler):
        original = compiler.execute_sql

        def execute_sql(self, *args, _original=original, **kwargs):
            if self.query.model is model and _writes(self.query, field):
                raise DeepFailure(f"planted in the write of {model.__name__}.{field}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(compiler, "execute_sql", execute_sql)
    # Statements composed from the ORM's SQL and run on the cursor (on PostgreSQL a
    # refresh saves in one statement): fail the one that sets the column.
    table, column = model._meta.db_table, model._meta.get_field(field).column

    def fail_composed(execute, sql, params, many, context):
        if f'UPDATE "{table}" SET ' in sql and f'"{column}" = ' in sql:
            raise DeepFailure(f"planted in the write of {model.__name__}.{field}")
        return execute(sql, params, many, context)

    from django.db import connections

    database = connections["default"]
    monkeypatch.setattr(database, "execute_wrappers",
                        [*database.execute_wrappers, fail_composed])


def _record(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so that each return value is kept in the returned list."""
    seen: list = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(owner, name, recording)
    return seen


def _token_secrets(answer: oauth.TokenResponse, prefix: str = "") -> dict[str, str]:
    values = {"access token": answer.access_token, "refresh token": answer.refresh_token,
              "id_token": answer.id_token}
    return {prefix + name: value for name, value in values.items() if value}


def _stored_secrets(connection) -> dict[str, str]:
    token = BrexToken.objects.get(pk=connection.pk)
    return {"stored access token": token.access_token,
            "stored refresh token": token.refresh_token}


def _raised(call: Callable[[], object], expected: type[Exception] = DeepFailure):
    try:
        call()
    except expected:
        return sys.exc_info()
    pytest.fail(f"{expected.__name__} was not raised")


def _report(exc_info, request=None) -> str:
    reporter = ExceptionReporter(request, *exc_info)
    return reporter.get_traceback_html() + reporter.get_traceback_text()


def assert_no_secret_in_error_reports(settings, exc_info, secrets: dict[str, str],
                                      request=None) -> None:
    assert secrets and all(secrets.values())
    settings.DEBUG = True  # Django's filter is off: the frames' locals show as they are
    unfiltered = _report(exc_info, request)
    settings.DEBUG = False
    filtered = _report(exc_info, request)
    assert exc_info[0].__name__ in filtered and "Local vars" in filtered
    for name, value in secrets.items():
        assert value in unfiltered, f"the {name} is in no frame: this failure proves nothing"
        assert value not in filtered, f"the {name} is in the error report"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "failure",
    ["exchanging the code", "validating the id_token", "reading the identity",
     "storing the tokens"],
)
def test_a_callback_failing_reports_no_secret(
    flow, fake_brex, settings, monkeypatch, failure
):
    location = fake_brex.consent(flow.start())
    code = parse_qs(urlsplit(location).query)["code"][0]
    verifier = AuthorizationRequest.objects.get().code_verifier
    answers = _record(monkeypatch, oauth, "exchange_code")
    if failure == "exchanging the code":
        _fail_http(monkeypatch, "/v1/token")
    elif failure == "validating the id_token":
        monkeypatch.setattr(discovery, "find_jwk", _planted_failure)
    elif failure == "reading the identity":
        _fail_http(monkeypatch, "/v2/users/me")
    else:
        _fail_db_write(monkeypatch, BrexToken, "access_token")
    failures = []

    def capture(sender, request, **kwargs):
        failures.append((request, sys.exc_info()))

    got_request_exception.connect(capture)
    flow.client.raise_request_exception = False
    try:
        assert flow.callback(location).status_code == 500
    finally:
        got_request_exception.disconnect(capture)

    ((request, exc_info),) = failures
    # Which secrets are in the frames at each point (the unfiltered report must show them;
    # a TokenResponse's repr hides its tokens, so they show only where a string holds one).
    tokens = _token_secrets(answers[0]) if answers else {}
    secrets = {"code": code, **{
        "exchanging the code": {"verifier": verifier, "client secret": fake_brex.client_secret},
        "validating the id_token": {"id_token": tokens.get("id_token")},
        "reading the identity": {"access token": tokens.get("access token")},
        "storing the tokens": {"access token": tokens.get("access token"),
                               "refresh token": tokens.get("refresh token")},
    }[failure]}
    assert_no_secret_in_error_reports(settings, exc_info, secrets, request)
    # The code is gone from the request itself, for error trackers that read its URL.
    assert code not in request.get_full_path() and code not in str(dict(request.GET))


@pytest.mark.django_db(transaction=True)
def test_starting_a_connection_that_fails_reports_no_verifier(
    user_client, brex_settings, settings, monkeypatch
):
    verifiers = _record(monkeypatch, oauth, "new_code_verifier")
    _fail_db_write(monkeypatch, AuthorizationRequest, "code_verifier")

    exc_info = _raised(lambda: user_client.get(reverse("brex_oauth:connect")))

    assert_no_secret_in_error_reports(settings, exc_info, {"verifier": verifiers[0]})


def _refresh_command_failure(connection) -> None:
    """``brex_oauth_refresh`` goes on past a connection whose refresh fails, logs the error
    and says so at the end; the error report to check is the one it logged."""
    logged: list = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.exc_info:
                logged.append(record.exc_info)

    handler = Keep()
    logging.getLogger("django_brex_oauth").addHandler(handler)
    try:
        with pytest.raises(CommandError):
            call_command("brex_oauth_refresh", "--all")
    finally:
        logging.getLogger("django_brex_oauth").removeHandler(handler)
    _, error, traceback = logged[0]
    raise error.with_traceback(traceback)


REFRESH_ENTRY_POINTS = {
    "service": lambda connection: refresh_connection(connection.pk, force=True),
    "task": lambda connection: tasks.refresh_connection(connection.pk, force=True),
    "command": _refresh_command_failure,
    "API client": lambda connection: BrexClient(connection).get_me(),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("entry", sorted(REFRESH_ENTRY_POINTS))
def test_a_refresh_failing_after_brex_answered_reports_no_token(
    user, brex_settings, fake_brex, settings, monkeypatch, entry
):
    connection = make_connection(user, fake=fake_brex, expired=True)
    old = _stored_secrets(connection)
    answers = _record(monkeypatch, oauth, "refresh")
    _fail_db_write(monkeypatch, BrexToken, "access_token")

    exc_info = _raised(lambda: REFRESH_ENTRY_POINTS[entry](connection))

    secrets = {"new access token": answers[0].access_token,
               "new refresh token": answers[0].refresh_token,
               "old refresh token": old["stored refresh token"]}
    assert_no_secret_in_error_reports(settings, exc_info, secrets)


@pytest.mark.django_db(transaction=True)
def test_a_refresh_failing_after_the_commit_reports_no_token(
    user, brex_settings, fake_brex, settings, monkeypatch
):
    # A receiver of the signal sent after the save's commit raises: the frames that run the
    # commit's callbacks hold the saved token, whose new refresh token must not show.
    connection = make_connection(user, fake=fake_brex, expired=True)
    answers = _record(monkeypatch, oauth, "refresh")

    def receiver(**kwargs):
        raise DeepFailure("planted in a token_refreshed receiver")

    signals.token_refreshed.connect(receiver, weak=False)
    try:
        exc_info = _raised(lambda: refresh_connection(connection.pk, force=True))
    finally:
        signals.token_refreshed.disconnect(receiver)

    secrets = {"new access token": answers[0].access_token,
               "new refresh token": answers[0].refresh_token}
    assert_no_secret_in_error_reports(settings, exc_info, secrets)


@pytest.mark.django_db(transaction=True)
def test_a_refresh_failing_in_the_token_request_reports_no_token(
    user, brex_settings, fake_brex, settings, monkeypatch
):
    connection = make_connection(user, fake=fake_brex)
    _fail_http(monkeypatch, "/v1/token")

    exc_info = _raised(lambda: refresh_connection(connection.pk, force=True))

    secrets = {**_stored_secrets(connection), "client secret": fake_brex.client_secret}
    assert_no_secret_in_error_reports(settings, exc_info, secrets)


def _pending_revocation(connection) -> None:
    BrexConnection.objects.filter(pk=connection.pk).update(
        status="revoked", revocation_status="pending"
    )


REVOKE_ENTRY_POINTS = {
    "disconnect": lambda connection: disconnect(connection, queue_retry=False),
    "task": lambda connection: (_pending_revocation(connection),
                                tasks.revoke_connection(connection.pk)),
    "command": lambda connection: (_pending_revocation(connection),
                                   call_command("brex_oauth_cleanup")),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("entry", sorted(REVOKE_ENTRY_POINTS))
def test_a_revocation_failing_in_its_request_reports_no_token(
    user, brex_settings, fake_brex, settings, monkeypatch, entry
):
    connection = make_connection(user, fake=fake_brex)
    secrets = {"refresh token": _stored_secrets(connection)["stored refresh token"],
               "client secret": fake_brex.client_secret}
    _fail_http(monkeypatch, "/v1/revoke")

    exc_info = _raised(lambda: REVOKE_ENTRY_POINTS[entry](connection))

    assert_no_secret_in_error_reports(settings, exc_info, secrets)


@pytest.mark.django_db(transaction=True)
def test_deleting_a_connection_that_fails_reports_no_token(
    user, brex_settings, fake_brex, settings, monkeypatch
):
    connection = make_connection(user, fake=fake_brex)
    refresh_token = _stored_secrets(connection)["stored refresh token"]
    # Copying the token for its revocation after the rows go, then revoking it.
    _fail_db_write(monkeypatch, DetachedRevocation, "token")
    exc_info = _raised(lambda: BrexConnection.objects.filter(pk=connection.pk).delete())
    assert_no_secret_in_error_reports(settings, exc_info, {"refresh token": refresh_token})

    monkeypatch.undo()
    revocation = DetachedRevocation.objects.create(
        token=refresh_token, environment=connection.environment,
        former_connection_id=connection.pk, brex_user_id=connection.brex_user_id,
    )
    _fail_http(monkeypatch, "/v1/revoke")
    exc_info = _raised(lambda: tasks.revoke_detached_token(revocation.pk))
    assert_no_secret_in_error_reports(
        settings, exc_info,
        {"refresh token": refresh_token, "client secret": fake_brex.client_secret},
    )


@pytest.mark.django_db(transaction=True)
def test_an_api_call_failing_in_its_request_reports_no_access_token(
    user, brex_settings, fake_brex, settings, monkeypatch
):
    connection = make_connection(user, fake=fake_brex)
    _fail_http(monkeypatch, "/v2/company")

    exc_info = _raised(lambda: BrexClient(connection).get_company())

    secrets = _stored_secrets(connection)
    del secrets["stored refresh token"]  # a call that needs no refresh never reads it
    assert_no_secret_in_error_reports(settings, exc_info, secrets)


@pytest.mark.django_db
def test_client_credentials_failing_report_no_secret(
    brex_settings, fake_brex, settings, monkeypatch
):
    referrals = OnboardingClient.REFERRALS_SCOPE
    _fail_http(monkeypatch, "/v1/token")
    exc_info = _raised(lambda: client_credentials.get_client_credentials_token([referrals]))
    assert_no_secret_in_error_reports(
        settings, exc_info, {"client secret": fake_brex.client_secret}
    )

    monkeypatch.undo()
    answers = _record(monkeypatch, oauth, "client_credentials")
    monkeypatch.setattr(client_credentials, "_fernet", _FailingFernet())
    exc_info = _raised(lambda: OnboardingClient().get_referral("ref_1"))
    assert_no_secret_in_error_reports(settings, exc_info, _token_secrets(answers[0]))


class _FailingFernet:
    """Fails to encrypt the token before it is cached (the plaintext is in its frame)."""

    def encrypt(self, data):
        raise DeepFailure("planted in the encryption of the token")


@pytest.mark.django_db
def test_the_management_commands_report_no_secret(
    user, brex_settings, fake_brex, settings, monkeypatch
):
    _fail_http(monkeypatch, "/v1/token")
    exc_info = _raised(lambda: call_command("brex_oauth_check"))
    assert_no_secret_in_error_reports(
        settings, exc_info, {"client secret": fake_brex.client_secret}
    )

    monkeypatch.undo()
    connection = make_connection(user, fake=fake_brex)
    _fail_db_write(monkeypatch, BrexToken, "access_token")
    exc_info = _raised(lambda: call_command("brex_oauth_rotate_key"))
    assert_no_secret_in_error_reports(settings, exc_info, _stored_secrets(connection))


def test_a_webhook_check_failing_reports_no_signing_secret(settings, monkeypatch):
    secret = base64.b64encode(b"a webhook signing secret, 32 byte").decode("ascii")
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "WEBHOOK_SECRETS_FETCHER": lambda: [secret]}
    body = b'{"event_type": "USER_UPDATED"}'
    now = int(time.time())
    headers = {webhooks.ID_HEADER: "msg_1", webhooks.TIMESTAMP_HEADER: str(now),
               webhooks.SIGNATURE_HEADER: webhooks.sign(secret, "msg_1", now, body)}
    monkeypatch.setattr(webhooks.hmac, "new", _planted_failure)

    exc_info = _raised(lambda: webhooks.verify(headers, body))

    assert_no_secret_in_error_reports(settings, exc_info, {"webhook signing secret": secret})


def test_settings_errors_report_no_client_secret(settings, monkeypatch):
    secret = settings.BREX_OAUTH["CLIENT_SECRET"]
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "CLIENT_SECRETS": "a typo"}
    # The reporter's own settings section hides BREX_OAUTH; the frames are the danger.
    exc_info = _raised(lambda: app_settings.CLIENT_ID, BrexOAuthConfigurationError)
    assert_no_secret_in_error_reports(settings, exc_info, {"client secret": secret})

    settings.BREX_OAUTH = {k: v for k, v in settings.BREX_OAUTH.items() if k != "CLIENT_SECRETS"}
    monkeypatch.setattr(checks, "_callback_url_problems", _planted_failure)
    exc_info = _raised(check_settings)
    assert_no_secret_in_error_reports(settings, exc_info, {"client secret": secret})


def _planted_failure(*args, **kwargs):
    raise DeepFailure("planted in the checks")


# ---------------------------------------------------------------------------------------
# Stored tokens, identity answers and deleted owners
# ---------------------------------------------------------------------------------------

# Stored values: no pickle on the way back (a forged ciphertext under a leaked key must not
# run code), the earlier pickled rows still read and are rewritten by the rotate command,
# and dumpdata writes ciphertext that loaddata restores.

_forged_payload_ran: list[str] = []


def _record_forged_call(marker: str) -> str:
    """What a forged pickle calls when it is unpickled: an observable side effect."""
    _forged_payload_ran.append(marker)
    return marker


class _ForgedToken:
    def __reduce__(self):
        return (_record_forged_call, ("ran",))


def _raw_token_column(connection_pk: int, column: str = "refresh_token") -> bytes:
    from django.db import connection as db

    with db.cursor() as cursor:
        cursor.execute(
            f"SELECT {column} FROM brex_oauth_brextoken WHERE connection_id = %s",
            [connection_pk],
        )
        return bytes(cursor.fetchone()[0])


def _write_raw_token_column(connection_pk: int, value: bytes, column: str = "refresh_token"):
    from django.db import connection as db

    with db.cursor() as cursor:
        cursor.execute(
            f"UPDATE brex_oauth_brextoken SET {column} = %s WHERE connection_id = %s",
            [value, connection_pk],
        )


@pytest.fixture
def stored_tokens(user):
    connection = BrexConnection.objects.create(
        owner=user, environment="staging", brex_user_id="cuuser_stored"
    )
    BrexToken.objects.create(
        connection=connection,
        access_token="access-PLAINTEXT-1",
        refresh_token="refresh-PLAINTEXT-1",
    )
    return connection


@pytest.mark.django_db
def test_a_forged_pickle_under_the_right_key_is_refused_without_running(stored_tokens):
    _forged_payload_ran.clear()
    forged = RotatingFernet().encrypt(pickle.dumps(_ForgedToken()))
    _write_raw_token_column(stored_tokens.pk, forged)

    with pytest.raises(UndecryptableValue) as info:
        BrexToken.objects.get(pk=stored_tokens.pk)
    assert _forged_payload_ran == []
    assert "ENCRYPTION_KEY" not in str(info.value)  # the key was right; the content was not
    # A pickle of any other type (bytes, a list) is refused too: only a string is a token.
    for other in (b"refresh", ["refresh"], 42):
        _write_raw_token_column(stored_tokens.pk, RotatingFernet().encrypt(pickle.dumps(other)))
        with pytest.raises(UndecryptableValue):
            BrexToken.objects.get(pk=stored_tokens.pk)


@pytest.mark.django_db
def test_values_are_stored_without_pickle(stored_tokens):
    plaintext = RotatingFernet().decrypt(_raw_token_column(stored_tokens.pk))
    assert plaintext == b"\x01refresh-PLAINTEXT-1"
    assert not plaintext.startswith(b"\x80")  # not a pickle


@pytest.mark.django_db
def test_rows_in_the_earlier_pickled_format_still_read_and_rotation_rewrites_them(
    stored_tokens, user, settings
):
    from django.core.management import call_command

    # Rows as the earlier field wrote them: pickle.dumps(str), encrypted.
    old_key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    for column, value in (("access_token", "access-LEGACY"), ("refresh_token", "refresh-LEGACY")):
        _write_raw_token_column(
            stored_tokens.pk, RotatingFernet().encrypt(pickle.dumps(value)), column
        )
    request = AuthorizationRequest.objects.create(
        user=user, state="s" * 43, environment="staging", code_verifier="v" * 43,
        nonce="n" * 32, redirect_uri="https://partner.example/brex/callback/",
        requested_scopes="openid offline_access users.readonly",
        expires_at=timezone.now() + timedelta(minutes=10),
    )
    from django.db import connection as db

    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE brex_oauth_authorizationrequest SET code_verifier = %s WHERE id = %s",
            [RotatingFernet().encrypt(pickle.dumps("v" * 43, protocol=2)), request.pk],
        )

    token = BrexToken.objects.get(pk=stored_tokens.pk)
    assert (token.access_token, token.refresh_token) == ("access-LEGACY", "refresh-LEGACY")
    assert AuthorizationRequest.objects.get(pk=request.pk).code_verifier == "v" * 43

    # Rotate to a new key: every legacy row is rewritten in the current format.
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ENCRYPTION_KEY": "the-next-key",
        "ENCRYPTION_KEY_FALLBACKS": [old_key],
    }
    call_command("brex_oauth_rotate_key", stdout=None)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": []}
    for column, value in (("access_token", "access-LEGACY"), ("refresh_token", "refresh-LEGACY")):
        plaintext = RotatingFernet().decrypt(_raw_token_column(stored_tokens.pk, column))
        assert plaintext == b"\x01" + value.encode()
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT code_verifier FROM brex_oauth_authorizationrequest WHERE id = %s",
            [request.pk],
        )
        verifier = bytes(cursor.fetchone()[0])
    assert RotatingFernet().decrypt(verifier) == b"\x01" + b"v" * 43
    assert BrexToken.objects.get(pk=stored_tokens.pk).refresh_token == "refresh-LEGACY"


@pytest.mark.django_db
@pytest.mark.parametrize("serialisation", ["json", "xml"])
def test_dumpdata_writes_ciphertext_and_loaddata_restores_the_tokens(
    stored_tokens, user, serialisation, tmp_path
):
    from django.core.management import call_command

    request = AuthorizationRequest.objects.create(
        user=user, state="state-" + "s" * 40, environment="staging",
        code_verifier="verifier-PLAINTEXT-" + "v" * 30, nonce="n" * 32,
        redirect_uri="https://partner.example/brex/callback/",
        requested_scopes="openid offline_access users.readonly",
        expires_at=timezone.now() + timedelta(minutes=10),
    )
    dump = tmp_path / f"dump.{serialisation}"
    call_command(
        "dumpdata", "auth.user", "brex_oauth", format=serialisation, output=str(dump),
        verbosity=0,
    )
    text = dump.read_text()
    for secret in ("access-PLAINTEXT-1", "refresh-PLAINTEXT-1", "verifier-PLAINTEXT-"):
        assert secret not in text
    assert text.count("brex-oauth-encrypted:") == 3

    BrexConnection.objects.all().delete()
    AuthorizationRequest.objects.all().delete()
    assert not BrexToken.objects.exists()
    call_command("loaddata", str(dump), verbosity=0)

    token = BrexToken.objects.get(pk=stored_tokens.pk)
    assert (token.access_token, token.refresh_token) == (
        "access-PLAINTEXT-1", "refresh-PLAINTEXT-1"
    )
    assert AuthorizationRequest.objects.get(pk=request.pk).code_verifier.startswith(
        "verifier-PLAINTEXT-"
    )
    assert b"refresh-PLAINTEXT-1" not in _raw_token_column(stored_tokens.pk)


@pytest.mark.django_db
def test_a_dump_loads_under_a_rotated_key_only_while_the_old_key_is_a_fallback(
    stored_tokens, settings, tmp_path
):
    from django.core.management import call_command
    from django.core.serializers.base import DeserializationError

    dump = tmp_path / "tokens.json"
    call_command("dumpdata", "brex_oauth.brextoken", output=str(dump), verbosity=0)
    BrexToken.objects.all().delete()
    old_key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": "a-later-key"}
    with pytest.raises(DeserializationError) as info:
        call_command("loaddata", str(dump), verbosity=0)
    assert "ENCRYPTION_KEY" in str(info.value)
    assert "refresh-PLAINTEXT-1" not in str(info.value)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": [old_key]}
    call_command("loaddata", str(dump), verbosity=0)
    assert BrexToken.objects.get(pk=stored_tokens.pk).refresh_token == "refresh-PLAINTEXT-1"


# Deleted owners and connections: the grant is revoked at Brex, with its retries, although
# the rows are gone.


def _revoke_requests(fake) -> list[dict]:
    return [r for r in fake.requests if r["path"].endswith("/v1/revoke")]


def _delete_owner(connection):
    connection.owner.delete()


def _delete_row(connection):
    BrexConnection.objects.get(pk=connection.pk).delete()


def _delete_queryset(connection):
    BrexConnection.objects.filter(owner=connection.owner).delete()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("delete", [_delete_owner, _delete_row, _delete_queryset],
                         ids=["owner", "row", "queryset"])
def test_deleting_a_connection_revokes_its_refresh_token_at_brex(
    user, fake_brex, brex_settings, delete, caplog
):
    connection = make_connection(user, fake=fake_brex)
    token = BrexToken.objects.get(pk=connection.pk)
    refresh_token, access_token = token.refresh_token, token.access_token
    assert fake_brex.is_refresh_token_active(refresh_token)

    delete(connection)

    assert not BrexConnection.objects.filter(pk=connection.pk).exists()
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert not fake_brex.is_access_token_active(access_token)
    [sent] = _revoke_requests(fake_brex)
    assert sent["form"]["token_type_hint"] == "refresh_token"
    assert not DetachedRevocation.objects.exists()  # nothing secret is kept once revoked
    for secret in (refresh_token, access_token):
        assert secret not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_deleting_the_owner_while_brex_is_briefly_down_still_revokes_on_retry(
    user, fake_brex, brex_settings, caplog
):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REVOKE_RETRY_BACKOFF": 1}
    connection = make_connection(user, fake=fake_brex)
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token
    fake_brex.fail_next("/v1/revoke", status=503, times=2)

    user.delete()

    assert [r["status"] for r in _revoke_requests(fake_brex)] == [503, 503, 200]
    assert all(r["form"]["token"] == refresh_token for r in _revoke_requests(fake_brex))
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert not DetachedRevocation.objects.exists()
    assert "attempt 2" in caplog.text and refresh_token not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_deleted_connection_brex_never_confirmed_is_kept_encrypted_for_the_sweep(
    user, fake_brex, brex_settings
):
    from django_brex_oauth import tasks

    connection = make_connection(user, fake=fake_brex)
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token
    fake_brex.fail_next("/v1/revoke", status=503, times=100)

    user.delete()  # the task gives up after REVOKE_TASK_MAX_RETRIES

    [pending] = DetachedRevocation.objects.all()
    assert pending.attempts >= 2 and "503" in pending.last_error
    assert fake_brex.is_refresh_token_active(refresh_token)
    from django.db import connection as db

    with db.cursor() as cursor:
        cursor.execute("SELECT token FROM brex_oauth_detachedrevocation")
        raw = bytes(cursor.fetchone()[0])
    assert refresh_token.encode() not in raw
    assert refresh_token not in repr(pending) and refresh_token not in str(pending)

    fake_brex.clear_failures()
    DetachedRevocation.objects.update(attempted_at=timezone.now() - timedelta(days=1))
    assert tasks.sweep_revocations() == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert not DetachedRevocation.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_deletion_that_rolls_back_revokes_nothing(user, fake_brex, brex_settings):
    from django.db import transaction

    connection = make_connection(user, fake=fake_brex)
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token
    with pytest.raises(RuntimeError), transaction.atomic():
        user.delete()
        raise RuntimeError("the deletion is abandoned")
    assert BrexToken.objects.get(pk=connection.pk).refresh_token == refresh_token
    assert fake_brex.is_refresh_token_active(refresh_token)
    assert _revoke_requests(fake_brex) == []
    assert not DetachedRevocation.objects.exists()


@pytest.mark.django_db
def test_key_rotation_keeps_the_token_of_a_deleted_connection_awaiting_revocation(settings):
    from django.core.management import call_command

    pending = DetachedRevocation.objects.create(
        token="refresh-DETACHED", environment="staging", former_connection_id=7
    )
    old_key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ENCRYPTION_KEY": "the-next-key",
        "ENCRYPTION_KEY_FALLBACKS": [old_key],
    }
    call_command("brex_oauth_rotate_key", stdout=None)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": []}
    assert DetachedRevocation.objects.get(pk=pending.pk).token == "refresh-DETACHED"


# Identity answers: /v2/users/me or /v2/company answering something malformed during the
# connect keeps a usable connection (the grant is stored, so it can be revoked) and the
# identity is read again later.


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fault", ["not_json", "json_list", "json_string", "wrong_types"])
def test_a_malformed_identity_answer_keeps_a_usable_connection_and_reads_it_again_later(
    flow, fake_brex, user, fault, caplog
):
    fake_brex.identity_fault = fault

    response = flow.connect()

    assert response.status_code == 302, response.content[:300]
    connection = BrexConnection.objects.get(owner=user)
    assert connection.status == "active"
    # Nothing of the malformed answers is stored; the email comes from the signed id_token.
    assert (connection.brex_company_id, connection.brex_company_name) == ("", "")
    assert connection.brex_user_email == fake_brex.default_user["email"]
    token = BrexToken.objects.get(pk=connection.pk)
    # The grant Brex issued is held by the site: usable, and revocable by a disconnect.
    assert fake_brex.is_refresh_token_active(token.refresh_token)
    assert fake_brex.is_access_token_active(token.access_token)
    assert "/v2/users/me" in caplog.text and "/v2/company" in caplog.text
    assert "Something went wrong" not in caplog.text and token.access_token not in caplog.text

    # Once Brex answers properly, the identity is read again and stored.
    fake_brex.identity_fault = None
    assert tasks.read_identity(connection.pk) is True
    connection.refresh_from_db()
    assert connection.brex_user_email == fake_brex.default_user["email"]
    assert connection.brex_company_id == fake_brex.company["id"]
    assert connection.brex_company_name == fake_brex.company["legal_name"]


@pytest.mark.django_db(transaction=True)
def test_the_identity_is_read_again_by_itself_after_the_connect_commits(flow, fake_brex, user):
    # Only the answers during the callback are malformed; the task queued after the
    # commit reads proper ones.
    fake_brex.fail_next("/v2/users/me", status=200, body="<html>maintenance</html>")
    fake_brex.fail_next("/v2/company", status=200, body=[fake_brex.company])

    response = flow.connect()

    assert response.status_code == 302
    connection = BrexConnection.objects.get(owner=user)
    assert connection.brex_user_email == fake_brex.default_user["email"]
    assert connection.brex_company_id == fake_brex.company["id"]
    me_answers = [r["status"] for r in fake_brex.requests if r["path"] == "/v2/users/me"]
    assert me_answers == [200, 200]


@pytest.mark.django_db(transaction=True)
def test_a_connection_with_a_malformed_identity_can_be_disconnected_and_revoked(
    flow, fake_brex, user, user_client
):
    from django.urls import reverse

    fake_brex.identity_fault = "json_string"
    flow.connect()
    connection = BrexConnection.objects.get(owner=user)
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token

    response = user_client.post(reverse("brex_oauth:disconnect", args=[connection.pk]))

    assert response.status_code == 302
    assert not fake_brex.is_refresh_token_active(refresh_token)


def test_unknown_identity_faults_are_refused():
    from django_brex_oauth.testing.fake_brex import IDENTITY_FAULTS, FakeBrex

    assert set(IDENTITY_FAULTS) == {"not_json", "json_list", "json_string", "wrong_types"}
    fake = FakeBrex()
    with pytest.raises(ValueError, match="unknown identity fault"):
        fake.identity_fault = "teapot"
