"""What happens when…: every fault a connection can meet, and its outcome.

Each test makes the fake Brex (or the database, the key ring, the clock) misbehave in one
way and asserts the outcome: the connection's status, its tokens, its events, the signals
sent, and what the person or staff see. ``docs/faults.rst`` is this module as a table.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
import time
import urllib.error
from datetime import timedelta
from io import StringIO

import pytest
from celery import signals as celery_signals
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.db import OperationalError
from django.db import connection as db_connection
from django.urls import reverse
from django.utils import timezone

from django_brex_oauth import client as client_module
from django_brex_oauth import conf, discovery, oauth, signals, tasks
from django_brex_oauth.client import BrexClient, OnboardingClient
from django_brex_oauth.exceptions import (
    BrexAPIUnavailable,
    BrexUnavailable,
    ConnectionNotUsable,
    MalformedTokenResponse,
    RefreshPaused,
)
from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    RevocationStatus,
)
from django_brex_oauth.services import client_credentials, refresh, revoke, sweep, throttle
from django_brex_oauth.services.refresh import Outcome
from django_brex_oauth.services.revoke import disconnect, pending_revocation_ids
from django_brex_oauth.testing import FakeBrex
from django_brex_oauth.testing.factories import make_connection
from django_brex_oauth.testing.fake_brex import MALFORMED_TOKEN_ANSWERS
from django_brex_oauth.testing.server import brex_oauth_settings_for
from tests import sqlite_refreshers
from tests.conftest import require_postgres
from tests.example_site import clean_environment, demo, keep_logs, query
from tests.factories import (
    SignalRecorder,
    create_connection,
    create_connections,
    create_user,
    event_kinds,
    store_connections,
    stored_token,
)
from tests.refresh_workers import run_rounds
from tests.test_demo import redirect_location, signed_in_browser

# ---------------------------------------------------------------------------------------
# Saving a refresh: reconnect races, malformed answers, narrower grants, a failed commit
# ---------------------------------------------------------------------------------------


# The shared fixtures (``flow``, ``fake_brex`` with a 30 s grace period, ``brex_settings``)
# come from conftest.py. Every test here saves over real HTTP to the fake Brex.


@pytest.fixture
def saving_signals():
    with SignalRecorder(
        refreshed=signals.token_refreshed,
        failed=signals.refresh_failed,
        connected=signals.connected,
    ) as recorder:
        yield recorder


def revoked_at_fake(fake, token: str) -> bool:
    """Whether the fake received a revocation request for ``token``."""
    return any(
        r["path"].endswith("/v1/revoke") and r["form"].get("token") == token
        for r in fake.requests
    )


class RefreshInFlight:
    """A refresh of one connection on a thread (and database connection) of its own, which
    reaches Brex and waits there while the test holds Brex's answer back."""

    def __init__(self, connection_id: int) -> None:
        self.results: list = []
        self.errors: list = []
        self.thread = threading.Thread(target=self._run, args=(connection_id,))
        self.thread.start()

    def _run(self, connection_id: int) -> None:
        try:
            self.results.append(refresh.refresh_connection(connection_id, min_validity=60))
        except Exception as err:  # reported by result()
            self.errors.append(err)
        finally:
            db_connection.close()

    def result(self, timeout: float = 30):
        """The refresh's result, once it has finished."""
        self.thread.join(timeout)
        assert self.errors == []
        [result] = self.results
        return result


@pytest.mark.django_db(transaction=True)
def test_reconnect_during_a_refresh_keeps_the_reconnects_tokens(
    flow, fake_brex, saving_signals
):
    """A refresh waits on Brex while the customer reconnects: the reconnect's tokens stay,
    the refresh's answer is discarded and revoked at Brex (PostgreSQL, real threads)."""
    require_postgres()
    flow.connect()
    connection = BrexConnection.objects.get()
    BrexToken.objects.filter(pk=connection.pk).update(
        access_token_expires_at=timezone.now() + timedelta(seconds=30)
    )

    with fake_brex.hold_next("/v1/token") as held:
        in_flight = RefreshInFlight(connection.pk)
        assert held.wait(timeout=10), "the refresh never reached Brex"
        # Brex has rotated the refresh token and is about to answer; meanwhile:
        response = flow.connect()
        assert response.status_code == 302
        reconnected = stored_token(connection)

    result = in_flight.result()
    refresh_answer = held.answers[0]
    stored = stored_token(connection)
    # The reconnect's tokens stay, and work.
    assert stored.refresh_token == reconnected.refresh_token != refresh_answer["refresh_token"]
    assert stored.access_token == reconnected.access_token != refresh_answer["access_token"]
    assert stored.connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(stored.refresh_token)
    assert BrexClient(BrexConnection.objects.get(pk=connection.pk)).get_me()["id"]
    assert result.outcome == Outcome.NOT_DUE and result.usable
    # The refresh's grant is revoked at Brex, by name.
    assert revoked_at_fake(fake_brex, refresh_answer["refresh_token"])
    assert not fake_brex.is_refresh_token_active(refresh_answer["refresh_token"])
    kinds = event_kinds(connection)
    assert kinds[-2:] == [EventKind.RECONNECTED, EventKind.REFRESH_DISCARDED]
    assert EventKind.REFRESHED not in kinds
    assert saving_signals["refreshed"] == [] and saving_signals["failed"] == []
    assert len(saving_signals["connected"]) == 2


@pytest.mark.django_db(transaction=True)
def test_a_refresh_overtaken_by_another_worker_drops_its_answer_without_revoking(
    brex_settings, fake_brex, saving_signals
):
    """A refresh's claim runs out while Brex answers it slowly; another worker takes over,
    refreshes with the same refresh token (inside Brex's grace period) and saves first. The
    slow one's save must not overwrite those tokens, and must not revoke its own answer
    either: that would revoke the grant the stored tokens belong to."""
    require_postgres()
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)

    with fake_brex.hold_next("/v1/token") as held:
        slow = RefreshInFlight(connection.pk)
        assert held.wait(timeout=10), "the refresh never reached Brex"
        # Its claim runs out (as after a long stall); another worker takes over.
        BrexToken.objects.filter(pk=connection.pk).update(
            refresh_claimed_until=timezone.now() - timedelta(seconds=1)
        )
        overtaking = refresh.refresh_connection(connection.pk, min_validity=60)
        assert overtaking.outcome == Outcome.REFRESHED
        saved = stored_token(connection)

    result = slow.result()
    slow_answer = held.answers[0]
    stored = stored_token(connection)
    assert stored.refresh_token == saved.refresh_token != slow_answer["refresh_token"]
    assert stored.access_token == saved.access_token
    assert stored.refresh_token != before.refresh_token
    assert fake_brex.is_refresh_token_active(stored.refresh_token)
    assert fake_brex.is_access_token_active(stored.access_token)
    assert not revoked_at_fake(fake_brex, slow_answer["refresh_token"])
    assert result.outcome == Outcome.NOT_DUE and result.usable
    assert stored.connection.status == ConnectionStatus.ACTIVE
    assert event_kinds(connection) == [EventKind.REFRESHED, EventKind.REFRESH_DISCARDED]
    assert [s["rotated"] for s in saving_signals["refreshed"]] == [True]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "spoil",
    [v for k, v in MALFORMED_TOKEN_ANSWERS.items() if k != "huge_expires_in"],
    ids=[k for k in MALFORMED_TOKEN_ANSWERS if k != "huge_expires_in"],
)
def test_malformed_refresh_answer_stores_no_non_token_and_keeps_the_rotated_one(
    brex_settings, fake_brex, saving_signals, spoil
):
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    fake_brex.tamper_next("/v1/token", **spoil)

    with pytest.raises(MalformedTokenResponse) as raised:
        refresh.refresh_connection(connection, min_validity=60)

    after = stored_token(connection)
    # Nothing from the answer but a rotated refresh token is stored; the old access token
    # (still good for 30 s) stays.
    assert after.access_token == before.access_token
    assert after.access_token_expires_at == before.access_token_expires_at
    assert after.token_type == "Bearer"
    rotated_arrived = "body" not in spoil and "refresh_token" not in spoil
    if rotated_arrived:
        assert after.refresh_token != before.refresh_token
        assert fake_brex.is_refresh_token_active(after.refresh_token)
    else:
        assert after.refresh_token == before.refresh_token
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert after.connection.last_error.startswith("Refresh failed, will retry: Brex sent a ")
    assert raised.value.problems and raised.value.status == 200
    assert event_kinds(connection) == [EventKind.REFRESH_FAILED]
    assert saving_signals["refreshed"] == [] and saving_signals["failed"] == []
    # The next try (within Brex's grace period for the old refresh token) gets a whole
    # answer, and the connection carries on.
    assert refresh.refresh_connection(connection, min_validity=60).outcome == Outcome.REFRESHED
    healed = stored_token(connection)
    assert fake_brex.is_access_token_active(healed.access_token)
    assert fake_brex.is_refresh_token_active(healed.refresh_token)
    assert healed.connection.last_error == ""
    assert BrexClient(healed.connection).get_me()["id"]


