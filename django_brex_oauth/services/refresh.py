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

import contextlib
import copy
import enum
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.db.models import Case, F, Q, Value, When
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
    MalformedTokenResponse,
    RefreshPaused,
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
    team_note,
)
from . import health, throttle, unreadable

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
    #: The sweep's rate budget is used up for this window (only with ``budget=True``):
    #: nothing was sent; try again after ``retry_after`` seconds.
    DEFERRED = "deferred"


@dataclass(frozen=True)
class RefreshResult:
    """The outcome of one refresh attempt and the tokens as they now stand."""

    outcome: Outcome
    connection_id: int
    token: BrexToken | None = None
    rotated: bool = False
    #: For ``DEFERRED``: seconds until the sweep's budget has room again.
    retry_after: float | None = None

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
    budget: bool = False,
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

    Every caller honours the waits of :mod:`.throttle`, shared by every process: while
    Brex's ``Retry-After`` runs nothing is sent (an on-demand caller sleeps through up to
    ``RETRY_BACKOFF_MAX`` seconds of it; a longer wait raises :class:`BrexUnavailable` with
    ``retry_after``), and while Brex refuses the client credentials :class:`RefreshPaused`
    is raised. With ``budget`` (the sweep), the request is taken from the sweep's shared
    rate budget first, and ``DEFERRED`` returned when it is used up.

    Raises :class:`BrexUnavailable` for a transient failure (timeout, connection error, 429,
    5xx, discovery unreachable): tokens untouched, connection still active, the failure
    recorded. Brex refusing the refresh token is not raised: the connection is marked
    ``needs_reauth`` and ``NEEDS_REAUTH`` returned; so is a connection whose tokens no
    configured key can decrypt (see :mod:`~django_brex_oauth.services.unreadable`).
    Brex refusing the site's client credentials (``invalid_client``) leaves the connection
    active and its tokens untouched, pauses refreshing for every connection and raises
    :class:`RefreshPaused`.
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

    if token.connection.status == ConnectionStatus.ACTIVE and needs_refresh(token):
        # Outside the claim: an on-demand caller may sleep through a short Retry-After.
        throttle.before_token_request(
            max_wait=float(brex_settings.RETRY_BACKOFF_MAX) if wait else 0.0,
            environment=token.connection.environment,
        )
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
        if budget:
            ticket = throttle.take_sweep_budget()
            if not ticket.granted:
                return RefreshResult(
                    Outcome.DEFERRED, connection_id, token, retry_after=ticket.resets_in
                )
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
    # A setting that cannot work must fail before Brex rotates anything, not after.
    oauth.required_api_scopes()
    for _ in range(_MAX_TOKEN_SWAPS + 1):
        try:
            # Resolve the endpoint first (it may need a request), then make sure a whole
            # lease is left for the token call.
            discovery.get_endpoint("token_endpoint", issuer=issuer)
            if time.monotonic() - claimed_at > 1.0:
                renew_claim(connection_id, claimant)
            answer = oauth.refresh(sent, issuer=issuer)
            if not answer.problems:
                # Tokens for another Brex user, or from another issuer, are never stored. (Of
                # a malformed answer only the refresh token is kept, which is only ever sent
                # back to the token endpoint, and its next answer is checked.)
                oauth.validate_refreshed_tokens(
                    answer, subject=token.connection.brex_user_id, issuer=issuer
                )
        except InvalidClient as err:
            # The site's client id or secret, not this customer's grant: keep every
            # connection active and pause refreshing until the credentials work again.
            throttle.client_rejected(err, connection=token.connection)
            paused = RefreshPaused(
                f"Refreshing is paused for every connection: Brex refused this site's client "
                f"credentials ({err.error}). The customer need not reconnect.",
                retry_after=float(brex_settings.CLIENT_REJECTED_PROBE_INTERVAL),
            )
            _record_transient_failure(connection_id, paused)
            raise paused from err
        except InvalidGrant as err:
            result = _mark_needs_reauth(connection_id, err, sent)
            if result is not None:
                return result
            # Another worker stored a different refresh token meanwhile: use that instead.
            current = _load(connection_id)
            if current is None or current.connection.status != ConnectionStatus.ACTIVE:
                return RefreshResult(Outcome.NOT_ACTIVE, connection_id, current)
            if not needs_refresh(current):
                return RefreshResult(Outcome.NOT_DUE, connection_id, current)
            token, sent = current, current.refresh_token or ""
            claimed_at = 0.0  # renew before the next call
            continue
        except DiscoveryError as err:
            _record_transient_failure(connection_id, err)
            raise BrexUnavailable(str(err)) from err
        except BrexUnavailable as err:
            # A Retry-After holds back every worker, not only this one.
            throttle.hold_for(throttle.token_scope(token.connection.environment), err)
            _record_transient_failure(connection_id, err)
            raise
        except TokenError as err:
            _record_transient_failure(connection_id, err)
            raise
        return _save(token, claimant, sent, answer)
    raise BrexUnavailable("The stored refresh token kept changing while refreshing.")


