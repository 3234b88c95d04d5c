"""Fault injection: the rules that make the fake fail, spoil, hold back, delay or refuse
(rate limit) its answers, and the public names tests use with them."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any, TypeVar

from .messages import (
    API_ERROR_TYPES,
    ISSUER_PATH,
    OAUTH_ERRORS,
    Response,
    api_error,
    json_response,
    oauth_error,
)


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()
"""A value for :meth:`FakeBrex.tamper_next` that removes a field from the answer."""

UNSET: Any = object()

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


@dataclass
class Failure:
    """A :meth:`FakeBrex.fail_next` rule (or a rate limit's refusal)."""

    path: str
    status: int
    times: int
    body: Any
    delay: float
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, path: str) -> Response:
        """The answer to a request for ``path`` that this rule fails."""
        response = self._body(path)
        response.headers.update(self.headers)
        return response

    def _body(self, path: str) -> Response:
        body = self.body
        if isinstance(body, (dict, list)):
            return json_response(self.status, body)
        if isinstance(body, (str, bytes)):
            data = body.encode("utf-8") if isinstance(body, str) else body
            return Response(self.status, data, {"Content-Type": "text/plain; charset=utf-8"})
        description = f"Injected failure: HTTP {self.status}"
        if path.startswith(ISSUER_PATH):
            default = "server_error" if self.status >= 500 else "invalid_request"
            error = OAUTH_ERRORS.get(self.status, default)
            return oauth_error(self.status, error, description)
        return api_error(self.status, description, API_ERROR_TYPES.get(self.status))


@dataclass
class RateLimit:
    path: str
    limit: int
    window: float
    retry_after: bool
    window_started: float = 0.0
    used: int = 0


def retry_after_header(retry_after: float | datetime | str) -> str:
    """A ``Retry-After`` value: seconds as delta-seconds, a datetime as an HTTP-date."""
    if isinstance(retry_after, datetime):
        if retry_after.tzinfo is None:
            retry_after = retry_after.replace(tzinfo=timezone.utc)
        return format_datetime(retry_after.astimezone(timezone.utc), usegmt=True)
    if isinstance(retry_after, str):
        return retry_after
    return str(max(0, math.ceil(retry_after)))


@dataclass
class Tamper:
    """A :meth:`FakeBrex.tamper_next` rule."""

    path: str
    times: int
    body: Any
    fields: dict[str, Any]

    def apply(self, response: Response) -> Response:
        if self.body is not UNSET:
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
        return json_response(response.status, data, {**response.headers})


_Rule = TypeVar("_Rule", Failure, Tamper)


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

    def _hold(self, response: Response) -> None:
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


class FaultRules:
    """The rules in force, each matched by the end of a request's path; used under the
    fake's lock. A refusal for a rate limit counts in ``stats["rate_limited"]``."""

    def __init__(self, stats: Counter[str]) -> None:
        self.stats = stats
        self.failures: list[Failure] = []
        self.tampers: list[Tamper] = []
        self.holds: list[HeldAnswers] = []
        self.rate_limits: list[RateLimit] = []
        self.latency = 0.0
        self.path_latency: dict[str, float] = {}

    def failure_for(self, path: str) -> Failure | None:
        """The failure to answer a request for ``path`` with (a rule used up once, or a rate
        limit exceeded), or ``None`` to process it."""
        return self._take(self.failures, path) or self._over_rate_limit(path)

    def tamper_for(self, path: str) -> Tamper | None:
        return self._take(self.tampers, path)

    def hold_for(self, path: str) -> HeldAnswers | None:
        return next((held for held in self.holds if held._take(path)), None)

    def latency_for(self, path: str) -> float:
        for suffix, seconds in self.path_latency.items():
            if path.endswith(suffix):
                return seconds
        return self.latency

    def set_rate_limit(self, path: str, limit: int | None, per: float, retry_after: bool) -> None:
        self.rate_limits = [rule for rule in self.rate_limits if rule.path != path]
        if limit is not None:
            self.rate_limits.append(RateLimit(path, int(limit), float(per), retry_after))

    def set_latency(self, seconds: float, path: str | None) -> None:
        if path is None:
            self.latency = max(0.0, seconds)
        elif seconds > 0:
            self.path_latency[path] = seconds
        else:
            self.path_latency.pop(path, None)

    def clear(self) -> list[HeldAnswers]:
        """Forget every rule; the held answers are returned, for the caller to release."""
        self.failures.clear()
        self.tampers.clear()
        self.rate_limits.clear()
        self.latency = 0.0
        self.path_latency.clear()
        holds, self.holds = self.holds, []
        return holds

    @staticmethod
    def _take(rules: list[_Rule], path: str) -> _Rule | None:
        """The first of ``rules`` (fail_next or tamper_next) for ``path``, used up once."""
        for rule in rules:
            if path.endswith(rule.path):
                rule.times -= 1
                if rule.times <= 0:
                    rules.remove(rule)
                return rule
        return None

    def _over_rate_limit(self, path: str) -> Failure | None:
        for rule in self.rate_limits:
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
            headers = {"Retry-After": retry_after_header(max(1, left))} if rule.retry_after else {}
            return Failure(path, 429, 1, None, 0.0, headers)
        return None
