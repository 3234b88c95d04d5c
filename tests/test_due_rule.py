"""The rule "when is a connection due for a refresh" agrees everywhere it is used.

The sweep's query (``BrexToken.objects.refresh_candidates``), the model's method
(``BrexToken.is_due_for_refresh``), the refresh service (through that method) and the two
partial indexes that answer the sweep are all built from ``due_condition`` / ``due_limits``
/ ``SWEPT_TOKENS`` in ``django_brex_oauth.models``; these tests prove the query and the
method pick the same rows, on the edges of each limit, and that the indexes cover them.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from django_brex_oauth.models import (
    DUE_KEY,
    IDLE_KEY,
    SWEPT_TOKENS,
    BrexConnection,
    BrexToken,
    due_condition,
    due_limits,
)

pytestmark = pytest.mark.django_db


def _rows(now):
    """Token rows on both sides of every limit, with and without each token."""
    expires_by, idle_since = due_limits(now)
    second = timedelta(seconds=1)
    expiries = [None, now - timedelta(hours=1), expires_by - second, expires_by,
                expires_by + second, now + timedelta(days=1)]
    used = [now, idle_since + second, idle_since, idle_since - second]
    tokens = [(None, None), ("at", None), (None, "rt"), ("at", "rt")]
    return list(itertools.product(expiries, used, tokens))


def test_the_sweeps_query_and_the_models_method_pick_the_same_tokens():
    now = timezone.now()
    owner = get_user_model().objects.create(username="due-rule")
    combinations = _rows(now)
    connections = BrexConnection.objects.bulk_create(
        BrexConnection(owner=owner, environment="staging", brex_user_id=f"cuuser_{n}")
        for n in range(len(combinations))
    )
    BrexToken.objects.bulk_create(
        BrexToken(connection=connection, access_token=access, refresh_token=refresh,
                  access_token_expires_at=expires, refresh_token_used_at=used_at)
        for connection, (expires, used_at, (access, refresh))
        in zip(connections, combinations, strict=True)
    )
    tokens = list(BrexToken.objects.all())
    selected = set(BrexToken.objects.refresh_candidates(now).values_list("pk", flat=True))
    swept = set(BrexToken.objects.filter(SWEPT_TOKENS).values_list("pk", flat=True))

    by_method = {t.pk for t in tokens if t.is_due_for_refresh(now)}
    # Every row the sweep selects is due by the method, and lies in the partial indexes.
    assert selected <= by_method
    assert selected <= swept
    # And of the rows with a usable access token (one, and its expiry), the method's due
    # ones are exactly the selected ones. A row without one is due by the method (an
    # on-demand refresh must get one) and, when it has no expiry, invisible to the sweep.
    usable = {t.pk for t in tokens if t.access_token and t.access_token_expires_at}
    assert by_method & usable == selected & usable
    assert selected - usable <= {t.pk for t in tokens if not t.access_token}
    # Both sides of every limit were there to be told apart.
    assert 0 < len(selected) < len(swept)


def test_the_partial_indexes_are_built_from_the_swept_condition():
    conditions = {
        index.name: index.condition for index in BrexToken._meta.indexes
        if index.name in ("brex_oauth_token_due", "brex_oauth_token_idle")
    }
    assert conditions == {"brex_oauth_token_due": SWEPT_TOKENS,
                          "brex_oauth_token_idle": SWEPT_TOKENS}
    # Keyed as the sweep reads each arm: the instant, then the connection.
    keys = {index.name: tuple(index.fields) for index in BrexToken._meta.indexes}
    assert keys["brex_oauth_token_due"] == DUE_KEY == ("access_token_expires_at", "connection_id")
    assert keys["brex_oauth_token_idle"] == IDLE_KEY == ("refresh_token_used_at", "connection_id")
    # The due condition is the swept one and more, so the indexes can answer it.
    assert (due_condition(timezone.now()) & SWEPT_TOKENS).children[:1] == [
        ("access_token_expires_at__isnull", False)
    ]


def test_each_batch_of_the_sweep_is_a_range_of_its_partial_index_postgres(settings):
    """The statements the sweep runs (first and later batches of each arm) are answered by
    the partial indexes, the keyset (instant, connection) included in the index condition,
    so a batch starts where the one before ended."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_brex_oauth.services import sweep
    from tests.conftest import require_postgres

    require_postgres()
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SWEEP_BATCH_SIZE": 2}
    now = timezone.now()
    expires_by, idle_since = due_limits(now)
    owner = get_user_model().objects.create(username="due-rule-plans")
    connections = BrexConnection.objects.bulk_create(
        BrexConnection(owner=owner, environment="staging", brex_user_id=f"cuuser_{n}")
        for n in range(6)
    )
    BrexToken.objects.bulk_create(
        BrexToken(connection=connection, access_token="at", refresh_token="rt",
                  access_token_expires_at=expires_by - timedelta(minutes=1) if n < 3
                  else now + timedelta(days=1),
                  refresh_token_used_at=now if n < 3 else idle_since - timedelta(days=1))
        for n, connection in enumerate(connections)
    )
    with CaptureQueriesContext(connection) as queries:
        listed = [pk for batch in sweep.batched_due_connection_ids(now=now) for pk in batch]
    assert listed == [c.pk for c in connections]
    plans = []
    with connection.cursor() as cursor:
        # A table this small is read whole otherwise; at scale the planner takes the
        # indexes by itself (benchmarks/sweep_index.py).
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        for query in queries:
            cursor.execute(f"EXPLAIN {query['sql']}")
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
    assert len(plans) == 4  # each arm: a full batch, then the rest after its keyset
    indexes = ["brex_oauth_token_due"] * 2 + ["brex_oauth_token_idle"] * 2
    for plan, index in zip(plans, indexes, strict=True):
        assert f"Index Scan using {index} on brex_oauth_brextoken" in plan, plan
        assert "Sort" not in plan, plan
    for plan, column in zip(plans[1::2], ["access_token_expires_at", "refresh_token_used_at"],
                            strict=True):
        index_condition = next(line for line in plan.splitlines() if "Index Cond" in line)
        assert f"ROW({column}, connection_id) > ROW(" in index_condition, plan
