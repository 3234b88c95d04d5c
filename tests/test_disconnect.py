"""Disconnecting: the user's pages, revocation at Brex, and retries while Brex is down."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
import requests
from celery import signals as celery_signals
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_brex_oauth import signals, tasks
from django_brex_oauth.models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    RevocationStatus,
)
from django_brex_oauth.services.revoke import (
    RevokeOutcome,
    disconnect,
    pending_revocation_ids,
    revoke_at_brex,
)
from django_brex_oauth.testing.factories import make_connection
from tests.factories import SignalRecorder

pytestmark = pytest.mark.django_db(transaction=True)

CONNECTIONS_URL = "/brex/connections/"


def disconnect_url(connection) -> str:
    return reverse("brex_oauth:disconnect", args=[connection.pk])


def confirm_url(connection) -> str:
    return reverse("brex_oauth:disconnect_confirm", args=[connection.pk])


def kinds(connection) -> list[str]:
    return list(
        ConnectionEvent.objects.filter(connection=connection)
        .order_by("created_at", "pk")
        .values_list("kind", flat=True)
    )


def revoke_requests(fake) -> list[dict]:
    return [r for r in fake.requests if r["path"].endswith("/v1/revoke")]


def refresh_at_brex(fake, refresh_token: str) -> requests.Response:
    """A refresh request sent straight to the fake's token endpoint."""
    return requests.post(
        fake.issuer + "/v1/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
        },
        timeout=5,
    )


@pytest.fixture
def connection(user, fake_brex, brex_settings):
    return make_connection(user, fake=fake_brex)


@pytest.fixture
def tokens(connection):
    token = BrexToken.objects.get(pk=connection.pk)
    return token.access_token, token.refresh_token


@pytest.fixture
def retry_delays():
    """Countdowns of every Celery task retry (eager retries run at once, but say when)."""
    delays: list[float] = []

    def record(sender=None, reason=None, **kwargs):
        delays.append(reason.when)

    celery_signals.task_retry.connect(record, weak=False)
    yield delays
    celery_signals.task_retry.disconnect(record)


def test_disconnect_revokes_the_refresh_token_at_brex(
    user_client, user, connection, tokens, fake_brex
):
    access_token, refresh_token = tokens
    confirm = user_client.get(confirm_url(connection) + "?next=/dashboard/")
    assert confirm.status_code == 200
    page = confirm.content.decode()
    assert f'action="{disconnect_url(connection)}"' in page
    assert 'method="post"' in page
    assert "csrfmiddlewaretoken" in page
    assert '<button type="submit" class="button danger">Disconnect</button>' in page
    assert 'name="next" value="/dashboard/"' in page

    with SignalRecorder(disconnected=signals.disconnected) as received:
        response = user_client.post(disconnect_url(connection), {"next": "/dashboard/"})

    assert response.status_code == 302
    assert response["Location"] == "/dashboard/"
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.REVOKED
    assert connection.revocation_status == RevocationStatus.DONE
    assert connection.revoked_at is not None
    assert connection.revocation_attempts == 1
    token = BrexToken.objects.get(pk=connection.pk)
    assert token.access_token is None and token.refresh_token is None
    assert token.access_token_expires_at is None

    # Brex was asked the RFC 7009 way, and no longer honours the tokens.
    [sent] = revoke_requests(fake_brex)
    assert sent["method"] == "POST"
    assert sent["headers"]["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert sent["form"] == {
        "token": refresh_token,
        "token_type_hint": "refresh_token",
        "client_id": fake_brex.client_id,
        "client_secret": fake_brex.client_secret,
    }
    assert fake_brex.stats["revocations"] == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert not fake_brex.is_access_token_active(access_token)
    refused = refresh_at_brex(fake_brex, refresh_token)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"

    assert kinds(connection) == ["disconnected", "revoked"]
    event = ConnectionEvent.objects.get(connection=connection, kind="disconnected")
    assert event.actor == user
    assert len(received["disconnected"]) == 1
    sent_signal = received["disconnected"][0]
    assert sent_signal["sender"] is BrexConnection
    assert sent_signal["connection"].pk == connection.pk
    assert sent_signal["actor"] == user
    assert sent_signal["revoked_at_brex"] is True

    listing = user_client.get(CONNECTIONS_URL).content.decode()
    assert "is disconnected, and Brex has revoked this site&#x27;s access to it." in listing


