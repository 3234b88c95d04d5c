"""Signing keys and the id_tokens the fake signs with them, defects included.

Each defect of :data:`ID_TOKEN_FAULTS` is one small function that spoils a correct token in
the making, so a new one is a function and a table entry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .messages import b64url, random_id

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

UNTRUSTED_AUDIENCE = "some-other-client-id"
"""The foreign client id that the ``wrong_aud``, ``extra_aud*`` and ``wrong_azp`` faults use."""

FOREIGN_ISSUER = "https://accounts-api.evil.example.com/oauth2/default"
"""The issuer that the ``wrong_iss`` faults name."""


# --------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    jwk: dict[str, Any]


_KEY_CACHE: dict[str, SigningKey] = {}
_KEY_CACHE_LOCK = threading.Lock()


def new_signing_key(kid: str | None = None) -> SigningKey:
    """A fresh RSA key; its ``kid`` is the JWK thumbprint unless given."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    if kid is None:
        thumbprint_input = json.dumps(
            {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
        )
        kid = b64url(hashlib.sha256(thumbprint_input.encode("ascii")).digest())
    jwk = {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}
    return SigningKey(kid=kid, private_key=private_key, jwk=jwk)


def cached_key(slot: str) -> SigningKey:
    """One key per slot and process: generating RSA keys is the slow part of starting a fake."""
    with _KEY_CACHE_LOCK:
        if slot not in _KEY_CACHE:
            _KEY_CACHE[slot] = new_signing_key()
        return _KEY_CACHE[slot]


def at_hash(access_token: str) -> str:
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest()[:16])


# --------------------------------------------------------------------------------------------
# id_tokens


@dataclass
class _Draft:
    """An id_token being made: what a fault may change before it is signed."""

    claims: dict[str, Any]
    headers: dict[str, Any]
    key: SigningKey
    now: int
    auth_time: int
    access_token: str
    client_id: str
    other_user_ids: Sequence[str]


def mint_id_token(
    *,
    issuer: str,
    client_id: str,
    key: SigningKey,
    user: Mapping[str, Any],
    user_ids: Sequence[str],
    now: int,
    nonce: str | None,
    access_token: str,
    auth_time: int,
    fault: str | None,
) -> str:
    """An RS256 id_token for ``user``, signed with ``key``, spoilt by ``fault`` if any.

    ``user_ids`` are the ids of every user, for ``wrong_sub`` to name another one.
    """
    claims: dict[str, Any] = {
        "ver": 1,
        "iss": issuer,
        "sub": user["id"],
        "aud": client_id,
        "iat": now,
        "exp": now + 3600,
        "jti": "ID." + secrets.token_urlsafe(24),
        "amr": ["pwd"],
        "auth_time": auth_time,
        "at_hash": at_hash(access_token),
        "email": user["email"],
        "name": f"{user['first_name']} {user['last_name']}",
    }
    if nonce is not None:
        claims["nonce"] = nonce
    draft = _Draft(
        claims=claims,
        headers={"kid": key.kid},
        key=key,
        now=now,
        auth_time=auth_time,
        access_token=access_token,
        client_id=client_id,
        other_user_ids=[user_id for user_id in user_ids if user_id != user["id"]],
    )
    if fault in _UNSIGNED_FAULTS:
        return _UNSIGNED_FAULTS[fault](draft)
    if fault is not None:
        _CLAIM_FAULTS[fault](draft)
    return jwt.encode(draft.claims, draft.key.private_key, algorithm="RS256", headers=draft.headers)


def _signing_input(draft: _Draft, alg: str) -> str:
    # Built by hand: PyJWT refuses both "none" and an RSA public key as an HMAC secret, as a
    # client should.
    header = {"alg": alg, "typ": "JWT", **draft.headers}
    return ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
        for part in (header, draft.claims)
    )


def _alg_none(draft: _Draft) -> str:
    return _signing_input(draft, "none") + "."


def _alg_hs256(draft: _Draft) -> str:
    # The key-confusion attack: the published public key (PEM) as the HMAC secret.
    signing_input = _signing_input(draft, "HS256")
    secret = draft.key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def _bad_signature(draft: _Draft) -> None:
    draft.key = cached_key("foreign")


def _unknown_kid(draft: _Draft) -> None:
    draft.key = cached_key("foreign")
    draft.headers["kid"] = "unpublished-" + secrets.token_hex(8)


def _missing_kid(draft: _Draft) -> None:
    del draft.headers["kid"]


def _wrong_aud(draft: _Draft) -> None:
    draft.claims["aud"] = UNTRUSTED_AUDIENCE


def _extra_aud(draft: _Draft) -> None:
    _extra_aud_no_azp(draft)
    draft.claims["azp"] = draft.client_id


def _extra_aud_no_azp(draft: _Draft) -> None:
    draft.claims["aud"] = [draft.client_id, UNTRUSTED_AUDIENCE]


def _wrong_azp(draft: _Draft) -> None:
    draft.claims["azp"] = UNTRUSTED_AUDIENCE


def _wrong_iss(draft: _Draft) -> None:
    draft.claims["iss"] = FOREIGN_ISSUER


def _wrong_sub(draft: _Draft) -> None:
    others = draft.other_user_ids
    draft.claims["sub"] = others[0] if others else random_id("cuuser_")


def _expired(draft: _Draft) -> None:
    draft.claims["iat"] = draft.now - 7200
    draft.claims["exp"] = draft.now - 3600
    draft.claims["auth_time"] = min(draft.auth_time, draft.now - 7200)


def _stale_iat(draft: _Draft) -> None:
    draft.claims["iat"] = draft.now - 7 * 24 * 3600
    draft.claims["auth_time"] = min(draft.auth_time, draft.claims["iat"])


def _future_iat(draft: _Draft) -> None:
    draft.claims["iat"] = draft.now + 3600
    draft.claims["exp"] = draft.now + 7200


def _wrong_nonce(draft: _Draft) -> None:
    draft.claims["nonce"] = "not-your-nonce-" + secrets.token_urlsafe(12)


def _missing_nonce(draft: _Draft) -> None:
    draft.claims.pop("nonce", None)


def _bad_at_hash(draft: _Draft) -> None:
    draft.claims["at_hash"] = at_hash(draft.access_token + "-not-this-one")


_UNSIGNED_FAULTS: dict[str, Callable[[_Draft], str]] = {
    "alg_none": _alg_none,
    "alg_hs256": _alg_hs256,
}
_CLAIM_FAULTS: dict[str, Callable[[_Draft], None]] = {
    "bad_signature": _bad_signature,
    "unknown_kid": _unknown_kid,
    "missing_kid": _missing_kid,
    "wrong_aud": _wrong_aud,
    "extra_aud": _extra_aud,
    "extra_aud_no_azp": _extra_aud_no_azp,
    "wrong_azp": _wrong_azp,
    "wrong_iss": _wrong_iss,
    "wrong_sub": _wrong_sub,
    "expired": _expired,
    "stale_iat": _stale_iat,
    "future_iat": _future_iat,
    "wrong_nonce": _wrong_nonce,
    "missing_nonce": _missing_nonce,
    "bad_at_hash": _bad_at_hash,
}
assert set(_UNSIGNED_FAULTS) | set(_CLAIM_FAULTS) == set(ID_TOKEN_FAULTS)
