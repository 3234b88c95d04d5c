"""Refreshing a connection's tokens, against the fake Brex over loopback HTTP.

The fake rotates refresh tokens with no grace period: reusing a rotated-out refresh token
revokes the whole chain, so any lost or reused token shows up as a failure.
"""

from __future__ import annotations

import io
import logging
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection as db_connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_brex_oauth import oauth, signals, tasks
from django_brex_oauth.exceptions import (
    BrexOAuthConfigurationError,
    BrexUnavailable,
    RefreshPaused,
)
from django_brex_oauth.models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
)
from django_brex_oauth.services import lease, refresh, sweep
from django_brex_oauth.services.refresh import Outcome
from tests.conftest import require_postgres
from tests.factories import (
    SignalRecorder,
    create_connection,
    event_kinds,
    stored_token,
    strict_rotation_fake_brex,
)

pytestmark = pytest.mark.django_db(transaction=True)


fake_brex = pytest.fixture(strict_rotation_fake_brex, name="fake_brex")


@pytest.fixture
def brex(brex_settings, fake_brex):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "HTTP_TIMEOUT": 2.0}
    return fake_brex


@pytest.fixture
def received():
    with SignalRecorder(
        refreshed=signals.token_refreshed, failed=signals.refresh_failed
    ) as recorder:
        yield recorder


def assert_no_secrets(texts, *secrets):
    for text in texts:
        for secret in secrets:
            assert secret not in text


def close_to(moment, expected, tolerance=timedelta(seconds=10)):
    return abs(moment - expected) <= tolerance


# Success --------------------------------------------------------------------------------


def test_on_demand_refresh_saves_the_rotated_tokens(brex, received):
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)

    result = refresh.refresh_connection(connection, min_validity=60)

    after = stored_token(connection)
    assert result.outcome == Outcome.REFRESHED
    assert result.rotated
    # New tokens stored, accepted by Brex; the rotated-out refresh token is dead.
    assert after.access_token != before.access_token
    assert brex.is_access_token_active(after.access_token)
    assert after.refresh_token != before.refresh_token
    assert brex.is_refresh_token_active(after.refresh_token)
    assert not brex.is_refresh_token_active(before.refresh_token)
    now = timezone.now()
    assert close_to(after.access_token_expires_at, now + timedelta(seconds=3600))
    # The chain's start stays; its estimated end is 90 days from this exchange.
    assert after.refresh_token_issued_at == before.refresh_token_issued_at
    assert close_to(after.refresh_token_expires_at, now + timedelta(days=90))
    assert close_to(after.refresh_token_used_at, now)
    assert after.refresh_claimed_until is None and after.refresh_claimed_by == ""
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.ACTIVE
    assert close_to(connection.last_refreshed_at, now)
    assert connection.last_error == ""
    assert event_kinds(connection) == [EventKind.REFRESHED]
    detail = ConnectionEvent.objects.get(connection=connection).detail
    assert "rotated" in detail
    assert_no_secrets([detail], after.access_token, after.refresh_token, before.refresh_token)
    # token_refreshed also passes the scopes before and after (unchanged here).
    assert received["refreshed"] == [
        {"sender": BrexConnection, "connection": connection, "rotated": True,
         "old_scopes": connection.scopes, "new_scopes": connection.scopes,
         "team": None, "signal": signals.token_refreshed}
    ]
    assert received["failed"] == []
    assert brex.stats["token_refresh_token"] == 1
    assert brex.stats["refresh_token_reuse"] == 0

    # Fresh now: asking again does not call Brex.
    again = refresh.refresh_connection(connection, min_validity=60)
    assert again.outcome == Outcome.NOT_DUE
    assert again.token.access_token == after.access_token
    assert brex.stats["token_refresh_token"] == 1