def test_disconnect_goes_to_the_connections_page_by_default(user_client, connection):
    response = user_client.post(disconnect_url(connection))
    assert response.status_code == 302
    assert response["Location"] == CONNECTIONS_URL


def test_an_unsafe_next_is_ignored(user_client, connection):
    response = user_client.post(disconnect_url(connection), {"next": "https://evil.example/"})
    assert response["Location"] == CONNECTIONS_URL


def test_disconnect_while_brex_is_down_is_local_at_once_then_retried_by_the_task(
    user_client, user, connection, tokens, fake_brex, brex_settings, retry_delays, caplog
):
    caplog.set_level(logging.DEBUG)
    access_token, refresh_token = tokens
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH, "REVOKE_RETRY_BACKOFF": 10, "REVOKE_RETRY_BACKOFF_MAX": 25,
    }
    fake_brex.fail_next("/v1/revoke", status=503, times=3)
    at_signal = {}

    def snapshot(sender, connection, **kwargs):
        row = BrexConnection.objects.get(pk=connection.pk)
        token = BrexToken.objects.get(pk=connection.pk)
        at_signal.update(
            status=row.status,
            revocation=row.revocation_status,
            access_token=token.access_token,
            refresh_token_kept=token.refresh_token == refresh_token,
            brex_still_honours_it=fake_brex.is_refresh_token_active(refresh_token),
            revoke_calls=len(revoke_requests(fake_brex)),
        )

    signals.disconnected.connect(snapshot, weak=False, dispatch_uid="snapshot")
    try:
        with SignalRecorder(disconnected=signals.disconnected) as received:
            response = user_client.post(disconnect_url(connection))
    finally:
        signals.disconnected.disconnect(dispatch_uid="snapshot")
    assert response.status_code == 302

    # When the partner heard of it, the connection was already out of use, Brex had
    # answered 503 once, and the refresh token was kept to send again.
    assert at_signal == {
        "status": "revoked",
        "revocation": "pending",
        "access_token": None,
        "refresh_token_kept": True,
        "brex_still_honours_it": True,
        "revoke_calls": 1,
    }
    assert len(received["disconnected"]) == 1
    assert received["disconnected"][0]["revoked_at_brex"] is False

    # The task tried three more times with growing, jittered delays; the last try worked.
    assert len(revoke_requests(fake_brex)) == 4
    assert [r["status"] for r in revoke_requests(fake_brex)] == [503, 503, 503, 200]
    assert len(retry_delays) == 2
    assert 10 <= retry_delays[0] <= 20  # ceiling 2 * base, drawn from its upper half
    assert 12.5 <= retry_delays[1] <= 25  # ceiling 4 * base, capped at 25
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.REVOKED
    assert connection.revocation_status == RevocationStatus.DONE
    assert connection.revocation_attempts == 4
    assert connection.last_error == ""
    assert BrexToken.objects.get(pk=connection.pk).refresh_token is None
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert kinds(connection) == [
        "disconnected", "revoke_failed", "revoke_failed", "revoke_failed", "revoked"
    ]
    details = list(ConnectionEvent.objects.values_list("detail", flat=True))
    assert any("attempt 2" in d and "503" in d for d in details)
    assert all(refresh_token not in d and access_token not in d for d in details)
    # Every try was logged, and no log record holds a secret.
    assert "Revoking Brex connection" in caplog.text and "(attempt 3)" in caplog.text
    for secret in (refresh_token, access_token, fake_brex.client_secret):
        assert secret not in caplog.text


def test_revocation_retries_are_bounded_and_the_sweep_picks_up_the_rest(
    user, connection, tokens, fake_brex, brex_settings, retry_delays
):
    _access_token, refresh_token = tokens
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REVOKE_TASK_MAX_RETRIES": 2}
    fake_brex.fail_next("/v1/revoke", status=503, times=100)

    result = disconnect(connection, actor=user)

    assert result.disconnected and result.retry_queued
    assert not result.revoked_at_brex
    assert result.attempt.outcome == RevokeOutcome.FAILED
    # One try inline, then the task's first run and its two retries; then it stops.
    assert len(revoke_requests(fake_brex)) == 4
    assert len(retry_delays) == 2
    connection.refresh_from_db()
    assert connection.status == ConnectionStatus.REVOKED
    assert connection.revocation_status == RevocationStatus.PENDING
    assert "Revocation at Brex failed (attempt 4)" in connection.last_error
    assert BrexToken.objects.get(pk=connection.pk).refresh_token == refresh_token
    assert fake_brex.is_refresh_token_active(refresh_token)

    # The sweep leaves alone a revocation tried moments ago (a retry may be on its way)...
    fake_brex.clear_failures()
    assert list(pending_revocation_ids()) == []
    assert tasks.sweep_revocations.delay().get() == 0
    # ... and takes it up once it has been quiet for REVOKE_RETRY_BACKOFF_MAX.
    BrexConnection.objects.filter(pk=connection.pk).update(
        revocation_attempted_at=timezone.now() - timedelta(hours=1)
    )
    assert tasks.sweep_revocations.delay().get() == 1

    connection.refresh_from_db()
    assert connection.revocation_status == RevocationStatus.DONE
    assert connection.revocation_attempts == 5
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert kinds(connection).count("revoke_failed") == 4
    assert kinds(connection)[-1] == "revoked"


