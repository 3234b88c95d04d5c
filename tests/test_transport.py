"""The one HTTP session per process (django_brex_oauth.http): every call to Brex (token
endpoint, revocation, discovery, API) goes through it, keeps its connection alive, shares it
across threads, and a forked child makes its own."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from oauthlib.oauth2 import InsecureTransportError

from django_brex_oauth import http, oauth
from django_brex_oauth.client import get_with_token
from django_brex_oauth.exceptions import BrexUnavailable, TokenError


class _KeepAliveBrex(ThreadingHTTPServer):
    """A token, revocation and API server on loopback that speaks HTTP/1.1 with keep-alive
    (the fake Brex closes every connection) and counts the TCP connections it accepts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)
        self.connections = 0
        self.paths: list[str] = []
        self.cookies: list[str | None] = []
        self.authorizations: list[str | None] = []
        self.issuer = f"http://127.0.0.1:{self.server_address[1]}"


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _KeepAliveBrex

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass

    def _answer(self, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's name)
        self.server.paths.append(self.path)
        self.server.cookies.append(self.headers.get("Cookie"))
        self.server.authorizations.append(self.headers.get("Authorization"))
        issuer = self.server.issuer
        if self.path == "/.well-known/openid-configuration":
            self._answer({
                "issuer": issuer,
                "authorization_endpoint": issuer + "/authorize",
                "token_endpoint": issuer + "/token",
                "revocation_endpoint": issuer + "/revoke",
                "jwks_uri": issuer + "/keys",
            })
        else:
            # An API answer that also tries to set a cookie.
            self._answer({"id": "u1"}, {"Set-Cookie": "tracking=customer-1; Path=/"})

    def do_POST(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's name)
        self.server.paths.append(self.path)
        self.server.cookies.append(self.headers.get("Cookie"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/token":
            self._answer({"access_token": "access-1", "token_type": "Bearer",
                          "expires_in": 3600, "refresh_token": "refresh-2"})
        else:
            self._answer({})


@pytest.fixture
def keep_alive_brex(settings) -> Iterator[_KeepAliveBrex]:
    server = _KeepAliveBrex()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ISSUER": server.issuer,
                           "API_BASE_URL": server.issuer}
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_one_session_per_process_shared_by_threads():
    seen: list[requests.Session] = []
    threads = [threading.Thread(target=lambda: seen.append(http.session())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8
    assert all(session is http.session() for session in seen)
    assert isinstance(http.session(), http.TimeoutSession)


def test_token_revocation_and_api_calls_reuse_one_connection(keep_alive_brex, db):
    for _ in range(3):
        answer = oauth.refresh("refresh-1")
        assert answer.refresh_token == "refresh-2"
    oauth.revoke("refresh-2")
    assert get_with_token("access-1", "/v2/users/me") == {"id": "u1"}
    assert keep_alive_brex.paths == [
        "/.well-known/openid-configuration", "/token", "/token", "/token", "/revoke",
        "/v2/users/me",
    ]
    # Discovery, three refreshes, a revocation and an API call: one TCP connection.
    assert keep_alive_brex.connections == 1


def test_the_shared_session_keeps_no_cookie_between_calls(keep_alive_brex, db):
    get_with_token("access-1", "/v2/users/me")
    get_with_token("access-2", "/v2/users/me")
    assert keep_alive_brex.cookies == [None, None]
    assert len(http.session().cookies) == 0


def test_the_session_follows_http_timeout_as_it_changes(settings):
    session = http.session()
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "HTTP_TIMEOUT": 3.5}
    assert session.timeout == 3.5
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "HTTP_TIMEOUT": 7}
    assert session.timeout == 7.0
    assert http.new_session(2.0).timeout == 2.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_session():
    parent = http.session()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's teardown
        try:
            child = http.session()
            verdict = b"own" if child is not parent and child is http.session() else b"shared"
        except BaseException:
            verdict = b"error"
        os.write(write_end, verdict)
        os._exit(0)
    os.close(write_end)
    try:
        verdict = os.read(read_end, 16)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert verdict == b"own"
    assert http.session() is parent


# The environment: read as a plain requests session reads it, but once per origin.


def test_the_session_sends_through_the_environments_proxy(keep_alive_brex, monkeypatch):
    # The loopback server stands in for a proxy: a proxied request names the whole URL.
    monkeypatch.setenv("HTTP_PROXY", keep_alive_brex.issuer)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    session = http.new_session(5)
    assert session.get("http://brex.invalid/v2/users/me").json() == {"id": "u1"}
    assert keep_alive_brex.paths == ["http://brex.invalid/v2/users/me"]


def test_no_proxy_still_bypasses_the_proxy(keep_alive_brex, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    session = http.new_session(5)
    assert session.get(keep_alive_brex.issuer + "/v2/users/me").json() == {"id": "u1"}
    assert keep_alive_brex.paths == ["/v2/users/me"]


def test_the_environment_is_read_once_per_origin(keep_alive_brex, monkeypatch):
    reads: list[str] = []
    real = http.get_environ_proxies
    monkeypatch.setattr(http, "get_environ_proxies", lambda url: reads.append(url) or real(url))
    session = http.new_session(5)
    for path in ("/v2/users/me", "/v2/companies/me", "/v2/users/me"):
        session.get(keep_alive_brex.issuer + path)
    assert reads == [keep_alive_brex.issuer + "/v2/users/me"]
    session.merge_environment_settings("https://api.brex.com/v2/users/me", {}, None, None, None)
    assert len(reads) == 2


def test_the_ca_bundle_of_the_environment_verifies_https(monkeypatch, tmp_path):
    bundle = tmp_path / "corporate-ca.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    session = http.new_session(5)
    merged = session.merge_environment_settings(
        "https://api.brex.com/v2/users/me", {}, None, None, None
    )
    assert merged["verify"] == str(bundle)
    # verify=False given for one call is kept, as requests keeps it.
    assert session.merge_environment_settings(
        "https://api.brex.com/v2/users/me", {}, None, False, None
    )["verify"] is False


def test_netrc_credentials_never_ride_along(keep_alive_brex, monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert requests.utils.get_netrc_auth(keep_alive_brex.issuer) == ("someone", "netrc-password")
    http.new_session(5).get(keep_alive_brex.issuer + "/v2/users/me")
    assert keep_alive_brex.authorizations == [None]


def test_send_reports_a_network_error_without_the_url(db):
    with pytest.raises(BrexUnavailable) as caught:
        http.send("POST", "http://127.0.0.1:9/token?code=secret-code", data={"a": "b"})
    assert "secret-code" not in str(caught.value)
    assert "127.0.0.1:9" in str(caught.value)


@pytest.mark.parametrize(("status", "transient"), [
    (200, False), (400, False), (401, False), (404, False), (408, False),
    (429, True), (500, True), (502, True), (503, True), (599, True),
])
def test_the_one_transient_rule(status, transient):
    assert http.is_transient_status(status) is transient


# Plain HTTP: only on this machine, checked by the app, never by setting oauthlib's variable.


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://accounts.brex.com/oauth2/default/v1/token", True),
    ("http://127.0.0.1:8000/oauth2/v1/token", True),
    ("http://localhost/oauth2/v1/token", True),
    ("http://[::1]:9000/token", True),
    ("http://accounts.brex.com/oauth2/default/v1/token", False),
    ("http://10.0.0.5/token", False),
    ("ftp://127.0.0.1/token", False),
])
def test_the_token_endpoints_transport_rule(url, allowed, monkeypatch):
    monkeypatch.delenv("OAUTHLIB_INSECURE_TRANSPORT", raising=False)
    if allowed:
        http.check_token_transport(url)
    else:
        with pytest.raises(InsecureTransportError):
            http.check_token_transport(url)


def test_plain_http_off_this_machine_is_refused_before_anything_is_sent(monkeypatch, db):
    monkeypatch.delenv("OAUTHLIB_INSECURE_TRANSPORT", raising=False)
    monkeypatch.setattr(oauth.discovery, "get_endpoint",
                        lambda name, issuer=None: "http://accounts.brex.com/token")
    sent: list[str] = []
    monkeypatch.setattr(oauth, "send", lambda method, url, **kwargs: sent.append(url))
    with pytest.raises(TokenError) as refused:
        oauth.refresh("refresh-1")
    assert refused.value.error == "insecure_transport"
    assert sent == []
    # The operator's variable lifts the rule, as it does for oauthlib.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    http.check_token_transport("http://accounts.brex.com/token")


def test_a_loopback_token_request_never_sets_oauthlibs_variable(keep_alive_brex, monkeypatch, db):
    monkeypatch.delenv("OAUTHLIB_INSECURE_TRANSPORT", raising=False)
    seen: list[str | None] = []
    real_send = oauth.send

    def send(*args, **kwargs):
        seen.append(os.environ.get("OAUTHLIB_INSECURE_TRANSPORT"))
        return real_send(*args, **kwargs)

    monkeypatch.setattr(oauth, "send", send)
    assert oauth.refresh("refresh-1").refresh_token == "refresh-2"
    assert seen == [None]
    assert "OAUTHLIB_INSECURE_TRANSPORT" not in os.environ
