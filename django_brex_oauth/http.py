"""The one door to HTTP: sessions with a timeout and User-Agent, loopback-only
insecure transport, and logging that cannot leak a token."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import __version__
from .conf import brex_settings
from .exceptions import BrexUnavailable

USER_AGENT = f"django-brex-oauth/{__version__} (+https://pypi.org/project/django-brex-oauth/)"

# requests-oauthlib logs request bodies, response bodies and whole token dicts at
# DEBUG; these loggers never log anything else worth keeping.
_SECRET_LOGGERS = ("requests_oauthlib", "requests_oauthlib.oauth2_session", "oauthlib")


class _DropDebugRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_DROP_DEBUG = _DropDebugRecords()


def silence_secret_logging() -> None:
    """Make sure requests-oauthlib's DEBUG records (full tokens) never reach a handler."""
    for name in _SECRET_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_DEBUG not in logger.filters:
            logger.addFilter(_DROP_DEBUG)


class TimeoutSession(requests.Session):
    """A :class:`requests.Session` that always sends a timeout and our User-Agent."""

    def __init__(self, timeout: float | None = None) -> None:
        super().__init__()
        self.timeout = timeout if timeout is not None else float(brex_settings.HTTP_TIMEOUT)
        self.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(self, method, url, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


def new_session(timeout: float | None = None) -> TimeoutSession:
    """A fresh HTTP session for talking to Brex."""
    silence_secret_logging()
    return TimeoutSession(timeout)


def is_loopback_url(url: str) -> bool:
    """True for an ``http(s)://`` URL whose host is this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_insecure_lock = threading.Lock()
_insecure_users = 0
_ENV_FLAG = "OAUTHLIB_INSECURE_TRANSPORT"


@contextlib.contextmanager
def allow_insecure_loopback(url: str) -> Iterator[None]:
    """Let oauthlib use plain ``http://`` for ``url`` while inside the block, but only
    when ``url`` is on loopback (a local fake Brex). For any other URL this does
    nothing, so production HTTPS checks stay on.
    """
    if urlsplit(url).scheme != "http" or not is_loopback_url(url):
        yield
        return
    global _insecure_users
    with _insecure_lock:
        operator_set = _insecure_users == 0 and _ENV_FLAG in os.environ
        if not operator_set:
            if _insecure_users == 0:
                os.environ[_ENV_FLAG] = "1"
            _insecure_users += 1
    if operator_set:
        # Set by the operator for the whole process: not ours to change.
        yield
        return
    try:
        yield
    finally:
        with _insecure_lock:
            _insecure_users -= 1
            if _insecure_users == 0:
                os.environ.pop(_ENV_FLAG, None)


def describe_request_error(err: requests.RequestException) -> str:
    """A log-safe description of a transport error: its type and the host, never the URL
    query or body."""
    request = getattr(err, "request", None)
    host = urlsplit(request.url).netloc if request is not None and request.url else "Brex"
    return f"{type(err).__name__} talking to {host}"


def unavailable(err: requests.RequestException) -> BrexUnavailable:
    """Wrap a transport error as :class:`BrexUnavailable` without leaking the URL."""
    return BrexUnavailable(describe_request_error(err))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 10.2.3), or None.

    Takes delta-seconds (``"120"``) or an HTTP-date (``"Wed, 21 Oct 2026 07:28:00 GMT"``,
    measured against this host's clock at receipt). A date in the past gives 0; anything
    else unreadable gives None. The result is capped at ``RETRY_AFTER_MAX`` so that a
    broken header cannot stop this site talking to Brex for days.
    """
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    seconds: float | None
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            # RFC 9110: an HTTP-date is always GMT; a date without a zone is not one.
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), float(brex_settings.RETRY_AFTER_MAX))


def retry_after_of(headers: Mapping[str, str] | None) -> float | None:
    """:func:`parse_retry_after` of a response's ``Retry-After`` header."""
    if headers is None:
        return None
    return parse_retry_after(headers.get("Retry-After"))


def outage(what: str, response: requests.Response) -> BrexUnavailable:
    """The :class:`BrexUnavailable` for a 429 or 5xx answer from ``what`` (e.g. "Brex token
    endpoint"), carrying its ``Retry-After``."""
    retry_after = retry_after_of(response.headers)
    message = f"{what} answered HTTP {response.status_code}"
    if retry_after is not None:
        message += f" (Retry-After: {retry_after:.0f} s)"
    return BrexUnavailable(message, status=response.status_code, retry_after=retry_after)


def is_transient_status(status: int) -> bool:
    """True for an HTTP status that says "try again later": 429 or any 5xx."""
    return status == 429 or status >= 500