def test_sweep_refreshes_what_is_due_and_nothing_else(brex, received, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SWEEP_BATCH_SIZE": 2}
    expiring = create_connection(brex, expires_in=300)
    expired = create_connection(brex, expires_in=-60)
    idle = create_connection(
        brex, expires_in=3000, refresh_token_used_at=timezone.now() - timedelta(days=61)
    )
    fresh = create_connection(brex, expires_in=3000)
    needs_reauth = create_connection(brex, expires_in=-60, status=ConnectionStatus.NEEDS_REAUTH)
    revoked = create_connection(brex, expires_in=-60, status=ConnectionStatus.REVOKED)
    busy = create_connection(
        brex,
        expires_in=-60,
        refresh_claimed_until=timezone.now() + timedelta(minutes=1),
        refresh_claimed_by="worker-on-another-host",
    )
    inactive = [needs_reauth, revoked]  # left with an access token expiry, unlike the services
    before = {c.pk: stored_token(c) for c in [expiring, expired, idle, fresh, busy, *inactive]}

    batches = list(sweep.batched_due_connection_ids())
    assert batches == [[expired.pk, needs_reauth.pk], [revoked.pk, expiring.pk], [idle.pk]]
    assert BrexToken.objects.due_for_refresh().count() == 4  # the joined query: active only

    queued = tasks.refresh_due_connections.delay().get()

    assert queued == 5
    assert brex.stats["token_refresh_token"] == 3
    assert brex.stats["refresh_token_reuse"] == 0
    for connection in (expiring, expired, idle):
        token = stored_token(connection)
        assert token.refresh_token != before[connection.pk].refresh_token
        assert brex.is_refresh_token_active(token.refresh_token)
        assert not token.is_due_for_refresh()
        assert event_kinds(connection) == [EventKind.REFRESHED]
    for connection in (fresh, busy):
        token = stored_token(connection)
        assert token.access_token == before[connection.pk].access_token
        assert token.refresh_token == before[connection.pk].refresh_token
        assert event_kinds(connection) == []
    assert stored_token(busy).refresh_claimed_by == "worker-on-another-host"
    for connection in inactive:
        # Their tasks found them inactive: Brex not called, the unusable access token wiped.
        token = stored_token(connection)
        assert token.connection.status == connection.status
        assert token.access_token is None and token.access_token_expires_at is None
        assert token.refresh_token == before[connection.pk].refresh_token
        assert event_kinds(connection) == []
    assert sorted(r["connection"].pk for r in received["refreshed"]) == sorted(
        [expiring.pk, expired.pk, idle.pk]
    )
    # A second sweep right after finds nothing to do.
    assert tasks.refresh_due_connections.delay().get() == 0
    assert brex.stats["token_refresh_token"] == 3


def test_sweep_reads_its_ids_one_bounded_batch_at_a_time(brex, settings):
    """The sweep never holds every due id: each batch is one query with a LIMIT, run only
    when the batch before has been used (keyset pagination along each partial index)."""
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "SWEEP_BATCH_SIZE": 2}
    expiring = [create_connection(brex, expires_in=n) for n in (-30, 100, 200, 300, 400)]
    idle = [
        create_connection(
            brex, expires_in=3000, refresh_token_used_at=timezone.now() - timedelta(days=d)
        )
        for d in (62, 61, 63)
    ]
    create_connection(brex, expires_in=3000)  # not due

    batches = sweep.batched_due_connection_ids()
    with CaptureQueriesContext(db_connection) as first:
        assert next(batches) == [expiring[0].pk, expiring[1].pk]
    assert len(first) == 1
    assert "LIMIT 2" in first[0]["sql"]
    with CaptureQueriesContext(db_connection) as rest:
        remaining = list(batches)
    # Soonest expiry first, then the longest unused.
    assert remaining == [
        [expiring[2].pk, expiring[3].pk], [expiring[4].pk], [idle[2].pk, idle[0].pk],
        [idle[1].pk],
    ]
    assert all("LIMIT 2" in query["sql"] for query in rest)


