"""Connections whose stored tokens no configured key can decrypt.

That happens when ``ENCRYPTION_KEY`` is lost, or rotated without listing the old key in
``ENCRYPTION_KEY_FALLBACKS``. Nothing can be done with such a connection: its tokens
cannot be sent to Brex, not even to revoke them. The services treat it as they treat a
refresh token Brex refused: the connection becomes ``needs_reauth`` with a ``last_error``
that names the cause, ``signals.refresh_failed`` is sent once, and the sweep leaves it
alone; a disconnect wipes it here and records that Brex could not be told.

The encrypted values are kept (an operator who finds the old key can add it to
``ENCRYPTION_KEY_FALLBACKS``) until a disconnect or a reconnect replaces them.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from .. import signals
from ..db import write_transaction
from ..models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    team_note,
)

logger = logging.getLogger("django_brex_oauth")

#: The ``error`` passed with ``signals.refresh_failed`` for such a connection.
ERROR_CODE = "undecryptable_token"

#: What ``last_error`` says (no token, no key).
REASON = (
    "The stored Brex tokens cannot be decrypted with BREX_OAUTH['ENCRYPTION_KEY'] or any of "
    "ENCRYPTION_KEY_FALLBACKS (a lost key, or a rotation without the old key among the "
    "fallbacks)."
)


def mark_unreadable(connection_id: int) -> bool:
    """Take a connection whose tokens cannot be decrypted out of use.

    Its access token and any refresh claim are wiped (which drops it from the sweep) and,
    if it was active, it becomes ``needs_reauth`` with a ``needs_reauth`` event and
    ``signals.refresh_failed`` after the commit. Returns True when this call changed the
    status (so a signal went out), False when it was not active already.
    """
    with write_transaction():
        connection = BrexConnection.objects.select_for_update().filter(pk=connection_id).first()
        if connection is None:
            return False
        # Only bookkeeping columns: loading the row would try to decrypt it again.
        BrexToken.objects.filter(pk=connection_id).update(
            access_token=None, access_token_expires_at=None, refresh_claimed_until=None,
            refresh_claimed_by="", updated_at=timezone.now(),
        )
        if connection.status != ConnectionStatus.ACTIVE:
            return False
        connection.status = ConnectionStatus.NEEDS_REAUTH
        connection.last_error = REASON
        connection.save(update_fields=["status", "last_error", "updated_at"])
        team = connection.owning_team
        ConnectionEvent.objects.create(
            connection=connection,
            kind=EventKind.NEEDS_REAUTH,
            detail=" ".join(filter(None, (
                REASON, "The customer must connect again.", team_note(team)
            ))),
        )
        transaction.on_commit(
            lambda: signals.refresh_failed.send(
                sender=BrexConnection, connection=connection, error=ERROR_CODE,
                description=REASON, team=team,
            )
        )
    logger.error("Brex connection %s needs re-authorization: %s", connection_id, REASON)
    return True
