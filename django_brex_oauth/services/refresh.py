"""Refreshing a connection's tokens: on demand, from the sweep, safely across workers.

Only one refresh of a connection runs at a time, across threads, processes and hosts,
with nothing but the database: a worker first *claims* the connection with a conditional
``UPDATE`` (``refresh_claimed_until`` is empty or in the past, by the database's clock),
which exactly one contender wins. The winner refreshes and saves; a loser either waits and
then uses the winner's tokens (on demand) or skips (the sweep). A worker killed in the
middle leaves a claim that simply expires after ``REFRESH_LEASE_SECONDS``.

Call these functions outside a database transaction: a claim and a rotated refresh token
must be committed at once, not when some outer transaction decides to commit (or roll back
and lose the only refresh token Brex still accepts).
"""

from __future__ import annotations

import enum
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Now
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from .. import discovery, oauth, signals
from ..conf import brex_settings
from ..db import write_transaction
from ..exceptions import (
    BrexOAuthError,
    BrexUnavailable,
    DiscoveryError,
    InvalidClient,
    InvalidGrant,
    TokenError,
)
from ..fields import UndecryptableValue
from ..models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    connection_pk,
)
from . import unreadable

logger = logging.getLogger("django_brex_oauth")

#: How many times a refused refresh token is swapped for one another worker stored meanwhile.
_MAX_TOKEN_SWAPS = 3


class Outcome(str, enum.Enum):
    """What :func:`refresh_connection` did."""

    #: Brex issued new tokens and they are saved.
    REFRESHED = "refreshed"
    #: Nothing to do: the tokens are fresh (perhaps another worker just refreshed them).
    NOT_DUE = "not_due"
    #: Another worker holds the claim (only when ``wait=False``).
    BUSY = "busy"
    #: Brex refused the refresh token: the connection now needs the customer to reconnect.
    NEEDS_REAUTH = "needs_reauth"
    #: The connection was not active (revoked, or needing re-authorization already).
    NOT_ACTIVE = "not_active"


@dataclass(frozen=True)
class RefreshResult:
    """The outcome of one refresh attempt and the tokens as they now stand."""

    outcome: Outcome
    connection_id: int
    token: BrexToken | None = None
    rotated: bool = False

    @property
    def usable(self) -> bool:
        """True when ``token`` holds an access token the connection may use."""
        return (
            self.outcome in (Outcome.REFRESHED, Outcome.NOT_DUE)
            and self.token is not None
            and bool(self.token.access_token)
        )


def lease_seconds() -> float:
    """How long a claim lasts: ``REFRESH_LEASE_SECONDS``, but always past the HTTP timeout."""
    return max(float(brex_settings.REFRESH_LEASE_SECONDS), float(brex_settings.HTTP_TIMEOUT) + 5)


def new_claimant_id() -> str:
    """An id for one refresh attempt: host, process, thread and a random part (64 chars max)."""
    host = socket.gethostname()[:30]
    return f"{host}:{os.getpid()}:{threading.get_ident() % 1_000_000}:{uuid.uuid4().hex[:8]}"[:64]


# The claim (an atomic lease on the token row) ---------------------------------------------


def claim(connection_id: int, claimant: str) -> bool:
    """Try to take the refresh claim of a connection; True when this caller won it.

    One conditional ``UPDATE``: PostgreSQL re-checks the condition after waiting for a
    concurrent writer's row lock, and SQLite serialises writers, so exactly one contender
    gets a row count of 1. Times come from the database, so hosts' clocks do not matter.
    """
    lease = timedelta(seconds=lease_seconds())
    taken = (
        BrexToken.objects.filter(pk=connection_id)
        .filter(Q(refresh_claimed_until__isnull=True) | Q(refresh_claimed_until__lt=Now()))
        .update(refresh_claimed_until=Now() + lease, refresh_claimed_by=claimant)
    )
    return taken == 1


