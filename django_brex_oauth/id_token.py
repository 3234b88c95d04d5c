"""OpenID Connect id_tokens: the checks of the one a sign-in brings (OpenID Connect Core
3.1.3.7) and of the one a refresh may bring (12.2).

Signature by the issuer's JWKS (fetched from discovery, fetched again once for an unknown
``kid``), an algorithm allow-list that never admits ``none`` or an HMAC, and every claim this
site relies on. No ORM and no HTTP of its own: keys come through :mod:`.discovery`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import TYPE_CHECKING, Any

import jwt
from django.views.decorators.debug import sensitive_variables

from . import discovery
from .conf import brex_settings
from .exceptions import DiscoveryError, IdTokenError, RefreshIdTokenError

if TYPE_CHECKING:
    from .oauth import TokenResponse

#: Algorithms that can never sign an id_token we accept, whatever the settings say.
FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})

#: The hash of each ``alg`` family for ``at_hash``: the one its signature uses.
_AT_HASH_FUNCTIONS = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}


def _allowed_algorithms() -> list[str]:
    return [a for a in brex_settings.ID_TOKEN_ALGORITHMS if a not in FORBIDDEN_ALGORITHMS]


@sensitive_variables()
def access_token_hash(access_token: str, alg: str) -> str:
    """The ``at_hash`` of ``access_token`` for an id_token signed with ``alg`` (OpenID Connect
    Core 3.1.3.6): the left half of its hash by ``alg``'s hash function, base64url."""
    hash_function = _AT_HASH_FUNCTIONS.get(alg[-3:]) if alg[:2] in ("RS", "PS", "ES") else None
    if hash_function is None:
        raise IdTokenError(f"The id_token's at_hash cannot be checked for algorithm {alg!r}.")
    digest = hash_function(access_token.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def _check_audience(claims: dict[str, Any]) -> None:
    # Policy: an id_token is for this site alone. PyJWT accepts an ``aud`` list that merely
    # contains the client id; a token also meant for another party could be replayed by it.
    client_id = brex_settings.CLIENT_ID
    audience = claims["aud"]
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or not audiences:
        raise IdTokenError("The id_token's aud is not a client id or a list of them.")
    if any(entry != client_id for entry in audiences):
        raise IdTokenError("The id_token is also meant for an audience other than this client.")
    azp = claims.get("azp")
    if len(audiences) > 1 and azp is None:
        raise IdTokenError("The id_token has several audiences but no azp.")
    if azp is not None and azp != client_id:
        raise IdTokenError("The id_token's azp is not this client.")


def _check_issued_at(claims: dict[str, Any]) -> None:
    issued_at = claims["iat"]
    if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
        raise IdTokenError("The id_token's iat is not a number.")
    leeway = brex_settings.ID_TOKEN_LEEWAY
    now = time.time()
    if issued_at > now + leeway:
        raise IdTokenError("The id_token was issued in the future.")
    max_age = brex_settings.ID_TOKEN_MAX_AGE
    if issued_at < now - max_age - leeway:
        raise IdTokenError(
            f"The id_token was issued {int(now - issued_at)} seconds ago, more than "
            f"ID_TOKEN_MAX_AGE ({max_age}) allows."
        )


@sensitive_variables()
def _check_access_token_hash(claims: dict[str, Any], alg: str, access_token: str | None) -> None:
    claimed = claims.get("at_hash")
    if claimed is None or access_token is None:
        return
    expected = access_token_hash(access_token, alg)
    if not isinstance(claimed, str) or not secrets.compare_digest(
        claimed.encode("utf-8"), expected.encode("ascii")
    ):
        raise IdTokenError("The id_token's at_hash does not match the access token.")


@sensitive_variables()
def _verified_claims(
    id_token: str, *, access_token: str | None, issuer: str | None = None
) -> dict[str, Any]:
    """The claims of an id_token of ``issuer`` (the configured one by default) that passes
    every check but the ``nonce`` and ``sub`` (OpenID Connect Core 3.1.3.7 and 12.2); raises
    :class:`IdTokenError`, or :class:`DiscoveryError` when the issuer's document or keys
    cannot be read."""
    algorithms = _allowed_algorithms()
    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.InvalidTokenError as err:
        raise IdTokenError(f"The id_token is malformed: {type(err).__name__}") from None
    alg = header.get("alg")
    if alg not in algorithms:
        raise IdTokenError(f"The id_token algorithm {alg!r} is not allowed.")
    jwk = discovery.find_jwk(header.get("kid"), issuer=issuer)
    if jwk is None:
        raise IdTokenError("The id_token was signed with a key the issuer does not publish.")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except jwt.PyJWKError as err:
        raise IdTokenError(f"The issuer's signing key is unusable: {err}") from None
    try:
        claims = jwt.decode(
            id_token,
            key=key,
            algorithms=[alg],
            audience=brex_settings.CLIENT_ID,
            issuer=discovery.discovered_issuer(issuer),
            leeway=brex_settings.ID_TOKEN_LEEWAY,
            options={"require": ["iss", "sub", "aud", "exp", "iat"]},
        )
    except jwt.InvalidTokenError as err:
        raise IdTokenError(f"The id_token is invalid: {type(err).__name__}: {err}") from None
    _check_audience(claims)
    _check_issued_at(claims)
    _check_access_token_hash(claims, alg, access_token)
    return claims


@sensitive_variables()
def validate_id_token(
    id_token: str, *, nonce: str, access_token: str | None = None
) -> dict[str, Any]:
    """Check the id_token of a sign-in (OpenID Connect Core 3.1.3.7) and return its claims.

    Checks the signature against the issuer's JWKS (fetching it again once for an unknown
    ``kid``), the algorithm against the allow-list (never ``none`` or an HMAC), ``iss``
    (exactly the discovered issuer), ``aud`` (this client and no other) and ``azp``, ``exp``,
    ``iat`` (neither in the future nor older than ``ID_TOKEN_MAX_AGE``), ``nonce``, and, with
    ``access_token``, the ``at_hash`` when the token carries one.
    """
    try:
        claims = _verified_claims(id_token, access_token=access_token)
    except DiscoveryError as err:
        raise IdTokenError(f"The issuer's signing keys are unavailable: {err}") from err
    claimed_nonce = claims.get("nonce")
    if not isinstance(claimed_nonce, str) or not secrets.compare_digest(claimed_nonce, nonce):
        raise IdTokenError("The id_token nonce does not match this authorization request.")
    return claims


@sensitive_variables()
def validate_refreshed_tokens(
    tokens: TokenResponse, *, subject: str, issuer: str | None = None
) -> None:
    """Check the id_token of a refresh answer, if it has one (OpenID Connect Core 12.2).

    The same checks as at sign-in against ``issuer`` (the connection's; the configured one
    by default), but no ``nonce``, and its ``sub`` must be ``subject``, the Brex user the
    connection belongs to. Raises :class:`RefreshIdTokenError` (a
    :class:`TokenError`) so the refresh fails and stores none of ``tokens``; an issuer whose
    document or keys cannot be read raises :class:`DiscoveryError` (try again later).
    """
    if not tokens.id_token:
        return
    try:
        claims = _verified_claims(tokens.id_token, access_token=tokens.access_token,
                                  issuer=issuer)
    except IdTokenError as err:
        raise RefreshIdTokenError(str(err)) from None
    if claims["sub"] != subject:
        raise RefreshIdTokenError("The id_token names another Brex user than the connection's.")
