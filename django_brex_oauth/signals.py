"""Signals sent when a connection changes.

Every signal is sent with ``sender=BrexConnection`` and ``connection=<BrexConnection>``
after the database transaction that made the change has committed, so receivers can
rely on what they read. No signal carries a token.
"""

from django.dispatch import Signal

#: A customer connected (or reconnected) a Brex account.
#:
#: kwargs: ``connection``, ``user`` (the site user), ``created`` (False on reconnect).
connected = Signal()

#: A connection was disconnected by its owner or revoked by staff. Sent once per disconnect,
#: right after the first attempt at Brex; later retries of the revocation send nothing.
#:
#: kwargs: ``connection``, ``actor`` (the user who did it, or None),
#: ``revoked_at_brex`` (True once Brex confirmed the revocation; False while it is queued).
disconnected = Signal()

#: A connection's tokens were refreshed.
#:
#: kwargs: ``connection``, ``rotated`` (True when Brex issued a new refresh token).
token_refreshed = Signal()

#: A refresh failed for good: the connection now needs the customer to reconnect.
#:
#: kwargs: ``connection``, ``error`` (the OAuth error code, e.g. "invalid_grant"),
#: ``description`` (Brex's description, never a token).
refresh_failed = Signal()