def renew_claim(connection_id: int, claimant: str) -> bool:
    """Extend a claim this caller holds by a full lease; False when it was lost."""
    lease = timedelta(seconds=lease_seconds())
    renewed = BrexToken.objects.filter(pk=connection_id, refresh_claimed_by=claimant).update(
        refresh_claimed_until=Now() + lease
    )
    return renewed == 1


def claim_expires_in(connection_id: int) -> float:
    """Seconds until the current claim on a connection runs out (0 when there is none),
    by the database's clock, at most one lease."""
    remaining = (
        BrexToken.objects.filter(pk=connection_id, refresh_claimed_until__isnull=False)
        .annotate(left=F("refresh_claimed_until") - Now())
        .values_list("left", flat=True)
        .first()
    )
    if remaining is None:
        return 0.0
    return min(max(0.0, remaining.total_seconds()), lease_seconds())


def release_claim(connection_id: int, claimant: str) -> None:
    """Give up a claim if this caller still holds it."""
    BrexToken.objects.filter(pk=connection_id, refresh_claimed_by=claimant).update(
        refresh_claimed_until=None, refresh_claimed_by=""
    )


# Refreshing one connection ----------------------------------------------------------------


def _load(connection_id: int) -> BrexToken | None:
    return BrexToken.objects.select_related("connection").filter(pk=connection_id).first()


@sensitive_variables()
def refresh_connection(
    connection: BrexConnection | int,
    *,
    force: bool = False,
    wait: bool = True,
    min_validity: float | None = None,
    stale_access_token: str | None = None,
) -> RefreshResult:
    """Refresh a connection's tokens if they need it, unless another worker is already on it.

    What "need it" means:

    * ``stale_access_token``: Brex rejected this access token (a 401), so refresh unless the
      stored one has changed since;
    * ``force``: refresh now, unless another worker refreshes while this one waits;
    * ``min_validity``: the access token expires within that many seconds;
    * otherwise the sweep's rule (:meth:`BrexToken.is_due_for_refresh`).

    With ``wait`` (on demand), a caller that loses the race for the claim waits for the
    winner and returns its tokens (``NOT_DUE``), or takes over once a dead winner's claim
    expires. Without it (the sweep), it returns ``BUSY`` at once.

    Raises :class:`BrexUnavailable` for a transient failure (timeout, connection error, 429,
    5xx, discovery unreachable): tokens untouched, connection still active, the failure
    recorded. Brex refusing the refresh token is not raised: the connection is marked
    ``needs_reauth`` and ``NEEDS_REAUTH`` returned; so is a connection whose tokens no
    configured key can decrypt (see :mod:`~django_brex_oauth.services.unreadable`).
    """
    connection_id = connection_pk(connection)
    try:
        token = _load(connection_id)
    except UndecryptableValue:
        # No configured key decrypts its tokens: out of use until the customer reconnects.
        marked = unreadable.mark_unreadable(connection_id)
        return RefreshResult(Outcome.NEEDS_REAUTH if marked else Outcome.NOT_ACTIVE,
                             connection_id)
    if token is None or token.connection.status != ConnectionStatus.ACTIVE:
        if token is not None and token.access_token_expires_at is not None:
            _forget_access_token(connection_id)
        return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
    if force and stale_access_token is None:
        stale_access_token = token.access_token or ""

    def needs_refresh(current: BrexToken) -> bool:
        if not current.refresh_token:
            return False
        if stale_access_token is not None:
            return not current.access_token or current.access_token == stale_access_token
        if min_validity is not None:
            return current.access_token_expires_within(min_validity)
        return current.is_due_for_refresh()

    claimant = new_claimant_id()
    deadline = time.monotonic() + lease_seconds() + 5
    pause = 0.05
    while True:
        if token is None or token.connection.status != ConnectionStatus.ACTIVE:
            return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
        if not needs_refresh(token):
            return RefreshResult(Outcome.NOT_DUE, connection_id, token)
        if claim(connection_id, claimant):
            claimed_at = time.monotonic()
            break
        if not wait:
            return RefreshResult(Outcome.BUSY, connection_id, token)
        if time.monotonic() > deadline:
            raise BrexUnavailable("Another worker is still refreshing this Brex connection.")
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, 0.5)
        token = _load(connection_id)

    released = False
    try:
        # Read again under the claim: the previous holder may have finished in between.
        token = _load(connection_id)
        if token is None or token.connection.status != ConnectionStatus.ACTIVE:
            return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
        if not needs_refresh(token):
            return RefreshResult(Outcome.NOT_DUE, connection_id, token)
        result = _refresh_claimed(token, claimant, claimed_at, needs_refresh)
        # Saving the tokens (or marking the connection) cleared the claim already.
        released = result.outcome in (Outcome.REFRESHED, Outcome.NEEDS_REAUTH)
        return result
    finally:
        if not released:
            release_claim(connection_id, claimant)