def test_a_lost_task_is_recovered_by_the_sweep(user, connection, tokens, fake_brex):
    _access_token, refresh_token = tokens
    fake_brex.fail_next("/v1/revoke", status=502)
    # As if the broker had dropped the retry: nothing is queued.
    result = disconnect(connection, actor=user, queue_retry=False)
    assert not result.retry_queued
    assert list(pending_revocation_ids()) == []
    assert list(pending_revocation_ids(timezone.now() + timedelta(hours=1))) == [connection.pk]

    BrexConnection.objects.filter(pk=connection.pk).update(revocation_attempted_at=None)
    assert tasks.sweep_revocations.delay().get() == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert BrexConnection.objects.get(pk=connection.pk).revocation_status == "done"


def test_a_refused_revocation_is_recorded_and_left_to_the_sweep(
    user, connection, tokens, fake_brex, retry_delays
):
    _access_token, refresh_token = tokens
    fake_brex.fail_next("/v1/revoke", status=401, body={"error": "invalid_client"})

    result = disconnect(connection, actor=user)

    # invalid_client is no passing outage: no task hammers Brex with it.
    assert result.attempt.outcome == RevokeOutcome.FAILED
    assert not result.attempt.retryable
    assert not result.retry_queued
    assert retry_delays == []
    assert len(revoke_requests(fake_brex)) == 1
    row = BrexConnection.objects.get(pk=connection.pk)
    assert row.status == ConnectionStatus.REVOKED
    assert row.revocation_status == RevocationStatus.PENDING
    assert "invalid_client" in row.last_error
    assert fake_brex.client_secret not in row.last_error
    assert kinds(connection) == ["disconnected", "revoke_failed"]
    assert fake_brex.is_refresh_token_active(refresh_token)

    # Once the credentials are right again, the sweep finishes the job.
    BrexConnection.objects.filter(pk=connection.pk).update(
        revocation_attempted_at=timezone.now() - timedelta(hours=1)
    )
    assert tasks.sweep_revocations.delay().get() == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert kinds(connection) == ["disconnected", "revoke_failed", "revoked"]


def test_disconnecting_twice_is_harmless(user_client, connection, tokens, fake_brex):
    with SignalRecorder(disconnected=signals.disconnected) as received:
        first = user_client.post(disconnect_url(connection))
        second = user_client.post(disconnect_url(connection))
        again = disconnect(connection)

    assert first.status_code == second.status_code == 302
    assert not again.disconnected
    assert again.attempt.outcome == RevokeOutcome.NOT_PENDING
    assert revoke_at_brex(connection).outcome == RevokeOutcome.NOT_PENDING
    assert len(received["disconnected"]) == 1
    assert fake_brex.stats["revocations"] == 1
    assert kinds(connection) == ["disconnected", "revoked"]
    page = user_client.get(CONNECTIONS_URL).content.decode()
    assert "was already disconnected." in page
    confirm = user_client.get(confirm_url(connection)).content.decode()
    assert "is already disconnected" in confirm
    assert 'method="post"' not in confirm


def test_disconnecting_again_while_pending_tries_brex_once_more_without_a_second_signal(
    user, connection, tokens, fake_brex
):
    _access_token, refresh_token = tokens
    fake_brex.fail_next("/v1/revoke", status=503)
    with SignalRecorder(disconnected=signals.disconnected) as received:
        first = disconnect(connection, actor=user, queue_retry=False)
        second = disconnect(connection, actor=user)
    assert first.disconnected and not first.revoked_at_brex
    assert not second.disconnected and second.revoked_at_brex
    assert len(received["disconnected"]) == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert kinds(connection) == ["disconnected", "revoke_failed", "revoked"]


