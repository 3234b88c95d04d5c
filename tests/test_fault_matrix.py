"""What happens when…: every fault a connection can meet, and its outcome.

Each test makes the fake Brex (or the database, the key ring, the clock) misbehave in one
way and asserts the outcome: the connection's status, its tokens, its events, the signals
sent, and what the person or staff see. ``docs/faults.rst`` is this module as a table.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time

import pytest
from django.db import connection as db_connection

from django_brex_oauth.testing import FakeBrex
from django_brex_oauth.testing.server import brex_oauth_settings_for
from tests import sqlite_refreshers
from tests.conftest import require_postgres
from tests.factories import store_connections

# ---------------------------------------------------------------------------------------
# Saving a refresh: reconnect races, malformed answers, narrower grants, a failed commit
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Rate limits (Retry-After, the shared budget) and a wrong client secret
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Lost keys, revocation, environments, concurrent refreshers on SQLite, the demo
# ---------------------------------------------------------------------------------------


SQLITE_REFRESHERS = 4
SQLITE_CONNECTIONS = 13
SQLITE_ROUNDS = 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("database", ["sqlite_file", "postgresql"])
def test_concurrent_cron_refreshers_never_reuse_a_refresh_token(database, tmp_path, settings):
    """Four ``brex_oauth_refresh --all`` processes at once over 13 connections, ten times
    over, against a Brex that revokes a grant whose rotated-out refresh token comes back:
    on a SQLite file (as the demo runs) and on PostgreSQL, every refresh is saved and no
    refresh token is presented twice."""
    with FakeBrex(rotate_refresh_tokens=True, refresh_grace_period=0.0) as fake:
        fake.set_latency(0.01, "/v1/token")
        brex_oauth = brex_oauth_settings_for(fake, settings.BREX_OAUTH)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        token_sets = [fake.issue_tokens() for _ in range(SQLITE_CONNECTIONS)]
        if database == "postgresql":
            require_postgres()
            databases = {"default": {**db_connection.settings_dict}}
            ids = store_connections(token_sets, fake.default_user["id"])
        else:
            # A file, as a site's SQLite database is (several processes share it).
            databases = {"default": {"ENGINE": "django.db.backends.sqlite3",
                                     "NAME": str(tmp_path / "db.sqlite3")}}
            setup = context.Process(target=sqlite_refreshers.run_prepare,
                                    args=(databases, brex_oauth, token_sets,
                                          fake.default_user["id"], results))
            setup.start()
            kind, ids = results.get(timeout=120)
            setup.join(30)
            assert kind == "ids", ids

        barrier = context.Barrier(SQLITE_REFRESHERS + 1)
        processes = [
            context.Process(target=sqlite_refreshers.refresh_all,
                            args=(databases, brex_oauth, SQLITE_ROUNDS, barrier, results),
                            daemon=True)
            for _ in range(SQLITE_REFRESHERS)
        ]
        started = time.monotonic()
        for process in processes:
            process.start()
        try:
            for _ in range(SQLITE_ROUNDS):
                barrier.wait(timeout=120)  # go
                barrier.wait(timeout=120)  # every process ran the command once
            reports = [results.get(timeout=60) for _ in processes]
        except (threading.BrokenBarrierError, queue.Empty):
            reports = []
            while not results.empty():
                reports.append(results.get())
            pytest.fail(f"a refresher failed: {reports}")
        finally:
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
        assert time.monotonic() - started < 120

        # No run of the command failed ("database is locked" included)...
        errors = [error for _, errs in reports for error in errs]
        assert errors == []
        # ...Brex never saw a rotated-out refresh token again, so no grant was revoked...
        assert fake.stats["refresh_token_reuse"] == 0
        assert fake.stats["refresh_token_reuse_rejected"] == 0
        # ...each connection was refreshed at least once a round...
        assert fake.stats["token_refresh_token"] >= SQLITE_CONNECTIONS * SQLITE_ROUNDS
        # ...and every stored token is the live one.
        stored = sqlite_refreshers.stored_tokens(databases, brex_oauth, context)
        assert sorted(stored) == sorted(ids)
        for connection_id, (status, refresh_token, access_token) in stored.items():
            assert status == "active", connection_id
            assert fake.is_refresh_token_active(refresh_token), connection_id
            assert fake.is_access_token_active(access_token), connection_id


# ---------------------------------------------------------------------------------------
# Brex's infrastructure: token endpoint down, revocation down, discovery down, new keys
# ---------------------------------------------------------------------------------------