def test_refresh_token_kept_when_brex_does_not_rotate(brex, received):
    brex.rotate_refresh_tokens = False
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)

    result = refresh.refresh_connection(connection)

    after = stored_token(connection)
    assert result.outcome == Outcome.REFRESHED
    assert not result.rotated
    assert after.access_token != before.access_token
    assert after.refresh_token == before.refresh_token
    assert brex.is_refresh_token_active(after.refresh_token)
    assert "kept" in ConnectionEvent.objects.get(connection=connection).detail
    assert [r["rotated"] for r in received["refreshed"]] == [False]
    # And the kept token goes on working.
    BrexToken.objects.filter(pk=connection.pk).update(access_token_expires_at=timezone.now())
    assert refresh.refresh_connection(connection).outcome == Outcome.REFRESHED
    assert stored_token(connection).refresh_token == before.refresh_token
    assert brex.stats["token_refresh_token"] == 2


def test_missing_expires_in_means_one_hour(brex, received):
    brex.include_expires_in = False
    brex.access_token_ttl = 7200
    connection = create_connection(brex, expires_in=30)

    assert refresh.refresh_connection(connection).outcome == Outcome.REFRESHED

    token = stored_token(connection)
    assert close_to(token.access_token_expires_at, timezone.now() + timedelta(seconds=3600))
    assert brex.is_access_token_active(token.access_token)
    assert len(received["refreshed"]) == 1


# Brex refuses the refresh token -----------------------------------------------------------


def test_invalid_grant_marks_needs_reauth_once(brex, received, caplog):
    caplog.set_level(logging.DEBUG)
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)
    brex.revoke_all()  # the customer removed the app at Brex

    result = refresh.refresh_connection(connection)

    assert result.outcome == Outcome.NEEDS_REAUTH
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.NEEDS_REAUTH
    assert "invalid_grant" in connection.last_error
    assert "The refresh token is invalid or expired." in connection.last_error
    token = stored_token(connection)
    assert token.access_token is None and token.access_token_expires_at is None
    assert token.refresh_token == before.refresh_token  # kept for a revocation on disconnect
    assert token.refresh_claimed_by == ""
    assert event_kinds(connection) == [EventKind.NEEDS_REAUTH]
    assert received["failed"] == [
        {
            "sender": BrexConnection,
            "connection": connection,
            "error": "invalid_grant",
            "description": "The refresh token is invalid or expired.",
            "team": None,
            "signal": signals.refresh_failed,
        }
    ]
    assert received["refreshed"] == []

    # No more attempts: not on demand, not from the sweep, not from the task.
    assert refresh.refresh_connection(connection, force=True).outcome == Outcome.NOT_ACTIVE
    assert list(sweep.due_connection_ids()) == []
    assert tasks.refresh_connection.apply(args=[connection.pk]).get() == "not_active"
    assert brex.stats["token_refresh_token"] == 1
    assert len(received["failed"]) == 1
    texts = [connection.last_error, caplog.text,
             *ConnectionEvent.objects.values_list("detail", flat=True)]
    assert_no_secrets(texts, before.access_token, before.refresh_token, brex.client_secret)


def test_refresh_task_does_not_retry_invalid_grant(brex, received):
    connection = create_connection(brex, expires_in=30)
    brex.revoke_all()

    assert tasks.refresh_connection.apply(args=[connection.pk]).get() == "needs_reauth"

    assert brex.stats["token_refresh_token"] == 1
    assert len(received["failed"]) == 1


def test_invalid_client_pauses_refreshing_and_keeps_the_connection_active(
    brex, received, settings
):
    # A wrong client secret is the site's configuration, not the customer's grant: the
    # connection stays active with its tokens (it used to become needs_reauth).
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "CLIENT_SECRET": "not-the-secret"}

    with pytest.raises(RefreshPaused) as caught:
        refresh.refresh_connection(connection)

    assert caught.value.retry_after > 0
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.ACTIVE
    assert "invalid_client" in connection.last_error
    after = stored_token(connection)
    assert after.refresh_token == before.refresh_token
    assert after.access_token == before.access_token
    assert received["failed"] == []


