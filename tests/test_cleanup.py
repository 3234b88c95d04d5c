"""Cleanup: expired authorization requests and old events are pruned; pending revocations
are retried by the command for sites without Celery."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from django_brex_oauth import oauth, tasks
from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
)
from django_brex_oauth.services.revoke import disconnect
from django_brex_oauth.testing.factories import make_connection

pytestmark = pytest.mark.django_db(transaction=True)


def authorization(user, *, expired_for: timedelta | None = None, consumed: bool = False):
    """An authorization request that expires in ten minutes, or expired ``expired_for`` ago."""
    now = timezone.now()
    expires_at = now + timedelta(minutes=10) if expired_for is None else now - expired_for
    return AuthorizationRequest.objects.create(
        state=oauth.new_state(),
        user=user,
        environment="staging",
        code_verifier=oauth.new_code_verifier(),
        nonce=oauth.new_nonce(),
        redirect_uri="http://testserver/brex/callback/",
        requested_scopes="openid offline_access users.readonly",
        created_at=expires_at - timedelta(minutes=10),
        expires_at=expires_at,
        consumed_at=now if consumed else None,
    )


def event(connection, *, age: timedelta, kind: str = "connected") -> ConnectionEvent:
    return ConnectionEvent.objects.create(
        connection=connection, kind=kind, created_at=timezone.now() - age
    )


@pytest.fixture
def rows(user):
    connection = make_connection(user)
    return {
        "pending": authorization(user),
        "used": authorization(user, consumed=True),
        # Just expired: kept a while, so a late return from Brex is told it expired.
        "just_expired": authorization(user, expired_for=timedelta(minutes=5)),
        "expired": authorization(user, expired_for=timedelta(hours=2)),
        "expired_used": authorization(user, expired_for=timedelta(days=3), consumed=True),
        "recent_event": event(connection, age=timedelta(days=30)),
        "old_event": event(connection, age=timedelta(days=366)),
        "older_event": event(connection, age=timedelta(days=800)),
        "connection": connection,
    }


def remaining(rows) -> set[str]:
    left = set()
    for name, row in rows.items():
        if row.__class__.objects.filter(pk=row.pk).exists():
            left.add(name)
    return left


def test_the_prune_task_deletes_expired_requests_and_old_events(rows):
    result = tasks.prune.delay().get()
    assert result == {"authorization_requests": 2, "events": 2, "webhook_events": 0}
    assert remaining(rows) == {"pending", "used", "just_expired", "recent_event", "connection"}
    # Nothing else is touched: the connection keeps its tokens.
    assert BrexToken.objects.get(pk=rows["connection"].pk).refresh_token


def test_the_retention_period_is_a_setting(rows, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "EVENT_RETENTION_DAYS": 7}
    assert tasks.prune.delay().get()["events"] == 3
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "EVENT_RETENTION_DAYS": None}
    event(rows["connection"], age=timedelta(days=5000))
    assert tasks.prune.delay().get()["events"] == 0
    assert ConnectionEvent.objects.count() == 1


def test_routine_refresh_events_are_kept_a_shorter_time(user, settings):
    connection = make_connection(user)
    kept = [
        event(connection, age=timedelta(days=29), kind="refreshed"),
        event(connection, age=timedelta(days=200), kind="refresh_failed"),
        event(connection, age=timedelta(days=200), kind="connected"),
    ]
    pruned = event(connection, age=timedelta(days=31), kind="refreshed")
    assert tasks.prune.delay().get()["events"] == 1
    assert not ConnectionEvent.objects.filter(pk=pruned.pk).exists()
    assert ConnectionEvent.objects.filter(pk__in=[e.pk for e in kept]).count() == 3

    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "REFRESH_EVENT_RETENTION_DAYS": None}
    event(connection, age=timedelta(days=300), kind="refreshed")
    assert tasks.prune.delay().get()["events"] == 0
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "EVENT_RETENTION_DAYS": None,
                           "REFRESH_EVENT_RETENTION_DAYS": 7}
    assert tasks.prune.delay().get()["events"] == 2  # the 29- and 300-day refreshes


def test_the_command_prunes_and_says_so(rows):
    out = io.StringIO()
    call_command("brex_oauth_cleanup", "--dry-run", stdout=out)
    assert "Would delete 2 expired authorization request(s) and 2 old event(s)." in out.getvalue()
    assert "Would retry 0 pending revocation(s) at Brex." in out.getvalue()
    assert len(remaining(rows)) == len(rows)

    out = io.StringIO()
    call_command("brex_oauth_cleanup", stdout=out)
    assert "Deleted 2 expired authorization request(s) and 2 old event(s)." in out.getvalue()
    assert remaining(rows) == {"pending", "used", "just_expired", "recent_event", "connection"}


def test_the_command_prunes_in_batches(user, monkeypatch):
    from django_brex_oauth.services import cleanup

    monkeypatch.setattr(cleanup, "BATCH_SIZE", 3)
    connection = make_connection(user)
    for _ in range(10):
        event(connection, age=timedelta(days=400))
    event(connection, age=timedelta(days=1))
    assert cleanup.prune().events == 10
    assert ConnectionEvent.objects.count() == 1


def test_the_command_retries_pending_revocations_for_sites_without_celery(
    user, fake_brex, brex_settings
):
    connection = make_connection(user, fake=fake_brex)
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token
    fake_brex.fail_next("/v1/revoke", status=503)
    disconnect(connection, actor=user, queue_retry=False)
    assert fake_brex.is_refresh_token_active(refresh_token)
    BrexConnection.objects.filter(pk=connection.pk).update(
        revocation_attempted_at=timezone.now() - timedelta(hours=1)
    )

    out = io.StringIO()
    call_command("brex_oauth_cleanup", "--dry-run", stdout=out)
    assert "Would retry 1 pending revocation(s) at Brex." in out.getvalue()
    assert fake_brex.is_refresh_token_active(refresh_token)

    out = io.StringIO()
    call_command("brex_oauth_cleanup", stdout=out)
    assert "Pending revocations: 1; revoked at Brex 1, failed 0, skipped 0." in out.getvalue()
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert BrexConnection.objects.get(pk=connection.pk).revocation_status == "done"

    out = io.StringIO()
    call_command("brex_oauth_cleanup", "--skip-revocations", stdout=out)
    assert "Pending revocations" not in out.getvalue()