@pytest.mark.django_db(transaction=True)
def test_a_huge_expires_in_is_clamped_and_the_rotated_token_kept(
    brex_settings, fake_brex, saving_signals
):
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    fake_brex.tamper_next("/v1/token", expires_in=10**12)

    result = refresh.refresh_connection(connection, min_validity=60)

    after = stored_token(connection)
    assert result.outcome == Outcome.REFRESHED
    assert after.refresh_token != before.refresh_token
    assert fake_brex.is_refresh_token_active(after.refresh_token)
    assert fake_brex.is_access_token_active(after.access_token)
    lifetime = after.access_token_expires_at - after.connection.last_refreshed_at
    assert lifetime == timedelta(seconds=oauth.MAX_ACCESS_TOKEN_LIFETIME)
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert event_kinds(connection) == [EventKind.REFRESHED]
    assert [s["rotated"] for s in saving_signals["refreshed"]] == [True]


@pytest.mark.django_db(transaction=True)
def test_a_malformed_answer_does_not_stop_the_sweep(brex_settings, fake_brex):
    due = [create_connection(fake_brex, expires_in=30 + i) for i in range(3)]
    before = {c.pk: stored_token(c) for c in due}
    fake_brex.tamper_next("/v1/token", body=[])  # the most urgent one, first

    report = sweep.sweep()

    assert (report.refreshed, report.failed) == (2, 1)
    first, *others = due
    assert stored_token(first).refresh_token == before[first.pk].refresh_token
    assert event_kinds(first) == [EventKind.REFRESH_FAILED]
    for connection in others:
        after = stored_token(connection)
        assert after.refresh_token != before[connection.pk].refresh_token
        assert fake_brex.is_access_token_active(after.access_token)
        assert event_kinds(connection) == [EventKind.REFRESHED]


@pytest.mark.django_db(transaction=True)
def test_a_narrower_grant_on_refresh_is_recorded_and_signalled(
    brex_settings, fake_brex, saving_signals
):
    connection = create_connection(fake_brex, expires_in=30)
    old_scopes = connection.scopes
    fake_brex.narrow_grant(stored_token(connection).refresh_token, ["users.readonly"])

    result = refresh.refresh_connection(connection, min_validity=60)

    after = stored_token(connection)
    new_scopes = ["openid", "offline_access", "users.readonly"]
    assert result.outcome == Outcome.REFRESHED
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert after.connection.scopes == new_scopes
    assert fake_brex.is_access_token_active(after.access_token)
    assert event_kinds(connection) == [EventKind.SCOPES_CHANGED, EventKind.REFRESHED]
    change = ConnectionEvent.objects.get(connection=connection, kind=EventKind.SCOPES_CHANGED)
    assert "no longer granted: companies.readonly" in change.detail
    [sent] = saving_signals["refreshed"]
    assert (sent["old_scopes"], sent["new_scopes"]) == (old_scopes, new_scopes)
    assert saving_signals["failed"] == []


@pytest.mark.django_db(transaction=True)
def test_losing_a_required_scope_on_refresh_needs_reauth(
    brex_settings, fake_brex, saving_signals
):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH, "REQUIRED_API_SCOPES": ["companies.readonly"]
    }
    connection = create_connection(fake_brex, expires_in=30)
    fake_brex.narrow_grant(stored_token(connection).refresh_token, ["users.readonly"])

    result = refresh.refresh_connection(connection, min_validity=60)

    after = stored_token(connection)
    assert result.outcome == Outcome.NEEDS_REAUTH
    assert after.connection.status == ConnectionStatus.NEEDS_REAUTH
    assert "companies.readonly" in after.connection.last_error
    # No usable access token, out of the sweep; the rotated refresh token is kept so that a
    # disconnect can revoke it.
    assert after.access_token is None and after.access_token_expires_at is None
    assert fake_brex.is_refresh_token_active(after.refresh_token)
    assert sweep.due_connection_ids() == []
    assert event_kinds(connection) == [EventKind.SCOPES_CHANGED, EventKind.NEEDS_REAUTH]
    assert saving_signals["refreshed"] == []
    [failed] = saving_signals["failed"]
    assert failed["error"] == "insufficient_scope"
    assert failed["connection"].status == ConnectionStatus.NEEDS_REAUTH
    with pytest.raises(ConnectionNotUsable):
        BrexClient(BrexConnection.objects.get(pk=connection.pk)).get_me()


@pytest.fixture
def database_drops(monkeypatch):
    """``database_drops(times, pause=0)``: the next ``times`` saves of refreshed tokens meet
    a dropped database connection (on PostgreSQL the server really terminates the session;
    on SQLite the driver's error is raised), each after ``pause`` seconds, as a failover
    would. Other statements (recording the failure) go through."""

    def arrange(times: int, pause: float = 0.0) -> list[str]:
        dropped: list[str] = []

        def drop(execute, sql, params, many, context):
            # The save's first statement (on PostgreSQL its one WITH statement).
            update = 'UPDATE "brex_oauth_brexconnection"'
            saving = sql.startswith((update, "WITH c AS (")) and '"last_refreshed_at"' in sql
            if len(dropped) < times and saving:
                time.sleep(pause)
                dropped.append(sql)
                if db_connection.vendor == "postgresql":
                    terminate_backend(db_connection)
                else:
                    raise OperationalError("disk I/O error")
            return execute(sql, params, many, context)

        db_connection.execute_wrappers.append(drop)
        return dropped

    yield arrange
    db_connection.execute_wrappers.clear()


def terminate_backend(django_connection) -> None:
    """Have PostgreSQL end ``django_connection``'s session from another session."""
    import psycopg

    pid = django_connection.connection.info.backend_pid
    settings = django_connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"], port=settings["PORT"] or 5432, user=settings["USER"],
        password=settings["PASSWORD"] or None, dbname=settings["NAME"], autocommit=True,
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