@dataclass
class _Save:
    """What saving one token answer writes: two conditional ``UPDATE`` statements (the
    connection, only while it is active; the token row, only at the generation the refresh
    started from) and one ``INSERT`` of its events, in one transaction."""

    claimant: str
    connection_fields: dict[str, Any]
    token_fields: dict[str, Any]
    #: (kind, detail) of each event to write.
    events: list[tuple[str, str]]
    outcome: Outcome
    #: Sends the signal, after the commit, with the connection as saved.
    on_commit: Callable[[BrexConnection], None] | None = None


@sensitive_variables()
def _save(
    started: BrexToken, claimant: str, sent: str, answer: oauth.TokenResponse
) -> RefreshResult:
    """Save Brex's answer over the tokens the refresh started from, and nothing else.

    The tokens are replaced only if they are still the generation ``started`` read and the
    connection is still active; otherwise (a reconnect, a disconnect, another worker that
    saved first) this answer is discarded by :func:`_discard`. A malformed answer saves only
    the rotated refresh token it carries, if any, and raises
    :class:`MalformedTokenResponse`.
    """
    connection_id = started.connection_id
    rotated = answer.refresh_token is not None and answer.refresh_token != sent
    error: MalformedTokenResponse | None = None
    if answer.problems:
        error = MalformedTokenResponse(answer.problems)
        if not rotated:
            _record_transient_failure(connection_id, error)
            raise error
        plan = _plan_malformed(started, claimant, answer, error)
    else:
        plan = _plan_refreshed(started, claimant, answer, rotated)
    token = _write_within_grace(started, plan, answer)
    if token is None:
        return _discard(started, answer, rotated)
    if error is not None:
        logger.warning(
            "Brex connection %s: %s The new refresh token was saved.", connection_id, error
        )
        raise error
    if plan.outcome == Outcome.NEEDS_REAUTH:
        logger.warning("Brex connection %s needs re-authorization: %s", connection_id,
                       plan.connection_fields["last_error"])
    else:
        logger.info("Refreshed Brex connection %s (refresh token %s).", connection_id,
                    "rotated" if rotated else "kept")
    return RefreshResult(plan.outcome, connection_id, token, rotated=rotated)


@sensitive_variables()
def _applied(started: BrexToken, plan: _Save, now: datetime) -> BrexToken:
    """A copy of ``started`` (token and connection) as :func:`_write` left the rows, so
    that nothing is read again."""
    token, connection = copy.copy(started), copy.copy(started.connection)
    for name, value in plan.token_fields.items():
        if not isinstance(value, Case):
            setattr(token, name, value)
    if token.refresh_claimed_by == plan.claimant:
        token.refresh_claimed_until, token.refresh_claimed_by = None, ""
    token.generation += 1
    token.updated_at = connection.updated_at = now
    for name, value in plan.connection_fields.items():
        setattr(connection, name, value)
    token.connection = connection
    return token


def _release_claim_fields(claimant: str) -> dict[str, Any]:
    # Release the claim only if this worker still holds it: one that took over after the
    # lease ran out keeps its own.
    mine = Q(refresh_claimed_by=claimant)
    return {
        "refresh_claimed_until": Case(When(mine, then=Value(None)),
                                      default=F("refresh_claimed_until")),
        "refresh_claimed_by": Case(When(mine, then=Value("")), default=F("refresh_claimed_by")),
    }