@pytest.mark.parametrize("other_worker_saved_expiry", [True, False])
def test_refused_token_replaced_meanwhile_by_another_worker_is_not_a_failure(
    brex, received, monkeypatch, other_worker_saved_expiry
):
    """Another worker rotated the token and stored the result just before Brex answered
    this one's request with invalid_grant: the connection stays active on the new token."""
    connection = create_connection(brex, expires_in=30)
    first = stored_token(connection)
    real_refresh = oauth.refresh
    sent = []

    def refresh_racing_another_worker(refresh_token, **kwargs):
        sent.append(refresh_token)
        if len(sent) == 1:
            other = real_refresh(refresh_token, **kwargs)
            update = {"access_token": other.access_token, "refresh_token": other.refresh_token}
            if other_worker_saved_expiry:
                update["access_token_expires_at"] = timezone.now() + timedelta(hours=1)
            BrexToken.objects.filter(pk=connection.pk).update(**update)
            brex.fail_next(
                "/v1/token",
                status=400,
                body={"error": "invalid_grant",
                      "error_description": "The refresh token is invalid or expired."},
            )
        return real_refresh(refresh_token, **kwargs)

    monkeypatch.setattr(oauth, "refresh", refresh_racing_another_worker)

    result = refresh.refresh_connection(connection)

    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.ACTIVE
    assert received["failed"] == []
    assert EventKind.NEEDS_REAUTH not in event_kinds(connection)
    token = stored_token(connection)
    assert brex.is_refresh_token_active(token.refresh_token)
    assert brex.is_access_token_active(token.access_token)
    assert brex.stats["refresh_token_reuse"] == 0
    if other_worker_saved_expiry:
        assert result.outcome == Outcome.NOT_DUE
        assert sent == [first.refresh_token]
    else:
        assert result.outcome == Outcome.REFRESHED
        assert len(sent) == 2 and sent[1] != first.refresh_token
        assert event_kinds(connection) == [EventKind.REFRESHED]


# Transient failures ------------------------------------------------------------------------


TRANSIENT = {
    "503": {"status": 503},
    "500": {"status": 500},
    "429": {"status": 429},
    # Brex never processes the request and the answer comes after the client gave up.
    "timeout": {"status": 503, "delay": 1.5},
}


@pytest.mark.parametrize("failure", list(TRANSIENT))
def test_transient_failure_leaves_tokens_alone(brex, received, settings, caplog, failure):
    caplog.set_level(logging.DEBUG)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "HTTP_TIMEOUT": 0.5}
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)
    brex.fail_next("/v1/token", **TRANSIENT[failure])

    with pytest.raises(BrexUnavailable) as caught:
        refresh.refresh_connection(connection)

    after = stored_token(connection)
    assert after.access_token == before.access_token
    assert after.refresh_token == before.refresh_token
    assert after.access_token_expires_at == before.access_token_expires_at
    assert after.refresh_claimed_until is None
    assert brex.is_refresh_token_active(after.refresh_token)
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.ACTIVE
    expected = "Timeout" if failure == "timeout" else f"HTTP {TRANSIENT[failure]['status']}"
    assert expected in connection.last_error
    assert event_kinds(connection) == [EventKind.REFRESH_FAILED]
    assert received["refreshed"] == [] and received["failed"] == []
    texts = [str(caught.value), connection.last_error, caplog.text,
             *ConnectionEvent.objects.values_list("detail", flat=True)]
    assert_no_secrets(texts, before.access_token, before.refresh_token, brex.client_secret)

    # The next attempt succeeds with the same (still valid) refresh token.
    time.sleep(TRANSIENT[failure].get("delay", 0))
    assert refresh.refresh_connection(connection).outcome == Outcome.REFRESHED
    connection.refresh_from_db()
    assert connection.last_error == ""
    assert event_kinds(connection) == [EventKind.REFRESH_FAILED, EventKind.REFRESHED]
    assert len(received["refreshed"]) == 1
    assert brex.stats["refresh_token_reuse"] == 0