@pytest.mark.django_db(transaction=True)
def test_a_save_that_meets_a_dropped_database_is_retried_within_the_grace(
    brex_settings, fake_brex, saving_signals, database_drops
):
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    dropped = database_drops(times=2, pause=1.0)

    started = timezone.now()
    result = refresh.refresh_connection(connection, min_validity=60)

    assert len(dropped) == 2
    after = stored_token(connection)
    assert result.outcome == Outcome.REFRESHED
    assert after.refresh_token != before.refresh_token
    assert fake_brex.is_refresh_token_active(after.refresh_token)
    assert fake_brex.is_access_token_active(after.access_token)
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert after.connection.last_error == ""
    # The access token's expiry counts from Brex's answer, not from the save 2 s later.
    assert after.access_token_expires_at < started + timedelta(seconds=3600, milliseconds=900)
    assert event_kinds(connection) == [EventKind.REFRESHED]
    detail = ConnectionEvent.objects.get(connection=connection).detail
    assert "Saved at try 3, after the database failed (OperationalError)" in detail
    assert [s["rotated"] for s in saving_signals["refreshed"]] == [True]


@pytest.mark.django_db(transaction=True)
def test_a_save_that_fails_past_the_window_is_recorded(
    brex_settings, fake_brex, saving_signals, database_drops, caplog
):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REFRESH_SAVE_RETRY_SECONDS": 1}
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    database_drops(times=100, pause=0.2)

    with pytest.raises(OperationalError):
        refresh.refresh_connection(connection, min_validity=60)

    db_connection.execute_wrappers.clear()
    after = stored_token(connection)
    # The rotated-out token is still the stored one: Brex takes it for its grace period.
    assert after.refresh_token == before.refresh_token
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert "could not be saved" in after.connection.last_error
    assert event_kinds(connection) == [EventKind.REFRESH_FAILED]
    assert saving_signals["refreshed"] == [] and saving_signals["failed"] == []
    logged = [r for r in caplog.records if "could not be saved" in r.getMessage()]
    assert logged and logged[0].levelname == "ERROR"
    for record in caplog.records:
        assert before.refresh_token not in record.getMessage()
    # Within that grace period the next refresh carries on.
    assert refresh.refresh_connection(connection, min_validity=60).outcome == Outcome.REFRESHED


@pytest.mark.django_db(transaction=True)
def test_expiry_counts_from_brexs_answer_at_connect(flow, fake_brex):
    fake_brex.set_latency(1.5, "/v2/users/me")
    fake_brex.set_latency(1.5, "/v2/company")

    started = timezone.now()
    assert flow.connect().status_code == 302
    finished = timezone.now()

    token = BrexToken.objects.get()
    # Brex answered before the identity calls' 3 s.
    answered_by = finished - timedelta(seconds=3)
    assert started + timedelta(seconds=3600) <= token.access_token_expires_at
    assert token.access_token_expires_at <= answered_by + timedelta(seconds=3600)


# ---------------------------------------------------------------------------------------
# Rate limits (Retry-After, the shared budget) and a wrong client secret
# ---------------------------------------------------------------------------------------


def _rate_events(connection) -> list[tuple[str, str]]:
    return list(
        ConnectionEvent.objects.filter(connection=connection)
        .order_by("created_at", "pk")
        .values_list("kind", "detail")
    )


def _rate_admin_page(client, staff_user) -> str:
    client.force_login(staff_user)
    response = client.get(reverse("admin:brex_oauth_brexconnection_changelist"))
    assert response.status_code == 200
    return response.content.decode()


def _rate_signals():
    return SignalRecorder(
        refreshed=signals.token_refreshed, failed=signals.refresh_failed,
        disconnected=signals.disconnected, rejected=signals.client_credentials_rejected,
    )


def _requests_to(fake, suffix: str) -> list[dict]:
    return [r for r in fake.requests if r["path"].endswith(suffix)]


@pytest.mark.django_db(transaction=True)
def test_a_token_endpoint_retry_after_holds_back_every_refresh_until_it_passes(
    brex_settings, fake_brex, countdowns, client, staff_user
):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH, "REFRESH_TASK_MAX_RETRIES": 1, "REFRESH_RETRY_BACKOFF": 15,
    }
    first = create_connection(fake_brex, expires_in=30)
    second = create_connection(fake_brex, expires_in=30)
    before = {c.pk: stored_token(c) for c in (first, second)}
    fake_brex.fail_next("/v1/token", status=429, retry_after=120)

    with _rate_signals() as received:
        # The task that got the 429 comes back after Retry-After, not after 12-19 s.
        with pytest.raises(BrexUnavailable):
            tasks.refresh_connection.apply(args=[first.pk]).get()
        assert countdowns and all(countdown >= 120 for countdown in countdowns)
        # Every other caller waits too: on demand (BrexClient), the Celery sweep, cron.
        with pytest.raises(BrexUnavailable) as caught:
            BrexClient(second).get_me()
        assert 100 < caught.value.retry_after <= 120
        assert tasks.refresh_due_connections.apply().get() == 0
        out = StringIO()
        call_command("brex_oauth_refresh", stdout=out)
        assert "refreshed 0, skipped 0, failed 0, needs re-auth 0, deferred 2" in out.getvalue()
        assert "Retry-After" in out.getvalue()

    # Brex was asked once; the eager retry, the client, the sweep and cron sent nothing.
    assert [r["status"] for r in _requests_to(fake_brex, "/v1/token")] == [429]
    assert _requests_to(fake_brex, "/v2/users/me") == []
    for connection in (first, second):
        token = stored_token(connection)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert token.refresh_token == before[connection.pk].refresh_token
        assert token.access_token == before[connection.pk].access_token
        assert fake_brex.is_refresh_token_active(token.refresh_token)
    [(kind, detail)] = _rate_events(first)
    assert kind == EventKind.REFRESH_FAILED and "Retry-After: 120 s" in detail
    assert _rate_events(second) == []
    assert received["refreshed"] == received["failed"] == received["rejected"] == []
    page = _rate_admin_page(client, staff_user)
    assert "Brex asked this site to slow down (Retry-After): nothing asks Brex to refresh " \
        "tokens before" in page


@pytest.mark.django_db(transaction=True)
def test_a_revocation_retry_after_holds_back_every_revocation_until_it_passes(
    brex_settings, fake_brex, monkeypatch, client, staff_user
):
    first = create_connection(fake_brex)
    second = create_connection(fake_brex)
    before = {c.pk: stored_token(c) for c in (first, second)}
    queued = []
    monkeypatch.setattr(
        tasks.revoke_connection, "apply_async",
        lambda args, countdown=None, **kwargs: queued.append((args[0], countdown)),
    )
    fake_brex.fail_next("/v1/revoke", status=429, retry_after=120)

    with _rate_signals() as received:
        revoke.disconnect(first)
        revoke.disconnect(second)
        assert tasks.sweep_revocations.apply().get() == 0

    # One request to Brex; both retries are queued for after Retry-After, not 15-30 s.
    assert [r["status"] for r in _requests_to(fake_brex, "/v1/revoke")] == [429]
    assert [pk for pk, _ in queued] == [first.pk, second.pk]
    assert queued[0][1] >= 120 and queued[1][1] >= 100
    for connection in (first, second):
        connection.refresh_from_db()
        assert connection.status == ConnectionStatus.REVOKED
        assert connection.revocation_status == RevocationStatus.PENDING
        token = stored_token(connection)
        assert token.access_token is None
        # Kept (encrypted) so that the queued retry can still revoke it at Brex.
        assert token.refresh_token == before[connection.pk].refresh_token
    assert [kind for kind, _ in _rate_events(first)] == [
        EventKind.DISCONNECTED, EventKind.REVOKE_FAILED
    ]
    assert "Retry-After: 120 s" in _rate_events(first)[1][1]
    assert [kind for kind, _ in _rate_events(second)] == [EventKind.DISCONNECTED]
    assert [r["revoked_at_brex"] for r in received["disconnected"]] == [False, False]
    page = _rate_admin_page(client, staff_user)
    assert "nothing asks Brex to revoke tokens before" in page


