"""The one door to HTTP for every call to Brex (token endpoint, revocation, discovery, API).

- :func:`session`: the process's one :class:`requests.Session` (keep-alive), with a timeout
  and our User-Agent; :func:`send` sends through it and turns a network error into
  :class:`~django_brex_oauth.exceptions.BrexUnavailable` without leaking the URL.
- :func:`is_transient_status`: the one rule for "try again later" (429 or any 5xx), and
  :func:`outage` / :func:`retry_after_of` for Brex's ``Retry-After``.
- :func:`json_body`: an answer's JSON, decoded once, or :data:`NOT_JSON`.
- :func:`check_token_transport`: HTTPS, or plain HTTP on loopback only (a local fake
  Brex), and logging that cannot leak a token.

Everything above this module (``oauth``, ``discovery``, ``client``) sends through here, so a
change such as "treat 408 as transient" is made in :func:`is_transient_status` alone.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from oauthlib.oauth2 import InsecureTransportError
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies

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
    """A :class:`requests.Session` that always sends a timeout and our User-Agent, and
    reads the environment once per origin rather than at every request.

    Without a ``timeout`` of its own it sends ``HTTP_TIMEOUT`` as the setting is at the time
    of each request, so a long-lived session follows the settings.

    The environment is what a plain session reads: the proxies (``HTTPS_PROXY``,
    ``NO_PROXY``…) and the CA bundle (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``). A plain
    session reads them, and stats the ``.netrc`` files, at every request, which costs a
    token refresh about as much CPU as everything else it does in Python; this one reads
    them the first time it calls an origin (a scheme and host) and keeps them for the
    process, as HTTPX does. ``.netrc`` is never read: a call to Brex carries its own
    credentials.
    """

    def __init__(self, timeout: float | None = None) -> None:
        super().__init__()
        self._timeout = timeout
        self.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.mount("https://", adapter)
        self.mount("http://", adapter)
        # Off for requests' own per-request reading (and .netrc); the same environment is
        # read below, once per origin.
        self.trust_env = False
        self._environment: dict[tuple[str, str], tuple[dict[str, str], str | None]] = {}

    @property
    def timeout(self) -> float:
        if self._timeout is not None:
            return self._timeout
        return brex_settings.HTTP_TIMEOUT

    def request(self, method, url, *args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        origin = urlsplit(url)[:2]
        known = self._environment.get(origin)
        if known is None:
            # What requests reads with trust_env on, for this origin.
            known = self._environment[origin] = (
                get_environ_proxies(url),
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"),
            )
        environ_proxies, ca_bundle = known
        proxies = {**environ_proxies, **(proxies or {})}
        if (verify is True or verify is None) and ca_bundle:
            verify = ca_bundle
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


def new_session(timeout: float | None = None) -> TimeoutSession:
    """A fresh HTTP session for talking to Brex (most code wants :func:`session`)."""
    silence_secret_logging()
    return TimeoutSession(timeout)


# The process's session. requests documents no thread-safety for a Session, so this one is
# never changed after it is made and keeps no cookies (a cookie from one customer's call must
# not ride along on another's); what remains shared, urllib3's connection pool, is
# thread-safe. A forked child (a Celery prefork pool process, a gunicorn worker) must not
# write to its parent's sockets, so it forgets the session and makes its own.
_shared_session: TimeoutSession | None = None
_shared_session_lock = threading.Lock()


def session() -> TimeoutSession:
    """The process's one HTTP session for talking to Brex: connections are kept alive and
    reused by every call (token endpoint, revocation, discovery, API), from any thread."""
    global _shared_session
    # Again on every call: a LOGGING dictConfig run later may have reset the loggers.
    silence_secret_logging()
    shared = _shared_session
    if shared is None:
        with _shared_session_lock:
            if _shared_session is None:
                made = TimeoutSession()
                made.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
                _shared_session = made
            shared = _shared_session
    return shared


def _forget_session_after_fork() -> None:
    global _shared_session, _shared_session_lock
    # Not closed: its sockets are the parent's, still in use there.
    _shared_session = None
    # Another thread may have held the lock at the fork; in the child it never lets go.
    _shared_session_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork either
    os.register_at_fork(after_in_child=_forget_session_after_fork)


def send(
    method: str, url: str, *, on_unreachable: Callable[[], None] | None = None, **kwargs: Any
) -> requests.Response:
    """Send one request through :func:`session`. A network error or timeout is raised as
    :class:`BrexUnavailable` naming the host only (``on_unreachable`` runs first, e.g. to
    forget a cached discovery document); any HTTP answer is returned as it is."""
    try:
        return session().request(method, url, **kwargs)
    except requests.RequestException as err:
        if on_unreachable is not None:
            on_unreachable()
        raise unavailable(err) from err


#: What :func:`json_body` gives for an answer that is not JSON.
NOT_JSON: Any = object()


def json_body(response: requests.Response) -> Any:
    """The decoded JSON of ``response`` (any JSON value), or :data:`NOT_JSON`."""
    try:
        return response.json()
    except ValueError:
        return NOT_JSON


def json_object(response: requests.Response) -> dict[str, Any]:
    """The JSON object ``response`` holds, or ``{}`` when it holds anything else."""
    body = json_body(response)
    return body if isinstance(body, dict) else {}


def is_loopback_url(url: str) -> bool:
    """True for an ``http(s)://`` URL whose host is this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(url: str) -> None:
    """oauthlib's rule for a token request, applied here: HTTPS, or plain HTTP only on
    this machine (a local fake Brex) or with ``OAUTHLIB_INSECURE_TRANSPORT`` set by the
    operator. Raises oauthlib's ``InsecureTransportError`` otherwise.

    oauthlib reads the rule from that variable. Setting it around a loopback call would
    lift the rule for every thread of the process at once, letting another thread's call
    to any plain-HTTP host through; so the rule is checked here (oauthlib builds only the
    request's body) and the variable is never written."""
    scheme = urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and is_loopback_url(url)):
        return
    if os.environ.get("OAUTHLIB_INSECURE_TRANSPORT"):
        return
    raise InsecureTransportError()


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
    return min(max(0.0, seconds), brex_settings.RETRY_AFTER_MAX)


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
