"""Saving Brex's answer to a refresh: the rows it writes, written once, durably.

A refresh that Brex answered writes one :class:`SavePlan`, all or nothing: the token row,
only at the generation the refresh started from (which also releases the claim), and
only then the connection's row and its events, all while the connection is active. On
PostgreSQL that is one statement, atomic on its own; on SQLite three, in one transaction.
By the time it is written Brex has rotated the refresh token, so :func:`write_within_grace`
keeps trying through a dropped database connection for as long as Brex's grace period for
the old one allows.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar, cast

from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.db.models import Case, F, Field, Model, Q, QuerySet, Value, When
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from .. import oauth, signals
from ..conf import brex_settings
from ..db import cache_related
from ..exceptions import MalformedTokenResponse
from ..models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    team_note,
    with_team_note,
)

logger = logging.getLogger("django_brex_oauth")


@dataclass
class SavePlan:
    """What saving one token answer writes: two conditional ``UPDATE`` statements (the
    connection, only while it is active; the token row, only at the generation the refresh
    started from) and one ``INSERT`` of its events, in one transaction."""

    claimant: str
    connection_fields: dict[str, Any]
    token_fields: dict[str, Any]
    #: (kind, detail) of each event to write.
    events: list[tuple[str, str]]
    #: The refresh made the connection need the customer to connect again (a narrower
    #: grant); otherwise it refreshed.
    needs_reauth: bool = False
    #: Sends the signal, after the commit, with the connection as saved.
    on_commit: Callable[[BrexConnection], None] | None = None


@sensitive_variables()
def _applied(started: BrexToken, plan: SavePlan, now: datetime) -> BrexToken:
    """A copy of ``started`` (token and connection) as :func:`_write` left the rows, so
    that nothing is read again."""
    token, connection = _copy(started), _copy(started.connection)
    for name, value in plan.token_fields.items():
        if not isinstance(value, _ReleasedIfMine):
            setattr(token, name, value)
    if token.refresh_claimed_by == plan.claimant:
        token.refresh_claimed_until, token.refresh_claimed_by = None, ""
    token.generation += 1
    token.updated_at = connection.updated_at = now
    for name, value in plan.connection_fields.items():
        setattr(connection, name, value)
    cache_related(token, "connection", connection)
    return token


M = TypeVar("M", bound=Model)


def _copy(instance: M) -> M:
    """A copy of a model instance, as ``copy.copy()`` makes one (its own state and cache of
    related objects) without going through pickling's protocol."""
    copied = instance.__class__.__new__(instance.__class__)
    copied.__dict__ = instance.__dict__.copy()
    state = copied._state = copy.copy(instance._state)
    state.fields_cache = instance._state.fields_cache.copy()
    return copied


class _ReleasedIfMine:
    """``CASE WHEN refresh_claimed_by = <claimant> THEN <released> ELSE <column> END``:
    the claim's release, written by :func:`_write_in_one_statement` directly and
    given to the ORM as :meth:`as_case`."""

    __slots__ = ("claimant", "column", "released")

    def __init__(self, claimant: str, column: str, released: None | str) -> None:
        self.claimant, self.column, self.released = claimant, column, released

    def as_case(self) -> Case:
        return Case(
            When(Q(refresh_claimed_by=self.claimant), then=Value(self.released)),
            default=F(self.column),
        )


def _release_claim_fields(claimant: str) -> dict[str, Any]:
    # Release the claim only if this worker still holds it: one that took over after the
    # lease ran out keeps its own.
    return {
        column: _ReleasedIfMine(claimant, column, released)
        for column, released in _RELEASED.items()
    }


#: The columns the claim's release sets, and what it sets them to.
_RELEASED: dict[str, None | str] = {"refresh_claimed_until": None, "refresh_claimed_by": ""}


