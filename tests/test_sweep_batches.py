"""The sweep's batches: each one query along its partial index, starting after the last
row of the batch before on (instant, connection id), whatever the number of rows.

Counted, never timed: the ids listed, the queries run, the statements compiled, the index
entries read (PostgreSQL) and the memory traced.
"""

from __future__ import annotations

import tracemalloc
from datetime import timedelta
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models.sql.compiler import SQLCompiler
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_brex_oauth.models import BrexConnection, BrexToken, due_limits
from django_brex_oauth.services import sweep
from tests.conftest import require_postgres

pytestmark = pytest.mark.django_db


def make_tokens(count: int, *, expires_at=None, used_at=None) -> list[int]:
    """``count`` connections with tokens; all share ``expires_at`` and ``used_at``."""
    now = timezone.now()
    owner, _ = get_user_model().objects.get_or_create(username="sweep-batches")
    made = []
    for start in range(0, count, 2000):
        connections = BrexConnection.objects.bulk_create(
            BrexConnection(owner=owner, environment="staging", brex_user_id=f"cuuser_{n}")
            for n in range(start, min(count, start + 2000))
        )
        BrexToken.objects.bulk_create(
            BrexToken(connection=c, access_token="at", refresh_token="rt",
                      access_token_expires_at=expires_at or now + timedelta(days=1),
                      refresh_token_used_at=used_at or now)
            for c in connections
        )
        made += [c.pk for c in connections]
    return made


def set_batch_size(settings, size: int) -> None:
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SWEEP_BATCH_SIZE": size}


@pytest.mark.parametrize("arm", ["expiring", "idle"])
def test_rows_sharing_one_instant_are_listed_once_each_in_order(settings, arm):
    set_batch_size(settings, 7)
    now = timezone.now()
    expires_by, idle_since = due_limits(now)
    instant = (expires_by if arm == "expiring" else idle_since) - timedelta(minutes=1)
    ids = make_tokens(40, **({"expires_at": instant} if arm == "expiring" else
                             {"used_at": instant}))

    with CaptureQueriesContext(connection) as queries:
        batches = list(sweep.batched_due_connection_ids(now=now))

    assert [pk for batch in batches for pk in batch] == sorted(ids)
    assert [len(batch) for batch in batches] == [7, 7, 7, 7, 7, 5]
    # One query per batch, the first arm's last one included (the arm with no due row
    # reads once, finds nothing).
    assert len(queries) == 7


def test_each_batch_reads_only_its_own_index_entries_postgres(settings):
    """All the tokens expire at one instant: each batch is one range of the due index that
    starts after the last row listed, so the sweep reads each entry about once (the old
    keyset on the instant alone read every row of that instant again in every batch)."""
    require_postgres()
    set_batch_size(settings, 50)
    now = timezone.now()
    expires_by, _idle_since = due_limits(now)
    ids = make_tokens(1000, expires_at=expires_by - timedelta(minutes=1))
    with connection.cursor() as cursor:
        # The table is small: make the planner take the index, as it does at scale.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute("SELECT pg_stat_get_xact_tuples_returned('brex_oauth_token_due'::regclass)")
        read_before = cursor.fetchone()[0]

    with CaptureQueriesContext(connection) as queries:
        listed = [pk for batch in sweep.batched_due_connection_ids(now=now) for pk in batch]

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_get_xact_tuples_returned('brex_oauth_token_due'::regclass)")
        read = cursor.fetchone()[0] - read_before
    assert listed == sorted(ids)
    # 20 batches of 50, then one that finds the arm done; the idle arm reads its own index.
    assert len(queries) == 22
    # Each entry read about once: at most two more per query (the keyset on the instant
    # alone read 11,540 here, the rows of the instant again in every batch).
    assert len(ids) <= read <= len(ids) + 2 * len(queries)


def test_the_sweep_compiles_its_statements_once_whatever_the_number_of_batches(settings):
    """Compiling a query per batch left a little memory behind per batch (CPython keeps each
    ``as_<vendor>`` name Django builds in its type attribute cache, up to a few thousand):
    the sweep compiles each arm's two statements once and reuses them."""
    set_batch_size(settings, 10)
    now = timezone.now()
    expires_by, _idle_since = due_limits(now)
    make_tokens(3000, expires_at=expires_by - timedelta(minutes=1))
    compiled = [0]
    as_sql = SQLCompiler.as_sql

    def counting(self, *args, **kwargs):
        compiled[0] += 1
        return as_sql(self, *args, **kwargs)

    def sweep_over(count: int) -> tuple[int, int, int]:
        """(ids listed, statements compiled, peak memory traced) for the first ``count``."""
        BrexToken.objects.filter(
            connection_id__in=BrexToken.objects.order_by("connection_id")
            .values_list("connection_id", flat=True)[count:]
        ).update(access_token_expires_at=now + timedelta(days=1))
        compiled[0] = 0
        with mock.patch.object(SQLCompiler, "as_sql", counting):
            tracemalloc.start()
            try:
                listed = sum(len(batch) for batch in sweep.batched_due_connection_ids(now=now))
                _current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        return listed, compiled[0], peak

    for _ in range(3):  # warm-up: the interpreter's and the driver's own caches fill
        sweep_over(3000)
    many = sweep_over(3000)
    few = sweep_over(300)
    assert many[0] == 3000 and few[0] == 300
    # Two arms, two statements each, whether 31 batches or 301.
    assert many[1] == few[1] == 4
    # Ten times the batches, about the same peak (a batch is ten ids; compiling per batch
    # made it grow by about 60 KiB here).
    assert many[2] - few[2] < 32 * 1024, (many[2], few[2])