@sensitive_variables()
def _refresh_claimed(
    token: BrexToken,
    claimant: str,
    claimed_at: float,
    needs_refresh: Callable[[BrexToken], bool],
) -> RefreshResult:
    connection_id = token.connection_id
    sent = token.refresh_token or ""
    # The Brex the connection was made at, whichever ENVIRONMENT is configured now.
    issuer = brex_settings.issuer_for(token.connection.environment)
    for _ in range(_MAX_TOKEN_SWAPS + 1):
        try:
            # Resolve the endpoint first (it may need a request), then make sure a whole
            # lease is left for the token call.
            discovery.get_endpoint("token_endpoint", issuer=issuer)
            if time.monotonic() - claimed_at > 1.0:
                renew_claim(connection_id, claimant)
            answer = oauth.refresh(sent, issuer=issuer)
            # Tokens for another Brex user, or from another issuer, are never stored.
            oauth.validate_refreshed_tokens(answer, subject=token.connection.brex_user_id,
                                            issuer=issuer)
        except (InvalidGrant, InvalidClient) as err:
            result = _mark_needs_reauth(connection_id, err, sent)
            if result is not None:
                return result
            # Another worker stored a different refresh token meanwhile: use that instead.
            current = _load(connection_id)
            if current is None or current.connection.status != ConnectionStatus.ACTIVE:
                return RefreshResult(Outcome.NOT_ACTIVE, connection_id, current)
            if not needs_refresh(current):
                return RefreshResult(Outcome.NOT_DUE, connection_id, current)
            sent = current.refresh_token or ""
            claimed_at = 0.0  # renew before the next call
            continue
        except DiscoveryError as err:
            _record_transient_failure(connection_id, err)
            raise BrexUnavailable(str(err)) from err
        except BrexUnavailable as err:
            _record_transient_failure(connection_id, err)
            raise
        except TokenError as err:
            _record_transient_failure(connection_id, err)
            raise
        return _save(connection_id, claimant, sent, answer)
    raise BrexUnavailable("The stored refresh token kept changing while refreshing.")