def test_unreachable_brex_is_transient(brex, received, settings):
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)
    brex.stop()
    try:
        with pytest.raises(BrexUnavailable):
            refresh.refresh_connection(connection)
    finally:
        brex.start()
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.ACTIVE
    assert connection.last_error
    assert stored_token(connection).refresh_token == before.refresh_token
    assert event_kinds(connection) == [EventKind.REFRESH_FAILED]


# The claim --------------------------------------------------------------------------------


def test_sweep_mode_skips_a_connection_another_worker_is_refreshing(brex):
    connection = create_connection(
        brex,
        expires_in=30,
        refresh_claimed_until=timezone.now() + timedelta(minutes=1),
        refresh_claimed_by="worker-on-another-host",
    )

    result = refresh.refresh_connection(connection, wait=False)

    assert result.outcome == Outcome.BUSY
    assert brex.stats["token_refresh_token"] == 0
    assert stored_token(connection).refresh_claimed_by == "worker-on-another-host"
    assert tasks.refresh_connection.apply(args=[connection.pk]).get() == "busy"


def test_claim_of_a_dead_worker_expires_and_is_taken_over(brex, received):
    connection = create_connection(brex, expires_in=30)
    claimant = "host-that-died:4242:1:deadbeef"
    assert lease.claim(connection.pk, claimant)
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_claimed_until=timezone.now() + timedelta(seconds=1)
    )
    assert not lease.claim(connection.pk, "someone-else")

    started = time.monotonic()
    result = refresh.refresh_connection(connection, min_validity=60)  # waits, on demand

    assert time.monotonic() - started >= 0.5
    assert result.outcome == Outcome.REFRESHED
    token = stored_token(connection)
    assert token.refresh_claimed_by == "" and token.refresh_claimed_until is None
    assert brex.is_refresh_token_active(token.refresh_token)
    assert len(received["refreshed"]) == 1


def test_claim_expires_in_reads_the_claim_by_the_databases_clock(brex):
    connection = create_connection(brex, expires_in=30)
    assert lease.claim_expires_in(connection.pk) == 0
    assert lease.claim(connection.pk, "a-worker")
    length = lease.lease_seconds()
    assert length - 5 < lease.claim_expires_in(connection.pk) <= length
    lease.release_claim(connection.pk, "a-worker")
    assert lease.claim_expires_in(connection.pk) == 0


def test_a_redelivered_task_that_finds_the_claim_held_comes_back_when_it_ends(
    brex, monkeypatch
):
    # The task of a worker that died mid-refresh is delivered again: it finds the dead
    # worker's claim and is sent again for when that claim runs out.
    connection = create_connection(brex, expires_in=30)
    assert lease.claim(connection.pk, "host-that-died:4242:1:deadbeef")
    sent = []
    monkeypatch.setattr(
        tasks.refresh_connection, "apply_async", lambda *a, **kw: sent.append((a, kw))
    )
    task = tasks.refresh_connection
    task.push_request(delivery_info={"redelivered": True}, retries=0)
    try:
        assert task.run(connection.pk) == "busy"
    finally:
        task.pop_request()
    [(args, options)] = sent
    assert args == ((connection.pk,), {"force": False})
    assert lease.lease_seconds() - 5 < options["countdown"] <= lease.lease_seconds() + 0.5
    # A first delivery that finds the claim held leaves it to the claim's holder.
    assert tasks.refresh_connection.apply(args=[connection.pk]).get() == "busy"
    assert len(sent) == 1


