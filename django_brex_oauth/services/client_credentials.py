"""Client-credentials tokens for the onboarding API, cached and shared by every process.

A token is kept in the Django cache (``BREX_OAUTH["CACHE_ALIAS"]``; use a shared backend
such as Redis or Memcached in production) until ``CLIENT_CREDENTIALS_MARGIN`` seconds
before it expires. When it is missing, one process fetches it while the others wait for
it: the fetcher holds a short lock taken with the cache's atomic ``add()``. The cached
token is encrypted with the token encryption key, like the tokens in the database.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable
from typing import Any

from django.core.cache import caches
from django.utils.encoding import force_bytes, force_str
from django.views.decorators.debug import sensitive_variables

from .. import oauth
from ..backoff import jittered_waits
from ..conf import brex_settings
from ..exceptions import BrexUnavailable
from ..fields import RotatingFernet, UndecryptableValue
from . import throttle

_fernet = RotatingFernet()


def _cache():
    return caches[brex_settings.CACHE_ALIAS]


def _normalise(scopes: Iterable[str]) -> list[str]:
    normalised = sorted({str(scope) for scope in scopes if scope})
    if not normalised:
        raise ValueError("A client-credentials token needs at least one scope.")
    return normalised


def _key(scopes: list[str]) -> str:
    material = "\n".join([brex_settings.issuer, str(brex_settings.CLIENT_ID), *scopes])
    return "brex_oauth:client-credentials:" + hashlib.sha256(material.encode()).hexdigest()[:40]


def _lock_seconds() -> int:
    return int(brex_settings.HTTP_TIMEOUT * 2) + 5


@sensitive_variables()
def _cached_token(key: str) -> str | None:
    entry: Any = _cache().get(key)
    if not isinstance(entry, dict) or entry.get("refresh_at", 0) <= time.time():
        return None
    try:
        return force_str(_fernet.decrypt(force_bytes(entry["token"])))
    except (UndecryptableValue, KeyError, TypeError):
        return None


@sensitive_variables()
def _fetch_and_store(key: str, scopes: list[str]) -> str:
    # The token endpoint's Retry-After, whichever caller got it, holds this grant back too;
    # and one this grant gets holds back every other caller of the token endpoint.
    throttle.wait_for(throttle.token_scope(), "the token endpoint")
    try:
        answer = oauth.client_credentials(scopes)
    except BrexUnavailable as err:
        throttle.hold_for(throttle.token_scope(), err)
        raise
    access_token = answer.usable_access_token()
    lifetime = float(answer.expires_in)
    # Renew CLIENT_CREDENTIALS_MARGIN seconds early, but never use less than half of a
    # short-lived token's life.
    keep_for = max(lifetime - brex_settings.CLIENT_CREDENTIALS_MARGIN, lifetime / 2)
    entry = {
        "token": _fernet.encrypt(force_bytes(access_token)),
        "refresh_at": time.time() + keep_for,
    }
    _cache().set(key, entry, timeout=max(1, int(keep_for)))
    return access_token


@sensitive_variables()
def get_client_credentials_token(scopes: Iterable[str]) -> str:
    """A valid client-credentials access token for ``scopes``.

    Served from the cache while it has more than ``CLIENT_CREDENTIALS_MARGIN`` seconds to
    live; otherwise fetched from the token endpoint by one caller at a time.
    Raises :class:`~django_brex_oauth.exceptions.BrexUnavailable` or
    :class:`~django_brex_oauth.exceptions.TokenError` when Brex does not issue one, and
    :class:`~django_brex_oauth.exceptions.BrexUnavailable` (with ``retry_after``), without
    asking Brex, while the token endpoint's ``Retry-After`` runs.
    """
    wanted = _normalise(scopes)
    key = _key(wanted)
    token = _cached_token(key)
    if token is not None:
        return token
    cache = _cache()
    lock_key = key + ":lock"
    holder = uuid.uuid4().hex

    def fetch_holding_the_lock() -> str | None:
        # One fetcher at a time; None when another process holds the lock.
        if not cache.add(lock_key, holder, timeout=_lock_seconds()):
            return None
        try:
            return _cached_token(key) or _fetch_and_store(key, wanted)
        finally:
            if cache.get(lock_key) == holder:
                cache.delete(lock_key)

    token = fetch_holding_the_lock()
    if token is not None:
        return token
    for _ in jittered_waits(first=0.02, cap=0.25, timeout=_lock_seconds()):
        token = _cached_token(key) or fetch_holding_the_lock()
        if token is not None:
            return token
    # The lock holder is gone or stuck; do not wait for it forever.
    return _fetch_and_store(key, wanted)


@sensitive_variables()
def forget_client_credentials_token(scopes: Iterable[str], access_token: str | None = None) -> None:
    """Drop the cached token for ``scopes`` (only if it is ``access_token``, when given),
    e.g. after Brex rejected it."""
    key = _key(_normalise(scopes))
    if access_token is not None and _cached_token(key) not in (None, access_token):
        return
    _cache().delete(key)