@sensitive_variables()
def _save(
    connection_id: int, claimant: str, sent: str, answer: oauth.TokenResponse
) -> RefreshResult:
    now = timezone.now()
    with write_transaction():
        connection = BrexConnection.objects.select_for_update().get(pk=connection_id)
        token = BrexToken.objects.select_for_update().get(pk=connection_id)
        if connection.status != ConnectionStatus.ACTIVE:
            # Disconnected while Brex was answering: keep nothing, and make Brex forget it.
            if answer.refresh_token:
                new_refresh_token = answer.refresh_token
                issuer = brex_settings.issuer_for(connection.environment)
                transaction.on_commit(lambda: _revoke_quietly(new_refresh_token, issuer))
            return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
        rotated = answer.refresh_token is not None and answer.refresh_token != sent
        token.access_token = answer.access_token
        token.token_type = answer.token_type
        token.access_token_expires_at = now + timedelta(seconds=answer.expires_in)
        if answer.refresh_token:
            token.refresh_token = answer.refresh_token
        token.refresh_token_used_at = now
        # Brex's refresh tokens last 90 days from the last exchange and every refresh
        # returns one (the same value when not rotated), so the estimated end moves with
        # each refresh. It stays an estimate: Brex may also cap a chain's total lifetime.
        token.refresh_token_expires_at = now + timedelta(
            seconds=int(brex_settings.REFRESH_TOKEN_LIFETIME)
        )
        if token.refresh_claimed_by == claimant:
            token.refresh_claimed_until = None
            token.refresh_claimed_by = ""
        token.save()
        connection.last_refreshed_at = now
        connection.last_error = ""
        if answer.scopes:
            connection.granted_scopes = " ".join(answer.scopes)
        connection.save(update_fields=["last_refreshed_at", "last_error", "granted_scopes",
                                       "updated_at"])
        ConnectionEvent.objects.create(
            connection=connection,
            kind=EventKind.REFRESHED,
            detail=(
                f"Access token valid until {token.access_token_expires_at:%Y-%m-%d %H:%M:%S} "
                f"UTC; refresh token {'rotated' if rotated else 'kept'}."
            ),
        )
        transaction.on_commit(
            lambda: signals.token_refreshed.send(
                sender=BrexConnection, connection=connection, rotated=rotated
            )
        )
    logger.info("Refreshed Brex connection %s (refresh token %s).", connection_id,
                "rotated" if rotated else "kept")
    return RefreshResult(Outcome.REFRESHED, connection_id, token, rotated=rotated)


@sensitive_variables()
def _mark_needs_reauth(
    connection_id: int, err: TokenError, sent: str
) -> RefreshResult | None:
    """Mark the connection ``needs_reauth`` unless its refresh token changed since ``sent``
    was read (then return None so the caller uses the new one)."""
    with write_transaction():
        connection = BrexConnection.objects.select_for_update().get(pk=connection_id)
        token = BrexToken.objects.select_for_update().get(pk=connection_id)
        if token.refresh_token and token.refresh_token != sent:
            return None
        if connection.status != ConnectionStatus.ACTIVE:
            return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
        reason = f"Brex refused the refresh token ({err.error})"
        if err.description:
            reason += f": {err.description}"
        connection.status = ConnectionStatus.NEEDS_REAUTH
        connection.last_error = reason[:2000]
        connection.save(update_fields=["status", "last_error", "updated_at"])
        # The access token is of no further use; the refresh token is kept (encrypted) so
        # that a disconnect can still ask Brex to revoke it.
        token.access_token = None
        token.access_token_expires_at = None
        token.refresh_claimed_until = None
        token.refresh_claimed_by = ""
        token.save()
        ConnectionEvent.objects.create(
            connection=connection,
            kind=EventKind.NEEDS_REAUTH,
            detail=reason[:2000] + " The customer must connect again.",
        )
        error, description = err.error, err.description
        transaction.on_commit(
            lambda: signals.refresh_failed.send(
                sender=BrexConnection, connection=connection, error=error,
                description=description,
            )
        )
    logger.warning("Brex connection %s needs re-authorization: %s", connection_id, err.error)
    return RefreshResult(Outcome.NEEDS_REAUTH, connection_id, token)


def _forget_access_token(connection_id: int) -> None:
    """Wipe the access token of a connection that is not active (it cannot be used), which
    also takes it out of the sweep's indexes."""
    with write_transaction():
        connection = BrexConnection.objects.select_for_update().get(pk=connection_id)
        if connection.status != ConnectionStatus.ACTIVE:
            BrexToken.objects.filter(pk=connection_id).update(
                access_token=None, access_token_expires_at=None
            )