def test_disconnected_during_refresh_keeps_no_tokens(brex, received, monkeypatch):
    connection = create_connection(brex, expires_in=30)
    before = stored_token(connection)
    real_refresh = oauth.refresh
    issued = []

    def refresh_while_disconnecting(refresh_token, **kwargs):
        answer = real_refresh(refresh_token, **kwargs)
        issued.append(answer.refresh_token)
        BrexConnection.objects.filter(pk=connection.pk).update(status=ConnectionStatus.REVOKED)
        return answer

    monkeypatch.setattr(oauth, "refresh", refresh_while_disconnecting)

    result = refresh.refresh_connection(connection)

    assert result.outcome == Outcome.NOT_ACTIVE
    assert stored_token(connection).refresh_token == before.refresh_token
    assert not brex.is_refresh_token_active(issued[0])  # revoked at Brex after commit
    assert received["refreshed"] == []
    # The discarded answer is on the record, for staff.
    assert event_kinds(connection) == [EventKind.REFRESH_DISCARDED]


def test_a_save_that_loses_to_another_writer_changes_nothing(brex, received, monkeypatch):
    # Another writer replaces the tokens while Brex answers: the save must write all or
    # nothing, so the connection's row keeps what that writer left.
    connection = create_connection(brex, expires_in=30)
    real_refresh = oauth.refresh

    def refresh_while_another_saves(refresh_token, **kwargs):
        answer = real_refresh(refresh_token, **kwargs)
        BrexToken.objects.filter(pk=connection.pk).update(generation=F("generation") + 1)
        BrexConnection.objects.filter(pk=connection.pk).update(
            last_error="left by the other writer", granted_scopes="openid users.readonly"
        )
        return answer

    monkeypatch.setattr(oauth, "refresh", refresh_while_another_saves)

    result = refresh.refresh_connection(connection)

    assert result.outcome == Outcome.NOT_DUE
    row = BrexConnection.objects.get(pk=connection.pk)
    assert row.last_error == "left by the other writer"
    assert row.granted_scopes == "openid users.readonly"
    assert row.last_refreshed_at == connection.last_refreshed_at
    assert event_kinds(connection) == [EventKind.REFRESH_DISCARDED]
    assert received["refreshed"] == []


# The management command --------------------------------------------------------------------


class TerminalIO(io.StringIO):
    def isatty(self):
        return True


def test_command_refreshes_what_is_due_and_reports(brex):
    due = [create_connection(brex, expires_in=60) for _ in range(2)]
    fresh = create_connection(brex, expires_in=3000)
    out = io.StringIO()

    call_command("brex_oauth_refresh", stdout=out)

    assert "Due connections: 2" in out.getvalue()
    assert "refreshed 2, skipped 0, failed 0, needs re-auth 0" in out.getvalue()
    assert brex.stats["token_refresh_token"] == 2
    for connection in due:
        assert event_kinds(connection) == [EventKind.REFRESHED]
    assert event_kinds(fresh) == []

    out = io.StringIO()
    call_command("brex_oauth_refresh", "--all", stdout=out)
    assert "All active connections: 3" in out.getvalue()
    assert "refreshed 3, skipped 0, failed 0, needs re-auth 0" in out.getvalue()
    assert brex.stats["token_refresh_token"] == 5
    assert event_kinds(fresh) == [EventKind.REFRESHED]


def test_a_token_stored_under_another_key_does_not_stop_the_command(
    brex, settings, caplog
):
    readable = create_connection(brex, expires_in=60)
    key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": "a-key-since-lost"}
    unreadable = create_connection(brex, expires_in=-5)  # the most urgent: read first
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": key}

    out = io.StringIO()
    call_command("brex_oauth_refresh", stdout=out)

    # The unreadable one needs its customer now (nothing to retry), and the rest go on.
    assert "refreshed 1, skipped 0, failed 0, needs re-auth 1" in out.getvalue()
    assert event_kinds(readable) == [EventKind.REFRESHED]
    assert event_kinds(unreadable) == [EventKind.NEEDS_REAUTH]
    unreadable.refresh_from_db()
    assert unreadable.status == ConnectionStatus.NEEDS_REAUTH
    assert (
        f"Brex connection {unreadable.pk} needs re-authorization: The stored Brex tokens "
        "cannot be decrypted"
    ) in caplog.text


