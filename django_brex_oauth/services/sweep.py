"""The refresh sweep: find the connections that are due and refresh each, in this process.

:func:`batched_due_connection_ids` is what both sweeps read: the Celery one
(:func:`django_brex_oauth.tasks.refresh_due_connections`) queues a task per connection,
and :func:`sweep` (``manage.py brex_oauth_refresh``, for cron) refreshes them one after
another. Either way each connection is refreshed by
:func:`~django_brex_oauth.services.refresh.refresh_connection`, which takes its request from
the sweep's shared rate budget.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime

from django.db import connections
from django.db.models import BooleanField, Func, QuerySet
from django.utils import timezone

from ..conf import brex_settings
from ..exceptions import BrexOAuthError, BrexUnavailable, RefreshPaused
from ..fields import UndecryptableValue
from ..models import (
    DUE_KEY,
    IDLE_KEY,
    SWEPT_TOKENS,
    BrexConnection,
    BrexToken,
    BrexTokenQuerySet,
    ConnectionStatus,
    due_limits,
)
from . import health, throttle
from .refresh import Outcome, RefreshResult, refresh_connection

logger = logging.getLogger("django_brex_oauth")



def batched_due_connection_ids(
    *, all_active: bool = False, exclude_environments: Collection[str] = (),
    now: datetime | None = None,
) -> Iterator[list[int]]:
    """Ids of the connections the sweep should refresh, ``SWEEP_BATCH_SIZE`` at a time,
    most urgent first. Connections another worker is refreshing are left out.

    They are the rows of :meth:`BrexTokenQuerySet.refresh_candidates`, read one arm of
    the rule at a time, each in bounded batches along its partial index, without looking
    at the connections table: the services wipe the access token
    expiry of every connection that stops being active, which drops it from those indexes,
    and :func:`refresh_connection` checks the status anyway (and wipes a stray expiry), so
    joining every candidate to its connection here would only add cost. ``all_active``
    lists every active connection that has a refresh token instead.
    ``exclude_environments`` leaves out the connections made in those Brex environments
    (the join is made only then: while a Brex holds the sweep back).
    """
    size = brex_settings.SWEEP_BATCH_SIZE
    now = now or timezone.now()
    if all_active:
        arms: list[tuple[BrexTokenQuerySet, tuple[str, ...]]] = [
            (_all_active(), ("connection_id",))
        ]
    else:
        # Each arm of the due rule on its own, walked in the order of its partial index:
        # the access tokens that expire soon, soonest first, then the refresh tokens left
        # unused too long (and not listed already), longest unused first.
        expires_by, idle_since = due_limits(now)
        swept = BrexToken.objects.filter(SWEPT_TOKENS, refresh_token__isnull=False)
        arms = [
            (swept.filter(access_token_expires_at__lte=expires_by), DUE_KEY),
            (
                swept.filter(
                    refresh_token_used_at__lte=idle_since, access_token_expires_at__gt=expires_by
                ),
                IDLE_KEY,
            ),
        ]
    for tokens, key in arms:
        if exclude_environments:
            # The join is made only then: while a Brex holds the sweep back.
            tokens = tokens.exclude(connection__environment__in=list(exclude_environments))
        yield from _keyset_batches(tokens.unclaimed(now), key, size)


def _all_active() -> BrexTokenQuerySet:
    return BrexToken.objects.filter(
        connection__status=ConnectionStatus.ACTIVE, refresh_token__isnull=False
    )


def _count(all_active: bool, now: datetime) -> int:
    """How many ids :func:`batched_due_connection_ids` would list now (for the progress)."""
    tokens = _all_active() if all_active else BrexToken.objects.refresh_candidates(now)
    return tokens.unclaimed(now).count()


class _After(Func):
    """``(a, b, ...) > (%s, %s, ...)``: the rows after a keyset, as one row comparison that a
    B-tree index on those columns answers as a range. The values are left as placeholders,
    filled in at each execution (see :func:`_keyset_batches`)."""

    conditional = True
    output_field = BooleanField()

    def as_sql(self, compiler, connection, **extra_context):  # type: ignore[override]
        columns, params = [], []
        for expression in self.source_expressions:
            sql, column_params = compiler.compile(expression)
            columns.append(sql)
            params.extend(column_params)
        placeholders = ", ".join(["%s"] * len(columns))
        return f"({', '.join(columns)}) > ({placeholders})", [*params, *_KEYSET[:len(columns)]]


#: Stand-ins for the keyset's values among a compiled statement's parameters, replaced by
#: the last row's values at each execution (wherever the backend put them: Django 6 on
#: SQLite, for one, compares the condition to a parameter after them).
_KEYSET = tuple(object() for _ in range(4))


def _keyset_batches(tokens: QuerySet, key: tuple[str, ...], size: int) -> Iterator[list[int]]:
    """The connection ids of ``tokens`` in the order of ``key`` (columns, the last the
    connection id), ``size`` at a time: each batch is one query that starts after the last
    row of the one before (keyset pagination, ``(key) > (last row's key)``), so a sweep
    holds one batch of ids, not all of them, and each query reads one stretch of the index.

    The two statements (the first batch, the next ones) are compiled once and run with the
    last row's values as they came from the database: compiling a query per batch would
    cost every batch the ORM's work and leave the interpreter's caches filling as it goes
    (CPython 3.11's type attribute cache keeps each distinct name string that Django builds
    to look up a backend's ``as_<vendor>`` method, a few thousand of them at most).
    """
    rows = tokens.order_by(*key).values_list(*key)
    alias = rows.db
    compilers = (
        rows[:size].query.get_compiler(alias),
        rows.filter(_After(*key))[:size].query.get_compiler(alias),
    )
    (first, first_params), (after, after_params) = (c.as_sql() for c in compilers)
    slots = [after_params.index(marker) for marker in _KEYSET[:len(key)]]
    statement, params = first, first_params
    while True:
        with connections[alias].cursor() as cursor:
            cursor.execute(statement, params)
            page = cursor.fetchall()
        if page:
            yield [row[-1] for row in page]
        if len(page) < size:
            return
        values = list(after_params)
        for slot, value in zip(slots, page[-1], strict=True):
            values[slot] = value
        statement, params = after, tuple(values)


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
    now = timezone.now()
    total = _count(all_active, now)
    # One batch of ids at a time: the sweep's memory does not grow with the connections.
    connection_ids = (
        pk for batch in batched_due_connection_ids(all_active=all_active, now=now)
        for pk in batch
    )
    report = SweepReport()
    #: Environment -> why its Brex is not to be called now.
    held: dict[str, BrexUnavailable] = {}
    if total:
        used, limit, _refused = throttle.sweep_budget_use()
        logger.info(
            "Refresh sweep: %s connection(s) due; rate budget: %s of %s token requests used "
            "in this window.", total, used, limit,
        )
        held = held_environments()
        for err in held.values():
            _hold_back(report, err)
    for done, connection_id in enumerate(connection_ids, start=1):
        # The environment is looked up only while some Brex holds the sweep back.
        if held and _environment_of(connection_id) in held:
            report.deferred += 1
            if progress is not None:
                progress(done, max(total, done), report)
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
            progress(done, max(total, done), report)
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