def _record_transient_failure(connection_id: int, err: BrexOAuthError) -> None:
    reason = f"Refresh failed, will retry: {err}"[:2000]
    with write_transaction():
        BrexConnection.objects.filter(pk=connection_id).update(
            last_error=reason, updated_at=timezone.now()
        )
        ConnectionEvent.objects.create(
            connection_id=connection_id, kind=EventKind.REFRESH_FAILED, detail=reason
        )
    logger.warning("Refreshing Brex connection %s failed: %s", connection_id, err)


@sensitive_variables()
def _revoke_quietly(refresh_token: str, issuer: str) -> None:
    try:
        oauth.revoke(refresh_token, "refresh_token", issuer=issuer)
    except BrexOAuthError as err:
        logger.warning("Could not revoke a refresh token issued after disconnecting: %s", err)


# The sweep ---------------------------------------------------------------------------------


def batched_due_connection_ids(*, all_active: bool = False) -> Iterator[list[int]]:
    """Ids of the connections the sweep should refresh, ``SWEEP_BATCH_SIZE`` at a time,
    most urgent first. Connections another worker is refreshing are left out.

    They come from :meth:`BrexTokenQuerySet.refresh_candidates`, answered by its partial
    indexes without looking at the connections table: the services wipe the access token
    expiry of every connection that stops being active, which drops it from those indexes,
    and :func:`refresh_connection` checks the status anyway (and wipes a stray expiry), so
    joining every candidate to its connection here would only add cost. ``all_active``
    lists every active connection that has a refresh token instead.
    """
    size = max(1, int(brex_settings.SWEEP_BATCH_SIZE))
    now = timezone.now()
    if all_active:
        tokens = BrexToken.objects.filter(
            connection__status=ConnectionStatus.ACTIVE, refresh_token__isnull=False
        ).order_by("pk")
    else:
        tokens = BrexToken.objects.refresh_candidates(now).order_by("access_token_expires_at")
    # One plain query: a server-side cursor would make PostgreSQL pick a fast-start plan
    # (walking an index in order) that is far slower for this OR-ed condition, and the ids
    # are small (a million of them take a few tens of MB).
    ids = list(tokens.unclaimed(now).values_list("connection_id", flat=True))
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def due_connection_ids(*, all_active: bool = False) -> list[int]:
    """All the ids :func:`batched_due_connection_ids` yields, in one list."""
    return [pk for batch in batched_due_connection_ids(all_active=all_active) for pk in batch]


@dataclass
class SweepReport:
    """Counts of what a synchronous sweep did."""

    refreshed: int = 0
    skipped: int = 0
    failed: int = 0
    needs_reauth: int = 0

    @property
    def total(self) -> int:
        """How many connections the sweep went through."""
        return self.refreshed + self.skipped + self.failed + self.needs_reauth

    def add(self, outcome: Outcome | None) -> None:
        """Count one connection's outcome (None: a failure)."""
        if outcome is None:
            self.failed += 1
        elif outcome == Outcome.REFRESHED:
            self.refreshed += 1
        elif outcome == Outcome.NEEDS_REAUTH:
            self.needs_reauth += 1
        else:
            self.skipped += 1


def sweep(
    *,
    all_active: bool = False,
    progress: Callable[[int, int, SweepReport], None] | None = None,
) -> SweepReport:
    """Refresh every due connection (every active one with ``all_active``) in this process.

    The synchronous twin of the Celery sweep, for cron: connections another worker is busy
    with are skipped, a transient failure is counted and the sweep goes on. ``progress`` is
    called after each connection with (done, total, report).
    """
    connection_ids = due_connection_ids(all_active=all_active)
    report = SweepReport()
    for done, connection_id in enumerate(connection_ids, start=1):
        try:
            result = refresh_connection(connection_id, force=all_active, wait=False)
        except BrexOAuthError:
            report.add(None)
        except UndecryptableValue as err:
            # One row written under another key must not stop the rest of the sweep.
            logger.error("Brex connection %s: %s", connection_id, err)
            report.add(None)
        else:
            report.add(result.outcome)
        if progress is not None:
            progress(done, len(connection_ids), report)
    return report