@pytest.mark.django_db(transaction=True)
def test_an_api_retry_after_holds_back_every_call_for_that_brex_account(
    brex_settings, fake_brex, monkeypatch, client, staff_user
):
    first = create_connection(fake_brex, expires_in=3000)
    same_company = create_connection(fake_brex, expires_in=3000)
    other_company = create_connection(fake_brex, expires_in=3000)
    BrexConnection.objects.filter(pk=other_company.pk).update(brex_company_id="cuacc_other")
    other_company.refresh_from_db()
    slept = []
    monkeypatch.setattr(client_module._APIClient, "sleep", staticmethod(slept.append))
    fake_brex.fail_next("/v2/users/me", status=429, retry_after=120)

    with _rate_signals() as received:
        with pytest.raises(BrexAPIUnavailable) as first_error:
            BrexClient(first).get_me()
        with pytest.raises(BrexAPIUnavailable) as second_error:
            BrexClient(same_company).get_company()
        assert BrexClient(other_company).get_me()["id"]

    # No retry after a capped 20 s: the 429 is raised at once with what Brex asked for, and
    # the other connection of the same Brex account sends nothing until then.
    assert slept == []
    assert first_error.value.status == 429 and first_error.value.retry_after == 120
    assert second_error.value.status == 429 and 100 < second_error.value.retry_after <= 120
    assert [r["status"] for r in _requests_to(fake_brex, "/v2/users/me")] == [429, 200]
    assert _requests_to(fake_brex, "/v2/company") == []
    for connection in (first, same_company, other_company):
        connection.refresh_from_db()
        assert connection.status == ConnectionStatus.ACTIVE and connection.last_error == ""
        assert fake_brex.is_access_token_active(stored_token(connection).access_token)
        assert _rate_events(connection) == []
    assert received["refreshed"] == received["failed"] == []
    page = _rate_admin_page(client, staff_user)
    assert "Brex asked this site to slow down (Retry-After) for 1 Brex account: its API" in page


@pytest.mark.django_db(transaction=True)
def test_the_sweep_shares_a_rate_budget_so_brex_never_answers_429(
    brex_settings, fake_brex, caplog, client, staff_user
):
    # Brex's limit, scaled down: 10 token requests per 2 s. The budget is half of it, so
    # two busy windows back to back still stay under Brex's limit.
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH, "SWEEP_RATE_LIMIT": 5, "SWEEP_RATE_WINDOW": 2,
    }
    fake_brex.rate_limit(10, per=2.0)
    ids = create_connections(fake_brex, 12, expires_in=30)
    before = {pk: stored_token(pk).refresh_token for pk in ids}
    caplog.set_level(logging.INFO, logger="django_brex_oauth")

    with _rate_signals() as received:
        out = StringIO()
        call_command("brex_oauth_refresh", stdout=out)

    assert "refreshed 12, skipped 0, failed 0, needs re-auth 0, deferred 0" in out.getvalue()
    assert fake_brex.stats["rate_limited"] == 0
    times = sorted(r["time"] for r in _requests_to(fake_brex, "/v1/token"))
    assert len(times) == 12
    # Never more than the budget in one window: the 12 requests span at least two windows.
    assert times[-1] - times[0] >= 2 * 2 - 0.5
    for pk in ids:
        token = stored_token(pk)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert token.refresh_token != before[pk]
        assert fake_brex.is_refresh_token_active(token.refresh_token)
        assert [kind for kind, _ in _rate_events(pk)] == [EventKind.REFRESHED]
    assert len(received["refreshed"]) == 12 and received["failed"] == []
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Brex refresh budget used up: 5 of 5 token requests in this 2 s window" in logged
    assert "the last window used 5 of 5 token requests" in logged
    for secret in before.values():
        assert secret not in logged
    # Nothing for staff to worry about: no wait is in force.
    assert "Retry-After" not in _rate_admin_page(client, staff_user)


@pytest.mark.django_db(transaction=True)
def test_a_wrong_client_secret_pauses_refreshing_keeps_connections_active_and_alerts(
    brex_settings, fake_brex, caplog, client, staff_user
):
    connections = [create_connection(fake_brex, expires_in=30) for _ in range(3)]
    before = {c.pk: stored_token(c) for c in connections}
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "CLIENT_SECRET": "a-bad-deploy"}

    with _rate_signals() as received:
        out = StringIO()
        with pytest.raises(CommandError, match="refreshing is paused for every connection"):
            call_command("brex_oauth_refresh", stdout=out)
        # Later sweeps and on-demand refreshes send nothing until the probe time.
        assert tasks.refresh_due_connections.apply().get() == 0
        assert tasks.refresh_connection.apply(args=[connections[1].pk]).get() == "paused"
        with pytest.raises(RefreshPaused):
            BrexClient(connections[2]).get_me()
        with pytest.raises(CommandError, match="refreshing is paused for every connection"):
            call_command("brex_oauth_check", stdout=StringIO())

    assert "deferred 2" in out.getvalue()
    # One refresh found it out (and brex_oauth_check asked once more); nobody else asked.
    assert fake_brex.stats["token_refresh_token"] == 0
    assert len(_requests_to(fake_brex, "/v1/token")) == 2
    for connection in connections:
        token = stored_token(connection)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert token.refresh_token == before[connection.pk].refresh_token
        assert token.access_token == before[connection.pk].access_token
        assert fake_brex.is_refresh_token_active(token.refresh_token)
    kinds = [[kind for kind, _ in _rate_events(c)] for c in connections]
    assert kinds == [[EventKind.REFRESH_FAILED], [], []]
    assert "need not reconnect" in _rate_events(connections[0])[0][1]
    # Loud: one signal, an ERROR log, a banner for staff; never the customer's signal.
    assert received["failed"] == [] and received["refreshed"] == []
    [rejected] = received["rejected"]
    assert rejected["error"] == "invalid_client"
    assert rejected["connection"] == connections[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refreshing is paused for every Brex connection" in m for m in errors)
    assert all("a-bad-deploy" not in r.getMessage() for r in caplog.records)
    page = _rate_admin_page(client, staff_user)
    assert "Refreshing is paused for every connection since" in page
    assert "customers need not reconnect" in page
    assert "a-bad-deploy" not in page


@pytest.mark.django_db(transaction=True)
def test_refreshing_resumes_by_itself_once_the_client_secret_works(
    brex_settings, fake_brex, client, staff_user
):
    connections = [create_connection(fake_brex, expires_in=30) for _ in range(3)]
    good = dict(brex_settings.BREX_OAUTH)
    brex_settings.BREX_OAUTH = {**good, "CLIENT_SECRET": "a-bad-deploy",
                                "CLIENT_REJECTED_PROBE_INTERVAL": 1}
    with pytest.raises(RefreshPaused):
        refresh.refresh_connection(connections[0])
    brex_settings.BREX_OAUTH = {**good, "CLIENT_REJECTED_PROBE_INTERVAL": 1}  # the fix

    with _rate_signals() as received:
        # Before the probe time, still paused, though the secret is right now.
        with pytest.raises(RefreshPaused):
            refresh.refresh_connection(connections[1])
        time.sleep(1.2)
        # Then one probe (a refresh of a token that cannot exist), and the sweep goes on.
        out = StringIO()
        call_command("brex_oauth_refresh", stdout=out)

    assert "refreshed 3, skipped 0, failed 0, needs re-auth 0, deferred 0" in out.getvalue()
    assert fake_brex.stats["token_refresh_token"] == 4  # the probe and three refreshes
    for connection in connections:
        token = stored_token(connection)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert token.connection.last_error == ""
        assert fake_brex.is_refresh_token_active(token.refresh_token)
        assert [kind for kind, _ in _rate_events(connection)][-1] == EventKind.REFRESHED
    assert len(received["refreshed"]) == 3
    assert received["failed"] == received["rejected"] == []
    assert "Refreshing is paused" not in _rate_admin_page(client, staff_user)
    assert "Brex OAuth configuration OK." in _call_check()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("error", ["invalid_client", "unauthorized_client"])
def test_a_client_refused_at_the_code_exchange_pauses_refreshing_and_alerts(
    brex_settings, fake_brex, flow, caplog, error
):
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    if error == "invalid_client":
        brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "CLIENT_SECRET": "a-bad-deploy"}
    else:
        fake_brex.fail_next("/v1/token", status=400, body={"error": "unauthorized_client"})

    with _rate_signals() as received:
        response = flow.connect()
        # Refreshing waits for the credentials to work, as after a refused refresh.
        with pytest.raises(RefreshPaused):
            refresh.refresh_connection(connection, force=True)

    # The person sees the error page; nothing is connected, the attempt is used up.
    assert response.status_code == 502
    assert b"did not accept this site&#x27;s credentials" in response.content
    assert BrexConnection.objects.count() == 1
    assert AuthorizationRequest.objects.get().consumed_at is not None
    # Staff get the alert of a refused refresh: one signal, an ERROR log, the pause.
    [rejected] = received["rejected"]
    assert rejected["error"] == error and rejected["connection"] is None
    assert received["failed"] == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refreshing is paused for every Brex connection" in m for m in errors)
    assert all("a-bad-deploy" not in r.getMessage() for r in caplog.records)
    assert throttle.client_pause() is not None
    # Only the code exchange reached the token endpoint; the existing connection is kept.
    assert len(_requests_to(fake_brex, "/v1/token")) == 1
    token = stored_token(connection)
    assert token.connection.status == ConnectionStatus.ACTIVE
    assert token.refresh_token == before.refresh_token
    assert fake_brex.is_refresh_token_active(token.refresh_token)


