"""What a refresh costs the database, counted in statements (never timed).

A refresh must cost the HTTP round trip to Brex and one durable commit of the rotated
tokens; the rest is kept to a fixed, small number of statements: on PostgreSQL one claim
that also reads the row (``UPDATE … RETURNING``, taking the sweep's budget in the same
statement) and one statement that saves the tokens, the connection and the event. SQLite
cannot write two tables in one statement, so it sends the save's three writes separately
(and the sweep's budget beside the claim), in the same two commits. ``BEGIN`` and
``COMMIT`` are not counted as queries. The Retry-After and pause checks are answered from
what this process read of them within ``throttle.SNAPSHOT_SECONDS``: the tests read it
first, as any busy process has.
"""

from __future__ import annotations

import gc
import types

import pytest
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext

from django_brex_oauth.client import BrexClient
from django_brex_oauth.services import refresh, throttle
from django_brex_oauth.services.refresh import Outcome
from tests.factories import create_connection, event_kinds, stored_token

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _recent_reading(monkeypatch):
    # However slow the machine running the tests, the reading taken first stays recent.
    monkeypatch.setattr(throttle, "SNAPSHOT_SECONDS", 300.0)

_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


def _queries(captured) -> list[str]:
    return [q["sql"] for q in captured if not q["sql"].lstrip().upper().startswith(_CONTROL)]


def _commits(captured) -> int:
    """Transactions that wrote: each explicit COMMIT, and each write run on its own."""
    explicit = [q["sql"].strip().upper() for q in captured]
    commits = explicit.count("COMMIT")
    depth = 0
    for sql in explicit:
        if sql.startswith("BEGIN"):
            depth += 1
        elif sql in ("COMMIT", "ROLLBACK"):
            depth -= 1
        elif depth == 0 and not sql.startswith("SELECT"):
            commits += 1
    return commits


def _limit() -> int:
    return 3 if db_connection.vendor == "postgresql" else 5


@pytest.mark.parametrize("force", [False, True], ids=["sweep", "sweep --all"])
def test_a_sweep_refresh_takes_at_most_three_queries(brex_settings, fake_brex, force):
    connection = create_connection(fake_brex, expires_in=60)
    throttle.wait_left(throttle.token_scope())  # this process's reading of the waits
    # The budget's window is open (the first request of each window opens it: more work).
    assert throttle.take_sweep_budget().granted

    with CaptureQueriesContext(db_connection) as captured:
        result = refresh.refresh_connection(connection, force=force, wait=False, budget=True)

    assert result.outcome == Outcome.REFRESHED
    assert fake_brex.is_refresh_token_active(stored_token(connection).refresh_token)
    assert event_kinds(connection)[0] == "refreshed"
    assert len(_queries(captured)) <= _limit(), "\n".join(_queries(captured))
    assert _commits(captured) == 2, "\n".join(q["sql"] for q in captured)


def test_an_on_demand_refresh_takes_at_most_three_queries(brex_settings, fake_brex):
    connection = create_connection(fake_brex, expires_in=30)
    throttle.wait_left(throttle.token_scope())

    with CaptureQueriesContext(db_connection) as captured:
        result = refresh.refresh_connection(connection, min_validity=60)

    assert result.outcome == Outcome.REFRESHED
    assert fake_brex.is_refresh_token_active(stored_token(connection).refresh_token)
    assert len(_queries(captured)) <= _limit(), "\n".join(_queries(captured))
    assert _commits(captured) == 2, "\n".join(q["sql"] for q in captured)


def test_brex_client_with_a_fresh_token_reads_the_database_once(brex_settings, fake_brex):
    connection = create_connection(fake_brex, expires_in=3600)
    BrexClient(connection).get_me()  # reads the waits and the discovery document

    with CaptureQueriesContext(db_connection) as captured:
        me = BrexClient(connection).get_me()

    assert me["id"] == fake_brex.default_user["id"]
    assert len(captured) == 1, "\n".join(q["sql"] for q in captured)


@pytest.mark.parametrize("force", [False, True], ids=["sweep", "sweep --all"])
def test_a_refresh_leaves_no_garbage_for_the_collector(brex_settings, fake_brex, force):
    # A reference cycle made at each refresh is freed only by the garbage collector, whose
    # collections then walk every object in the process: at 28 refreshes a second that
    # cost more than the refresh's own Python. Everything a refresh makes is freed as soon
    # as it is dropped.
    first, second = (create_connection(fake_brex, expires_in=60) for _ in range(2))
    throttle.wait_left(throttle.token_scope())
    refresh.refresh_connection(first, force=force, wait=False, budget=True)  # warm caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = refresh.refresh_connection(second, force=force, wait=False, budget=True)
        assert result.outcome == Outcome.REFRESHED
        del result
        gc.collect()
        garbage = [_made_by_the_app(thing) for thing in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    garbage = [name for name in garbage if name]
    assert garbage == [], sorted(set(garbage))


def _made_by_the_app(thing: object) -> str:
    """The name of a model instance, expression, function or other object of the app's or
    Django's, else "" (the fake Brex's server thread, on loopback in this process, may leave
    garbage of its own while the refresh runs)."""
    module = thing.__module__ if isinstance(thing, types.FunctionType) else type(thing).__module__
    if module.startswith(("django_brex_oauth", "django.")):
        return getattr(thing, "__qualname__", type(thing).__qualname__)
    return ""
