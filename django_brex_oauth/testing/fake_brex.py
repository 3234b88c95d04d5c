"""A fake Brex authorization server and API for tests and local development.

``FakeBrex`` serves, over real loopback HTTP, the parts of Brex that an OAuth partner talks to:

* the OpenID Connect authorization server at ``{base_url}/oauth2/default`` (discovery, JWKS,
  a consent page, the token, revocation, introspection and userinfo endpoints), behaving like the
  Okta-style server Brex runs: single-use authorization codes, optional PKCE (S256), refresh token
  rotation with a grace period and reuse detection, RS256 id_tokens;
* a few API endpoints at ``{base_url}`` (``/v2/users/me``, ``/v2/users``, ``/v2/company``,
  ``/v1/referrals``) with Brex's error shapes.

It does not depend on Django, so it can be used from any test-suite::

    from django_brex_oauth.testing import FakeBrex

    with FakeBrex(redirect_uris=["http://testserver/brex/callback"]) as brex:
        settings.BREX_OAUTH = brex.django_settings()
        location = brex.consent(authorize_url)        # what the browser would be sent back to
        brex.fail_next("/v1/token", status=503)      # the next token request fails
        brex.fail_next("/v1/token", status=429, retry_after=120)   # ...asking to wait 2 min
        brex.rate_limit(1000, per=60, path="/v1/token")   # Brex's limit, enforced
        brex.id_token_fault = "wrong_nonce"           # id_tokens carry a defect from now on
        brex.refresh_id_token_fault = "wrong_sub"     # ... only those a refresh returns
        brex.authorization_response_fault = "wrong_iss"  # the redirect back names another issuer

Run ``python -m django_brex_oauth.testing.fake_brex --port 8765`` to serve one until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import html
import json
import math
import re
import secrets
import signal
import socket
import socketserver
import string
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .fake_webhooks import FakeWebhooks

__all__ = [
    "AUTHORIZATION_RESPONSE_FAULTS",
    "DEFAULT_SCOPES",
    "DROP",
    "FOREIGN_ISSUER",
    "ID_TOKEN_FAULTS",
    "IDENTITY_FAULTS",
    "ISSUER_PATH",
    "MALFORMED_TOKEN_ANSWERS",
    "REFERRALS_SCOPE",
    "SUPPORTED_SCOPES",
    "UNTRUSTED_AUDIENCE",
    "FakeBrex",
    "HeldAnswers",
    "main",
]

ISSUER_PATH = "/oauth2/default"
"""Path of the authorization server under the base URL, as at Brex."""

REFERRALS_SCOPE = "https://onboarding.brexapis.com/referrals"
"""Scope of the onboarding (referrals) API; only granted to client-credentials tokens."""

DEFAULT_SCOPES: tuple[str, ...] = (
    "openid",
    "offline_access",
    "users.readonly",
    "companies.readonly",
)
"""Scopes requested by default (see :meth:`FakeBrex.django_settings`)."""

_SCOPES_WITH_READONLY = (
    "users",
    "departments",
    "locations",
    "cards",
    "legal_entities",
    "expenses.card",
    "budgets",
    "vendors",
    "transfers",
    "incoming_transfers",
    "travel.trips",
)
_OTHER_SCOPES = (
    "cards.pan",
    "companies.readonly",
    "transactions.card.readonly",
    "transactions.cash.readonly",
    "accounts.card.readonly",
    "accounts.cash.readonly",
    "statements.card.readonly",
    "statements.cash.readonly",
    "linked_accounts.readonly",
    "fields.read",
    "fields.write",
    "accounting.record.read",
    "accounting.record.write",
)
SUPPORTED_SCOPES: tuple[str, ...] = (
    "openid",
    "offline_access",
    *(s for base in _SCOPES_WITH_READONLY for s in (base, f"{base}.readonly")),
    *_OTHER_SCOPES,
)
"""Scopes a user can be asked for at the authorize endpoint."""

ID_TOKEN_FAULTS: tuple[str, ...] = (
    "bad_signature",
    "alg_none",
    "alg_hs256",
    "wrong_aud",
    "extra_aud",
    "extra_aud_no_azp",
    "wrong_azp",
    "wrong_iss",
    "wrong_sub",
    "expired",
    "stale_iat",
    "future_iat",
    "wrong_nonce",
    "missing_nonce",
    "bad_at_hash",
    "unknown_kid",
    "missing_kid",
)
"""Values of :attr:`FakeBrex.id_token_fault` and :attr:`FakeBrex.refresh_id_token_fault`."""

AUTHORIZATION_RESPONSE_FAULTS: tuple[str, ...] = ("wrong_iss", "missing_iss")
"""Values accepted by :attr:`FakeBrex.authorization_response_fault`."""

UNTRUSTED_AUDIENCE = "some-other-client-id"
"""The foreign client id that the ``wrong_aud``, ``extra_aud*`` and ``wrong_azp`` faults use."""

FOREIGN_ISSUER = "https://accounts-api.evil.example.com/oauth2/default"
"""The issuer that the ``wrong_iss`` faults name."""

IDENTITY_FAULTS: tuple[str, ...] = (
    "not_json",
    "json_list",
    "json_string",
    "wrong_types",
)
"""Values accepted by :attr:`FakeBrex.identity_fault`."""


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()
"""A value for :meth:`FakeBrex.tamper_next` that removes a field from the answer."""

_UNSET: Any = object()

MALFORMED_TOKEN_ANSWERS: dict[str, dict[str, Any]] = {
    "empty_list": {"body": []},
    "json_null": {"body": None},
    "null_access_token": {"access_token": None},
    "missing_access_token": {"access_token": DROP},
    "numeric_access_token": {"access_token": 12345},
    "empty_access_token": {"access_token": ""},
    "huge_expires_in": {"expires_in": 10**12},
    "non_integer_expires_in": {"expires_in": "soon"},
    "fractional_expires_in": {"expires_in": 3599.5},
    "negative_expires_in": {"expires_in": -60},
    "zero_expires_in": {"expires_in": 0},
    "missing_token_type": {"token_type": DROP},
    "mac_token_type": {"token_type": "mac"},
    "numeric_refresh_token": {"refresh_token": 12345},
    "object_refresh_token": {"refresh_token": {"value": "x"}},
    "numeric_scope": {"scope": 7},
}
"""Named ways to spoil a token answer, as keyword arguments of :meth:`FakeBrex.tamper_next`.