def test_a_connection_needing_reauthorization_is_still_revoked_at_brex(
    user_client, user, fake_brex, brex_settings
):
    connection = make_connection(user, fake=fake_brex, status="needs_reauth")
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token
    assert user_client.post(disconnect_url(connection)).status_code == 302
    assert [r["form"]["token"] for r in revoke_requests(fake_brex)] == [refresh_token]
    assert BrexConnection.objects.get(pk=connection.pk).revocation_status == "done"


def test_reconnecting_while_a_revocation_is_pending_keeps_the_new_tokens(
    flow, user, connection, tokens, fake_brex
):
    fake_brex.fail_next("/v1/revoke", status=503)
    disconnect(connection, actor=user, queue_retry=False)
    assert flow.connect().status_code == 302  # the same Brex user connects again

    reconnected = BrexConnection.objects.get(pk=connection.pk)
    assert reconnected.status == ConnectionStatus.ACTIVE
    new = BrexToken.objects.get(pk=connection.pk)
    assert revoke_at_brex(connection).outcome == RevokeOutcome.NOT_PENDING
    assert tasks.revoke_connection.delay(connection.pk).get() == "not_pending"
    assert fake_brex.is_refresh_token_active(new.refresh_token)
    assert BrexToken.objects.get(pk=connection.pk).refresh_token == new.refresh_token
    assert list(pending_revocation_ids(timezone.now() + timedelta(days=1))) == []


def test_a_refresh_token_past_its_estimated_end_is_still_revoked_at_brex(
    user, connection, fake_brex
):
    # The stored end date is the app's estimate; only Brex knows whether the grant lives.
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_token_expires_at=timezone.now() - timedelta(minutes=1)
    )
    result = disconnect(connection, actor=user)
    assert result.revoked_at_brex
    assert len(revoke_requests(fake_brex)) == 1
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert BrexToken.objects.get(pk=connection.pk).refresh_token is None


# Who may disconnect ------------------------------------------------------------------------


def test_another_user_cannot_disconnect_or_see_the_confirmation(
    client, other_user, connection, tokens, fake_brex
):
    client.force_login(other_user)
    assert client.post(disconnect_url(connection)).status_code == 403
    assert client.get(confirm_url(connection)).status_code == 403
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.ACTIVE
    assert revoke_requests(fake_brex) == []
    assert fake_brex.is_refresh_token_active(tokens[1])


def test_staff_need_the_revoke_permission(client, django_user_model, connection, fake_brex):
    clerk = django_user_model.objects.create_user("clerk", "clerk@example.com", "pw",
                                                  is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="change_brexconnection"))
    client.force_login(clerk)
    assert client.post(disconnect_url(connection)).status_code == 403

    clerk.user_permissions.add(Permission.objects.get(codename="revoke_brexconnection"))
    clerk = django_user_model.objects.get(pk=clerk.pk)  # drop the permission cache
    client.force_login(clerk)
    assert client.get(confirm_url(connection)).status_code == 200
    assert client.post(disconnect_url(connection)).status_code == 302
    row = BrexConnection.objects.get(pk=connection.pk)
    assert row.status == ConnectionStatus.REVOKED
    assert ConnectionEvent.objects.get(connection=row, kind="disconnected").actor == clerk


def test_get_on_disconnect_is_not_allowed(user_client, connection):
    response = user_client.get(disconnect_url(connection))
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.ACTIVE


