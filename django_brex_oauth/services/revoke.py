"""Disconnecting a connection and revoking its refresh token at Brex.

A disconnect takes effect on this site at once: in one transaction the connection becomes
``revoked`` and its access token is wiped, whatever Brex answers. Brex is then asked to
revoke the refresh token at the discovery ``revocation_endpoint`` (RFC 7009). When Brex
confirms, the refresh token is wiped too and the revocation is ``done``. When Brex cannot
be reached, the revocation stays ``pending`` with the refresh token kept (encrypted) so it
can be sent again: by the ``revoke_connection`` task with exponential backoff, and by the
``sweep_revocations`` task for anything a lost task left behind. Every try is recorded as
an event; ``signals.disconnected`` is sent once per disconnect, after the commit.

A connection that is deleted instead is revoked through
:mod:`django_brex_oauth.services.detached`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.messages import constants as levels
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext
from django.views.decorators.debug import sensitive_variables

from .. import oauth, signals
from ..backoff import backoff_delay, not_before_delay
from ..conf import brex_settings
from ..db import write_transaction
from ..exceptions import BrexOAuthError, BrexUnavailable, DiscoveryError
from ..fields import UndecryptableValue
from ..models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    RevocationStatus,
    connection_pk,
    team_note,
    with_team_note,
)
from . import throttle, unreadable, webhook_subscriptions
from .queue import TASKS, send_task

logger = logging.getLogger("django_brex_oauth")

#: How many times one attempt sends again when the stored token changed during the request.
_MAX_TOKEN_SWAPS = 3


class RevokeOutcome(str, enum.Enum):
    """What one attempt to revoke a connection at Brex came to."""

    #: Brex confirmed (or nothing was left to revoke): tokens wiped, revocation ``done``.
    REVOKED = "revoked"
    #: Brex could not be reached or refused the request: the revocation stays ``pending``.
    FAILED = "failed"
    #: Nothing to do: the revocation is done already, or the connection is in use again.
    NOT_PENDING = "not_pending"
    #: Not tried here (``attempt_now=False``): handed to the ``revoke_connection`` task.
    QUEUED = "queued"
    #: No configured key decrypts the stored token, so Brex cannot be asked: tokens wiped
    #: here, revocation ``not_possible``. Not retried.
    NOT_POSSIBLE = "not_possible"


@dataclass(frozen=True)
class RevocationAttempt:
    """The outcome of :func:`revoke_at_brex`. ``error`` is log-safe (never a token)."""

    outcome: RevokeOutcome
    connection_id: int
    attempt: int = 0
    error: str = ""
    #: True when the failure is transient (timeout, connection error, 429, 5xx, discovery
    #: unreachable) and worth retrying soon.
    retryable: bool = False
    #: Seconds Brex asked to wait before the next request (``Retry-After``), or None.
    retry_after: float | None = None

    @property
    def revoked(self) -> bool:
        """True when Brex confirmed the revocation in this attempt."""
        return self.outcome == RevokeOutcome.REVOKED


@dataclass(frozen=True)
class DisconnectResult:
    """What :func:`disconnect` did."""

    connection: BrexConnection
    #: True when this call disconnected the connection; False when it was revoked already.
    disconnected: bool
    #: The attempt at Brex made by this call (``NOT_PENDING`` when Brex had confirmed before).
    attempt: RevocationAttempt
    #: True when a retry was handed to the ``revoke_connection`` task.
    retry_queued: bool = False

    @property
    def revoked_at_brex(self) -> bool:
        """True once Brex has confirmed the revocation (in this call or before)."""
        return self.connection.revocation_status == RevocationStatus.DONE

    def user_message(self, name: str) -> tuple[int, str]:
        """What the person who disconnected ``name`` (the connection's display name) is
        told, in their language: a ``django.contrib.messages`` level and the text."""
        if not self.disconnected:
            return levels.INFO, gettext("%(name)s was already disconnected.") % {"name": name}
        if self.attempt.outcome == RevokeOutcome.NOT_POSSIBLE:
            return levels.WARNING, gettext(
                "%(name)s is disconnected and this site no longer uses it. Brex could not be "
                "told to revoke the access, because this site can no longer read its stored "
                "credentials for it; the site's administrators can see this in its records."
            ) % {"name": name}
        if self.revoked_at_brex:
            return levels.SUCCESS, gettext(
                "%(name)s is disconnected, and Brex has revoked this site's access to it."
            ) % {"name": name}
        return levels.WARNING, gettext(
            "%(name)s is disconnected and this site no longer uses it. Brex could not be "
            "reached to revoke the access; this site will keep asking Brex until it does."
        ) % {"name": name}

    def staff_message(self, label: str) -> tuple[int, str]:
        """What staff are told in the admin about the connection ``label``: a
        ``django.contrib.messages`` level and the text."""
        outcome = self.attempt.outcome
        if outcome == RevokeOutcome.REVOKED:
            return levels.SUCCESS, gettext(
                "%(label)s: revoked at Brex; its tokens are wiped."
            ) % {"label": label}
        if outcome == RevokeOutcome.NOT_PENDING:
            return levels.INFO, gettext("%(label)s: was revoked at Brex already.") % {
                "label": label
            }
        if outcome == RevokeOutcome.NOT_POSSIBLE:
            return levels.ERROR, gettext(
                "%(label)s: disconnected and its tokens wiped here, but Brex could not "
                "be told: no configured key decrypts its stored token "
                "(BREX_OAUTH['ENCRYPTION_KEY'] or ENCRYPTION_KEY_FALLBACKS)."
            ) % {"label": label}
        if outcome == RevokeOutcome.QUEUED:
            return levels.WARNING, gettext(
                "%(label)s: disconnected here; Brex is not answering, so its "
                "revocation is queued."
            ) % {"label": label}
        if self.retry_queued:
            text = gettext(
                "%(label)s: disconnected here, but Brex did not confirm the "
                "revocation (%(error)s); it will be retried shortly."
            )
        else:
            text = gettext(
                "%(label)s: disconnected here, but Brex did not confirm the "
                "revocation (%(error)s); the revocation sweep will retry it."
            )
        return levels.WARNING, text % {"label": label, "error": self.attempt.error}


def _lock_pending(connection_id: int) -> BrexConnection | None:
    """Lock the connection while it still waits for its revocation at Brex, else None.
    Call inside a transaction."""
    return (
        BrexConnection.objects.select_for_update()
        .filter(pk=connection_id, status=ConnectionStatus.REVOKED,
                revocation_status=RevocationStatus.PENDING)
        .first()
    )


def disconnect(
    connection: BrexConnection | int,
    *,
    actor=None,
    queue_retry: bool = True,
    attempt_now: bool = True,
) -> DisconnectResult:
    """Stop using a connection at once and revoke its refresh token at Brex.

    The connection is ``revoked`` locally whatever Brex answers, and its access token is
    wiped. One attempt at Brex follows (see :func:`revoke_at_brex`); if Brex cannot be
    reached and ``queue_retry`` is set, the ``revoke_connection`` task retries with backoff.
    A refusal (``invalid_client``, say) is left to the revocation sweep. With
    ``attempt_now=False`` Brex is not called here at all and the task is queued at once
    (for a batch disconnected while Brex is known to be down).
    ``signals.disconnected`` is sent after the commit, only by the call that disconnected
    the connection. Disconnecting a revoked connection again sends nothing new: it only
    tries Brex once more if Brex has not confirmed yet.

    Call it outside a transaction when possible, so that the request to Brex does not hold
    the transaction open.
    """
    connection_id = connection_pk(connection)
    # Brex's webhook subscriptions go first, while the grant still works.
    webhook_subscriptions.unsubscribe(connection_id, actor=actor)
    now = timezone.now()
    with write_transaction():
        locked = BrexConnection.objects.select_for_update().get(pk=connection_id)
        newly = locked.status != ConnectionStatus.REVOKED
        if newly:
            locked.status = ConnectionStatus.REVOKED
            locked.revoked_at = now
            locked.revocation_status = RevocationStatus.PENDING
            locked.revocation_attempts = 0
            locked.revocation_attempted_at = None
            locked.last_error = ""
            locked.save(
                update_fields=[
                    "status", "revoked_at", "revocation_status", "revocation_attempts",
                    "revocation_attempted_at", "last_error", "updated_at",
                ]
            )
            # The partner stops using the connection now, even if Brex is unreachable.
            BrexToken.objects.filter(pk=connection_id).update(
                access_token=None, access_token_expires_at=None, updated_at=now
            )
            ConnectionEvent.objects.create(
                connection=locked,
                kind=EventKind.DISCONNECTED,
                actor=actor if getattr(actor, "pk", None) else None,
                detail=" ".join(filter(None, (
                    "Disconnected; no longer used. Revoking the refresh token at Brex.",
                    team_note(locked.owning_team),
                ))),
            )

    attempt = RevocationAttempt(RevokeOutcome.NOT_PENDING, connection_id)
    retry_queued = False
    try:
        if attempt_now:
            attempt = revoke_at_brex(connection_id, actor=actor)
        elif locked.revocation_status == RevocationStatus.PENDING:
            attempt = RevocationAttempt(RevokeOutcome.QUEUED, connection_id)
        locked.refresh_from_db()
    finally:
        try:
            # Whatever Brex said (or raised), this disconnect happened: announce it once,
            # with the connection as the database now has it.
            if newly:
                revoked = attempt.revoked
                team = locked.owning_team
                transaction.on_commit(
                    lambda: signals.disconnected.send(
                        sender=BrexConnection, connection=locked, actor=actor,
                        revoked_at_brex=revoked, team=team,
                    )
                )
        finally:
            # ...and a receiver that raises cannot keep the revocation from being retried.
            if attempt.outcome == RevokeOutcome.QUEUED or (
                attempt.outcome == RevokeOutcome.FAILED and attempt.retryable and queue_retry
            ):
                retry_queued = queue_revocation(connection_id, retry_after=attempt.retry_after)
    locked.refresh_from_db()
    return DisconnectResult(locked, newly, attempt, retry_queued)


@sensitive_variables()
def revoke_at_brex(connection: BrexConnection | int, *, actor=None) -> RevocationAttempt:
    """Ask Brex once to revoke a disconnected connection's refresh token; record the outcome.

    Does nothing (``NOT_PENDING``) unless the connection is ``revoked`` with the revocation
    ``pending``. A token no configured key decrypts cannot be sent: it is wiped, the
    revocation becomes ``not_possible`` and a ``revoke_failed`` event says so
    (``NOT_POSSIBLE``). Sends the refresh token form-encoded with ``token_type_hint=refresh_token``
    and the client authentication of the token endpoint (or the access token, when only that
    is left). On success the tokens are wiped, the revocation becomes ``done`` and a
    ``revoked`` event is written; on failure a ``revoke_failed`` event and ``last_error``
    say why, and the refresh token is kept for the next try. Brex is asked even when the
    refresh token's estimated end date has passed: the date is the app's reckoning, Brex
    answers 200 for a token it has forgotten, and only its answer says the grant is gone.

    While Brex's ``Retry-After`` for the revocation endpoint runs (one process got it, every
    process honours it), nothing is sent: a retryable ``FAILED`` with ``retry_after`` comes
    back, and nothing is recorded.
    """
    connection_id = connection_pk(connection)
    actor = actor if getattr(actor, "pk", None) else None
    now = timezone.now()
    waiting = wait_for_brex(connection_id)
    if waiting is not None:
        if not BrexConnection.objects.filter(
            pk=connection_id, status=ConnectionStatus.REVOKED,
            revocation_status=RevocationStatus.PENDING,
        ).exists():
            return RevocationAttempt(RevokeOutcome.NOT_PENDING, connection_id)
        return waiting
    with write_transaction():
        locked = _lock_pending(connection_id)
        if locked is None:
            return RevocationAttempt(RevokeOutcome.NOT_PENDING, connection_id)
        locked.revocation_attempts += 1
        locked.revocation_attempted_at = now
        locked.save(update_fields=["revocation_attempts", "revocation_attempted_at",
                                   "updated_at"])
        attempt_number = locked.revocation_attempts
        # The Brex the connection was made at, whichever ENVIRONMENT is configured now.
        issuer = brex_settings.issuer_for(locked.environment)
        try:
            token = BrexToken.objects.filter(pk=connection_id).first()
        except UndecryptableValue:
            token = None
            unreadable_token = True
        else:
            unreadable_token = False
    if unreadable_token:
        return _give_up_unreadable(connection_id, attempt_number, actor)

    for _ in range(_MAX_TOKEN_SWAPS + 1):
        value, hint = token_to_revoke(token)
        if value is None:
            reason = "Nothing was left to revoke at Brex."
        else:
            try:
                oauth.revoke(value, hint, issuer=issuer)
            except BrexOAuthError as err:
                return _record_failure(connection_id, attempt_number, err, actor)
            reason = f"Brex confirmed the revocation of the {hint.replace('_', ' ')}."
        finished, token = _finish(connection_id, value, attempt_number, reason, actor)
        if finished is not None:
            return finished
    return _record_failure(
        connection_id, attempt_number,
        BrexUnavailable("The stored token kept changing while revoking it."), actor,
    )


def wait_for_brex(object_id: int) -> RevocationAttempt | None:
    """A retryable failure, sent nowhere, while Brex's ``Retry-After`` for the revocation
    endpoint runs (any process may have got it); None when a request may go."""
    left = throttle.wait_left(throttle.revocation_scope())
    if left <= 0:
        return None
    return RevocationAttempt(
        RevokeOutcome.FAILED, object_id,
        error=f"Brex asked to wait {left:.0f} s more before the next revocation "
        "(Retry-After).",
        retryable=True, retry_after=left,
    )


def token_to_revoke(token: BrexToken | None) -> tuple[str | None, str]:
    if token is not None and token.refresh_token:
        return token.refresh_token, "refresh_token"
    if token is not None and token.access_token:
        return token.access_token, "access_token"
    return None, "refresh_token"


@sensitive_variables()
def _finish(
    connection_id: int, sent: str | None, attempt_number: int, reason: str, actor
) -> tuple[RevocationAttempt | None, BrexToken | None]:
    """Wipe the tokens and mark the revocation done, unless the stored token changed since
    ``sent`` was read (then return the current token so the caller revokes that one)."""
    with write_transaction():
        locked = _lock_pending(connection_id)
        if locked is None:
            # Reconnected (or finished by another worker) while Brex was answering.
            return RevocationAttempt(RevokeOutcome.NOT_PENDING, connection_id,
                                     attempt_number), None
        token = BrexToken.objects.select_for_update().filter(pk=connection_id).first()
        current, _hint = token_to_revoke(token)
        if current is not None and current != sent:
            return None, token
        BrexToken.objects.filter(pk=connection_id).update(
            access_token=None, refresh_token=None, access_token_expires_at=None,
            refresh_claimed_until=None, refresh_claimed_by="", updated_at=timezone.now(),
        )
        locked.revocation_status = RevocationStatus.DONE
        locked.last_error = ""
        locked.save(update_fields=["revocation_status", "last_error", "updated_at"])
        ConnectionEvent.objects.create(
            connection=locked, kind=EventKind.REVOKED, actor=actor,
            detail=with_team_note(f"Attempt {attempt_number}: {reason} Tokens wiped.", locked),
        )
    logger.info("Revoked Brex connection %s at Brex (attempt %s).", connection_id,
                attempt_number)
    return RevocationAttempt(RevokeOutcome.REVOKED, connection_id, attempt_number), token


def _give_up_unreadable(connection_id: int, attempt_number: int, actor) -> RevocationAttempt:
    """The token to revoke cannot be decrypted: wipe it here and record that Brex could not
    be told (trying again cannot help)."""
    reason = (
        f"Revocation at Brex not possible (attempt {attempt_number}): {unreadable.REASON} "
        "Brex was not told; the tokens were wiped here."
    )
    with write_transaction():
        locked = _lock_pending(connection_id)
        if locked is None:
            return RevocationAttempt(RevokeOutcome.NOT_PENDING, connection_id, attempt_number)
        BrexToken.objects.filter(pk=connection_id).update(
            access_token=None, refresh_token=None, access_token_expires_at=None,
            refresh_claimed_until=None, refresh_claimed_by="", updated_at=timezone.now(),
        )
        locked.revocation_status = RevocationStatus.NOT_POSSIBLE
        locked.last_error = reason
        locked.save(update_fields=["revocation_status", "last_error", "updated_at"])
        ConnectionEvent.objects.create(
            connection=locked, kind=EventKind.REVOKE_FAILED, actor=actor,
            detail=with_team_note(reason, locked),
        )
    logger.error("Brex connection %s: %s", connection_id, reason)
    return RevocationAttempt(RevokeOutcome.NOT_POSSIBLE, connection_id, attempt_number,
                             unreadable.REASON)


def _record_failure(
    connection_id: int, attempt_number: int, err: BrexOAuthError, actor
) -> RevocationAttempt:
    retryable = is_retryable(err)
    retry_after = err.retry_after if isinstance(err, BrexUnavailable) else None
    if isinstance(err, BrexUnavailable):
        throttle.hold_for(throttle.revocation_scope(), err)
    error = str(err)[:1000]
    reason = f"Revocation at Brex failed (attempt {attempt_number}): {error}"
    with write_transaction():
        BrexConnection.objects.filter(
            pk=connection_id, revocation_status=RevocationStatus.PENDING
        ).update(last_error=reason, updated_at=timezone.now())
        ConnectionEvent.objects.create(
            connection_id=connection_id, kind=EventKind.REVOKE_FAILED, actor=actor,
            detail=with_team_note(
                reason + (" It will be tried again." if retryable else
                          " It will be tried again by the revocation sweep."),
                connection_id,
            ),
        )
    logger.warning("Revoking Brex connection %s failed (attempt %s): %s", connection_id,
                   attempt_number, error)
    return RevocationAttempt(RevokeOutcome.FAILED, connection_id, attempt_number, error,
                             retryable, retry_after)


def is_retryable(err: BrexOAuthError) -> bool:
    """Whether a failed revocation is worth trying again soon (Brex or discovery was
    unreachable, 429, 5xx), rather than left to the sweep (Brex refused it)."""
    return isinstance(err, BrexUnavailable | DiscoveryError)


def queue_revocation(
    connection: BrexConnection | int, *, attempt: int = 0, retry_after: float | None = None
) -> bool:
    """Hand a pending revocation to the ``revoke_connection`` task after the commit, to run
    no sooner than ``retry_after`` seconds (Brex's ``Retry-After``) when given.

    Returns False when the task could not be queued (no broker, say) and that was known at
    once (outside a transaction); either way the revocation stays pending until Brex
    confirms, so the revocation sweep (or ``manage.py brex_oauth_cleanup``) picks it up.
    """
    connection_id = connection_pk(connection)
    return queue_after_commit(
        "revoke_connection", connection_id, attempt, f"Brex connection {connection_id}",
        retry_after=retry_after,
    )


def queue_after_commit(task_name: str, object_id: int, attempt: int, what: str,
                        using: str | None = None, retry_after: float | None = None) -> bool:
    countdown = backoff_delay(
        attempt,
        base=brex_settings.REVOKE_RETRY_BACKOFF,
        cap=brex_settings.REVOKE_RETRY_BACKOFF_MAX,
    )
    countdown = not_before_delay(countdown, retry_after)
    queued = True

    def send() -> None:
        nonlocal queued
        try:
            send_task(TASKS + task_name, (object_id,), countdown=countdown)
        except Exception as err:  # noqa: BLE001 - any broker failure; the sweep recovers
            queued = False
            logger.warning(
                "Could not queue the revocation of %s (%s); the revocation sweep will retry "
                "it.", what, type(err).__name__,
            )

    transaction.on_commit(send, using=using)
    return queued


def pending_revocation_ids(now: datetime | None = None) -> Iterator[int]:
    """Ids of revoked connections whose revocation Brex has not confirmed and that nothing
    has tried for ``REVOKE_RETRY_BACKOFF_MAX`` seconds (a task retrying one is left alone).
    None while Brex's ``Retry-After`` for the revocation endpoint runs."""
    if throttle.wait_left(throttle.revocation_scope()) > 0:
        return iter(())
    now = now or timezone.now()
    quiet_since = now - timedelta(seconds=brex_settings.REVOKE_RETRY_BACKOFF_MAX)
    return (
        BrexConnection.objects.filter(
            status=ConnectionStatus.REVOKED, revocation_status=RevocationStatus.PENDING
        )
        .filter(Q(revocation_attempted_at__isnull=True)
                | Q(revocation_attempted_at__lte=quiet_since))
        .order_by("revocation_attempted_at", "pk")
        .values_list("pk", flat=True)
        .iterator(chunk_size=500)
    )