@pytest.mark.django_db(transaction=True)
def test_a_client_credentials_retry_after_holds_back_the_token_endpoint(
    brex_settings, fake_brex
):
    connection = create_connection(fake_brex, expires_in=30)
    scopes = [OnboardingClient.REFERRALS_SCOPE]
    fake_brex.fail_next("/v1/token", status=429, retry_after=2)

    with pytest.raises(BrexUnavailable):
        client_credentials.get_client_credentials_token(scopes)
    # Until it passes, neither this grant nor a refresh asks Brex.
    with pytest.raises(BrexUnavailable) as caught:
        client_credentials.get_client_credentials_token(scopes)
    assert 0 < caught.value.retry_after <= 2
    with pytest.raises(BrexUnavailable):
        refresh.refresh_connection(connection, force=True, wait=False)
    assert [r["status"] for r in _requests_to(fake_brex, "/v1/token")] == [429]
    # Then it is issued.
    time.sleep(2.1)
    assert client_credentials.get_client_credentials_token(scopes)
    assert fake_brex.stats["token_client_credentials"] == 1


def _call_check() -> str:
    out = StringIO()
    call_command("brex_oauth_check", stdout=out)
    return out.getvalue()


# ---------------------------------------------------------------------------------------
# Lost keys, revocation, environments, concurrent refreshers on SQLite, the demo
# ---------------------------------------------------------------------------------------


def _events(connection_id: int) -> list[tuple[str, str]]:
    return list(
        ConnectionEvent.objects.filter(connection_id=connection_id)
        .order_by("created_at", "pk")
        .values_list("kind", "detail")
    )


def _page_messages(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def _disconnect_as_the_person(user_client, connection):
    """POST the disconnect button; returns the page it leads to (checked to be a 200) and
    the ``disconnected`` signals sent."""
    with SignalRecorder(disconnected=signals.disconnected) as received:
        response = user_client.post(
            reverse("brex_oauth:disconnect", args=[connection.pk]), follow=True
        )
    assert response.status_code == 200
    return response, received


@pytest.mark.django_db(transaction=True)
def test_each_refresh_restarts_the_refresh_tokens_estimated_end(brex_settings, fake_brex):
    """Brex's refresh tokens last 90 days from the last exchange: a connection made 100
    days ago and refreshed since is not "past its 90 days"."""
    connection = create_connection(
        fake_brex, expires_in=30,
        refresh_token_issued_at=timezone.now() - timedelta(days=100),
        refresh_token_expires_at=timezone.now() - timedelta(days=10),
    )
    assert sweep.sweep().refreshed == 1
    token = stored_token(connection)
    assert token.connection.status == ConnectionStatus.ACTIVE
    expected = timezone.now() + timedelta(days=90)
    assert abs(token.refresh_token_expires_at - expected) < timedelta(minutes=1)
    assert token.refresh_token_days_left == 89
    # The chain's start stays where the customer connected.
    assert token.refresh_token_issued_at < timezone.now() - timedelta(days=99)


@pytest.mark.django_db(transaction=True)
def test_disconnect_past_the_estimated_end_still_revokes_at_brex(
    brex_settings, fake_brex, user, user_client
):
    """The estimated end date has passed but Brex still holds the grant: the disconnect
    asks Brex, and the person is told it was revoked only because Brex said so."""
    connection = make_connection(user, fake=fake_brex)
    refresh_token = stored_token(connection).refresh_token
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_token_expires_at=timezone.now() - timedelta(days=1)
    )
    response, received = _disconnect_as_the_person(user_client, connection)
    revocations = [r for r in fake_brex.requests if r["path"].endswith("/v1/revoke")]
    assert len(revocations) == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.REVOKED
    assert connection.revocation_status == RevocationStatus.DONE
    assert stored_token(connection).refresh_token is None
    kinds = [kind for kind, _ in _events(connection.pk)]
    assert kinds == [EventKind.DISCONNECTED, EventKind.REVOKED]
    assert "Brex confirmed the revocation" in _events(connection.pk)[-1][1]
    assert [r["revoked_at_brex"] for r in received["disconnected"]] == [True]
    assert any("Brex has revoked" in m for m in _page_messages(response))



def _lose_the_encryption_key(settings) -> None:
    """Configure a new key without the old one among the fallbacks."""
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": "a-new-key-0123456789abcdef",
                           "ENCRYPTION_KEY_FALLBACKS": []}


