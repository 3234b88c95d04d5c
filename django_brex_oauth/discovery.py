"""OpenID Connect discovery and the issuer's signing keys (JWKS).

Every endpoint the app calls comes from ``<issuer>/.well-known/openid-configuration``.
The document and the JWKS are cached in the Django cache (shared by all processes);
a failed call to an endpoint drops the cached document so the next call reads it anew,
and a key id that is not in the cached JWKS makes it fetch the JWKS once more.
A last good copy of the document is kept to ride out a short outage of the
discovery endpoint itself.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import requests
from django.core.cache import caches

from .conf import brex_settings
from .exceptions import DiscoveryError
from .http import NOT_JSON, json_body, session, unavailable

logger = logging.getLogger(__name__)

WELL_KNOWN_PATH = "/.well-known/openid-configuration"
REQUIRED_KEYS = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")


def _cache():
    return caches[brex_settings.CACHE_ALIAS]


def _key(kind: str, issuer: str) -> str:
    digest = hashlib.sha256(issuer.encode()).hexdigest()[:32]
    return f"brex_oauth:{kind}:{digest}"


def discovery_url(issuer: str | None = None) -> str:
    return (issuer or brex_settings.issuer) + WELL_KNOWN_PATH


def _fetch_json(url: str, what: str) -> dict[str, Any]:
    try:
        response = session().get(url, headers={"Accept": "application/json"})
    except requests.RequestException as err:
        raise DiscoveryError(f"Could not fetch the {what}: {unavailable(err)}") from err
    if response.status_code != 200:
        raise DiscoveryError(f"The {what} at {url} answered HTTP {response.status_code}.")
    data = json_body(response)
    if data is NOT_JSON:
        raise DiscoveryError(f"The {what} at {url} is not JSON.")
    if not isinstance(data, dict):
        raise DiscoveryError(f"The {what} at {url} is not a JSON object.")
    return data


def fetch_provider_metadata(issuer: str) -> dict[str, Any]:
    """Read and check the discovery document of ``issuer`` (no cache)."""
    url = discovery_url(issuer)
    data = _fetch_json(url, "OpenID configuration")
    missing = [k for k in REQUIRED_KEYS if not data.get(k)]
    if missing:
        raise DiscoveryError(f"The OpenID configuration at {url} lacks {', '.join(missing)}.")
    if str(data["issuer"]).rstrip("/") != issuer.rstrip("/"):
        raise DiscoveryError(
            f"The OpenID configuration at {url} names issuer {data['issuer']!r}, "
            f"not the configured {issuer!r}; refusing it."
        )
    return data


def get_provider_metadata(
    *, force_refresh: bool = False, issuer: str | None = None
) -> dict[str, Any]:
    """The discovery document of ``issuer`` (the configured one by default), from the cache
    when possible, or the last good copy while the discovery endpoint fails."""
    issuer = issuer or brex_settings.issuer
    cache = _cache()
    key = _key("discovery", issuer)
    if not force_refresh:
        cached = cache.get(key)
        if cached is not None:
            return cached
    try:
        data = fetch_provider_metadata(issuer)
    except DiscoveryError:
        last_good = cache.get(_key("discovery-last-good", issuer))
        if last_good is None or force_refresh:
            raise
        logger.warning("Brex discovery failed; using the last good configuration for %s", issuer)
        return last_good
    cache.set(key, data, brex_settings.DISCOVERY_CACHE_TIMEOUT)
    cache.set(_key("discovery-last-good", issuer), data, None)
    return data


def discovered_issuer(issuer: str | None = None) -> str:
    """The ``issuer`` of the discovery document, exactly as it is written there.

    The document is accepted only when it names the configured issuer (a trailing slash
    aside); this is the value an id_token's ``iss`` and an authorization response's ``iss``
    must then equal character for character (OpenID Connect Core 3.1.3.7, RFC 9207).
    ``issuer`` picks another environment's document (the configured one by default).
    """
    return str(get_provider_metadata(issuer=issuer)["issuer"])


def get_endpoint(name: str, *, issuer: str | None = None) -> str:
    """One endpoint URL from discovery, e.g. ``get_endpoint("token_endpoint")``, of
    ``issuer`` (the configured one by default)."""
    metadata = get_provider_metadata(issuer=issuer)
    url = metadata.get(name)
    if not url:
        raise DiscoveryError(f"Brex's OpenID configuration has no {name}.")
    return str(url)


def invalidate(issuer: str | None = None) -> None:
    """Forget the cached discovery document and JWKS of ``issuer`` (the configured one by
    default) after an endpoint failed; the last good copy is kept."""
    issuer = issuer or brex_settings.issuer
    _cache().delete_many([_key("discovery", issuer), _key("jwks", issuer)])


def get_jwks(*, force_refresh: bool = False, issuer: str | None = None) -> dict[str, Any]:
    """The JSON Web Key Set of ``issuer`` (the configured one by default), from the cache
    when possible."""
    issuer = issuer or brex_settings.issuer
    cache = _cache()
    key = _key("jwks", issuer)
    if not force_refresh:
        cached = cache.get(key)
        if cached is not None:
            return cached
    data = _fetch_json(get_endpoint("jwks_uri", issuer=issuer), "JWKS")
    if not isinstance(data.get("keys"), list):
        raise DiscoveryError("Brex's JWKS has no list of keys.")
    cache.set(key, data, brex_settings.DISCOVERY_CACHE_TIMEOUT)
    return data


def find_jwk(kid: str | None, *, issuer: str | None = None) -> dict[str, Any] | None:
    """The JWK with key id ``kid`` of ``issuer`` (the configured one by default); fetches the
    JWKS again once if it is not cached."""
    for force in (False, True):
        keys = get_jwks(force_refresh=force, issuer=issuer)["keys"]
        if kid is None and len(keys) == 1:
            return keys[0]
        for jwk in keys:
            if jwk.get("kid") == kid:
                return jwk
    return None
