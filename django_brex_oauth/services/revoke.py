"""Disconnecting a connection and revoking its refresh token at Brex."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from .. import oauth, signals
from ..exceptions import BrexOAuthError
from ..models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    RevocationStatus,
)

logger = logging.getLogger("django_brex_oauth")


def disconnect(connection: BrexConnection, *, actor=None) -> BrexConnection:
    """Stop using ``connection`` at once and revoke its refresh token at Brex.

    The connection is ``revoked`` locally whatever Brex answers. When Brex confirms,
    the tokens are wiped; when it cannot be reached, the refresh token is kept
    (encrypted) so that the revocation can be tried again, and the outcome is recorded.
    Disconnecting twice is harmless.
    """
    with transaction.atomic():
        connection = BrexConnection.objects.select_for_update().get(pk=connection.pk)
        already = connection.status == ConnectionStatus.REVOKED
        if not already:
            connection.status = ConnectionStatus.REVOKED
            connection.revoked_at = timezone.now()
            connection.revocation_status = RevocationStatus.PENDING
            connection.save(update_fields=["status", "revoked_at", "revocation_status",
                                           "updated_at"])
            ConnectionEvent.objects.create(
                connection=connection, kind=EventKind.DISCONNECTED, actor=actor,
                detail="Disconnected; revoking the refresh token at Brex.",
            )
    if connection.revocation_status != RevocationStatus.PENDING:
        return connection
    revoked = revoke_at_brex(connection, actor=actor)
    if not already:
        transaction.on_commit(
            lambda: signals.disconnected.send(
                sender=BrexConnection, connection=connection, actor=actor,
                revoked_at_brex=revoked,
            )
        )
    return connection


def revoke_at_brex(connection: BrexConnection, *, actor=None) -> bool:
    """Try once to revoke the connection's refresh token; record the outcome.

    Returns True when Brex confirmed (or there was nothing left to revoke).
    """
    token = BrexToken.objects.filter(connection=connection).first()
    refresh_token = token.refresh_token if token else None
    try:
        if refresh_token:
            oauth.revoke(refresh_token, "refresh_token")
    except BrexOAuthError as err:
        with transaction.atomic():
            BrexConnection.objects.filter(pk=connection.pk).update(
                last_error=f"Revocation at Brex failed: {err}"
            )
            ConnectionEvent.objects.create(
                connection=connection, kind=EventKind.REVOKE_FAILED, actor=actor,
                detail=str(err),
            )
        logger.warning("Revoking Brex connection %s failed: %s", connection.pk, err)
        return False
    with transaction.atomic():
        BrexToken.objects.filter(connection=connection).update(
            access_token=None, refresh_token=None, access_token_expires_at=None,
            refresh_claimed_until=None, refresh_claimed_by="",
        )
        BrexConnection.objects.filter(pk=connection.pk).update(
            revocation_status=RevocationStatus.DONE, last_error=""
        )
        connection.revocation_status = RevocationStatus.DONE
        ConnectionEvent.objects.create(
            connection=connection, kind=EventKind.REVOKED, actor=actor,
            detail="Brex confirmed the refresh token is revoked; tokens wiped.",
        )
    return True
