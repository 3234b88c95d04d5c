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
    # The due condition is the swept one and more, so the indexes can answer it.
    assert (due_condition(timezone.now()) & SWEPT_TOKENS).children[:1] == [
        ("access_token_expires_at__isnull", False)
    ]