@pytest.mark.django_db(transaction=True)
def test_a_token_no_key_decrypts_needs_reauth_once_and_leaves_the_sweep(
    brex_settings, fake_brex, admin_client
):
    connection = create_connection(fake_brex, expires_in=30)
    _lose_the_encryption_key(brex_settings)
    with SignalRecorder(refresh_failed=signals.refresh_failed,
                        token_refreshed=signals.token_refreshed) as received:
        assert tasks.refresh_due_connections.delay().get() == 1
        # Taken out of the sweep: the next ones queue nothing, the cron sweep finds nothing.
        assert tasks.refresh_due_connections.delay().get() == 0
        assert sweep.sweep().total == 0
        assert sweep.sweep(all_active=True).total == 0
        with pytest.raises(ConnectionNotUsable):
            BrexClient(BrexConnection.objects.get(pk=connection.pk)).get_me()
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.NEEDS_REAUTH
    assert "cannot be decrypted" in connection.last_error
    assert "ENCRYPTION_KEY" in connection.last_error
    assert [kind for kind, _ in _events(connection.pk)] == [EventKind.NEEDS_REAUTH]
    assert [(r["connection"].pk, r["error"]) for r in received["refresh_failed"]] == [
        (connection.pk, "undecryptable_token")
    ]
    assert received["token_refreshed"] == []
    assert fake_brex.stats["token_refresh_token"] == 0
    # Staff see it as needing re-authorization, with the reason.
    page = admin_client.get(reverse("admin:brex_oauth_brexconnection_changelist")).content
    assert b"Needs re-authorization" in page and b"cannot be decrypted" in page


@pytest.mark.django_db(transaction=True)
def test_the_api_client_raises_connection_not_usable_for_an_unreadable_token(
    brex_settings, fake_brex, user
):
    connection = make_connection(user, fake=fake_brex)
    _lose_the_encryption_key(brex_settings)
    with SignalRecorder(refresh_failed=signals.refresh_failed) as received:
        with pytest.raises(ConnectionNotUsable):
            BrexClient(connection).get_me()
        with pytest.raises(ConnectionNotUsable):
            BrexClient(connection).get_me()
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.NEEDS_REAUTH
    assert len(received["refresh_failed"]) == 1
    assert not [r for r in fake_brex.requests if r["path"].endswith("/v2/users/me")]


@pytest.mark.django_db(transaction=True)
def test_disconnecting_an_unreadable_connection_wipes_it_and_records_brex_was_not_told(
    brex_settings, fake_brex, user, user_client
):
    connection = make_connection(user, fake=fake_brex)
    refresh_token = stored_token(connection).refresh_token
    _lose_the_encryption_key(brex_settings)
    response, received = _disconnect_as_the_person(user_client, connection)
    assert any("Brex could not be told" in m for m in _page_messages(response))
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.REVOKED
    assert connection.revocation_status == RevocationStatus.NOT_POSSIBLE
    assert "cannot be decrypted" in connection.last_error
    row = BrexToken.objects.filter(pk=connection.pk).values(
        "access_token", "refresh_token", "access_token_expires_at").get()
    assert row == {"access_token": None, "refresh_token": None,
                   "access_token_expires_at": None}
    kinds = [kind for kind, _ in _events(connection.pk)]
    assert kinds == [EventKind.DISCONNECTED, EventKind.REVOKE_FAILED]
    assert "Brex was not told" in _events(connection.pk)[-1][1]
    assert [r["revoked_at_brex"] for r in received["disconnected"]] == [False]
    # Nothing is left to retry: the task and the revocation sweep have nothing to do.
    assert tasks.revoke_connection.delay(connection.pk).get() == "not_pending"
    assert list(pending_revocation_ids(timezone.now() + timedelta(days=1))) == []
    # Brex was never asked (it could not be), so the grant is still live there.
    assert [r for r in fake_brex.requests if r["path"].endswith("/v1/revoke")] == []
    assert fake_brex.is_refresh_token_active(refresh_token)


@pytest.mark.django_db(transaction=True)
def test_staff_revoking_an_unreadable_connection_are_told_brex_could_not_be(
    brex_settings, fake_brex, user, admin_client
):
    connection = make_connection(user, fake=fake_brex)
    _lose_the_encryption_key(brex_settings)
    response = admin_client.post(
        reverse("admin:brex_oauth_brexconnection_changelist"),
        {"action": "revoke_at_brex", "_selected_action": [connection.pk]}, follow=True,
    )
    assert response.status_code == 200
    assert any("Brex could not be told" in m for m in _page_messages(response))
    connection.refresh_from_db()
    assert connection.revocation_status == RevocationStatus.NOT_POSSIBLE
    # Staff find such connections with the revocation status filter.
    listed = admin_client.get(reverse("admin:brex_oauth_brexconnection_changelist"),
                              {"revocation_status__exact": "not_possible"})
    assert [c.pk for c in listed.context["cl"].result_list] == [connection.pk]


@pytest.mark.django_db(transaction=True)
def test_reconnecting_replaces_an_unreadable_connection(brex_settings, fake_brex, user, flow):
    connection = make_connection(user, fake=fake_brex)
    _lose_the_encryption_key(brex_settings)
    refresh.refresh_connection(connection, force=True)
    assert flow.connect().status_code == 302
    reconnected = stored_token(connection)
    assert reconnected.connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(reconnected.refresh_token)
    assert BrexClient(reconnected.connection).get_me()["id"]



@pytest.fixture
def brex_production():
    """A second fake Brex standing in for Brex production's documented URLs."""
    with FakeBrex(rotate_refresh_tokens=True, refresh_grace_period=0.0) as server:
        yield server


def _staging_then_production(brex_settings, fake_brex, brex_production, monkeypatch, user,
                             **settings):
    """A connection made at Brex staging (``fake_brex``), the site switched to production
    (``brex_production``), a connection made there; both due for a refresh."""
    staging = make_connection(user, fake=fake_brex)
    assert staging.environment == "staging"
    # Brex staging's documented URLs lead to the fake the connection was made at.
    monkeypatch.setitem(conf.AUTH_BASE_URLS, "staging", fake_brex.issuer)
    monkeypatch.setitem(conf.API_BASE_URLS, "staging", fake_brex.api_base_url)
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "ENVIRONMENT": "production",
                                "ISSUER": brex_production.issuer,
                                "API_BASE_URL": brex_production.api_base_url, **settings}
    production = make_connection(create_user("grace"), fake=brex_production)
    assert production.environment == "production"
    _make_due()
    return staging, production


def _make_due() -> None:
    BrexToken.objects.update(access_token_expires_at=timezone.now() + timedelta(seconds=30))


@pytest.mark.django_db(transaction=True)
def test_switching_the_site_to_production_keeps_staging_connections_at_staging(
    brex_settings, fake_brex, brex_production, monkeypatch, user
):
    """A connection made in staging is refreshed, called and revoked at Brex staging after
    the site switched ENVIRONMENT to production (ISSUER and API_BASE_URL now override
    production's URLs); production connections go to production."""
    staging, production = _staging_then_production(
        brex_settings, fake_brex, brex_production, monkeypatch, user
    )

    with SignalRecorder(refresh_failed=signals.refresh_failed) as received:
        assert sweep.sweep().refreshed == 2
    assert received["refresh_failed"] == []
    for connection, fake in ((staging, fake_brex), (production, brex_production)):
        token = stored_token(connection)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert fake.is_refresh_token_active(token.refresh_token)
        assert fake.stats["token_refresh_token"] == 1
        assert BrexClient(token.connection).get_me()["id"]
        assert [r for r in fake.requests if r["path"].endswith("/v2/users/me")]
    # Disconnecting revokes at the connection's own Brex.
    refresh_token = stored_token(staging).refresh_token
    assert disconnect(staging, actor=user).revoked_at_brex
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert [r for r in brex_production.requests if r["path"].endswith("/v1/revoke")] == []