def _refresh_token_end(exchanged_at: datetime) -> datetime:
    # Brex's refresh tokens last 90 days from the last exchange and every refresh returns
    # one (the same value when not rotated), so the estimated end moves with each refresh.
    # It stays an estimate: Brex may also cap a chain's total lifetime.
    return exchanged_at + timedelta(seconds=int(brex_settings.REFRESH_TOKEN_LIFETIME))


def _scope_change(old: list[str], new: list[str]) -> str:
    lost = [s for s in old if s not in new]
    gained = [s for s in new if s not in old]
    parts = []
    if lost:
        parts.append("no longer granted: " + " ".join(lost))
    if gained:
        parts.append("newly granted: " + " ".join(gained))
    return "; ".join(parts)


@sensitive_variables()
def _plan_refreshed(
    started: BrexToken, claimant: str, answer: oauth.TokenResponse, rotated: bool
) -> _Save:
    connection = started.connection
    team = connection.owning_team
    old_scopes = connection.scopes
    # No scope in the answer: what was granted before (RFC 6749 section 6).
    new_scopes = list(answer.scopes) or old_scopes
    received_at = answer.received_at
    token_fields: dict[str, Any] = {
        "refresh_token_used_at": received_at,
        **_release_claim_fields(claimant),
    }
    if rotated:
        token_fields["refresh_token"] = answer.refresh_token
    token_fields["refresh_token_expires_at"] = _refresh_token_end(received_at)
    connection_fields: dict[str, Any] = {
        "last_refreshed_at": received_at,
        "granted_scopes": " ".join(new_scopes),
    }
    events: list[tuple[str, str]] = []
    scopes_changed = set(old_scopes) != set(new_scopes)
    if scopes_changed:
        change = _scope_change(old_scopes, new_scopes)
        events.append(
            (EventKind.SCOPES_CHANGED, f"On refresh, Brex changed the granted scopes ({change}).")
        )
    missing = oauth.missing_required_scopes(new_scopes)
    if missing:
        reason = (
            "Brex no longer grants a scope this site requires: " + " ".join(missing) + "."
        )
        # Like a refused refresh token: no access token, the refresh token kept (encrypted)
        # so that a disconnect can still revoke it, out of the sweep.
        token_fields.update(access_token=None, access_token_expires_at=None)
        connection_fields.update(status=ConnectionStatus.NEEDS_REAUTH, last_error=reason)
        events.append((EventKind.NEEDS_REAUTH, " ".join(filter(None, (
            reason, "The customer must connect again.", team_note(team)
        )))))

        def send_refresh_failed(connection: BrexConnection) -> None:
            signals.refresh_failed.send(
                sender=BrexConnection, connection=connection, error="insufficient_scope",
                description=reason, team=team,
            )

        return _Save(
            claimant, connection_fields, token_fields, events, Outcome.NEEDS_REAUTH,
            send_refresh_failed,
        )

    token_fields.update(
        access_token=answer.access_token,
        token_type=answer.token_type,
        access_token_expires_at=answer.expires_at,
    )
    connection_fields["last_error"] = ""
    events.append((
        EventKind.REFRESHED,
        f"Access token valid until {answer.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
        f"refresh token {'rotated' if rotated else 'kept'}."
        + ("" if team is None else " " + team_note(team)),
    ))

    def send_token_refreshed(connection: BrexConnection) -> None:
        signals.token_refreshed.send(
            sender=BrexConnection, connection=connection, rotated=rotated,
            old_scopes=old_scopes, new_scopes=new_scopes, team=team,
        )

    return _Save(
        claimant, connection_fields, token_fields, events, Outcome.REFRESHED,
        send_token_refreshed,
    )


