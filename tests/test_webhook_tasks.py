"""The webhook tasks in real Celery worker processes (Redis broker, PostgreSQL)."""

from __future__ import annotations

import re

import pytest

from django_brex_oauth.models import (
    BrexConnection,
    BrexWebhookEvent,
    BrexWebhookSubscription,
    SubscriptionStatus,
    WebhookEventStatus,
)
from django_brex_oauth.testing.factories import make_connection
from tests.factories import create_user
from tests.test_celery import broker, wait_for, worker_settings, workers  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

PROCESS = "brex_oauth.process_webhook_event"
SYNC = "brex_oauth.sync_webhook_subscription"


def task_results(worker) -> list[str]:
    pattern = re.escape(PROCESS) + r"\[[^\]]+\] succeeded in [\d.]+s: '(\w+)'"
    return re.findall(pattern, worker.output())


def test_a_process_task_delivered_twice_runs_the_handlers_once(
    brex_settings, fake_brex, broker, workers  # noqa: F811
):
    sender, queue = broker
    connection = make_connection(create_user("worker-owner"), fake=fake_brex)
    ada = fake_brex.default_user
    ada["email"] = "ada.king@example.com"
    event = BrexWebhookEvent.objects.create(
        webhook_id="msg_twice", event_type="USER_UPDATED", company_id=connection.brex_company_id,
        payload={"event_type": "USER_UPDATED", "company_id": connection.brex_company_id,
                 "user_id": ada["id"], "updated_attributes": ["email"]},
    )
    worker = workers(queue, worker_settings(brex_settings.BREX_OAUTH), concurrency=2)

    for _ in range(2):
        sender.send_task(PROCESS, args=[event.pk], queue=queue)

    results = wait_for(lambda: len(task_results(worker)) == 2 and task_results(worker), 30,
                       "both tasks to finish")
    assert sorted(results) == ["processed", "skipped"]
    event.refresh_from_db()
    assert (event.status, event.attempts) == (WebhookEventStatus.PROCESSED, 1)
    assert list(event.connections.all()) == [connection]
    assert BrexConnection.objects.get(pk=connection.pk).brex_user_email == "ada.king@example.com"
    assert len([r for r in fake_brex.requests if r["path"] == "/v2/users/me"]) == 1


def test_the_subscription_task_subscribes_in_a_worker(
    brex_settings, fake_brex, broker, workers  # noqa: F811
):
    sender, queue = broker
    brex_oauth = {**brex_settings.BREX_OAUTH, "WEBHOOK_URL": "https://partner.example/hook/",
                  "WEBHOOK_EVENT_TYPES": ["USER_UPDATED"]}
    connection = make_connection(create_user("task-owner"), fake=fake_brex)
    subscription = BrexWebhookSubscription.objects.create(
        connection=connection, url="https://partner.example/hook/",
        event_types=["USER_UPDATED"], idempotency_key="brex-oauth-webhook-test",
    )
    workers(queue, worker_settings(brex_oauth), concurrency=1)

    sender.send_task(SYNC, args=[subscription.pk], queue=queue)

    wait_for(lambda: BrexWebhookSubscription.objects.get(pk=subscription.pk).status
             == SubscriptionStatus.ACTIVE, 30, "the subscription")
    subscription.refresh_from_db()
    assert subscription.brex_webhook_id in fake_brex.webhooks.subscriptions
    (post,) = [r for r in fake_brex.requests if r["path"] == "/v1/webhooks"]
    assert post["headers"]["Idempotency-Key"] == "brex-oauth-webhook-test"