@pytest.mark.django_db(transaction=True)
def test_a_retry_after_from_one_environments_brex_holds_back_only_its_connections(
    brex_settings, fake_brex, brex_production, monkeypatch, user
):
    """Brex production's 429 keeps the site from calling Brex production, not Brex staging,
    where the staging connections refresh (the configured environment is production)."""
    staging, production = _staging_then_production(
        brex_settings, fake_brex, brex_production, monkeypatch, user
    )
    brex_production.fail_next("/v1/token", status=429, retry_after=120)

    first = sweep.sweep()
    assert (first.refreshed, first.failed, first.deferred) == (1, 1, 0)
    _make_due()
    second = sweep.sweep()
    assert (second.refreshed, second.failed, second.deferred) == (1, 0, 1)
    assert "Retry-After" in second.held_back
    # The Celery sweep queues the staging connection alone.
    _make_due()
    assert tasks.refresh_due_connections.apply().get() == 1
    # Each Brex was asked only what it allows: production once, staging every time.
    assert [r["status"] for r in _requests_to(brex_production, "/v1/token")] == [429]
    assert fake_brex.stats["token_refresh_token"] == 3
    assert stored_token(staging).connection.last_error == ""
    with pytest.raises(BrexUnavailable) as caught:
        refresh.refresh_connection(production, force=True)
    assert 100 < caught.value.retry_after <= 120
    assert refresh.refresh_connection(staging, force=True).outcome == refresh.Outcome.REFRESHED


@pytest.mark.django_db(transaction=True)
def test_a_client_refused_by_one_environments_brex_pauses_only_its_connections(
    brex_settings, fake_brex, brex_production, monkeypatch, user
):
    """Brex staging refusing the client credentials pauses the staging connections alone;
    the pause is probed at Brex staging (so Brex production accepting the credentials does
    not end it), and ends once Brex staging accepts them."""
    staging, production = _staging_then_production(
        brex_settings, fake_brex, brex_production, monkeypatch, user,
        CLIENT_REJECTED_PROBE_INTERVAL=1,
    )
    secret = fake_brex.client_secret
    fake_brex.client_secret = "rotated-at-staging-only"

    with _rate_signals() as received:
        report = sweep.sweep()
    assert (report.refreshed, report.failed, report.paused) == (1, 1, True)
    [rejected] = received["rejected"]
    assert rejected["connection"] == staging
    assert throttle.client_pause("staging") is not None
    assert throttle.client_pause() is None and throttle.client_pause("production") is None
    # Production goes on refreshing; staging sends nothing until its probe time.
    staging_requests = len(_requests_to(fake_brex, "/v1/token"))
    assert refresh.refresh_connection(production, force=True).outcome == refresh.Outcome.REFRESHED
    with pytest.raises(RefreshPaused):
        refresh.refresh_connection(staging, force=True)
    assert len(_requests_to(fake_brex, "/v1/token")) == staging_requests
    # At the probe time the probe asks Brex staging, which still refuses: still paused.
    time.sleep(1.2)
    with pytest.raises(RefreshPaused):
        refresh.refresh_connection(staging, force=True)
    assert len(_requests_to(fake_brex, "/v1/token")) == staging_requests + 1
    assert throttle.client_pause("staging") is not None
    assert refresh.refresh_connection(production, force=True).outcome == refresh.Outcome.REFRESHED
    # Fixed at Brex staging: the next probe ends the pause and the staging connection
    # refreshes there.
    fake_brex.client_secret = secret
    time.sleep(1.2)
    assert refresh.refresh_connection(staging, force=True).outcome == refresh.Outcome.REFRESHED
    assert throttle.client_pause("staging") is None
    token = stored_token(staging)
    assert token.connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(token.refresh_token)
    assert stored_token(production).connection.status == ConnectionStatus.ACTIVE



def _demo_site(data_dir, extra_env: dict[str, str]) -> demo.Stack:
    """The example site alone (no worker, no beat, no fake of its own) as the demo runs it."""
    config = demo.StackConfig(
        python=sys.executable, port=demo.free_port(), data_dir=data_dir, env_file="",
        fake_port=None, worker=False, beat=False, echo=False, extra_env=extra_env,
        base_env=clean_environment(),
    )
    return demo.Stack(config)


def test_switching_the_demo_from_the_fake_to_brex_staging_keeps_their_data_apart(
    tmp_path, fake_brex
):
    """Connected in fake mode, then switched to Brex staging as example_project/README.md
    says: the dashboard works and shows no connection of the fake's (whose tokens, encrypted
    with the fake mode's key, mean nothing to Brex staging); the fake's data is kept."""
    data_dir = tmp_path / "var"
    fake_mode = {"BREX_CLIENT_ID": fake_brex.client_id,
                 "BREX_CLIENT_SECRET": fake_brex.client_secret,
                 "BREX_ENVIRONMENT": "staging", "BREX_ISSUER": fake_brex.issuer,
                 "BREX_API_BASE_URL": fake_brex.api_base_url}
    staging_mode = {"BREX_CLIENT_ID": "issued-by-brex", "BREX_CLIENT_SECRET": "issued-secret",
                    "BREX_ENVIRONMENT": "staging", "BREX_ISSUER": "", "BREX_API_BASE_URL": "",
                    "BREX_ENCRYPTION_KEY": "a-key-of-the-partners-own-0123456789"}
    try:
        with _demo_site(data_dir, fake_mode) as site:
            browser = signed_in_browser(site.url)
            authorize = redirect_location(browser, site.url + "brex/connect/")
            assert redirect_location(browser, fake_brex.consent(authorize)) == "/"
            status, page = _open(browser, site.url)
            assert status == 200 and 'data-status="active"' in page

        with _demo_site(data_dir, staging_mode) as site:
            browser = signed_in_browser(site.url)
            status, page = _open(browser, site.url)
            assert status == 200
            assert "No Brex account connected yet" in page
            assert "data-status=" not in page
        assert query(data_dir, "SELECT COUNT(*) FROM brex_oauth_brexconnection",
                     mode="staging") == [(0,)]
        # The fake's connection is still there for the next run against the fake.
        assert query(data_dir, "SELECT status FROM brex_oauth_brexconnection") == [("active",)]
    finally:
        keep_logs(data_dir, "demo-switch-logs")


def _open(browser, url: str) -> tuple[int, str]:
    try:
        with browser.open(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read().decode(errors="replace")



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
        reports = run_rounds(processes, barrier, results, SQLITE_ROUNDS)
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


TOKEN_ENDPOINT_FAULTS = {
    "500": "Brex token endpoint answered HTTP 500",
    "503": "Brex token endpoint answered HTTP 503",
    "timeout": "ReadTimeout talking to 127.0.0.1",
    "refused": "ConnectionError talking to 127.0.0.1",
    "html": "Brex token endpoint answered HTTP 200 with a page that is not JSON",
}
MAINTENANCE_PAGE = "<!doctype html><html><body><h1>Down for maintenance</h1></body></html>"


@pytest.fixture
def token_endpoint_fault(fake_brex, brex_settings):
    """Makes Brex's token endpoint fail one way, and ``.clear()`` makes it work again."""

    class Fault:
        def apply(self, kind: str) -> None:
            self.kind = kind
            if kind in ("500", "503"):
                fake_brex.fail_next("/v1/token", status=int(kind), times=100)
            elif kind == "html":
                fake_brex.fail_next("/v1/token", status=200, body=MAINTENANCE_PAGE, times=100)
            elif kind == "timeout":
                # Brex does the refresh (it rotates the refresh token) but answers too late.
                brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "HTTP_TIMEOUT": 0.5}
                fake_brex.set_latency(1.5, "/v1/token")
            else:
                discovery.get_provider_metadata()  # the endpoints are known...
                fake_brex.stop()  # ...but nothing listens there any more

        def clear(self) -> None:
            fake_brex.clear_failures()
            if not fake_brex.running:
                fake_brex.start()  # the same port

    return Fault()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fault", list(TOKEN_ENDPOINT_FAULTS))
