"""The refresh claim: a lease on a connection's token row, so that only one worker (thread,
process or host) refreshes a connection at a time, with nothing but the database.

A worker *claims* the connection with a conditional ``UPDATE`` (``refresh_claimed_until``
is empty or in the past, by the database's clock), which exactly one contender wins: the
winner refreshes and saves, which releases the claim; a loser either waits and then uses
the winner's tokens (on demand) or skips (the sweep). A worker killed in the middle leaves
a claim that simply expires after ``REFRESH_LEASE_SECONDS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import uuid
from datetime import timedelta
from typing import Any, cast

from django.db import connections, router, transaction
from django.db.models import F, Q, QuerySet
from django.db.models.functions import Now

from ..conf import brex_settings
from ..db import cache_related, from_row, update_sql
from ..models import BrexConnection, BrexToken, ConnectionStatus


def lease_seconds() -> float:
    """How long a claim lasts: ``REFRESH_LEASE_SECONDS``, but always past the HTTP timeout."""
    return max(brex_settings.REFRESH_LEASE_SECONDS, brex_settings.HTTP_TIMEOUT + 5)


def new_claimant_id() -> str:
    """An id for one refresh attempt: host, process, thread and a random part (64 chars max)."""
    host = socket.gethostname()[:30]
    return f"{host}:{os.getpid()}:{threading.get_ident() % 1_000_000}:{uuid.uuid4().hex[:8]}"[:64]


def unclaimed() -> Q:
    """The condition of a token row no worker holds: no claim, or one that ran out."""
    return Q(refresh_claimed_until__isnull=True) | Q(refresh_claimed_until__lt=Now())


def claim(connection_id: int, claimant: str) -> bool:
    """Try to take the refresh claim of a connection; True when this caller won it.

    One conditional ``UPDATE``: PostgreSQL re-checks the condition after waiting for a
    concurrent writer's row lock, and SQLite serialises writers, so exactly one contender
    gets a row count of 1. Times come from the database, so hosts' clocks do not matter.
    """
    lease = timedelta(seconds=lease_seconds())
    taken = (
        BrexToken.objects.filter(pk=connection_id)
        .filter(unclaimed())
        .update(refresh_claimed_until=Now() + lease, refresh_claimed_by=claimant)
    )
    return taken == 1


def load(connection_id: int) -> BrexToken | None:
    """A connection's token row with its connection (one query), or None.

    The ``SELECT`` is built through the ORM once per database (with a stand-in for the
    connection); each call runs it and converts the row as the ORM would."""
    alias = router.db_for_read(BrexToken)
    if alias not in _loads:
        rows = BrexToken.objects.using(alias).select_related("connection")
        _loads[alias] = rows.filter(pk=_SOME_CONNECTION).query.sql_with_params()
    statement, params = _loads[alias]
    params = tuple(connection_id if p == _SOME_CONNECTION else p for p in params)
    with connections[alias].cursor() as cursor:
        cursor.execute(statement, params)
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(BrexToken._meta.concrete_fields)
    token = cast(BrexToken, from_row(BrexToken, alias, row[:split]))
    cache_related(token, "connection", from_row(BrexConnection, alias, row[split:]))
    return token


#: load()'s statement by database, with the stand-in for the connection.
_loads: dict[str, tuple[str, tuple]] = {}


def claim_and_load(
    connection_id: int, claimant: str, condition: Q | None = None
) -> BrexToken | None:
    """Claim an active connection whose token row also meets ``condition`` (a condition on
    the token table's own columns), and read that row with its connection as the claim
    left it, in one statement (``UPDATE … RETURNING``); None when nothing was claimed
    (busy, not active, or not meeting it)."""
    return claim_and_load_then(connection_id, claimant, condition)[0]


def claim_and_load_then(
    connection_id: int,
    claimant: str,
    condition: Q | None = None,
    then: tuple[str, tuple] | None = None,
) -> tuple[BrexToken | None, bool]:
    """:func:`claim_and_load`, and, only when it claimed, ``then``: an ``UPDATE … WHERE``
    (SQL and parameters; e.g. taking a request from the sweep's budget) that may or may
    not match. Returns the token (or None) and whether ``then`` updated a row.

    On PostgreSQL both are one statement (``WITH claimed AS (UPDATE …) UPDATE …``);
    elsewhere two in one transaction. Either way there is one commit.
    """
    alias = router.db_for_write(BrexToken)
    connection = connections[alias]
    postgres = connection.vendor == "postgresql"
    if condition is None:
        statement, params = _plain_claim_statement(alias, postgres, connection_id, claimant)
    else:
        statement, params = _claim_statement(
            _claim_rows(alias, connection_id, condition),
            _claim_values(claimant), postgres,
        )
    then_done = False
    if postgres and then is not None:
        statement = (
            f"WITH claimed AS ({statement}), then_done AS ({then[0]} AND EXISTS "
            "(SELECT 1 FROM claimed) RETURNING 1) "
            "SELECT claimed.*, EXISTS (SELECT 1 FROM then_done) FROM claimed"
        )
        params = (*params, *then[1])
    with transaction.atomic(using=alias) if then is not None and not postgres else (
        contextlib.nullcontext()
    ), connection.cursor() as cursor:
        cursor.execute(statement, params)
        row = cursor.fetchone()
        if row is not None and then is not None:
            if postgres:
                row, then_done = row[:-1], bool(row[-1])
            else:
                cursor.execute(f"{then[0]} RETURNING 1", then[1])
                then_done = cursor.fetchone() is not None
    if row is None:
        return None, False
    split = len(BrexToken._meta.concrete_fields)
    token = cast(BrexToken, from_row(BrexToken, alias, row[:split]))
    connection_values = row[split:] if postgres else json.loads(row[split])
    cache_related(token, "connection", from_row(BrexConnection, alias, connection_values))
    return token, then_done


def _claim_rows(alias: str, connection_id: int, condition: Q | None) -> QuerySet:
    rows = BrexToken.objects.using(alias).filter(pk=connection_id).filter(unclaimed())
    return rows if condition is None else rows.filter(condition)


def _claim_values(claimant: str) -> dict[str, Any]:
    return {
        "refresh_claimed_until": Now() + timedelta(seconds=lease_seconds()),
        "refresh_claimed_by": claimant,
    }


#: Stand-ins for the connection and the claimant in the cached claim statements: the ORM
#: passes both to the driver as they are (an integer, a string), so they are found among
#: the statement's parameters and replaced.
_SOME_CONNECTION = -7_700_000_000_001
_SOME_CLAIMANT = "\x00claimant\x00"
#: The claim statement without a condition, by (database, lease), with the stand-ins.
_plain_claims: dict[tuple[str, float], tuple[str, tuple]] = {}


def _plain_claim_statement(
    alias: str, postgres: bool, connection_id: int, claimant: str
) -> tuple[str, tuple]:
    """:func:`_claim_statement` with no condition, built through the ORM once per process
    and lease length (a refresh spends more time building it than PostgreSQL running it)."""
    key = (alias, lease_seconds())
    if key not in _plain_claims:
        _plain_claims[key] = _claim_statement(
            _claim_rows(alias, _SOME_CONNECTION, None), _claim_values(_SOME_CLAIMANT), postgres
        )
        found = [p for p in _plain_claims[key][1] if p in (_SOME_CONNECTION, _SOME_CLAIMANT)]
        assert sorted(map(str, found)) == sorted(map(str, [_SOME_CONNECTION, _SOME_CLAIMANT]))
    statement, params = _plain_claims[key]
    stand_ins = {_SOME_CONNECTION: connection_id, _SOME_CLAIMANT: claimant}
    return statement, tuple(
        stand_ins.get(p, p) if isinstance(p, (int, str)) and not isinstance(p, bool) else p
        for p in params
    )


def _claim_statement(
    rows: QuerySet, values: dict[str, Any], postgres: bool
) -> tuple[str, tuple]:
    """The claim's ``UPDATE`` of ``rows``, only while the connection is active, returning
    the token row's columns and then its connection's (PostgreSQL: as columns of a join;
    SQLite, whose ``RETURNING`` cannot name a joined table: as one JSON array)."""
    quote = connections[rows.db].ops.quote_name
    sql, params = update_sql(rows, values)
    head, where = sql.split(" WHERE ", 1)
    token_table = quote(BrexToken._meta.db_table)
    connection_table = quote(BrexConnection._meta.db_table)
    token_fields = [str(f.column) for f in BrexToken._meta.concrete_fields]
    connection_fields = [str(f.column) for f in BrexConnection._meta.concrete_fields]
    same = f"c.{quote('id')} = {token_table}.{quote('connection_id')}"
    active = f"c.{quote('status')} = %s"
    if not postgres:
        token_columns = ", ".join(f"{token_table}.{quote(column)}" for column in token_fields)
        connection_columns = ", ".join(f"c.{quote(column)}" for column in connection_fields)
        statement = (
            f"{head} WHERE ({where}) AND EXISTS (SELECT 1 FROM {connection_table} AS c "
            f"WHERE {same} AND {active}) RETURNING {token_columns}, "
            f"(SELECT json_array({connection_columns}) FROM {connection_table} AS c "
            f"WHERE {same})"
        )
        return statement, (*params, ConnectionStatus.ACTIVE.value)
    # Named apart: both tables have an updated_at.
    returning = ", ".join([
        *(f"{token_table}.{quote(column)} AS t{n}" for n, column in enumerate(token_fields)),
        *(f"c.{quote(column)} AS c{n}" for n, column in enumerate(connection_fields)),
    ])
    statement = (
        f"{head} FROM {connection_table} AS c WHERE ({where}) AND {same} AND {active} "
        f"RETURNING {returning}"
    )
    return statement, (*params, ConnectionStatus.ACTIVE.value)


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
