"""Secrets never reach logs, pages or URLs."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pytest

from django_brex_oauth.models import AuthorizationRequest, BrexConnection, BrexToken

pytestmark = pytest.mark.django_db(transaction=True)


class CaptureAll(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


@pytest.fixture
def all_logs():
    handler = CaptureAll()
    root = logging.getLogger()
    names = ["", "requests_oauthlib", "requests_oauthlib.oauth2_session", "oauthlib",
             "urllib3", "urllib3.connectionpool", "django", "django_brex_oauth"]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled


def test_no_secret_in_any_log_record(flow, fake_brex, all_logs):
    authorize_url = flow.start()
    location = fake_brex.consent(authorize_url)
    verifier = AuthorizationRequest.objects.get().code_verifier
    code = parse_qs(urlsplit(location).query)["code"][0]
    assert flow.callback(location).status_code == 302
    # and a failing one, whose error paths log too
    fake_brex.id_token_fault = "bad_signature"
    failing = fake_brex.consent(flow.start())
    assert flow.callback(failing).status_code == 400

    token = BrexToken.objects.get(connection=BrexConnection.objects.get())
    secrets = {
        "access token": token.access_token,
        "refresh token": token.refresh_token,
        "authorization code": code,
        "PKCE verifier": verifier,
        "client secret": fake_brex.client_secret,
    }
    assert all_logs.lines, "the capture saw no log record at all"
    assert any(line.startswith("urllib3") for line in all_logs.lines)
    joined = "\n".join(all_logs.lines)
    for name, value in secrets.items():
        assert value not in joined, f"the {name} reached a log record"


def test_token_repr_and_str_hide_the_tokens(flow):
    flow.connect()
    token = BrexToken.objects.get()
    for text in (repr(token), str(token), repr(token.connection), str(token.connection)):
        assert token.access_token not in text
        assert token.refresh_token not in text


def test_error_pages_show_no_secret(flow, fake_brex, settings):
    location = fake_brex.consent(flow.start())
    code = parse_qs(urlsplit(location).query)["code"][0]
    fake_brex.fail_next("/v1/token", status=401,
                        body={"error": "invalid_client", "error_description": "bad secret"})
    response = flow.callback(location)
    assert response.status_code == 502
    body = response.content.decode()
    assert code not in body
    assert fake_brex.client_secret not in body
    assert "credentials" in body