def test_the_token_endpoint_failing_leaves_the_connection_active_to_retry(
    fault, brex_settings, fake_brex, token_endpoint_fault
):
    """500, 503, a timeout, a refused connection or an HTML page from the token endpoint:
    the refresh raises BrexUnavailable (so the task retries with backoff), the connection
    stays active with its refresh token, a ``refresh_failed`` event and ``last_error`` say
    what happened, no signal is sent; the API client's caller gets "Brex is not reachable
    right now"; once Brex answers again the next try refreshes."""
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REFRESH_TASK_MAX_RETRIES": 1,
                                "REFRESH_RETRY_BACKOFF": 15}
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    token_endpoint_fault.apply(fault)

    with SignalRecorder(refresh_failed=signals.refresh_failed,
                        token_refreshed=signals.token_refreshed) as received:
        with pytest.raises(BrexUnavailable) as raised:
            refresh.refresh_connection(connection.pk)
        with pytest.raises(BrexUnavailable) as seen_by_caller:
            BrexClient(BrexConnection.objects.get(pk=connection.pk),
                       max_retries=0).request("GET", "/v2/users/me")
    assert TOKEN_ENDPOINT_FAULTS[fault] in str(raised.value)
    assert seen_by_caller.value.title == "Brex is not reachable right now"
    assert received["refresh_failed"] == [] and received["token_refreshed"] == []
    after = stored_token(connection)
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert after.refresh_token == before.refresh_token
    assert after.access_token == before.access_token
    assert after.refresh_claimed_until is None
    assert after.connection.last_error == (
        f"Refresh failed, will retry: {raised.value}"
    )
    # The refresh task retries it once (REFRESH_TASK_MAX_RETRIES), after a backoff.
    retries: list[float] = []

    def record_retry(sender=None, reason=None, **kwargs):
        retries.append(reason.when)

    celery_signals.task_retry.connect(record_retry, weak=False)
    try:
        with pytest.raises(BrexUnavailable):
            tasks.refresh_connection.delay(connection.pk).get()
    finally:
        celery_signals.task_retry.disconnect(record_retry)
    assert len(retries) == 1 and 7.5 <= retries[0] <= 30
    events = _events(connection.pk)
    assert [kind for kind, _ in events] == [EventKind.REFRESH_FAILED] * 4
    assert all(before.refresh_token not in detail for _, detail in events)
    assert stored_token(connection).refresh_token == before.refresh_token

    token_endpoint_fault.clear()
    fake_brex.set_latency(0, "/v1/token")
    assert refresh.refresh_connection(connection.pk).outcome == Outcome.REFRESHED
    renewed = stored_token(connection)
    assert renewed.connection.last_error == ""
    assert fake_brex.is_refresh_token_active(renewed.refresh_token)
    # After a timeout Brex had rotated the token already; the retry came within its grace
    # period, so the grant survived.
    assert fake_brex.stats["refresh_token_reuse_rejected"] == 0


@pytest.mark.django_db(transaction=True)
def test_the_revocation_endpoint_down_keeps_the_revocation_pending_and_says_so(
    brex_settings, fake_brex, user, user_client, admin_client
):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REVOKE_TASK_MAX_RETRIES": 1}
    connection = make_connection(user, fake=fake_brex)
    refresh_token = stored_token(connection).refresh_token
    fake_brex.fail_next("/v1/revoke", status=503, times=100)

    response, received = _disconnect_as_the_person(user_client, connection)
    assert any("Brex could not be reached" in m for m in _page_messages(response))
    connection.refresh_from_db()
    # Out of use here at once; Brex still honours the grant until it answers.
    assert connection.status == ConnectionStatus.REVOKED
    assert connection.revocation_status == RevocationStatus.PENDING
    assert "Revocation at Brex failed" in connection.last_error
    token = stored_token(connection)
    assert token.access_token is None and token.refresh_token == refresh_token
    assert fake_brex.is_refresh_token_active(refresh_token)
    # The first try and the task's run and retry.
    kinds = [kind for kind, _ in _events(connection.pk)]
    assert kinds == [EventKind.DISCONNECTED] + [EventKind.REVOKE_FAILED] * 3
    assert [r["revoked_at_brex"] for r in received["disconnected"]] == [False]
    page = admin_client.get(reverse("admin:brex_oauth_brexconnection_changelist")).content
    assert b"Revocation at Brex failed" in page

    # Brex is back: the revocation sweep finishes it.
    fake_brex.clear_failures()
    BrexConnection.objects.filter(pk=connection.pk).update(
        revocation_attempted_at=timezone.now() - timedelta(hours=1)
    )
    assert tasks.sweep_revocations.delay().get() == 1
    connection.refresh_from_db()
    assert connection.revocation_status == RevocationStatus.DONE
    assert not fake_brex.is_refresh_token_active(refresh_token)


@pytest.mark.django_db(transaction=True)
def test_discovery_down_uses_the_last_good_document(brex_settings, fake_brex, flow, caplog):
    connection = create_connection(fake_brex, expires_in=30)
    assert refresh.refresh_connection(connection.pk).outcome == Outcome.REFRESHED
    # The cached copy expires (or a failed call dropped it) while discovery is down.
    discovery.invalidate()
    fake_brex.fail_next("/.well-known/openid-configuration", status=503, times=100)

    outcome = refresh.refresh_connection(connection.pk, force=True).outcome
    assert outcome == Outcome.REFRESHED
    assert "using the last good configuration" in caplog.text
    token = stored_token(connection)
    assert token.connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(token.refresh_token)
    # People can still connect: the authorization URL comes from the last good document.
    assert flow.start().startswith(fake_brex.issuer + "/v1/authorize?")
    assert fake_brex.stats["discovery"] == 1


@pytest.mark.django_db(transaction=True)
def test_discovery_down_with_no_good_document_yet_changes_nothing(
    brex_settings, fake_brex, user_client
):
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    fake_brex.fail_next("/.well-known/openid-configuration", status=503, times=100)

    with pytest.raises(BrexUnavailable, match="answered HTTP 503"):
        refresh.refresh_connection(connection.pk)
    after = stored_token(connection)
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert (after.access_token, after.refresh_token) == (before.access_token,
                                                         before.refresh_token)
    assert [kind for kind, _ in _events(connection.pk)] == [EventKind.REFRESH_FAILED]
    # The person trying to connect gets a page that says Brex is unreachable; nothing stored.
    response = user_client.get(reverse("brex_oauth:connect"))
    assert response.status_code == 502
    assert b"Brex is not reachable right now" in response.content
    assert not AuthorizationRequest.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_rotated_signing_key_is_fetched_again_and_the_connect_succeeds(
    brex_settings, fake_brex, flow, user
):
    assert flow.connect().status_code == 302  # the JWKS is cached now
    old_kid = fake_brex.signing_kid
    fake_brex.rotate_signing_key()  # the old key leaves the JWKS at once
    assert fake_brex.signing_kid != old_kid

    with SignalRecorder(connected=signals.connected) as received:
        assert flow.connect(force_login="1").status_code == 302
    assert fake_brex.stats["jwks"] == 2  # the unknown kid made it fetch the keys again
    connection = BrexConnection.objects.get(owner=user)
    assert connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(stored_token(connection).refresh_token)
    assert [kind for kind, _ in _events(connection.pk)] == [EventKind.CONNECTED,
                                                            EventKind.RECONNECTED]
    assert [r["created"] for r in received["connected"]] == [False]