@sensitive_variables()
def _plan_malformed(
    started: BrexToken, claimant: str, answer: oauth.TokenResponse,
    error: MalformedTokenResponse,
) -> _Save:
    # Brex rotated the refresh token although the rest of its answer is unusable: the new
    # one is the only one that will keep working, so it is saved; the access token is not
    # (the old one stays, good until it expires) and the next try gets a whole answer.
    reason = f"Refresh failed, will retry: {error} The new refresh token was saved."[:2000]
    return _Save(
        claimant=claimant,
        connection_fields={"last_error": reason},
        token_fields={
            "refresh_token": answer.refresh_token,
            "refresh_token_used_at": answer.received_at,
            "refresh_token_expires_at": _refresh_token_end(answer.received_at),
            **_release_claim_fields(claimant),
        },
        events=[(EventKind.REFRESH_FAILED, reason)],
        outcome=Outcome.REFRESHED,
    )


@sensitive_variables()
def _write(started: BrexToken, plan: _Save, note: str = "") -> BrexToken | None:
    """One try at writing ``plan``: the token as saved, or None when the tokens are no
    longer the ones the refresh started from (or the connection is no longer active)."""
    connection_id = started.connection_id
    now = timezone.now()
    # A plain atomic block, not write_transaction(): the first statement is a write, so
    # SQLite takes its write lock at once, with no read lock to upgrade.
    with transaction.atomic():
        # The connection first (every writer locks it before the token row): its status
        # is re-checked after any concurrent writer commits.
        if not BrexConnection.objects.filter(
            pk=connection_id, status=ConnectionStatus.ACTIVE
        ).update(**plan.connection_fields, updated_at=now):
            return None
        if not BrexToken.objects.filter(
            pk=connection_id, generation=started.generation
        ).update(**plan.token_fields, generation=F("generation") + 1, updated_at=now):
            transaction.set_rollback(True)
            return None
        ConnectionEvent.objects.bulk_create(
            ConnectionEvent(
                connection_id=connection_id, kind=kind, detail=f"{detail} {note}".strip()[:2000]
            )
            for kind, detail in plan.events
        )
        saved = _applied(started, plan, now)
        if plan.on_commit is not None:
            # A partial, not a lambda: the lambda's frame would hold the saved token (and
            # its new refresh token) outside any function marked sensitive.
            transaction.on_commit(partial(plan.on_commit, saved.connection))
    return saved


@sensitive_variables()
def _write_within_grace(
    started: BrexToken, plan: _Save, answer: oauth.TokenResponse
) -> BrexToken | None:
    """:func:`_write`, tried again while the database fails, for up to
    ``REFRESH_SAVE_RETRY_SECONDS`` after Brex answered.

    Brex has rotated the refresh token by now: the new one exists only in this process's
    memory, and the stored one dies when Brex's grace period (about 30 s) ends. So a
    dropped database connection or a failover is worth waiting out: each try reconnects
    and backs off (0.1 s doubling to 2 s). Inside an outer transaction nothing can be tried
    again. The outcome is recorded: in the events' detail when a later try saved, as
    ``last_error`` and an event (as far as the database allows) when none did.
    """
    connection_id = started.connection_id
    db = connections[router.db_for_write(BrexToken)]
    window = float(brex_settings.REFRESH_SAVE_RETRY_SECONDS)
    waited = (timezone.now() - answer.received_at).total_seconds()
    deadline = time.monotonic() + window - max(0.0, waited)
    pause = 0.1
    failures: list[str] = []
    while True:
        note = ""
        if failures:
            note = (
                f"Saved at try {len(failures) + 1}, after the database failed "
                f"({', '.join(dict.fromkeys(failures))})."
            )
        try:
            return _write(started, plan, note)
        except (OperationalError, InterfaceError) as err:
            failures.append(type(err).__name__)
            left = deadline - time.monotonic()
            if db.in_atomic_block or left <= 0:
                _record_unsaved(connection_id, failures, window)
                raise
            logger.warning(
                "Brex connection %s: saving the refreshed tokens failed (%s, try %d); "
                "trying again.", connection_id, type(err).__name__, len(failures),
            )
            with contextlib.suppress(DatabaseError):
                db.close()
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)


