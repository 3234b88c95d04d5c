"""No two refreshes of one connection at once: real OS processes and threads racing on
PostgreSQL, against a fake Brex that rotates refresh tokens with no grace period (any
reuse of a rotated-out refresh token would revoke the customer's whole grant)."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection as db_connection
from django.utils import timezone

from django_brex_oauth.models import BrexToken, ConnectionEvent, ConnectionStatus, EventKind
from django_brex_oauth.services import refresh
from django_brex_oauth.services.refresh import Outcome
from django_brex_oauth.testing import FakeBrex
from tests.conftest import require_postgres
from tests.factories import create_connection, stored_token
from tests.refresh_workers import race, run_rounds

pytestmark = pytest.mark.django_db(transaction=True)

CONNECTIONS = 50
ROUNDS = 3
MODES = ["client", "client", "on_demand", "sweep"]


@pytest.fixture
def fake_brex():
    with FakeBrex(rotate_refresh_tokens=True, refresh_grace_period=0.0) as server:
        # Hold every token answer back a little, so that contenders overlap.
        server.set_latency(0.01, "/v1/token")
        yield server


def make_all_due() -> None:
    BrexToken.objects.update(access_token_expires_at=timezone.now() + timedelta(seconds=30))


def test_processes_racing_on_the_same_connections_refresh_each_once(brex_settings, fake_brex):
    require_postgres()
    connections = [create_connection(fake_brex, expires_in=30) for _ in range(CONNECTIONS)]
    ids = [c.pk for c in connections]
    databases = {"default": {**db_connection.settings_dict}}
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(MODES) + 1)
    results = context.Queue()
    processes = [
        context.Process(
            target=race,
            args=(mode, databases, dict(brex_settings.BREX_OAUTH), ids, ROUNDS, barrier, results),
            daemon=True,
        )
        for mode in MODES
    ]
    reports = run_rounds(processes, barrier, results, ROUNDS, between_rounds=make_all_due)

    errors = [error for _, _, errs in reports for error in errs]
    assert errors == []
    outcomes = Counter()
    for mode, counts, _ in reports:
        outcomes.update({f"{mode}:{k}": v for k, v in counts.items()})
    assert outcomes["client:api_ok"] == 2 * CONNECTIONS * ROUNDS
    # Brex saw one refresh per connection and round, and never an old refresh token again.
    assert fake_brex.stats["token_refresh_token"] == CONNECTIONS * ROUNDS
    assert fake_brex.stats["refresh_token_reuse"] == 0
    assert fake_brex.stats["refresh_token_reuse_rejected"] == 0
    for connection_id in ids:
        token = stored_token(connection_id)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert fake_brex.is_refresh_token_active(token.refresh_token)
        assert fake_brex.is_access_token_active(token.access_token)
        assert token.refresh_claimed_until is None
        kinds = list(
            ConnectionEvent.objects.filter(connection_id=connection_id).values_list(
                "kind", flat=True
            )
        )
        assert kinds == [EventKind.REFRESHED] * ROUNDS


def test_threads_waiting_for_the_winner_use_its_tokens(brex_settings, fake_brex):
    require_postgres()
    fake_brex.set_latency(0.3, "/v1/token")
    connection = create_connection(fake_brex, expires_in=30)
    start = threading.Barrier(8)
    results = []

    def contend():
        start.wait()
        try:
            results.append(refresh.refresh_connection(connection.pk, min_validity=60))
        finally:
            db_connection.close()

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    outcomes = Counter(result.outcome for result in results)
    assert outcomes == {Outcome.REFRESHED: 1, Outcome.NOT_DUE: 7}
    stored = stored_token(connection)
    assert {result.token.access_token for result in results} == {stored.access_token}
    assert fake_brex.stats["token_refresh_token"] == 1
    assert fake_brex.is_refresh_token_active(stored.refresh_token)
