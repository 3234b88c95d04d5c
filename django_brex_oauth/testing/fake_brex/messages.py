"""Requests and answers as the fake sees them, and the small helpers every endpoint shares.

No state here: the error shapes of Brex's two halves (OAuth ``{"error": ...}`` under the
issuer, ``{"type": ..., "message": ...}`` on the API), the redirect, and the encodings.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import string
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

ISSUER_PATH = "/oauth2/default"
"""Path of the authorization server under the base URL, as at Brex."""

FORM = "application/x-www-form-urlencoded"

_ID_ALPHABET = string.ascii_lowercase + string.digits

API_ERROR_TYPES = {
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
OAUTH_ERRORS = {
    400: "invalid_request",
    401: "invalid_client",
    403: "access_denied",
    429: "too_many_requests",
    503: "temporarily_unavailable",
}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class Headers(dict):
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
class Request:
    """One request, parsed: the query and a form-encoded body as lists per name."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: Headers
    body: bytes
    content_type: str

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(data).encode("utf-8")
    return Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def oauth_error(status: int, error: str, description: str, **headers: str) -> Response:
    return json_response(
        status, {"error": error, "error_description": description}, {**NO_STORE, **headers}
    )


def api_error(status: int, message: str, code: str | None = None) -> Response:
    data: dict[str, Any] = {"type": API_ERROR_TYPES.get(status, "ERROR"), "message": message}
    if code is not None:
        data["code"] = code
    return json_response(status, data)


def html_response(status: int, page: str) -> Response:
    return Response(
        status,
        page.encode("utf-8"),
        {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
    )


def redirect(location: str) -> Response:
    return Response(302, b"", {"Location": location, "Cache-Control": "no-store"})


def add_query(url: str, params: Mapping[str, str | None]) -> str:
    """``url`` with ``params`` (those not ``None``) appended to its query."""
    parts = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    pairs += [(key, value) for key, value in params.items() if value is not None]
    query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=query))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def random_id(prefix: str) -> str:
    """An id in Brex's style: ``prefix`` and 25 lowercase letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(25))


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def first(values: Mapping[str, list[str]]) -> dict[str, str]:
    """The first value of each name."""
    return {key: items[0] for key, items in values.items() if items}


def flatten(values: Mapping[str, list[str]]) -> dict[str, Any]:
    """Each name's value, or its list of values when there are several."""
    return {key: items[0] if len(items) == 1 else list(items) for key, items in values.items()}


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def equal(a: str, b: str) -> bool:
    """Compare secrets in constant time."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