def test_disconnect_requires_the_csrf_token(user, connection):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(disconnect_url(connection)).status_code == 403
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.ACTIVE

    page = client.get(confirm_url(connection)).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post(disconnect_url(connection), {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.REVOKED


def test_signed_out_people_are_sent_to_sign_in(client, connection):
    for response in (client.post(disconnect_url(connection)), client.get(CONNECTIONS_URL),
                     client.get(confirm_url(connection))):
        assert response.status_code == 302
        assert response["Location"].startswith("/login/?next=")
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.ACTIVE


def test_an_unknown_connection_is_not_found(user_client):
    assert user_client.post(reverse("brex_oauth:disconnect", args=[999999])).status_code == 404


# The connections page ----------------------------------------------------------------------


def test_the_connections_page_lists_only_the_users_own_connections(
    user_client, user, other_user, fake_brex, brex_settings
):
    active = make_connection(user, fake=fake_brex)
    broken = make_connection(user, fake=fake_brex, status="needs_reauth",
                             brex_user="grace.hopper@example.com",
                             scopes=["users.readonly"])
    gone = make_connection(user, fake=fake_brex, status="revoked",
                           brex_user="alan.turing@example.com")
    theirs = make_connection(other_user, fake=fake_brex,
                             brex_user="katherine.johnson@example.com")

    response = user_client.get(CONNECTIONS_URL)
    assert response.status_code == 200
    page = response.content.decode()
    assert "<h1" in page and "Brex connections" in page
    assert '<th scope="col">Environment</th>' in page

    def row(connection) -> str:
        match = re.search(
            rf'<tr id="brex-connection-{connection.pk}">(.*?)</tr>', page, re.S
        )
        assert match, f"no row for connection {connection.pk}"
        return match.group(1)

    assert f'id="brex-connection-{theirs.pk}"' not in page
    assert "katherine.johnson@example.com" not in page

    first = row(active)
    assert "Acme Rockets, Inc." in first
    assert "Staging" in first
    assert "<code>users.readonly</code>, <code>companies.readonly</code>" in first
    assert "Active" in first
    assert f'datetime="{active.connected_at.isoformat()}"' in first
    assert f'href="{confirm_url(active)}?next=%2Fbrex%2Fconnections%2F"' in first
    assert "Reconnect" not in first

    second = row(broken)
    assert "Needs re-authorization" in second
    assert "<code>users.readonly</code>" in second
    assert "/brex/connect/?force_login=1&amp;next=%2Fbrex%2Fconnections%2F" in second
    assert "Reconnect" in second

    third = row(gone)
    assert "Revoked" in third
    assert "Disconnect" not in third
    # A revoked connection is reconnected as one Brex no longer accepts.
    assert "/brex/connect/?force_login=1&amp;next=%2Fbrex%2Fconnections%2F" in third
    assert "Reconnect" in third

    assert 'href="/brex/connect/?next=%2Fbrex%2Fconnections%2F"' in page


def test_the_connections_page_invites_a_first_connection(user_client):
    page = user_client.get(CONNECTIONS_URL).content.decode()
    assert "You have not connected a Brex account yet." in page
    assert ">Connect Brex</a>" in page


def test_connecting_lands_on_the_connections_page(flow):
    response = flow.connect()
    assert response.status_code == 302
    assert response["Location"] == CONNECTIONS_URL
    page = flow.client.get(CONNECTIONS_URL).content.decode()
    assert "is connected." in page


def test_the_signal_carries_the_connection_as_brex_left_it(user, connection, fake_brex):
    seen = []

    def receiver(sender, connection, revoked_at_brex, **kwargs):
        seen.append((revoked_at_brex, connection.status, connection.revocation_status))

    signals.disconnected.connect(receiver, weak=False, dispatch_uid="seen")
    try:
        disconnect(connection, actor=user)
    finally:
        signals.disconnected.disconnect(dispatch_uid="seen")
    assert seen == [(True, ConnectionStatus.REVOKED, RevocationStatus.DONE)]


def test_a_receiver_that_raises_does_not_stop_the_retry(user, connection, tokens, fake_brex):
    _, refresh_token = tokens
    fake_brex.fail_next("/v1/revoke", status=503)

    def broken_receiver(sender, **kwargs):
        raise RuntimeError("the partner's receiver is broken")

    signals.disconnected.connect(broken_receiver, weak=False, dispatch_uid="broken")
    try:
        with pytest.raises(RuntimeError, match="receiver is broken"):
            disconnect(connection, actor=user)
    finally:
        signals.disconnected.disconnect(dispatch_uid="broken")

    # The retry task (eager here) was queued all the same and finished the revocation.
    connection.refresh_from_db()
    assert connection.revocation_status == RevocationStatus.DONE
    assert not fake_brex.is_refresh_token_active(refresh_token)


def test_the_disconnect_view_calls_brex_outside_any_transaction_under_atomic_requests(
    user_client, connection, fake_brex, atomic_requests
):
    from django_brex_oauth import oauth

    seen = atomic_requests.watch(oauth, "revoke")
    assert user_client.post(disconnect_url(connection)).status_code == 302
    assert seen == [False]
    connection.refresh_from_db()
    assert connection.revocation_status == RevocationStatus.DONE