def test_command_counts_failures_and_shows_progress_on_a_terminal(brex):
    create_connection(brex, expires_in=-5)  # the most urgent: meets the 503 below
    create_connection(brex, expires_in=60)
    refused = create_connection(brex, expires_in=120)
    oauth.revoke(stored_token(refused).refresh_token)  # this customer removed the app
    create_connection(brex, expires_in=-60, refresh_claimed_by="elsewhere",
                      refresh_claimed_until=timezone.now() + timedelta(minutes=1))
    brex.fail_next("/v1/token", status=503)
    out = TerminalIO()

    with pytest.raises(CommandError, match="1 refresh"):  # a non-zero exit for cron
        call_command("brex_oauth_refresh", stdout=out)

    text = out.getvalue()
    assert "\r[1/3]" in text and "\r[3/3]" in text
    assert "refreshed 1, skipped 0, failed 1, needs re-auth 1" in text
    refused.refresh_from_db()
    assert refused.status == ConnectionStatus.NEEDS_REAUTH


# The sweep's query ---------------------------------------------------------------------------


def test_sweep_query_is_answered_by_the_partial_indexes(user):
    """The plan shape at 40,000 connections (benchmarks/sweep_index.py shows a million)."""
    require_postgres()
    with db_connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO brex_oauth_brexconnection
                (owner_id, environment, brex_user_id, brex_user_email, brex_company_id,
                 brex_company_name, granted_scopes, status, connected_at, updated_at,
                 revocation_status, revocation_attempts, last_error)
            SELECT %s, 'production', 'cuuser_' || g, '', '', '', '', 'active', now(), now(),
                   '', 0, ''
            FROM generate_series(1, 40000) AS g;
            """,
            [user.pk],
        )
        cursor.execute(
            """
            INSERT INTO brex_oauth_brextoken
                (connection_id, access_token, refresh_token, token_type,
                 access_token_expires_at, refresh_token_used_at, refresh_claimed_by, updated_at)
            SELECT id, '\\x00'::bytea, '\\x00'::bytea, 'Bearer',
                   now() + interval '10 minutes' + random() * interval '50 minutes',
                   now() - random() * interval '60 minutes', '', now()
            FROM brex_oauth_brexconnection;
            """
        )
        cursor.execute("ANALYZE brex_oauth_brexconnection, brex_oauth_brextoken")
    now = timezone.now() + timedelta(minutes=1)  # the next sweep, a minute later

    plan = (
        BrexToken.objects.refresh_candidates(now)
        .unclaimed(now)
        .order_by("access_token_expires_at")
        .values_list("connection_id", flat=True)
        .explain()
    )

    assert "Bitmap Index Scan on brex_oauth_token_due" in plan
    assert "Bitmap Index Scan on brex_oauth_token_idle" in plan
    assert "Seq Scan" not in plan


def test_required_scopes_given_as_a_string_fail_loudly_and_mark_nothing(
    brex, settings, received
):
    # "users.readonly" as a string would require each of its letters, and mark every
    # connection needs_reauth: the refresh refuses the setting instead.
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "REQUIRED_API_SCOPES": "users.readonly"}
    connection = create_connection(brex, expires_in=30)

    with pytest.raises(BrexOAuthConfigurationError, match="REQUIRED_API_SCOPES"):
        refresh.refresh_connection(connection, min_validity=60)

    # Before anything was sent to Brex: the stored refresh token is still the live one.
    assert brex.stats["token_refresh_token"] == 0
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.ACTIVE
    assert received["failed"] == []
