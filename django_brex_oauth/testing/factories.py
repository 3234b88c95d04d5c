"""Connections for tests, without going through Brex's consent page.

::

    from django_brex_oauth.testing.factories import make_connection

    connection = make_connection(user, fake=fake_brex)              # tokens the fake accepts
    stale = make_connection(user, fake=fake_brex, expired=True,
                            brex_user="grace.hopper@example.com")  # refreshed before use
    broken = make_connection(user, status="needs_reauth")

Nothing here sends a signal or records an event: the rows look as if the customer
connected a while ago.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from ..conf import REQUIRED_SCOPES, brex_settings
from ..models import BrexConnection, BrexToken, ConnectionStatus, RevocationStatus

if TYPE_CHECKING:
    from .fake_brex import FakeBrex

__all__ = ["make_connection"]

#: How long ago an ``expired=True`` access token expired.
EXPIRED_FOR = timedelta(minutes=5)


def _granted_scopes(scopes: Iterable[str] | None) -> list[str]:
    granted = list(REQUIRED_SCOPES)
    for scope in brex_settings.scopes if scopes is None else scopes:
        if scope not in granted:
            granted.append(scope)
    return granted


def _identity(fake: FakeBrex | None, brex_user: str | None) -> dict[str, str]:
    if fake is None:
        user_id = brex_user or "cuuser_" + secrets.token_hex(10)
        return {
            "user_id": user_id,
            "email": f"{user_id}@example.com",
            "company_id": "cuacc_" + secrets.token_hex(10),
            "company_name": "Example Company, Inc.",
        }
    user: dict[str, Any] | None
    if brex_user is None:
        user = fake.default_user
    else:
        user = fake.find_user(brex_user)
        if user is None:
            raise LookupError(f"the fake Brex has no user {brex_user!r}")
    return {
        "user_id": user["id"],
        "email": user["email"],
        "company_id": fake.company["id"],
        "company_name": fake.company.get("legal_name", ""),
    }


def make_connection(
    owner: Any,
    *,
    fake: FakeBrex | None = None,
    expired: bool = False,
    scopes: Iterable[str] | None = None,
    status: str = ConnectionStatus.ACTIVE,
    brex_user: str | None = None,
    team: Any = None,
) -> BrexConnection:
    """Create a connection of ``owner`` to a Brex account, with its tokens.

    * ``fake``: the tokens are minted by ``fake.issue_tokens()``, so the fake's API accepts
      them and its token endpoint refreshes them; without it they are random strings that
      no server knows (enough for tests that never call Brex).
    * ``expired``: the stored access token expired five minutes ago, so the app refreshes
      it before use and the sweep finds the connection due.
    * ``scopes``: API scopes granted (default: the ones ``BREX_OAUTH["SCOPES"]`` asks for);
      ``openid`` and ``offline_access`` are always added. The company is recorded only
      when ``companies.readonly`` is among them, as when connecting for real.
    * ``status``: ``"active"``; ``"needs_reauth"`` (no access token, and a refresh token
      the fake no longer accepts); or ``"revoked"`` (revoked at Brex, tokens wiped).
    * ``brex_user``: id or email of the fake's user who connected (default: its first
      user; one owner can connect several Brex users).
    * ``team``: with ``BREX_OAUTH_TEAM_MODEL``, the team the connection belongs to
      (default: none, a personal connection).
    """
    status = ConnectionStatus(status)
    granted = _granted_scopes(scopes)
    who = _identity(fake, brex_user)
    now = timezone.now()

    if status == ConnectionStatus.REVOKED:
        tokens: dict[str, Any] = {}
    elif fake is not None:
        tokens = fake.issue_tokens(scopes=granted, user=who["user_id"])
    else:
        tokens = {
            "access_token": secrets.token_urlsafe(32),
            "refresh_token": secrets.token_urlsafe(48),
            "expires_in": brex_settings.DEFAULT_ACCESS_TOKEN_LIFETIME,
            "token_type": "Bearer",
        }

    with_company = "companies.readonly" in granted
    connection = BrexConnection.objects.create(
        **({} if team is None else {"team": team}),
        owner=owner,
        environment=brex_settings.environment,
        brex_user_id=who["user_id"],
        brex_user_email=who["email"],
        brex_company_id=who["company_id"] if with_company else "",
        brex_company_name=who["company_name"] if with_company else "",
        granted_scopes=" ".join(granted),
        status=status,
        connected_at=now,
        revoked_at=now if status == ConnectionStatus.REVOKED else None,
        revocation_status=(
            RevocationStatus.DONE if status == ConnectionStatus.REVOKED
            else RevocationStatus.NOT_REQUESTED
        ),
        last_error=(
            "Brex refused the refresh token (invalid_grant)"
            if status == ConnectionStatus.NEEDS_REAUTH else ""
        ),
    )

    access_token = tokens.get("access_token")
    refresh_token = tokens.get("refresh_token")
    if status == ConnectionStatus.NEEDS_REAUTH:
        access_token = None
        if fake is not None and refresh_token:
            fake.expire_refresh_token(refresh_token)
    if access_token is None:
        access_expires_at = None
    elif expired:
        access_expires_at = now - EXPIRED_FOR
    else:
        access_expires_at = now + timedelta(seconds=int(tokens["expires_in"]))
    BrexToken.objects.create(
        connection=connection,
        access_token=access_token,
        refresh_token=refresh_token,
        token_type=tokens.get("token_type", "Bearer"),
        access_token_expires_at=access_expires_at,
        refresh_token_issued_at=now if refresh_token else None,
        refresh_token_expires_at=(
            now + timedelta(seconds=brex_settings.REFRESH_TOKEN_LIFETIME)
            if refresh_token else None
        ),
        refresh_token_used_at=now,
    )
    return connection