def refresh_token_end(exchanged_at: datetime) -> datetime:
    # Brex's refresh tokens last 90 days from the last exchange and every refresh returns
    # one (the same value when not rotated), so the estimated end moves with each refresh.
    # It stays an estimate: Brex may also cap a chain's total lifetime.
    return exchanged_at + timedelta(seconds=brex_settings.REFRESH_TOKEN_LIFETIME)


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
def plan_refreshed(
    started: BrexToken, claimant: str, answer: oauth.TokenResponse, rotated: bool
) -> SavePlan:
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
    token_fields["refresh_token_expires_at"] = refresh_token_end(received_at)
    connection_fields: dict[str, Any] = {
        "last_refreshed_at": received_at,
        "granted_scopes": " ".join(new_scopes),
    }
    events: list[tuple[str, str]] = []
    scopes_changed = set(old_scopes) != set(new_scopes)
    if scopes_changed:
        change = _scope_change(old_scopes, new_scopes)
        events.append(
            (EventKind.SCOPES_CHANGED, " ".join(filter(None, (
                f"On refresh, Brex changed the granted scopes ({change}).", team_note(team)
            ))))
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

        return SavePlan(
            claimant, connection_fields, token_fields, events, True, send_refresh_failed
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

    return SavePlan(
        claimant, connection_fields, token_fields, events, False, send_token_refreshed
    )


@sensitive_variables()
def plan_malformed(
    started: BrexToken, claimant: str, answer: oauth.TokenResponse,
    error: MalformedTokenResponse,
) -> SavePlan:
    # Brex rotated the refresh token although the rest of its answer is unusable: the new
    # one is the only one that will keep working, so it is saved; the access token is not
    # (the old one stays, good until it expires) and the next try gets a whole answer.
    reason = f"Refresh failed, will retry: {error} The new refresh token was saved."[:2000]
    return SavePlan(
        claimant=claimant,
        connection_fields={"last_error": reason},
        token_fields={
            "refresh_token": answer.refresh_token,
            "refresh_token_used_at": answer.received_at,
            "refresh_token_expires_at": refresh_token_end(answer.received_at),
            **_release_claim_fields(claimant),
        },
        events=[(EventKind.REFRESH_FAILED, with_team_note(reason, started.connection))],
    )


@sensitive_variables()
def _write(started: BrexToken, plan: SavePlan, note: str = "") -> BrexToken | None:
    """One try at writing ``plan``: the token as saved, or None when the tokens are no
    longer the ones the refresh started from (or the connection is no longer active)."""
    connection_id = started.connection_id
    now = timezone.now()
    alias = router.db_for_write(BrexToken)
    events = [(kind, f"{detail} {note}".strip()[:2000]) for kind, detail in plan.events]

    if connections[alias].vendor == "postgresql":
        # One statement, atomic on its own: no transaction block around it (two round
        # trips fewer), and inside a caller's transaction it simply joins it.
        if not _write_in_one_statement(
            alias, started, plan.connection_fields, plan.token_fields, events, now
        ):
            return None
        return _saved(alias, started, plan, now)
    # A plain atomic block, not write_transaction(): the first statement is a write, so
    # SQLite takes its write lock at once, with no read lock to upgrade.
    with transaction.atomic(using=alias):
        written = _write_in_three_statements(
            *_orm_writes(alias, started, plan, now),
            [ConnectionEvent(connection_id=connection_id, kind=kind, detail=detail,
                             created_at=now) for kind, detail in events],
        )
        if not written:
            transaction.set_rollback(True, using=alias)
            return None
        return _saved(alias, started, plan, now)


@sensitive_variables()
def _saved(alias: str, started: BrexToken, plan: SavePlan, now: datetime) -> BrexToken:
    """The token as :func:`_write` saved it, its signal sent once the save is committed."""
    saved = _applied(started, plan, now)
    if plan.on_commit is not None:
        # A partial, not a lambda: the lambda's frame would hold the saved token (and its
        # new refresh token) outside any function marked sensitive.
        transaction.on_commit(partial(plan.on_commit, saved.connection), using=alias)
    return saved


@sensitive_variables()
def _orm_writes(
    alias: str, started: BrexToken, plan: SavePlan, now: datetime
) -> tuple[QuerySet, dict[str, Any], QuerySet, dict[str, Any]]:
    """The rows :func:`_write` updates and their values, as querysets."""
    return (
        BrexConnection.objects.using(alias).filter(
            pk=started.connection_id, status=ConnectionStatus.ACTIVE
        ),
        {**plan.connection_fields, "updated_at": now},
        BrexToken.objects.using(alias).filter(
            pk=started.connection_id, generation=started.generation
        ),
        {
            **{name: value.as_case() if isinstance(value, _ReleasedIfMine) else value
               for name, value in plan.token_fields.items()},
            "generation": F("generation") + 1, "updated_at": now,
        },
    )


@sensitive_variables()
def _write_in_three_statements(
    connection_rows, connection_values, token_rows, token_values, events
) -> bool:
    # The connection first (every writer locks it before the token row): its status is
    # re-checked after any concurrent writer commits.
    if not connection_rows.update(**connection_values):
        return False
    if not token_rows.update(**token_values):
        return False
    ConnectionEvent.objects.bulk_create(events)
    return True


def _set_clause(
    model: type[Model], connection: Any, names: tuple[str, ...]
) -> tuple[str, list[Field | None]]:
    """The ``SET`` assignments of ``names`` (``%s`` for each value, the claim's release
    as its ``CASE`` with the claimant and the released value as its parameters) and the
    field of each value (None for a release), as the ORM's compiler would write them."""
    quote = connection.ops.quote_name
    assignments: list[str] = []
    fields: list[Field | None] = []
    for name in names:
        field = cast(Field, model._meta.get_field(name))
        column = quote(field.column)
        if name in _RELEASED:
            assignments.append(
                f"{column} = CASE WHEN {quote('refresh_claimed_by')} = %s "
                f"THEN %s ELSE {column} END"
            )
            fields.append(None)
        else:
            assignments.append(f"{column} = %s")
            fields.append(field)
    return ", ".join(assignments), fields


def _parameters(fields: list[Field | None], values: list[Any], connection: Any) -> list[Any]:
    # Each value prepared as the ORM prepares it (encryption included); a release's
    # claimant and released value as they are.
    params: list[Any] = []
    for field, value in zip(fields, values, strict=True):
        if field is None:
            params += (value.claimant, value.released)
        else:
            params.append(field.get_db_prep_save(value, connection))
    return params


@sensitive_variables()
def _write_in_one_statement(
    alias: str, started: BrexToken, connection_fields: dict[str, Any],
    token_fields: dict[str, Any], events: list[tuple[str, str]], now: datetime,
) -> bool:
    """The save as one statement (PostgreSQL); whether it wrote.

    It locks the connection's row while the connection is active (first, as every writer
    does), then updates the token row if it is still the generation the refresh started
    from, and only if that matched, the connection's row and the events. So it writes all
    or nothing, and a connection disconnected or reconnected meanwhile is not touched.

    Its SQL is written here rather than through the ORM's compiler (which costs a refresh
    more than PostgreSQL takes to run it), once per process for each set of columns; each
    value is prepared by its field as the ORM prepares it (encryption included)."""
    connection_values = {**connection_fields, "updated_at": now}
    token_values = {**token_fields, "updated_at": now}
    connection = connections[alias]
    assert events, "every save records at least one event"
    shape = (alias, tuple(connection_values), tuple(token_values), len(events))
    if shape not in _statements:
        _statements[shape] = _statement(connection, *shape[1:])
    statement, connection_params, token_params, created_at = _statements[shape]
    params = (
        started.connection_id, ConnectionStatus.ACTIVE.value,
        *_parameters(token_params, list(token_values.values()), connection),
        started.connection_id, started.generation,
        *_parameters(connection_params, list(connection_values.values()), connection),
        created_at.get_db_prep_save(now, connection),
        *(value for event in events for value in event),
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0] == 1


def _statement(
    connection: Any, connection_names: tuple[str, ...], token_names: tuple[str, ...],
    event_count: int,
) -> tuple[str, list[Field | None], list[Field | None], Field]:
    quote = connection.ops.quote_name
    connection_set, connection_params = _set_clause(BrexConnection, connection, connection_names)
    token_set, token_params = _set_clause(BrexToken, connection, token_names)
    token_table = quote(BrexToken._meta.db_table)
    connection_table = quote(BrexConnection._meta.db_table)
    connection_pk = quote("id")
    token_pk = quote("connection_id")
    generation = quote("generation")
    columns = ", ".join(map(quote, ("connection_id", "kind", "detail", "created_at")))
    rows = ", ".join(["(%s, %s)"] * event_count)
    statement = (
        f"WITH c AS (SELECT {connection_pk} FROM {connection_table} "
        f"WHERE {connection_pk} = %s AND {quote('status')} = %s FOR NO KEY UPDATE), "
        f"t AS (UPDATE {token_table} SET {token_set}, "
        f"{generation} = {token_table}.{generation} + 1 "
        f"WHERE {token_table}.{token_pk} = %s AND {token_table}.{generation} = %s "
        f"AND {token_table}.{token_pk} IN (SELECT {connection_pk} FROM c) "
        f"RETURNING {token_table}.{token_pk}), "
        f"u AS (UPDATE {connection_table} SET {connection_set} "
        f"WHERE {connection_table}.{connection_pk} IN (SELECT {token_pk} FROM t) RETURNING 1), "
        f"e AS (INSERT INTO {quote(ConnectionEvent._meta.db_table)} ({columns}) "
        f"SELECT t.{token_pk}, v.kind, v.detail, %s::timestamptz FROM t, "
        f"(VALUES {rows}) AS v (kind, detail) RETURNING 1) "
        "SELECT count(*) FROM t"
    )
    created_at = cast(Field, ConnectionEvent._meta.get_field("created_at"))
    return statement, connection_params, token_params, created_at


#: _write_in_one_statement()'s statements, by database and the columns they set.
_statements: dict[tuple, tuple[str, list[Field | None], list[Field | None], Field]] = {}


@sensitive_variables()
def write_within_grace(
    started: BrexToken, plan: SavePlan, answer: oauth.TokenResponse
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
    window = brex_settings.REFRESH_SAVE_RETRY_SECONDS
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
                connection_id=connection_id, kind=EventKind.REFRESH_FAILED,
                detail=with_team_note(reason, connection_id),
            )
    except DatabaseError:
        logger.error("Brex connection %s: the failure could not be recorded either.",
                     connection_id)