def _record_unsaved(connection_id: int, failures: list[str], window: float) -> None:
    reason = (
        f"The refreshed tokens could not be saved: the database failed "
        f"({', '.join(dict.fromkeys(failures))}) {len(failures)} times in {window:g} s. "
        "The refresh token Brex rotated out is still the stored one; Brex accepts it only "
        "for its grace period, after which the customer must connect again."
    )
    logger.error("Brex connection %s: %s", connection_id, reason)
    db = connections[router.db_for_write(BrexToken)]
    if db.in_atomic_block:
        return
    try:
        with contextlib.suppress(DatabaseError):
            db.close()
        with transaction.atomic():
            BrexConnection.objects.filter(pk=connection_id).update(
                last_error=reason, updated_at=timezone.now()
            )
            ConnectionEvent.objects.create(
                connection_id=connection_id, kind=EventKind.REFRESH_FAILED, detail=reason
            )
    except DatabaseError:
        logger.error("Brex connection %s: the failure could not be recorded either.",
                     connection_id)


@sensitive_variables()
def _discard(started: BrexToken, answer: oauth.TokenResponse, rotated: bool) -> RefreshResult:
    """The tokens changed while Brex was answering: keep the stored ones, and make Brex
    forget the answer's unless they belong to the same grant as the stored ones."""
    connection_id = started.connection_id
    current = _load(connection_id)
    same_grant = (
        current is not None
        and current.connection.status == ConnectionStatus.ACTIVE
        and current.connection.connected_at == started.connection.connected_at
    )
    if same_grant:
        # Another worker (one that took over an expired claim) saved tokens of this same
        # grant first. Revoking this answer's refresh token would revoke those too.
        detail = (
            "Another refresh saved newer tokens first; the tokens Brex gave this one were "
            "not stored."
        )
    else:
        detail = (
            "The connection was reconnected or disconnected while Brex was answering a "
            "refresh; the tokens Brex gave that refresh were not stored, and were revoked "
            "at Brex."
        )
        issuer = brex_settings.issuer_for(started.connection.environment)
        if rotated:
            oauth.revoke_quietly(answer.refresh_token, "refresh_token", issuer=issuer)
        elif answer.access_token:
            oauth.revoke_quietly(answer.access_token, "access_token", issuer=issuer)
    if current is not None:
        ConnectionEvent.objects.create(
            connection_id=connection_id, kind=EventKind.REFRESH_DISCARDED, detail=detail
        )
    logger.info("Brex connection %s: %s", connection_id, detail)
    if current is None or current.connection.status != ConnectionStatus.ACTIVE:
        return RefreshResult(Outcome.NOT_ACTIVE, connection_id, current)
    return RefreshResult(Outcome.NOT_DUE, connection_id, current)


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
        team = connection.owning_team
        ConnectionEvent.objects.create(
            connection=connection,
            kind=EventKind.NEEDS_REAUTH,
            detail=" ".join(filter(None, (
                reason[:2000], "The customer must connect again.", team_note(team)
            ))),
        )
        error, description = err.error, err.description
        transaction.on_commit(
            lambda: signals.refresh_failed.send(
                sender=BrexConnection, connection=connection, error=error,
                description=description, team=team,
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


# The sweep ---------------------------------------------------------------------------------


def batched_due_connection_ids(
    *, all_active: bool = False, exclude_environments: Collection[str] = ()
) -> Iterator[list[int]]:
    """Ids of the connections the sweep should refresh, ``SWEEP_BATCH_SIZE`` at a time,
    most urgent first. Connections another worker is refreshing are left out.

    They come from :meth:`BrexTokenQuerySet.refresh_candidates`, answered by its partial
    indexes without looking at the connections table: the services wipe the access token
    expiry of every connection that stops being active, which drops it from those indexes,
    and :func:`refresh_connection` checks the status anyway (and wipes a stray expiry), so
    joining every candidate to its connection here would only add cost. ``all_active``
    lists every active connection that has a refresh token instead.
    ``exclude_environments`` leaves out the connections made in those Brex environments
    (the join is made only then: while a Brex holds the sweep back).
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
    if exclude_environments:
        tokens = tokens.exclude(connection__environment__in=list(exclude_environments))
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
    #: Left for a later run: Brex asked to wait (Retry-After) or refreshing is paused.
    deferred: int = 0
    #: Why connections were deferred (log-safe), or "".
    held_back: str = ""
    #: True when Brex refused the client credentials (refreshing is paused site-wide).
    paused: bool = False

    @property
    def total(self) -> int:
        """How many connections the sweep went through."""
        return self.refreshed + self.skipped + self.failed + self.needs_reauth + self.deferred

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
    with are skipped, a transient failure is counted and the sweep goes on. It takes each
    request from the sweep's shared rate budget and, when that is used up, sleeps until the
    next window. Once a Brex asks to wait (``Retry-After``) or refuses the client
    credentials, nothing more is sent to it: the rest of the connections made in its
    environment are counted as deferred, for a later run, while those of the other
    environment go on. ``progress`` is called after each connection with (done, total,
    report).
    """
    connection_ids = due_connection_ids(all_active=all_active)
    report = SweepReport()
    #: Environment -> why its Brex is not to be called now.
    held: dict[str, BrexUnavailable] = {}
    if connection_ids:
        used, limit, _refused = throttle.sweep_budget_use()
        logger.info(
            "Refresh sweep: %s connection(s) due; rate budget: %s of %s token requests used "
            "in this window.", len(connection_ids), used, limit,
        )
        held = held_environments()
        for err in held.values():
            _hold_back(report, err)
    for done, connection_id in enumerate(connection_ids, start=1):
        # The environment is looked up only while some Brex holds the sweep back.
        if held and _environment_of(connection_id) in held:
            report.deferred += 1
            if progress is not None:
                progress(done, len(connection_ids), report)
            continue
        try:
            result = _sweep_one(connection_id, all_active)
        except BrexUnavailable as err:
            report.add(None)
            if err.retry_after:
                held[_environment_of(connection_id)] = err
                _hold_back(report, err)
        except BrexOAuthError:
            report.add(None)
        except UndecryptableValue as err:
            # One row written under another key must not stop the rest of the sweep.
            logger.error("Brex connection %s: %s", connection_id, err)
            report.add(None)
        except Exception:
            # Nor may anything else that goes wrong with one connection (a bug, a database
            # error that outlasted the save's retries): log it and go on with the others.
            logger.exception("Refreshing Brex connection %s failed unexpectedly.", connection_id)
            report.add(None)
        else:
            report.add(result.outcome)
        if progress is not None:
            progress(done, len(connection_ids), report)
    if report.held_back:
        logger.warning("Refresh sweep: %s connection(s) deferred: %s", report.deferred,
                       report.held_back)
    # For the admin's health page: when the sweep last ran.
    health.record_sweep(report.total, "synchronous sweep (manage.py brex_oauth_refresh)")
    return report


def held_environments() -> dict[str, BrexUnavailable]:
    """The Brex environments whose token endpoint may not be called now (``Retry-After``
    running, or the client credentials refused), each with why; a paused one whose probe
    time has come is probed first (see :func:`throttle.before_token_request`)."""
    held = {}
    for environment in throttle.environments():
        try:
            throttle.before_token_request(environment=environment)
        except BrexUnavailable as err:
            held[environment] = err
    return held


def _environment_of(connection_id: int) -> str:
    return (
        BrexConnection.objects.filter(pk=connection_id)
        .values_list("environment", flat=True)
        .first()
    ) or ""  # A connection deleted meanwhile: held back by no environment.


def _sweep_one(connection_id: int, all_active: bool) -> RefreshResult:
    """Refresh one connection for the synchronous sweep, waiting for the rate budget."""
    while True:
        result = refresh_connection(connection_id, force=all_active, wait=False, budget=True)
        if result.outcome != Outcome.DEFERRED:
            return result
        time.sleep((result.retry_after or 0.0) + random.uniform(0.05, 0.25))


def _hold_back(report: SweepReport, err: BrexUnavailable) -> None:
    report.held_back = "; ".join(filter(None, [report.held_back, str(err)]))
    report.paused = report.paused or isinstance(err, RefreshPaused)