The token request is still processed (a refresh token still rotates); only the answer that
comes back is spoilt. For example
``fake.tamper_next("/v1/token", **MALFORMED_TOKEN_ANSWERS["null_access_token"])``.
"""

_OIDC_SCOPES = ("openid", "offline_access")
_STAT_KEYS = (
    "token_authorization_code",
    "token_refresh_token",
    "token_client_credentials",
    "refresh_token_reuse",
    "refresh_token_reuse_rejected",
    "revocations",
    "authorize",
    "jwks",
    "discovery",
    "rate_limited",
)
_FORM = "application/x-www-form-urlencoded"
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_ID_ALPHABET = string.ascii_lowercase + string.digits
_UNAUTHORIZED = {"type": "UNAUTHORIZED", "message": "PERMISSION_DENIED: Invalid or Revoked Token"}
_INVALID_CODE = "The authorization code is invalid or has expired."
_INVALID_REFRESH = "The refresh token is invalid or expired."
_BAD_CLIENT = (
    "Client authentication failed. Either the client or the client credentials are invalid."
)
_API_ERROR_TYPES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_SERVER_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}
_OAUTH_ERRORS = {
    400: "invalid_request",
    401: "invalid_client",
    403: "access_denied",
    429: "too_many_requests",
    503: "temporarily_unavailable",
}


# --------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class _SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    jwk: dict[str, Any]


_KEY_CACHE: dict[str, _SigningKey] = {}
_KEY_CACHE_LOCK = threading.Lock()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _new_signing_key(kid: str | None = None) -> _SigningKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    if kid is None:
        thumbprint_input = json.dumps(
            {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
        )
        kid = _b64url(hashlib.sha256(thumbprint_input.encode("ascii")).digest())
    jwk = {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}
    return _SigningKey(kid=kid, private_key=private_key, jwk=jwk)


def _cached_key(slot: str) -> _SigningKey:
    """One key per slot and process: generating RSA keys is the slow part of starting a fake."""
    with _KEY_CACHE_LOCK:
        if slot not in _KEY_CACHE:
            _KEY_CACHE[slot] = _new_signing_key()
        return _KEY_CACHE[slot]


# --------------------------------------------------------------------------------------------
# small helpers


def _random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(25))


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _at_hash(access_token: str) -> str:
    return _b64url(hashlib.sha256(access_token.encode("ascii")).digest()[:16])


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _first(values: Mapping[str, list[str]]) -> dict[str, str]:
    return {key: items[0] for key, items in values.items() if items}


def _flatten(values: Mapping[str, list[str]]) -> dict[str, Any]:
    return {key: items[0] if len(items) == 1 else list(items) for key, items in values.items()}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _page_text(page: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return re.sub(r"\s+", " ", text).strip()


_SCOPE_NOUNS = {
    "cards.pan": "card numbers",
    "companies": "company details",
    "fields": "custom fields",
    "accounting.record": "accounting records",
    "travel.trips": "trips",
    "expenses.card": "card expenses",
}


def _scope_label(scope: str) -> str:
    if scope == REFERRALS_SCOPE:
        return "Refer businesses to Brex"
    words = scope.split(".")
    readonly = words[-1] in ("readonly", "read")
    write = words[-1] == "write"
    if readonly or write:
        words = words[:-1]
    base = ".".join(words)
    if base in _SCOPE_NOUNS:
        noun = _SCOPE_NOUNS[base]
    elif len(words) == 2 and words[1] in ("card", "cash"):
        noun = f"{words[1]} {words[0]}"
    else:
        noun = " ".join(words)
    noun = noun.replace("_", " ")
    if readonly:
        return f"View {noun}"
    if write:
        return f"Edit {noun}"
    return f"View and manage {noun}"


class _Headers(dict):
    """A ``dict`` of request headers whose lookups ignore case."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        for key, value in items:
            super().__setitem__(key, value)
        self._lower = {key.lower(): key for key in self}

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(self._lower.get(key.lower(), key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._lower

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: _Headers
    body: bytes
    content_type: str

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> _Response:
    body = json.dumps(data).encode("utf-8")
    return _Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def _oauth_error(status: int, error: str, description: str, **headers: str) -> _Response:
    return _json(
        status,
        {"error": error, "error_description": description},
        {"Cache-Control": "no-store", "Pragma": "no-cache", **headers},
    )


def _api_error(status: int, message: str, code: str | None = None) -> _Response:
    data: dict[str, Any] = {"type": _API_ERROR_TYPES.get(status, "ERROR"), "message": message}
    if code is not None:
        data["code"] = code
    return _json(status, data)


def _html(status: int, page: str) -> _Response:
    return _Response(
        status,
        page.encode("utf-8"),
        {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
    )


def _redirect(location: str) -> _Response:
    return _Response(302, b"", {"Location": location, "Cache-Control": "no-store"})


def _add_query(url: str, params: Mapping[str, str | None]) -> str:
    parts = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    pairs += [(key, value) for key, value in params.items() if value is not None]
    query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=query))


# --------------------------------------------------------------------------------------------
# state records


@dataclass
class _Grant:
    """What one consent (or :meth:`FakeBrex.issue_tokens`) granted: a refresh token chain."""

    grant_id: str
    client_id: str
    user_id: str
    scopes: list[str]
    auth_time: int
    revoked: bool = False
    refresh_tokens: list[str] = field(default_factory=list)
    access_tokens: list[str] = field(default_factory=list)


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scopes: list[str]
    user_id: str
    nonce: str | None
    code_challenge: str | None
    expires_at: float
    auth_time: int
    used: bool = False
    grant_id: str | None = None


@dataclass
class _AccessToken:
    client_id: str
    scopes: list[str]
    user_id: str | None
    issued_at: float
    expires_at: float
    grant_id: str | None
    revoked: bool = False


@dataclass
class _RefreshToken:
    grant_id: str
    issued_at: float
    expires_at: float
    rotated_at: float | None = None
    revoked: bool = False


@dataclass
class _Failure:
    path: str
    status: int
    times: int
    body: Any
    delay: float
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _RateLimit:
    path: str
    limit: int
    window: float
    retry_after: bool
    window_started: float = 0.0
    used: int = 0


def _retry_after_header(retry_after: float | datetime | str) -> str:
    """A ``Retry-After`` value: seconds as delta-seconds, a datetime as an HTTP-date."""
    if isinstance(retry_after, datetime):
        if retry_after.tzinfo is None:
            retry_after = retry_after.replace(tzinfo=timezone.utc)
        return format_datetime(retry_after.astimezone(timezone.utc), usegmt=True)
    if isinstance(retry_after, str):
        return retry_after
    return str(max(0, math.ceil(retry_after)))


@dataclass
class _Tamper:
    path: str
    times: int
    body: Any
    fields: dict[str, Any]

    def apply(self, response: _Response) -> _Response:
        if self.body is not _UNSET:
            data = self.body
        else:
            try:
                data = json.loads(response.body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return response
            if not isinstance(data, dict):
                return response
            for key, value in self.fields.items():
                if value is DROP:
                    data.pop(key, None)
                else:
                    data[key] = value
        return _json(response.status, data, {**response.headers})


_Rule = TypeVar("_Rule", _Failure, _Tamper)


class HeldAnswers:
    """Answers :meth:`FakeBrex.hold_next` keeps back until :meth:`release`.

    The requests are processed when they arrive; only their answers wait. Leaving a
    ``with`` block releases them.
    """

    def __init__(self, path: str, times: int, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        #: The JSON answers held so far (decoded; None for a body that is not JSON).
        self.answers: list[Any] = []
        self._left = times
        self._arrived = threading.Semaphore(0)
        self._released = threading.Event()

    def _take(self, path: str) -> bool:
        if self._left <= 0 or not path.endswith(self.path):
            return False
        self._left -= 1
        return True

    def _hold(self, response: _Response) -> None:
        try:
            self.answers.append(json.loads(response.body.decode("utf-8")))
        except (UnicodeDecodeError, ValueError):
            self.answers.append(None)
        self._arrived.release()
        # Never hang the server for good when a test forgets to release.
        self._released.wait(self.timeout)

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until one more answer is held; False when none came within ``timeout``."""
        return self._arrived.acquire(timeout=timeout)

    def release(self) -> None:
        """Send every held answer, and those of later matching requests at once."""
        self._released.set()

    def __enter__(self) -> HeldAnswers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "FakeBrex/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read :attr:`FakeBrex.requests` instead."""

    def _serve(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeBrex) -> None:
        self.fake = fake
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that went away; handler errors are kept in :attr:`FakeBrex.errors`."""


class _FormParser(HTMLParser):
    """Collects the controls of one ``<form>`` of a page, as a browser would see them."""

    def __init__(self, form_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.found = False
        self.action = ""
        self.method = "get"
        self.controls: list[dict[str, str]] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value if value is not None else "" for key, value in attrs}
        if tag == "form" and attributes.get("id") == self.form_id:
            self.found = self._inside = True
            self.action = attributes.get("action", "")
            self.method = attributes.get("method", "get").lower()
        elif self._inside and tag in ("input", "button"):
            self.controls.append({"tag": tag, **attributes})

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _http(method: str, url: str, data: list[tuple[str, str]] | None = None) -> tuple[int, Any, str]:
    body = urllib.parse.urlencode(data).encode("ascii") if data is not None else None
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", _FORM)
    request.add_header("Accept", "text/html")
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# pages

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f3f5;color:#161616;
  font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:440px;margin:56px auto;background:#fff;border-radius:14px;padding:32px 32px 28px;
  box-shadow:0 1px 2px rgba(0,0,0,.06),0 8px 24px rgba(0,0,0,.06)}
.logo{font-weight:800;font-size:24px;letter-spacing:-1px;margin-bottom:20px}
h1{font-size:20px;line-height:1.3;margin:0 0 6px}
p{margin:0 0 16px;color:#555}
label.field{display:block;font-weight:600;margin:0 0 4px}
input[type=email],input[type=text]{width:100%;padding:10px 12px;border:1px solid #ccc;
  border-radius:8px;font:inherit;margin-bottom:18px}
ul{list-style:none;margin:0 0 20px;padding:0;border:1px solid #eee;border-radius:10px}
li{padding:10px 14px;border-top:1px solid #eee}
li:first-child{border-top:0}
li label{display:flex;gap:10px;align-items:center;cursor:pointer}
li code{color:#888;font-size:12px;margin-left:auto}
.who{font-size:13px;color:#777;margin-bottom:18px}
.actions{display:flex;flex-direction:row-reverse;gap:12px}
button{flex:1;padding:11px 0;border-radius:8px;font:inherit;font-weight:600;cursor:pointer;
  border:1px solid #161616}
#allow,#save{background:#161616;color:#fff}
#deny{background:#fff;color:#161616}
.error{color:#b00020}
.note{font-size:12px;color:#888;margin:14px 0 0}
"""


def _page(title: str, content: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f'<body><main><div class="logo">brex</div>{content}</main></body></html>\n'
    )


def _error_page(status: int, error: str, description: str) -> _Response:
    content = (
        f"<h1>{status} {html.escape(error)}</h1>"
        '<p class="error" id="error">Your request resulted in an error. '
        f"{html.escape(description)}</p>"
    )
    return _html(status, _page("Brex - Error", content))


# --------------------------------------------------------------------------------------------
# the fake


class FakeBrex:
    """A fake Brex OAuth server and API on a loopback port, driven and inspected by tests.

    All state sits behind one lock, so it can be used from several threads; the server answers
    each request on its own thread.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = "test-client-id",
        client_secret: str = "test-client-secret",
        redirect_uris: Iterable[str] | None = None,
        access_token_ttl: float = 3600,
        refresh_token_lifetime: float = 90 * 24 * 3600,
        rotate_refresh_tokens: bool = True,
        refresh_grace_period: float = 30.0,
        include_expires_in: bool = True,
        include_scope: bool = True,
        authorization_response_iss_parameter_supported: bool = True,
        authorization_code_ttl: float = 60,
        users: Sequence[Mapping[str, Any]] | None = None,
        company: Mapping[str, Any] | None = None,
        public_url: str | None = None,
    ) -> None:
        """Configure the fake; nothing listens until :meth:`start`.

        ``redirect_uris=None`` accepts any absolute redirect URI, otherwise one must match exactly.
        ``users`` replaces the five default users (the first one is :attr:`default_user`);
        missing fields get defaults. ``company`` is merged over the default company.
        ``public_url`` overrides :attr:`base_url` when clients reach the fake at another address
        (e.g. when it listens on ``0.0.0.0`` inside a container).
        ``authorization_response_iss_parameter_supported`` is advertised in discovery, as a
        server implementing RFC 9207 does; the redirect back always carries ``iss`` unless
        :attr:`authorization_response_fault` says otherwise.
        """
        self.host = host
        self.port = port
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris: list[str] | None = (
            None if redirect_uris is None else list(redirect_uris)
        )
        self.access_token_ttl = access_token_ttl
        self.refresh_token_lifetime = refresh_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.refresh_grace_period = refresh_grace_period
        self.include_expires_in = include_expires_in
        self.include_scope = include_scope
        self.authorization_response_iss_parameter_supported = (
            authorization_response_iss_parameter_supported
        )
        self.authorization_code_ttl = authorization_code_ttl
        self.public_url = public_url
        self.scopes_supported: list[str] = list(SUPPORTED_SCOPES)

        self.users: list[dict[str, Any]] = [
            self._normalise_user(user)
            for user in (self._default_users() if users is None else users)
        ]
        if not self.users:
            raise ValueError("FakeBrex needs at least one user")
        self.company: dict[str, Any] = {**self._default_company(), **dict(company or {})}

        self.requests: list[dict[str, Any]] = []
        self.authorize_requests: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter(dict.fromkeys(_STAT_KEYS, 0))
        self.errors: list[str] = []
        self.referrals: dict[str, dict[str, Any]] = {}
        self.idempotency_keys: dict[str, str] = {}

        self._lock = threading.RLock()
        self._clock_offset = 0.0
        self._id_token_fault: str | None = None
        self._refresh_id_token_fault: str | None = None
        self._authorization_response_fault: str | None = None
        self._identity_fault: str | None = None
        self._signing_key = _cached_key("signing")
        self._published_keys: list[_SigningKey] = [self._signing_key]
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._failures: list[_Failure] = []
        self._tampers: list[_Tamper] = []
        self._holds: list[HeldAnswers] = []
        self._rate_limits: list[_RateLimit] = []
        self._latency: float = 0.0
        self._path_latency: dict[str, float] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: Webhook subscriptions, secrets and deliveries (see :mod:`.fake_webhooks`).
        self.webhooks = FakeWebhooks(
            self, {"json": _json, "api_error": _api_error, "html": _html, "page": _page}
        )

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeBrex:
        """Bind the port (``0`` picks a free one) and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeBrex is already running")
        server = _Server((self.host, self.port), self)
        self.port = int(server.server_address[1])
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"FakeBrex:{self.port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the server thread."""
        self.webhooks.stop()
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeBrex:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    # ---------------------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the fake (and of its API)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if not self.port:
            raise RuntimeError("FakeBrex has no port yet: call start() first")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def issuer(self) -> str:
        """The OpenID issuer: ``base_url + "/oauth2/default"``."""
        return self.base_url + ISSUER_PATH

    @property
    def api_base_url(self) -> str:
        """Base URL of the Brex API endpoints (the same server)."""
        return self.base_url

    def django_settings(self, **extra: Any) -> dict[str, Any]:
        """A ``BREX_OAUTH`` settings dict pointing a Django site at this fake."""
        return {
            "CLIENT_ID": self.client_id,
            "CLIENT_SECRET": self.client_secret,
            "ENVIRONMENT": "staging",
            "ISSUER": self.issuer,
            "API_BASE_URL": self.api_base_url,
            "SCOPES": list(DEFAULT_SCOPES),
            **extra,
        }

    # ---------------------------------------------------------------------------- users

    @property
    def default_user(self) -> dict[str, Any]:
        """The user who signs in unless another one is chosen."""
        return self.users[0]

    def find_user(self, user: str) -> dict[str, Any] | None:
        """The user whose id or email (any case) is ``user``, or ``None``."""
        wanted = user.strip().lower()
        for candidate in self.users:
            if candidate["id"].lower() == wanted or candidate["email"].lower() == wanted:
                return candidate
        return None

    @staticmethod
    def _default_users() -> list[dict[str, Any]]:
        names = [
            ("Ada", "Lovelace", "ACTIVE"),
            ("Grace", "Hopper", "ACTIVE"),
            ("Alan", "Turing", "ACTIVE"),
            ("Katherine", "Johnson", "ACTIVE"),
            ("Edsger", "Dijkstra", "INVITED"),
        ]
        return [
            {
                "first_name": first,
                "last_name": last,
                "email": f"{first.lower()}.{last.lower()}@example.com",
                "status": status,
            }
            for first, last, status in names
        ]

    @staticmethod
    def _normalise_user(user: Mapping[str, Any]) -> dict[str, Any]:
        user_id = user.get("id") or _random_id("cuuser_")
        data: dict[str, Any] = {
            "id": user_id,
            "first_name": "Test",
            "last_name": "User",
            "email": f"{user_id}@example.com",
            "status": "ACTIVE",
            "manager_id": None,
            "department_id": None,
            "location_id": None,
            "title_id": None,
            "remote_display_id": None,
            "metadata": {},
        }
        data.update(user)
        data["id"] = user_id
        return data

    @staticmethod
    def _default_company() -> dict[str, Any]:
        return {
            "id": _random_id("cuacc_"),
            "legal_name": "Acme Rockets, Inc.",
            "mailing_address": {
                "line1": "100 Launch Way",
                "line2": "Suite 400",
                "city": "San Francisco",
                "state": "CA",
                "country": "US",
                "postal_code": "94107",
                "phone_number": "+14155550100",
            },
            "accountType": "BREX_EMPOWER",
        }

    # ---------------------------------------------------------------------------- consent

    def consent(
        self,
        authorize_url: str,
        *,
        scopes: Iterable[str] | None = None,
        deny: bool = False,
        user: str | None = None,
    ) -> str:
        """Walk through the consent page over HTTP and return where it redirects the browser.

        GETs ``authorize_url``, fills the consent form like a browser (``scopes=None`` keeps every
        requested scope checked, ``[]`` unchecks all of them) and submits Allow, or Deny when
        ``deny``; ``user`` (id or email) signs in as that user. Redirects leading to this fake's
        authorize endpoint are followed first. Returns the ``Location`` of the redirect back to
        the client, including error redirects. Raises ``AssertionError`` with the page text when
        the server shows an error page instead.
        """
        own_authorize = f"{self.issuer}/v1/authorize"
        for _ in range(5):
            status, headers, page = _http("GET", authorize_url)
            location = str(headers.get("Location") or "")
            if not (300 <= status < 400 and location):
                break
            target = urllib.parse.urljoin(authorize_url, location)
            if target.split("?", 1)[0] != own_authorize:
                return location
            authorize_url = target
        if status != 200:
            raise AssertionError(f"authorize answered HTTP {status}: {_page_text(page)}")
        form = _FormParser("consent-form")
        form.feed(page)
        if not form.found:
            raise AssertionError(f"no consent form on the authorize page: {_page_text(page)}")

        wanted = None if scopes is None else set(scopes)
        email = None
        if user is not None:
            chosen = self.find_user(user)
            email = chosen["email"] if chosen else user
        data: list[tuple[str, str]] = []
        sent_email = False
        for control in form.controls:
            name = control.get("name")
            kind = control.get("type", "submit" if control["tag"] == "button" else "text").lower()
            if not name or control["tag"] == "button" or kind in ("submit", "button", "reset"):
                continue
            value = control.get("value", "")
            if kind in ("checkbox", "radio"):
                if name == "scope" and wanted is not None:
                    checked = value in wanted
                else:
                    checked = "checked" in control
                if checked:
                    data.append((name, value or "on"))
                continue
            if name == "email":
                sent_email = True
                if email is not None:
                    value = email
            data.append((name, value))
        if email is not None and not sent_email:
            data.append(("email", email))
        data.append(("decision", "deny" if deny else "allow"))

        action = urllib.parse.urljoin(authorize_url, form.action or authorize_url)
        status, headers, page = _http("POST", action, data)
        if 300 <= status < 400 and headers.get("Location"):
            return str(headers["Location"])
        raise AssertionError(f"consent answered HTTP {status}: {_page_text(page)}")

    # ---------------------------------------------------------------------------- controls

    def fail_next(
        self,
        path: str,
        *,
        status: int = 503,
        times: int = 1,
        body: Any = None,
        delay: float = 0.0,
        retry_after: float | datetime | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` requests whose path ends with ``path`` with ``status``.

        ``body`` may be a dict/list (sent as JSON) or a str/bytes (sent as text); by default it is
        an error in the style of the endpoint (OAuth ``{"error": ...}`` under the issuer, Brex
        ``{"type": ..., "message": ...}`` elsewhere). ``delay`` seconds pass before the answer.
        ``retry_after`` adds a ``Retry-After`` header: seconds (delta-seconds), a datetime (an
        HTTP-date) or a raw string; ``headers`` adds any others.
        The request is not processed. Rules queue up in the order they were added.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = _retry_after_header(retry_after)
        with self._lock:
            self._failures.append(_Failure(path, status, times, body, delay, extra))

    def rate_limit(
        self,
        limit: int | None,
        *,
        per: float = 60.0,
        path: str = "/v1/token",
        retry_after: bool = True,
    ) -> None:
        """Enforce a rate limit, as Brex does (1,000 requests per 60 s per client and account):
        beyond ``limit`` requests whose path ends with ``path`` in a fixed window of ``per``
        seconds, answer 429 (with ``Retry-After``: the rest of the window, unless
        ``retry_after`` is False), without processing the request. Each 429 counts in
        ``stats["rate_limited"]``. ``limit=None`` removes the limit on ``path``.
        """
        with self._lock:
            self._rate_limits = [r for r in self._rate_limits if r.path != path]
            if limit is not None:
                self._rate_limits.append(_RateLimit(path, int(limit), float(per), retry_after))

    def tamper_next(
        self, path: str, *, times: int = 1, body: Any = _UNSET, **fields: Any
    ) -> None:
        """Process the next ``times`` requests whose path ends with ``path`` as usual, then
        spoil their JSON answer before it is sent.

        Each of ``fields`` is set in the answer (:data:`DROP` removes it); ``body`` replaces
        the whole answer with any JSON value (``[]``, ``None``, ...). Unlike
        :meth:`fail_next`, the request has its effect: a refresh token sent to the token
        endpoint is rotated, and the client gets a spoilt answer instead of the new one.
        :data:`MALFORMED_TOKEN_ANSWERS` names the usual ways.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._tampers.append(_Tamper(path, times, body, dict(fields)))

    def hold_next(self, path: str, *, times: int = 1, timeout: float = 60.0) -> HeldAnswers:
        """Process the next ``times`` requests whose path ends with ``path`` at once, but hold
        their answers back until the returned :class:`HeldAnswers` is released.

        For races: ``held.wait()`` returns once Brex has done the work (a refresh token was
        rotated, say); the test then does something else meanwhile and calls
        ``held.release()`` (or uses it as a context manager). An answer is sent after
        ``timeout`` seconds anyway.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        held = HeldAnswers(path, times, timeout)
        with self._lock:
            self._holds.append(held)
        return held

    def clear_failures(self) -> None:
        """Forget every pending :meth:`fail_next` and :meth:`tamper_next` rule, every rate
        limit and every latency, and release every held answer."""
        with self._lock:
            self._failures.clear()
            self._tampers.clear()
            self._rate_limits.clear()
            self._latency = 0.0
            self._path_latency.clear()
            holds, self._holds = self._holds, []
        for held in holds:
            held.release()

    def set_latency(self, seconds: float, path: str | None = None) -> None:
        """Hold back every response (or those for paths ending with ``path``) by ``seconds``.

        The request is processed at once; only the answer is late, as when a client times out on
        a request the server completed. A path-specific latency replaces the global one;
        ``0`` removes it.
        """
        with self._lock:
            if path is None:
                self._latency = max(0.0, seconds)
            elif seconds > 0:
                self._path_latency[path] = seconds
            else:
                self._path_latency.pop(path, None)

    def advance_time(self, seconds: float) -> None:
        """Move the fake's clock forward (expiries, ``iat``/``exp`` of new id_tokens)."""
        with self._lock:
            self._clock_offset += seconds

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired."""
        with self._lock:
            now = self._now()
            for token in self._access_tokens.values():
                token.expires_at = min(token.expires_at, now - 1)

    def expire_refresh_token(self, refresh_token: str) -> None:
        """Make one refresh token expired (``KeyError`` if the fake never issued it)."""
        with self._lock:
            record = self._refresh_tokens.get(refresh_token)
            if record is None:
                raise KeyError("unknown refresh token")
            record.expires_at = min(record.expires_at, self._now() - 1)

    def narrow_grant(self, refresh_token: str, scopes: Iterable[str]) -> None:
        """The customer takes scopes back at Brex: the grant of ``refresh_token`` keeps only
        those of ``scopes`` it had (``openid`` and ``offline_access`` always stay). Its next
        refreshes issue tokens for, and answer with, the narrower scopes. ``KeyError`` if
        the fake never issued the token."""
        with self._lock:
            record = self._refresh_tokens.get(refresh_token)
            if record is None:
                raise KeyError("unknown refresh token")
            grant = self._grants[record.grant_id]
            keep = set(scopes) | set(_OIDC_SCOPES)
            grant.scopes = [scope for scope in grant.scopes if scope in keep]

    def revoke_all(self) -> None:
        """Revoke every user grant, as if each customer disconnected the app at Brex.

        Their refresh and access tokens stop working; client-credentials tokens are unaffected.
        """
        with self._lock:
            for grant in self._grants.values():
                self._revoke_grant(grant)

    def rotate_signing_key(self, *, keep_old_in_jwks: bool = False) -> None:
        """Sign id_tokens with a new key; the JWKS keeps the old key only if asked."""
        key = _new_signing_key()
        with self._lock:
            self._signing_key = key
            self._published_keys = [key, *self._published_keys] if keep_old_in_jwks else [key]

    @property
    def id_token_fault(self) -> str | None:
        """``None`` or one of :data:`ID_TOKEN_FAULTS`: the defect put into every id_token from
        now on (sign-in and refresh alike).

        ``bad_signature`` signs with a foreign key under the published ``kid``; ``alg_none`` sends
        an unsigned token; ``alg_hs256`` signs with HS256, the public key as the HMAC secret;
        ``wrong_aud``/``wrong_iss`` change that claim; ``extra_aud`` adds a second, foreign
        audience (with ``azp`` naming the client), ``extra_aud_no_azp`` the same without ``azp``;
        ``wrong_azp`` names another client in ``azp``; ``wrong_sub`` names another user;
        ``expired`` dates the token an hour in the past; ``stale_iat`` issues it a week ago
        (still unexpired); ``future_iat`` issues it an hour in the future;
        ``wrong_nonce``/``missing_nonce`` alter the nonce; ``bad_at_hash`` hashes another access
        token; ``unknown_kid`` signs with a key whose ``kid`` is never in the JWKS;
        ``missing_kid`` leaves ``kid`` out of the header.
        """
        return self._id_token_fault

    @id_token_fault.setter
    def id_token_fault(self, fault: str | None) -> None:
        with self._lock:
            self._id_token_fault = self._checked_fault(fault, ID_TOKEN_FAULTS, "id_token")

    @property
    def refresh_id_token_fault(self) -> str | None:
        """``None`` or one of :data:`ID_TOKEN_FAULTS`: the defect put into the id_tokens that
        refreshes return from now on (it wins over :attr:`id_token_fault` there); sign-ins are
        left alone."""
        return self._refresh_id_token_fault

    @refresh_id_token_fault.setter
    def refresh_id_token_fault(self, fault: str | None) -> None:
        with self._lock:
            self._refresh_id_token_fault = self._checked_fault(fault, ID_TOKEN_FAULTS, "id_token")

    @property
    def authorization_response_fault(self) -> str | None:
        """``None`` or one of :data:`AUTHORIZATION_RESPONSE_FAULTS`: the defect of every
        redirect back to the client from now on (codes, denials and errors alike).

        ``wrong_iss`` names :data:`FOREIGN_ISSUER` in ``iss`` (a mix-up attack);
        ``missing_iss`` leaves ``iss`` out, although discovery still advertises it when
        :attr:`authorization_response_iss_parameter_supported` is true.
        """
        return self._authorization_response_fault

    @authorization_response_fault.setter
    def authorization_response_fault(self, fault: str | None) -> None:
        with self._lock:
            self._authorization_response_fault = self._checked_fault(
                fault, AUTHORIZATION_RESPONSE_FAULTS, "authorization response"
            )

    @staticmethod
    def _checked_fault(fault: str | None, known: tuple[str, ...], what: str) -> str | None:
        if fault is not None and fault not in known:
            raise ValueError(f"unknown {what} fault {fault!r}; use one of {known}")
        return fault

    @property
    def identity_fault(self) -> str | None:
        """``None`` or one of :data:`IDENTITY_FAULTS`: how ``/v2/users/me`` and
        ``/v2/company`` answer from now on, with HTTP 200 and a malformed body.

        ``not_json`` sends an HTML page; ``json_list`` a JSON list holding the right object;
        ``json_string`` a JSON string; ``wrong_types`` the right object with every field of
        the wrong type (numbers for ids and names, a list for the email, an object for the
        status).
        """
        return self._identity_fault

    @identity_fault.setter
    def identity_fault(self, fault: str | None) -> None:
        with self._lock:
            self._identity_fault = self._checked_fault(fault, IDENTITY_FAULTS, "identity")

    def emit(self, event_type: str, payload: Mapping[str, Any] | None = None,
             **options: Any) -> list[Any]:
        """Send a signed webhook event to the subscribed URLs (see
        :meth:`FakeWebhooks.emit <django_brex_oauth.testing.fake_webhooks.FakeWebhooks.emit>`)."""
        return self.webhooks.emit(event_type, payload, **options)

    # ---------------------------------------------------------------------------- inspection

    @property
    def signing_kid(self) -> str:
        """``kid`` of the key currently signing id_tokens."""
        return self._signing_key.kid

    def jwks(self) -> dict[str, Any]:
        """The JWKS document served at ``/v1/keys``."""
        with self._lock:
            return {"keys": [dict(key.jwk) for key in self._published_keys]}

    def is_refresh_token_active(self, token: str) -> bool:
        """Whether a refresh request with ``token`` would succeed now (grace period included)."""
        with self._lock:
            record = self._refresh_tokens.get(token)
            if record is None or not self._refresh_usable(record):
                return False
            if record.rotated_at is not None:
                return self._now() - record.rotated_at < self.refresh_grace_period
            return True

    def live_grants(self) -> list[dict[str, Any]]:
        """The user grants not revoked, one ``{"user_id", "scopes"}`` per consent (or
        :meth:`issue_tokens`), e.g. to check that a refused sign-in left no grant alive."""
        with self._lock:
            return [
                {"user_id": grant.user_id, "scopes": list(grant.scopes)}
                for grant in self._grants.values()
                if not grant.revoked
            ]

    def is_access_token_active(self, token: str) -> bool:
        """Whether ``token`` would be accepted by the API now."""
        with self._lock:
            record = self._access_tokens.get(token)
            return record is not None and self._access_usable(record)

    def issue_tokens(
        self, *, scopes: Iterable[str] | None = None, user: str | None = None
    ) -> dict[str, Any]:
        """Mint a token set as a completed consent would, without any HTTP.

        ``scopes`` defaults to :data:`DEFAULT_SCOPES`; a refresh token is included when
        ``offline_access`` is among them, an id_token when ``openid`` is. ``user`` is an id or
        email (default: :attr:`default_user`). The answer always carries ``expires_in``.
        """
        with self._lock:
            chosen = self._user_or_default(user)
            granted = _unique(scopes if scopes is not None else DEFAULT_SCOPES)
            grant = self._new_grant(chosen["id"], granted)
            response = self._token_set(
                grant,
                granted,
                nonce=None,
                with_refresh="offline_access" in granted,
                id_token_fault=self._id_token_fault,
            )
            response["expires_in"] = int(self.access_token_ttl)
            return response

    # ---------------------------------------------------------------------------- internals

    def _now(self) -> float:
        return time.time() + self._clock_offset

    def _user_or_default(self, user: str | None) -> dict[str, Any]:
        if user is None:
            return self.default_user
        chosen = self.find_user(user)
        if chosen is None:
            raise LookupError(f"no such fake Brex user: {user!r}")
        return chosen

    def _user_by_id(self, user_id: str | None) -> dict[str, Any] | None:
        return next((user for user in self.users if user["id"] == user_id), None)

    def _redirect_uri_allowed(self, redirect_uri: str) -> bool:
        if self.redirect_uris is not None:
            return redirect_uri in self.redirect_uris
        parts = urllib.parse.urlsplit(redirect_uri)
        return bool(parts.scheme and parts.netloc) and not parts.fragment

    def _new_grant(self, user_id: str, scopes: list[str]) -> _Grant:
        grant = _Grant(
            grant_id=secrets.token_hex(8),
            client_id=self.client_id,
            user_id=user_id,
            scopes=list(scopes),
            auth_time=int(self._now()),
        )
        self._grants[grant.grant_id] = grant
        return grant

    def _revoke_grant(self, grant: _Grant) -> None:
        grant.revoked = True
        for token in grant.refresh_tokens:
            self._refresh_tokens[token].revoked = True
        for token in grant.access_tokens:
            self._access_tokens[token].revoked = True

    def _refresh_usable(self, record: _RefreshToken) -> bool:
        grant = self._grants[record.grant_id]
        return not (record.revoked or grant.revoked or self._now() >= record.expires_at)

    def _access_usable(self, record: _AccessToken) -> bool:
        if record.revoked or self._now() >= record.expires_at:
            return False
        grant = self._grants.get(record.grant_id) if record.grant_id else None
        return grant is None or not grant.revoked

    def _new_access_token(
        self, scopes: list[str], user_id: str | None, grant: _Grant | None
    ) -> str:
        token = secrets.token_urlsafe(32)
        now = self._now()
        self._access_tokens[token] = _AccessToken(
            client_id=self.client_id,
            scopes=list(scopes),
            user_id=user_id,
            issued_at=now,
            expires_at=now + self.access_token_ttl,
            grant_id=grant.grant_id if grant else None,
        )
        if grant is not None:
            grant.access_tokens.append(token)
        return token

    def _new_refresh_token(self, grant: _Grant, expires_at: float | None = None) -> str:
        token = secrets.token_urlsafe(48)
        now = self._now()
        self._refresh_tokens[token] = _RefreshToken(
            grant_id=grant.grant_id,
            issued_at=now,
            expires_at=expires_at if expires_at is not None else now + self.refresh_token_lifetime,
        )
        grant.refresh_tokens.append(token)
        return token

    def _token_set(
        self,
        grant: _Grant,
        scopes: list[str],
        *,
        nonce: str | None,
        with_refresh: bool,
        refresh_expires_at: float | None = None,
        id_token_fault: str | None = None,
    ) -> dict[str, Any]:
        access_token = self._new_access_token(scopes, grant.user_id, grant)
        response: dict[str, Any] = {"token_type": "Bearer"}
        if self.include_expires_in:
            response["expires_in"] = int(self.access_token_ttl)
        response["access_token"] = access_token
        if self.include_scope:
            response["scope"] = " ".join(scopes)
        if with_refresh:
            response["refresh_token"] = self._new_refresh_token(grant, refresh_expires_at)
        user = self._user_by_id(grant.user_id)
        if "openid" in scopes and user is not None:
            response["id_token"] = self._id_token(
                user,
                nonce=nonce,
                access_token=access_token,
                auth_time=grant.auth_time,
                fault=id_token_fault,
            )
        return response

    def _id_token(
        self,
        user: Mapping[str, Any],
        *,
        nonce: str | None,
        access_token: str,
        auth_time: int,
        fault: str | None,
    ) -> str:
        now = int(self._now())
        claims: dict[str, Any] = {
            "ver": 1,
            "iss": self.issuer,
            "sub": user["id"],
            "aud": self.client_id,
            "iat": now,
            "exp": now + 3600,
            "jti": "ID." + secrets.token_urlsafe(24),
            "amr": ["pwd"],
            "auth_time": auth_time,
            "at_hash": _at_hash(access_token),
            "email": user["email"],
            "name": f"{user['first_name']} {user['last_name']}",
        }
        if nonce is not None:
            claims["nonce"] = nonce
        key = self._signing_key
        headers: dict[str, Any] = {"kid": key.kid}
        if fault == "bad_signature":
            key = _cached_key("foreign")
        elif fault == "unknown_kid":
            key = _cached_key("foreign")
            headers["kid"] = "unpublished-" + secrets.token_hex(8)
        elif fault == "missing_kid":
            del headers["kid"]
        elif fault == "wrong_aud":
            claims["aud"] = UNTRUSTED_AUDIENCE
        elif fault in ("extra_aud", "extra_aud_no_azp"):
            claims["aud"] = [self.client_id, UNTRUSTED_AUDIENCE]
            if fault == "extra_aud":
                claims["azp"] = self.client_id
        elif fault == "wrong_azp":
            claims["azp"] = UNTRUSTED_AUDIENCE
        elif fault == "wrong_iss":
            claims["iss"] = FOREIGN_ISSUER
        elif fault == "wrong_sub":
            others = [u["id"] for u in self.users if u["id"] != user["id"]]
            claims["sub"] = others[0] if others else _random_id("cuuser_")
        elif fault == "expired":
            claims["iat"] = now - 7200
            claims["exp"] = now - 3600
            claims["auth_time"] = min(auth_time, now - 7200)
        elif fault == "stale_iat":
            claims["iat"] = now - 7 * 24 * 3600
            claims["auth_time"] = min(auth_time, claims["iat"])
        elif fault == "future_iat":
            claims["iat"] = now + 3600
            claims["exp"] = now + 7200
        elif fault == "wrong_nonce":
            claims["nonce"] = "not-your-nonce-" + secrets.token_urlsafe(12)
        elif fault == "missing_nonce":
            claims.pop("nonce", None)
        elif fault == "bad_at_hash":
            claims["at_hash"] = _at_hash(access_token + "-not-this-one")
        elif fault in ("alg_none", "alg_hs256"):
            # Built by hand: PyJWT refuses both, as a client should.
            header = {"alg": "none" if fault == "alg_none" else "HS256", "typ": "JWT", **headers}
            signing_input = ".".join(
                _b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
                for part in (header, claims)
            )
            if fault == "alg_none":
                return signing_input + "."
            # The key-confusion attack: the published public key (PEM) as the HMAC secret.
            secret = key.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
            return signing_input + "." + _b64url(mac)
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers=headers)

    # ---------------------------------------------------------------------------- serving

    def _handle(self, handler: _Handler) -> None:
        split = urllib.parse.urlsplit(handler.path)
        headers = _Headers(handler.headers.items())
        try:
            length = int(headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        body = handler.rfile.read(length) if length > 0 else b""
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form: dict[str, list[str]] = {}
        if content_type == _FORM:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        request = _Request(
            method=handler.command,
            path=split.path,
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            form=form,
            headers=headers,
            body=body,
            content_type=content_type,
        )
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "query": _flatten(request.query),
            "form": _flatten(request.form),
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            "time": time.time(),
            "status": None,
        }
        with self._lock:
            self.requests.append(entry)
            failure = self._take_rule(self._failures, request.path) or self._over_rate_limit(
                request.path
            )
            latency = self._latency_for(request.path)

        held = None
        if failure is not None:
            time.sleep(failure.delay)
            response = self._failure_response(request.path, failure)
        else:
            try:
                with self._lock:
                    response = self._dispatch(request)
                    tamper = self._take_rule(self._tampers, request.path)
                    held = next((h for h in self._holds if h._take(request.path)), None)
                if tamper is not None:
                    response = tamper.apply(response)
            except Exception:
                self.errors.append(traceback.format_exc())
                response = _api_error(500, "Internal error in FakeBrex")
        if latency > 0:
            time.sleep(latency)
        if held is not None:
            held._hold(response)
        entry["status"] = response.status
        try:
            handler.send_response(response.status)
            for key, value in response.headers.items():
                handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(response.body)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def _take_rule(rules: list[_Rule], path: str) -> _Rule | None:
        """The first of ``rules`` (fail_next or tamper_next) for ``path``, used up once."""
        for rule in rules:
            if path.endswith(rule.path):
                rule.times -= 1
                if rule.times <= 0:
                    rules.remove(rule)
                return rule
        return None

    def _over_rate_limit(self, path: str) -> _Failure | None:
        for rule in self._rate_limits:
            if not path.endswith(rule.path):
                continue
            now = time.monotonic()
            if now - rule.window_started >= rule.window:
                rule.window_started, rule.used = now, 0
            rule.used += 1
            if rule.used <= rule.limit:
                return None
            self.stats["rate_limited"] += 1
            left = rule.window - (now - rule.window_started)
            headers = {"Retry-After": _retry_after_header(max(1, left))} if rule.retry_after else {}
            return _Failure(path, 429, 1, None, 0.0, headers)
        return None

    def _latency_for(self, path: str) -> float:
        for suffix, seconds in self._path_latency.items():
            if path.endswith(suffix):
                return seconds
        return self._latency

    def _failure_response(self, path: str, failure: _Failure) -> _Response:
        response = self._failure_body(path, failure)
        response.headers.update(failure.headers)
        return response

    def _failure_body(self, path: str, failure: _Failure) -> _Response:
        body = failure.body
        if isinstance(body, (dict, list)):
            return _json(failure.status, body)
        if isinstance(body, (str, bytes)):
            data = body.encode("utf-8") if isinstance(body, str) else body
            return _Response(failure.status, data, {"Content-Type": "text/plain; charset=utf-8"})
        description = f"Injected failure: HTTP {failure.status}"
        if path.startswith(ISSUER_PATH):
            default = "server_error" if failure.status >= 500 else "invalid_request"
            error = _OAUTH_ERRORS.get(failure.status, default)
            return _oauth_error(failure.status, error, description)
        return _api_error(failure.status, description, _API_ERROR_TYPES.get(failure.status))

    def _dispatch(self, request: _Request) -> _Response:
        path = request.path
        params: dict[str, str] = {}
        if path == ISSUER_PATH or path.startswith(ISSUER_PATH + "/"):
            route = self._oauth_routes().get(path[len(ISSUER_PATH) :])
            if route is None:
                return _oauth_error(404, "not_found", f"No such endpoint: {path}")
        else:
            route, params = self._api_route(path)
            if route is None:
                return _api_error(404, f"No such endpoint: {path}", "NOT_FOUND")
        handler = route.get(request.method)
        if handler is None:
            return self._not_allowed(route)
        return handler(request, **params)

    @staticmethod
    def _not_allowed(route: Mapping[str, Any]) -> _Response:
        response = _api_error(405, "Method not allowed", "METHOD_NOT_ALLOWED")
        response.headers["Allow"] = ", ".join(route)
        return response

    def _oauth_routes(self) -> dict[str, dict[str, Callable[..., _Response]]]:
        discovery = {"GET": self._discovery}
        return {
            "/.well-known/openid-configuration": discovery,
            "/.well-known/oauth-authorization-server": discovery,
            "/v1/keys": {"GET": self._keys},
            "/v1/authorize": {"GET": self._authorize_page, "POST": self._authorize_submit},
            "/v1/token": {"POST": self._token},
            "/v1/revoke": {"POST": self._revoke},
            "/v1/introspect": {"POST": self._introspect},
            "/v1/userinfo": {"GET": self._userinfo, "POST": self._userinfo},
            "/v1/logout": {"GET": self._logout},
        }

    def _api_route(
        self, path: str
    ) -> tuple[dict[str, Callable[..., _Response]] | None, dict[str, str]]:
        exact: dict[str, dict[str, Callable[..., _Response]]] = {
            "/v2/users/me": {"GET": self._api_me},
            "/v2/users": {"GET": self._api_users},
            "/v2/company": {"GET": self._api_company},
            "/v1/referrals": {"POST": self._api_create_referral},
        }
        if path in exact:
            return exact[path], {}
        route, params = self.webhooks.routes(path)
        if route is not None:
            return route, params
        match = re.fullmatch(r"/v2/users/([^/]+)", path)
        if match:
            return {"GET": self._api_user}, {"user_id": urllib.parse.unquote(match.group(1))}
        match = re.fullmatch(r"/v1/referrals/([^/]+)", path)
        if match:
            return {"GET": self._api_referral}, {"referral_id": urllib.parse.unquote(match[1])}
        return None, {}

    # ---------------------------------------------------------------------------- discovery

    def _discovery(self, request: _Request) -> _Response:
        self.stats["discovery"] += 1
        issuer = self.issuer
        return _json(
            200,
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/v1/authorize",
                "token_endpoint": f"{issuer}/v1/token",
                "userinfo_endpoint": f"{issuer}/v1/userinfo",
                "jwks_uri": f"{issuer}/v1/keys",
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": [
                    "authorization_code",
                    "refresh_token",
                    "client_credentials",
                ],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": [*self.scopes_supported, REFERRALS_SCOPE],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "client_secret_basic",
                ],
                "claims_supported": [
                    "iss",
                    "ver",
                    "sub",
                    "aud",
                    "iat",
                    "exp",
                    "jti",
                    "auth_time",
                    "amr",
                    "nonce",
                    "at_hash",
                    "email",
                    "name",
                    "given_name",
                    "family_name",
                ],
                "code_challenge_methods_supported": ["S256"],
                "introspection_endpoint": f"{issuer}/v1/introspect",
                "introspection_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "client_secret_basic",
                ],
                "revocation_endpoint": f"{issuer}/v1/revoke",
                "revocation_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "client_secret_basic",
                ],
                "end_session_endpoint": f"{issuer}/v1/logout",
                "request_parameter_supported": False,
                "claims_parameter_supported": False,
                **(
                    {"authorization_response_iss_parameter_supported": True}
                    if self.authorization_response_iss_parameter_supported
                    else {}
                ),
            },
        )

    def _keys(self, request: _Request) -> _Response:
        self.stats["jwks"] += 1
        response = _json(200, self.jwks())
        response.headers["Cache-Control"] = "max-age=300"
        return response

    # ---------------------------------------------------------------------------- authorize

    def _check_authorize(self, params: Mapping[str, str]) -> _Response | None:
        """An error page or error redirect for bad authorize parameters, else ``None``."""
        client_id = params.get("client_id", "")
        if not client_id:
            return _error_page(400, "invalid_request", "The 'client_id' parameter is required.")
        if not _equal(client_id, self.client_id):
            return _error_page(400, "invalid_client", "Invalid value for 'client_id' parameter.")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            return _error_page(400, "invalid_request", "The 'redirect_uri' parameter is required.")
        if not self._redirect_uri_allowed(redirect_uri):
            return _error_page(
                400,
                "invalid_request",
                "The 'redirect_uri' parameter must be a Login redirect URI in the client app "
                "settings.",
            )
        state = params.get("state")

        def fail(error: str, description: str) -> _Response:
            return self._authorization_response(
                redirect_uri, {"error": error, "error_description": description, "state": state}
            )

        if params.get("response_type") != "code":
            return fail(
                "unsupported_response_type",
                "The response type is not supported by the authorization server. "
                "Configured response types: [code].",
            )
        if not state or len(state) <= 8:
            return fail(
                "invalid_request",
                "The 'state' parameter is required and must be longer than 8 characters.",
            )
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        if challenge:
            if method != "S256":
                return fail(
                    "invalid_request", "The 'code_challenge_method' parameter must be 'S256'."
                )
            if not _CHALLENGE_RE.fullmatch(challenge):
                return fail("invalid_request", "The 'code_challenge' parameter is invalid.")
        elif method:
            return fail(
                "invalid_request",
                "The 'code_challenge' parameter is required with 'code_challenge_method'.",
            )
        scopes = params.get("scope", "").split()
        if "openid" not in scopes:
            return fail("invalid_scope", "The 'openid' scope is required.")
        unknown = [scope for scope in scopes if scope not in self.scopes_supported]
        if unknown:
            return fail(
                "invalid_scope",
                "One or more scopes are not configured for the authorization server resource: "
                + " ".join(unknown),
            )
        if "none" in params.get("prompt", "").split():
            return fail(
                "login_required",
                "The client specified not to prompt, but the user is not logged in.",
            )
        return None

    def _authorize_page(self, request: _Request) -> _Response:
        self.stats["authorize"] += 1
        params = _first(request.query)
        self.authorize_requests.append(dict(params))
        problem = self._check_authorize(params)
        if problem is not None:
            return problem
        return _html(200, self._consent_page(params))

    def _consent_page(self, params: Mapping[str, str], error: str | None = None) -> str:
        esc = html.escape
        scopes = _unique(params.get("scope", "").split())
        login = "login" in params.get("prompt", "").split()
        hint = self.find_user(params["login_hint"]) if params.get("login_hint") else None
        user = hint or self.default_user
        client = esc(self.client_id)
        carried = [
            "client_id",
            "redirect_uri",
            "response_type",
            "state",
            "nonce",
            "code_challenge",
            "code_challenge_method",
            "prompt",
            "login_hint",
        ]
        hidden = "".join(
            f'<input type="hidden" name="{name}" value="{esc(params[name])}">'
            for name in carried
            if name in params
        )
        hidden += f'<input type="hidden" name="requested_scope" value="{esc(" ".join(scopes))}">'
        items = "".join(
            f'<li><label><input type="checkbox" name="scope" value="{esc(scope)}" checked>'
            f"<span>{esc(_scope_label(scope))}</span><code>{esc(scope)}</code></label></li>"
            for scope in scopes
            if scope not in _OIDC_SCOPES
        )
        parts = []
        if login:
            parts.append("<h1>Sign in to Brex</h1>")
            parts.append(f"<p>to continue to <strong>{client}</strong></p>")
        else:
            parts.append(f"<h1>Authorize {client}</h1>")
        if error:
            parts.append(f'<p class="error" id="error">{esc(error)}</p>')
        parts.append(
            f'<form id="consent-form" method="post" action="{esc(self.issuer)}/v1/authorize">'
        )
        parts.append(hidden)
        if login:
            parts.append(
                '<label class="field" for="email">Work email</label>'
                f'<input type="email" id="email" name="email" value="{esc(user["email"])}" '
                'autocomplete="email" required>'
            )
        else:
            parts.append(f'<div class="who">Signed in as {esc(user["email"])}</div>')
        company = esc(self.company.get("legal_name", "your company"))
        parts.append(
            f"<p><strong>{client}</strong> wants to access your Brex account "
            f"for <strong>{company}</strong>:</p>"
        )
        parts.append(f'<ul id="scopes">{items}</ul>' if items else "<p>No API access.</p>")
        if "offline_access" in scopes:
            parts.append('<p class="note">It will keep this access until you disconnect it.</p>')
        parts.append(
            '<div class="actions">'
            '<button type="submit" id="allow" name="decision" value="allow">Allow</button>'
            '<button type="submit" id="deny" name="decision" value="deny" formnovalidate>'
            "Deny</button>"
            "</div></form>"
        )
        title = "Sign in to Brex" if login else f"Authorize {self.client_id}"
        return _page(title, "".join(parts))

    def _authorize_submit(self, request: _Request) -> _Response:
        if request.content_type != _FORM:
            return _error_page(400, "invalid_request", "The consent form must be form-encoded.")
        form = _first(request.form)
        params = {key: value for key, value in form.items() if key not in ("scope", "email")}
        params["scope"] = form.get("requested_scope", "")
        problem = self._check_authorize(params)
        if problem is not None:
            return problem
        redirect_uri = params["redirect_uri"]
        state = params["state"]
        decision = form.get("decision")
        if decision == "deny":
            return self._authorization_response(
                redirect_uri,
                {
                    "error": "access_denied",
                    "error_description": "The resource owner or authorization server "
                    "denied the request.",
                    "state": state,
                },
            )
        if decision != "allow":
            return _error_page(400, "invalid_request", "Choose Allow or Deny.")

        login = form.get("email", "").strip()
        if login:
            user = self.find_user(login)
            if user is None or user["status"] in ("CLOSED", "DISABLED", "DELETED"):
                return _html(
                    401,
                    self._consent_page(params, error=f"Sign-in failed: no active user {login}."),
                )
        else:
            hint = params.get("login_hint")
            user = (self.find_user(hint) if hint else None) or self.default_user

        requested = _unique(params["scope"].split())
        checked = set(request.form.get("scope", []))
        granted = [scope for scope in requested if scope in _OIDC_SCOPES or scope in checked]
        code = secrets.token_urlsafe(32)
        self._codes[code] = _Code(
            client_id=params["client_id"],
            redirect_uri=redirect_uri,
            scopes=granted,
            user_id=user["id"],
            nonce=params.get("nonce"),
            code_challenge=params.get("code_challenge") or None,
            expires_at=self._now() + self.authorization_code_ttl,
            auth_time=int(self._now()),
        )
        return self._authorization_response(
            redirect_uri, {"code": code, "scope": " ".join(granted), "state": state}
        )

    def _authorization_response(
        self, redirect_uri: str, params: Mapping[str, str | None]
    ) -> _Response:
        """The redirect back to the client, with ``iss`` (RFC 9207) unless a fault says not."""
        fault = self._authorization_response_fault
        if fault == "wrong_iss":
            iss: str | None = FOREIGN_ISSUER
        elif fault == "missing_iss":
            iss = None
        else:
            iss = self.issuer
        return _redirect(_add_query(redirect_uri, {**params, "iss": iss}))

    def _logout(self, request: _Request) -> _Response:
        params = _first(request.query)
        target = params.get("post_logout_redirect_uri")
        if target and self._redirect_uri_allowed(target):
            return _redirect(_add_query(target, {"state": params.get("state")}))
        return _html(200, _page("Signed out", "<h1>You are signed out of Brex.</h1>"))

    # ---------------------------------------------------------------------------- token

    def _client_auth(self, request: _Request, form: Mapping[str, str]) -> _Response | None:
        """``None`` when the request authenticates this client, else the error to send."""
        authorization = request.headers.get("Authorization") or ""
        body_id = form.get("client_id")
        body_secret = form.get("client_secret")
        basic = authorization[:6].lower() == "basic "
        if basic:
            if body_secret is not None:
                return _oauth_error(
                    400,
                    "invalid_request",
                    "Cannot supply multiple client credentials. Use one of the following: "
                    "credentials in the Authorization header, credentials in the post body.",
                )
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return _oauth_error(401, "invalid_client", _BAD_CLIENT)
            raw_id, _, raw_secret = decoded.partition(":")
            candidates = [
                (raw_id, raw_secret),
                (urllib.parse.unquote_plus(raw_id), urllib.parse.unquote_plus(raw_secret)),
            ]
        elif body_id is not None and body_secret is not None:
            candidates = [(body_id, body_secret)]
        else:
            return _oauth_error(401, "invalid_client", _BAD_CLIENT)
        for client_id, secret in candidates:
            if body_id is not None and body_id != client_id:
                continue
            if _equal(client_id, self.client_id) and _equal(secret, self.client_secret):
                return None
        challenge = {"WWW-Authenticate": 'Basic realm="FakeBrex"'} if basic else {}
        return _oauth_error(
            401,
            "invalid_client",
            "The client secret supplied for a confidential client is invalid.",
            **challenge,
        )

    def _token(self, request: _Request) -> _Response:
        if request.content_type != _FORM:
            return _oauth_error(
                400,
                "invalid_request",
                "Bad request. Accept and/or Content-Type headers likely do not match supported "
                "values: use application/x-www-form-urlencoded.",
            )
        form = _first(request.form)
        problem = self._client_auth(request, form)
        if problem is not None:
            return problem
        grant_type = form.get("grant_type", "")
        if grant_type == "authorization_code":
            self.stats["token_authorization_code"] += 1
            return self._token_authorization_code(form)
        if grant_type == "refresh_token":
            self.stats["token_refresh_token"] += 1
            return self._token_refresh(form)
        if grant_type == "client_credentials":
            self.stats["token_client_credentials"] += 1
            return self._token_client_credentials(form)
        if not grant_type:
            return _oauth_error(400, "invalid_request", "The 'grant_type' parameter is required.")
        return _oauth_error(
            400,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server. "
            "Configured grant types: [authorization_code, refresh_token, client_credentials].",
        )

    def _token_authorization_code(self, form: Mapping[str, str]) -> _Response:
        record = self._codes.get(form.get("code", ""))
        if record is None:
            return _oauth_error(400, "invalid_grant", _INVALID_CODE)
        if record.used:
            if record.grant_id is not None:
                self._revoke_grant(self._grants[record.grant_id])
            return _oauth_error(400, "invalid_grant", _INVALID_CODE)
        record.used = True
        if self._now() >= record.expires_at or record.client_id != self.client_id:
            return _oauth_error(400, "invalid_grant", _INVALID_CODE)
        if form.get("redirect_uri") != record.redirect_uri:
            return _oauth_error(
                400,
                "invalid_grant",
                "The 'redirect_uri' does not match the redirection URI used in the authorization "
                "request.",
            )
        verifier = form.get("code_verifier")
        if record.code_challenge is not None:
            if not verifier or not _VERIFIER_RE.fullmatch(verifier):
                return _oauth_error(400, "invalid_grant", "PKCE verification failed.")
            if not _equal(_s256(verifier), record.code_challenge):
                return _oauth_error(400, "invalid_grant", "PKCE verification failed.")
        elif verifier:
            return _oauth_error(400, "invalid_grant", "PKCE verification failed.")
        grant = self._new_grant(record.user_id, record.scopes)
        grant.auth_time = record.auth_time
        record.grant_id = grant.grant_id
        body = self._token_set(
            grant,
            record.scopes,
            nonce=record.nonce,
            with_refresh="offline_access" in record.scopes,
            id_token_fault=self._id_token_fault,
        )
        return _json(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _token_refresh(self, form: Mapping[str, str]) -> _Response:
        invalid = _oauth_error(400, "invalid_grant", _INVALID_REFRESH)
        record = self._refresh_tokens.get(form.get("refresh_token", ""))
        if record is None:
            return invalid
        grant = self._grants[record.grant_id]
        rotated_out = record.rotated_at is not None
        if rotated_out:
            self.stats["refresh_token_reuse"] += 1
        if not self._refresh_usable(record) or grant.client_id != self.client_id:
            if rotated_out:
                self.stats["refresh_token_reuse_rejected"] += 1
            return invalid
        if record.rotated_at is not None:
            if self._now() - record.rotated_at >= self.refresh_grace_period:
                self.stats["refresh_token_reuse_rejected"] += 1
                self._revoke_grant(grant)
                return invalid
        requested = form.get("scope", "").split()
        if requested:
            extra = [scope for scope in requested if scope not in grant.scopes]
            if extra:
                return _oauth_error(
                    400,
                    "invalid_scope",
                    "The requested scope is invalid, unknown, or malformed: " + " ".join(extra),
                )
            scopes = _unique(requested)
        else:
            scopes = list(grant.scopes)
        body = self._token_set(
            grant,
            scopes,
            nonce=None,
            with_refresh=self.rotate_refresh_tokens,
            refresh_expires_at=record.expires_at,
            id_token_fault=self._refresh_id_token_fault or self._id_token_fault,
        )
        if self.rotate_refresh_tokens and record.rotated_at is None:
            record.rotated_at = self._now()
        return _json(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _token_client_credentials(self, form: Mapping[str, str]) -> _Response:
        scopes = _unique(form.get("scope", "").split())
        if not scopes:
            return _oauth_error(
                400,
                "invalid_scope",
                "The authorization server resource does not have any configured default scopes, "
                "'scope' must be provided.",
            )
        allowed = {*self.scopes_supported, REFERRALS_SCOPE} - set(_OIDC_SCOPES)
        refused = [scope for scope in scopes if scope not in allowed]
        if refused:
            return _oauth_error(
                400,
                "invalid_scope",
                "The following scopes are not allowed: " + " ".join(refused),
            )
        token = self._new_access_token(scopes, None, None)
        body = {
            "token_type": "Bearer",
            "expires_in": int(self.access_token_ttl),
            "access_token": token,
            "scope": " ".join(scopes),
        }
        return _json(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _revoke(self, request: _Request) -> _Response:
        if request.content_type != _FORM:
            return _oauth_error(
                400, "invalid_request", "The revocation request must be form-encoded."
            )
        form = _first(request.form)
        problem = self._client_auth(request, form)
        if problem is not None:
            return problem
        token = form.get("token")
        if not token:
            return _oauth_error(400, "invalid_request", "The 'token' parameter is required.")
        self.stats["revocations"] += 1
        refresh = self._refresh_tokens.get(token)
        if refresh is not None:
            self._revoke_grant(self._grants[refresh.grant_id])
        elif token in self._access_tokens:
            self._access_tokens[token].revoked = True
        return _Response(200, b"", {"Cache-Control": "no-store"})

    def _introspect(self, request: _Request) -> _Response:
        if request.content_type != _FORM:
            return _oauth_error(400, "invalid_request", "The request must be form-encoded.")
        form = _first(request.form)
        problem = self._client_auth(request, form)
        if problem is not None:
            return problem
        token = form.get("token", "")
        access = self._access_tokens.get(token)
        if access is not None and self._access_usable(access):
            data: dict[str, Any] = {
                "active": True,
                "token_type": "Bearer",
                "scope": " ".join(access.scopes),
                "client_id": access.client_id,
                "iat": int(access.issued_at),
                "exp": int(access.expires_at),
                "iss": self.issuer,
            }
            if access.user_id:
                data["sub"] = access.user_id
            return _json(200, data)
        if token in self._refresh_tokens and self.is_refresh_token_active(token):
            refresh = self._refresh_tokens[token]
            grant = self._grants[refresh.grant_id]
            return _json(
                200,
                {
                    "active": True,
                    "token_type": "refresh_token",
                    "scope": " ".join(grant.scopes),
                    "client_id": grant.client_id,
                    "iat": int(refresh.issued_at),
                    "exp": int(refresh.expires_at),
                    "sub": grant.user_id,
                    "iss": self.issuer,
                },
            )
        return _json(200, {"active": False})

    def _userinfo(self, request: _Request) -> _Response:
        record = self._bearer(request)
        if record is None:
            return _oauth_error(
                401,
                "invalid_token",
                "The access token is invalid.",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        user = self._user_by_id(record.user_id)
        if "openid" not in record.scopes or user is None:
            return _oauth_error(
                403,
                "insufficient_scope",
                "The access token must provide access to at least one of these scopes: openid.",
                **{"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        return _json(
            200,
            {
                "sub": user["id"],
                "email": user["email"],
                "email_verified": True,
                "given_name": user["first_name"],
                "family_name": user["last_name"],
                "name": f"{user['first_name']} {user['last_name']}",
                "preferred_username": user["email"],
            },
        )

    # ---------------------------------------------------------------------------- API

    def _bearer(self, request: _Request) -> _AccessToken | None:
        authorization = request.headers.get("Authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        record = self._access_tokens.get(token.strip())
        if record is None or not self._access_usable(record):
            return None
        return record

    def _api_auth(
        self, request: _Request, *scopes: str, user_token: bool = False
    ) -> tuple[_AccessToken | None, _Response | None]:
        record = self._bearer(request)
        if record is None:
            return None, _json(401, _UNAUTHORIZED)
        if not any(scope in record.scopes for scope in scopes):
            needed = " or ".join(scopes)
            return None, _api_error(
                403, f"PERMISSION_DENIED: Missing required scope: {needed}", "INSUFFICIENT_SCOPE"
            )
        if user_token and record.user_id is None:
            return None, _api_error(
                403, "PERMISSION_DENIED: This endpoint needs a user's token", "FORBIDDEN"
            )
        return record, None

    def _api_me(self, request: _Request) -> _Response:
        record, problem = self._api_auth(request, "users", "users.readonly", user_token=True)
        if problem is not None or record is None:
            return problem or _json(401, _UNAUTHORIZED)
        user = self._user_by_id(record.user_id)
        if user is None:
            return _api_error(404, "User not found", "NOT_FOUND")
        return self._identity_answer(user)

    def _api_user(self, request: _Request, user_id: str) -> _Response:
        _, problem = self._api_auth(request, "users", "users.readonly")
        if problem is not None:
            return problem
        user = self._user_by_id(user_id)
        if user is None:
            return _api_error(404, f"User {user_id} not found", "NOT_FOUND")
        return _json(200, user)

    def _api_users(self, request: _Request) -> _Response:
        _, problem = self._api_auth(request, "users", "users.readonly")
        if problem is not None:
            return problem
        query = _first(request.query)
        try:
            limit = int(query.get("limit") or 100)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return _api_error(400, "limit must be an integer between 1 and 1000", "BAD_REQUEST")
        offset = 0
        cursor = query.get("cursor")
        if cursor:
            try:
                offset = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            except (binascii.Error, ValueError):
                return _api_error(400, "Invalid cursor", "BAD_REQUEST")
        users = self.users
        if query.get("email"):
            users = [user for user in users if user["email"].lower() == query["email"].lower()]
        page = users[offset : offset + limit]
        next_offset = offset + limit
        next_cursor = None
        if next_offset < len(users):
            next_cursor = _b64url(str(next_offset).encode("ascii"))
        return _json(200, {"items": page, "next_cursor": next_cursor})

    def _api_company(self, request: _Request) -> _Response:
        _, problem = self._api_auth(request, "companies.readonly")
        if problem is not None:
            return problem
        return self._identity_answer(self.company)

    def _identity_answer(self, data: dict[str, Any]) -> _Response:
        fault = self._identity_fault
        if fault == "not_json":
            return _html(200, _page("Brex", "<p>Something went wrong.</p>"))
        if fault == "json_list":
            return _json(200, [data])
        if fault == "json_string":
            return _json(200, str(data.get("id", "")))
        if fault == "wrong_types":
            wrong: dict[str, Any] = {}
            for index, (key, value) in enumerate(data.items()):
                if key == "email":
                    wrong[key] = [value]
                elif key == "status":
                    wrong[key] = {"value": value}
                else:
                    wrong[key] = 10_000 + index
            return _json(200, wrong)
        return _json(200, data)

    def _api_create_referral(self, request: _Request) -> _Response:
        _, problem = self._api_auth(request, REFERRALS_SCOPE)
        if problem is not None:
            return problem
        key = (request.headers.get("Idempotency-Key") or "").strip()
        if not key:
            return _api_error(400, "Missing required header: Idempotency-Key", "BAD_REQUEST")
        if key in self.idempotency_keys:
            return _json(200, self.referrals[self.idempotency_keys[key]])
        body = request.json()
        if not isinstance(body, dict):
            return _api_error(400, "The request body must be a JSON object", "BAD_REQUEST")
        referral_id = _random_id("referral_")
        referral = {
            "id": referral_id,
            "referral_signup_url": f"{self.base_url}/signup/{referral_id}",
            "status": "UNCLAIMED",
            "expires_at": _iso(self._now() + 30 * 24 * 3600),
            "products": body.get("products") or [],
            "referral_code": body.get("referral_code"),
            "applicant": body.get("applicant"),
            "business": body.get("business"),
        }
        self.referrals[referral_id] = referral
        self.idempotency_keys[key] = referral_id
        return _json(200, referral)

    def _api_referral(self, request: _Request, referral_id: str) -> _Response:
        _, problem = self._api_auth(request, REFERRALS_SCOPE)
        if problem is not None:
            return problem
        referral = self.referrals.get(referral_id)
        if referral is None:
            return _api_error(404, f"Referral {referral_id} not found", "NOT_FOUND")
        return _json(200, referral)


# --------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a :class:`FakeBrex` until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m django_brex_oauth.testing.fake_brex",
        description="Serve a fake Brex OAuth server and API for local development.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--public-url", help="base URL clients use, if not http://host:port")
    parser.add_argument("--client-id", default="test-client-id")
    parser.add_argument("--client-secret", default="test-client-secret")
    parser.add_argument(
        "--redirect-uri",
        action="append",
        dest="redirect_uris",
        help="allowed redirect URI (repeatable); default: any",
    )
    parser.add_argument("--access-token-ttl", type=float, default=3600)
    parser.add_argument("--refresh-token-lifetime", type=float, default=90 * 24 * 3600)
    parser.add_argument("--refresh-grace-period", type=float, default=30.0)
    parser.add_argument("--authorization-code-ttl", type=float, default=60)
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens on refresh")
    parser.add_argument(
        "--no-expires-in", action="store_true", help="omit expires_in from token responses"
    )
    parser.add_argument(
        "--no-scope",
        action="store_true",
        help="omit scope from token responses, like Brex's documented example response",
    )
    args = parser.parse_args(argv)

    fake = FakeBrex(
        host=args.host,
        port=args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
        redirect_uris=args.redirect_uris,
        access_token_ttl=args.access_token_ttl,
        refresh_token_lifetime=args.refresh_token_lifetime,
        rotate_refresh_tokens=not args.no_rotate,
        refresh_grace_period=args.refresh_grace_period,
        include_expires_in=not args.no_expires_in,
        include_scope=not args.no_scope,
        authorization_code_ttl=args.authorization_code_ttl,
        public_url=args.public_url,
    )
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, request_stop)
        except ValueError:
            pass
    try:
        try:
            fake.start()
        except OSError as error:
            print(f"cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
            return 2
        print(f"issuer: {fake.issuer}", flush=True)
        print(f"api_base_url: {fake.api_base_url}", flush=True)
        print("BREX_OAUTH = " + json.dumps(fake.django_settings(), indent=4), flush=True)
        print("Serving until Ctrl-C.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
