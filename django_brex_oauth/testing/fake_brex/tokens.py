"""The fake's token store: grants, authorization codes, access and refresh tokens.

The rules of Brex's (Okta-style) authorization server live here and nowhere else, with no
HTTP: an authorization code is used once, and a second use revokes what the first one
granted; PKCE (S256) is checked when the code was asked for with a challenge; a refresh
token rotates on use, and the rotated-out one still works for a grace period, after which a
reuse revokes the whole grant. Refusals are raised as :class:`TokenError` carrying the OAuth
error code; the token endpoint turns them into HTTP answers.

The store does not lock: :class:`~.FakeBrex` holds its lock around every call.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .messages import b64url, equal, unique
from .scopes import OIDC_SCOPES

INVALID_CODE = "The authorization code is invalid or has expired."
INVALID_REFRESH = "The refresh token is invalid or expired."
_PKCE_FAILED = "PKCE verification failed."
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


class TokenSettings(Protocol):
    """What the store reads from the fake's settings, at each use (tests change them)."""

    client_id: str
    access_token_ttl: float
    refresh_token_lifetime: float
    rotate_refresh_tokens: bool
    refresh_grace_period: float


class TokenError(Exception):
    """A token request refused: ``error`` is the OAuth error code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass
class Grant:
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
class Code:
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
class AccessToken:
    client_id: str
    scopes: list[str]
    user_id: str | None
    issued_at: float
    expires_at: float
    grant_id: str | None
    revoked: bool = False


@dataclass
class RefreshToken:
    grant_id: str
    issued_at: float
    expires_at: float
    rotated_at: float | None = None
    revoked: bool = False


def s256(verifier: str) -> str:
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


class TokenStore:
    """Every grant, code and token the fake issued, and the rules for using them."""

    def __init__(
        self, settings: TokenSettings, clock: Callable[[], float], stats: Counter[str]
    ) -> None:
        self.settings = settings
        self.now = clock
        self.stats = stats
        self.codes: dict[str, Code] = {}
        self.grants: dict[str, Grant] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}

    # ---------------------------------------------------------------------------- grants

    def new_grant(self, user_id: str, scopes: list[str]) -> Grant:
        grant = Grant(
            grant_id=secrets.token_hex(8),
            client_id=self.settings.client_id,
            user_id=user_id,
            scopes=list(scopes),
            auth_time=int(self.now()),
        )
        self.grants[grant.grant_id] = grant
        return grant

    def revoke_grant(self, grant: Grant) -> None:
        """Revoke a grant with every refresh and access token it issued."""
        grant.revoked = True
        for token in grant.refresh_tokens:
            self.refresh_tokens[token].revoked = True
        for token in grant.access_tokens:
            self.access_tokens[token].revoked = True

    def revoke_all(self) -> None:
        for grant in self.grants.values():
            self.revoke_grant(grant)

    def revoke(self, token: str) -> None:
        """RFC 7009: a refresh token takes its grant with it, an access token goes alone;
        an unknown token is no error."""
        refresh = self.refresh_tokens.get(token)
        if refresh is not None:
            self.revoke_grant(self.grants[refresh.grant_id])
        elif token in self.access_tokens:
            self.access_tokens[token].revoked = True

    def live_grants(self) -> list[dict[str, Any]]:
        return [
            {"user_id": grant.user_id, "scopes": list(grant.scopes)}
            for grant in self.grants.values()
            if not grant.revoked
        ]

    def refresh_record(self, refresh_token: str) -> RefreshToken:
        """The record of a refresh token (``KeyError`` if the fake never issued it)."""
        record = self.refresh_tokens.get(refresh_token)
        if record is None:
            raise KeyError("unknown refresh token")
        return record

    def narrow_grant(self, refresh_token: str, scopes: Iterable[str]) -> None:
        grant = self.grants[self.refresh_record(refresh_token).grant_id]
        keep = set(scopes) | set(OIDC_SCOPES)
        grant.scopes = [scope for scope in grant.scopes if scope in keep]

    # ---------------------------------------------------------------------------- tokens

    def refresh_usable(self, record: RefreshToken) -> bool:
        grant = self.grants[record.grant_id]
        return not (record.revoked or grant.revoked or self.now() >= record.expires_at)

    def access_usable(self, record: AccessToken) -> bool:
        if record.revoked or self.now() >= record.expires_at:
            return False
        grant = self.grants.get(record.grant_id) if record.grant_id else None
        return grant is None or not grant.revoked

    def is_refresh_token_active(self, token: str) -> bool:
        """Whether a refresh request with ``token`` would succeed now (grace period included)."""
        record = self.refresh_tokens.get(token)
        if record is None or not self.refresh_usable(record):
            return False
        if record.rotated_at is not None:
            return self.now() - record.rotated_at < self.settings.refresh_grace_period
        return True

    def active_access_token(self, token: str) -> AccessToken | None:
        """The record of ``token`` if the API would accept it now."""
        record = self.access_tokens.get(token)
        if record is None or not self.access_usable(record):
            return None
        return record

    def new_access_token(self, scopes: list[str], user_id: str | None, grant: Grant | None) -> str:
        token = secrets.token_urlsafe(32)
        now = self.now()
        self.access_tokens[token] = AccessToken(
            client_id=self.settings.client_id,
            scopes=list(scopes),
            user_id=user_id,
            issued_at=now,
            expires_at=now + self.settings.access_token_ttl,
            grant_id=grant.grant_id if grant else None,
        )
        if grant is not None:
            grant.access_tokens.append(token)
        return token

    def new_refresh_token(self, grant: Grant, expires_at: float | None = None) -> str:
        token = secrets.token_urlsafe(48)
        now = self.now()
        if expires_at is None:
            expires_at = now + self.settings.refresh_token_lifetime
        self.refresh_tokens[token] = RefreshToken(
            grant_id=grant.grant_id, issued_at=now, expires_at=expires_at
        )
        grant.refresh_tokens.append(token)
        return token

    def expire_access_tokens(self) -> None:
        now = self.now()
        for token in self.access_tokens.values():
            token.expires_at = min(token.expires_at, now - 1)

    def expire_refresh_token(self, refresh_token: str) -> None:
        record = self.refresh_record(refresh_token)
        record.expires_at = min(record.expires_at, self.now() - 1)

    # ---------------------------------------------------------------------------- codes

    def issue_code(
        self,
        *,
        client_id: str,
        redirect_uri: str,
        scopes: list[str],
        user_id: str,
        nonce: str | None,
        code_challenge: str | None,
        ttl: float,
    ) -> str:
        code = secrets.token_urlsafe(32)
        self.codes[code] = Code(
            client_id=client_id,
            redirect_uri=redirect_uri,
            scopes=scopes,
            user_id=user_id,
            nonce=nonce,
            code_challenge=code_challenge,
            expires_at=self.now() + ttl,
            auth_time=int(self.now()),
        )
        return code

    def redeem_code(
        self, code: str, redirect_uri: str | None, verifier: str | None
    ) -> tuple[Code, Grant]:
        """Use ``code`` up and open its grant; :class:`TokenError` if it is refused. A code
        used twice revokes the grant of its first use."""
        record = self.codes.get(code)
        if record is None:
            raise TokenError("invalid_grant", INVALID_CODE)
        if record.used:
            if record.grant_id is not None:
                self.revoke_grant(self.grants[record.grant_id])
            raise TokenError("invalid_grant", INVALID_CODE)
        record.used = True
        if self.now() >= record.expires_at or record.client_id != self.settings.client_id:
            raise TokenError("invalid_grant", INVALID_CODE)
        if redirect_uri != record.redirect_uri:
            raise TokenError(
                "invalid_grant",
                "The 'redirect_uri' does not match the redirection URI used in the authorization "
                "request.",
            )
        self._check_pkce(record, verifier)
        grant = self.new_grant(record.user_id, record.scopes)
        grant.auth_time = record.auth_time
        record.grant_id = grant.grant_id
        return record, grant

    @staticmethod
    def _check_pkce(record: Code, verifier: str | None) -> None:
        if record.code_challenge is None:
            if verifier:
                raise TokenError("invalid_grant", _PKCE_FAILED)
            return
        if not verifier or not _VERIFIER_RE.fullmatch(verifier):
            raise TokenError("invalid_grant", _PKCE_FAILED)
        if not equal(s256(verifier), record.code_challenge):
            raise TokenError("invalid_grant", _PKCE_FAILED)

    # ---------------------------------------------------------------------------- refresh

    def use_refresh_token(
        self, token: str, requested: list[str]
    ) -> tuple[RefreshToken, Grant, list[str]]:
        """Check a refresh request: its token's record, grant and the scopes to issue.

        A rotated-out token counts in ``stats["refresh_token_reuse"]``; one refused (its grace
        period over, which also revokes the grant, or otherwise unusable) counts in
        ``stats["refresh_token_reuse_rejected"]``. ``requested`` scopes must be among the
        grant's. The caller issues the new tokens, then calls :meth:`rotated`.
        """
        record = self.refresh_tokens.get(token)
        if record is None:
            raise TokenError("invalid_grant", INVALID_REFRESH)
        grant = self.grants[record.grant_id]
        rotated_out = record.rotated_at is not None
        if rotated_out:
            self.stats["refresh_token_reuse"] += 1
        if not self.refresh_usable(record) or grant.client_id != self.settings.client_id:
            if rotated_out:
                self.stats["refresh_token_reuse_rejected"] += 1
            raise TokenError("invalid_grant", INVALID_REFRESH)
        if record.rotated_at is not None:
            if self.now() - record.rotated_at >= self.settings.refresh_grace_period:
                self.stats["refresh_token_reuse_rejected"] += 1
                self.revoke_grant(grant)
                raise TokenError("invalid_grant", INVALID_REFRESH)
        if not requested:
            return record, grant, list(grant.scopes)
        extra = [scope for scope in requested if scope not in grant.scopes]
        if extra:
            raise TokenError(
                "invalid_scope",
                "The requested scope is invalid, unknown, or malformed: " + " ".join(extra),
            )
        return record, grant, unique(requested)

    def rotated(self, record: RefreshToken) -> None:
        """Mark a refresh token used, when refresh tokens rotate: its grace period starts."""
        if self.settings.rotate_refresh_tokens and record.rotated_at is None:
            record.rotated_at = self.now()
