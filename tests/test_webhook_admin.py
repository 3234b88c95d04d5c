"""The admin of webhook events: filters by type, status and company; "process again"."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from django_brex_oauth import signals
from django_brex_oauth.models import BrexWebhookEvent, WebhookEventStatus
from django_brex_oauth.services import webhook_events
from django_brex_oauth.testing.factories import make_connection

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "admin:brex_oauth_brexwebhookevent_changelist"


@pytest.fixture
def events(user):
    connection = make_connection(user, scopes=["users.readonly", "companies.readonly"])
    company = connection.brex_company_id or "cuacc_1"
    rows = {}
    for key, event_type, company_id, status in [
        ("user", "USER_UPDATED", company, WebhookEventStatus.PROCESSED),
        ("transfer", "TRANSFER_FAILED", company, WebhookEventStatus.FAILED),
        ("stranger", "USER_UPDATED", "cuacc_stranger", WebhookEventStatus.IGNORED),
    ]:
        rows[key] = BrexWebhookEvent.objects.create(
            webhook_id=f"msg_{key}", event_type=event_type, company_id=company_id,
            payload={"event_type": event_type, "company_id": company_id, "secret_note": key},
            status=status,
        )
    return rows


def listed(response) -> set[str]:
    return {row.webhook_id for row in response.context["cl"].result_list}


def test_events_are_listed_and_filtered_by_type_status_and_company(admin_client, events):
    url = reverse(CHANGELIST)
    assert listed(admin_client.get(url)) == {"msg_user", "msg_transfer", "msg_stranger"}
    assert listed(admin_client.get(url, {"event_type": "USER_UPDATED"})) == {
        "msg_user", "msg_stranger"}
    assert listed(admin_client.get(url, {"status": "failed"})) == {"msg_transfer"}
    assert listed(admin_client.get(url, {"company_id": "cuacc_stranger"})) == {"msg_stranger"}
    assert listed(admin_client.get(url, {"q": "msg_tra"})) == {"msg_transfer"}
    page = admin_client.get(reverse("admin:brex_oauth_brexwebhookevent_change",
                                    args=[events["user"].pk]))
    assert page.status_code == 200
    assert b"secret_note" in page.content  # the payload, for staff
    assert not page.context["has_change_permission"]


def test_process_again_runs_the_handlers_once_more(admin_client, events, user):
    heard = []
    signals.webhook_received.connect(
        lambda sender, event, **kw: heard.append(event.webhook_id), weak=False,
        dispatch_uid="admin-heard")
    try:
        response = admin_client.post(reverse(CHANGELIST), {
            "action": "process_again",
            "_selected_action": [events["transfer"].pk],
        })
    finally:
        signals.webhook_received.disconnect(dispatch_uid="admin-heard")
    assert response.status_code == 302
    assert heard == ["msg_transfer"]
    event = BrexWebhookEvent.objects.get(pk=events["transfer"].pk)
    assert (event.status, event.attempts, event.last_error) == (
        WebhookEventStatus.PROCESSED, 1, "")
    assert [str(m) for m in get_messages(response.wsgi_request)] == ["msg_transfer: processed."]


def test_an_event_being_processed_is_left_alone(events):
    BrexWebhookEvent.objects.filter(pk=events["user"].pk).update(
        status=WebhookEventStatus.PROCESSING, processing_since=timezone.now())
    assert webhook_events.process(events["user"], again=True) is None
    assert webhook_events.process(events["user"]) is None


@pytest.mark.parametrize("again", [False, True])
def test_a_claim_left_by_a_process_that_died_is_taken_over(events, again):
    started = timezone.now() - timedelta(seconds=webhook_events.PROCESSING_TIMEOUT + 1)
    BrexWebhookEvent.objects.filter(pk=events["user"].pk).update(
        status=WebhookEventStatus.PROCESSING, processing_since=started)
    event = webhook_events.process(events["user"], again=again)
    assert event is not None and event.status == WebhookEventStatus.PROCESSED
    assert BrexWebhookEvent.objects.get(pk=events["user"].pk).processing_since is None


def test_process_again_needs_the_change_permission(client, django_user_model, events):
    member = django_user_model.objects.create_user("viewer", "v@example.com", "pw",
                                                   is_staff=True)
    member.user_permissions.add(Permission.objects.get(codename="view_brexwebhookevent"))
    client.force_login(member)
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    assert response.context["action_form"] is None  # no action this member may run
    client.post(reverse(CHANGELIST), {"action": "process_again",
                                      "_selected_action": [events["transfer"].pk]})
    assert BrexWebhookEvent.objects.get(pk=events["transfer"].pk).attempts == 0


def test_webhook_events_past_their_retention_are_pruned(events, settings):
    from io import StringIO

    from django.core.management import call_command

    from django_brex_oauth import tasks

    old = timezone.now() - timedelta(days=91)
    BrexWebhookEvent.objects.filter(pk=events["user"].pk).update(received_at=old)
    BrexWebhookEvent.objects.filter(pk=events["transfer"].pk).update(
        received_at=old + timedelta(days=2))
    events["user"].connections.set(events["user"].connections.model.objects.all())

    out = StringIO()
    call_command("brex_oauth_cleanup", "--dry-run", "--skip-revocations", stdout=out)
    assert "Would delete 1 old webhook event(s)." in out.getvalue()
    assert tasks.prune.delay().get()["webhook_events"] == 1
    assert set(BrexWebhookEvent.objects.values_list("webhook_id", flat=True)) == {
        "msg_transfer", "msg_stranger"}

    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "WEBHOOK_EVENT_RETENTION_DAYS": None}
    BrexWebhookEvent.objects.update(received_at=old - timedelta(days=999))
    assert tasks.prune.delay().get()["webhook_events"] == 0
