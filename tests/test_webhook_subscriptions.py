"""Webhook subscriptions follow connections: made on connect, deleted on disconnect before the
revocation, retried by a task, and events delivered by the fake Brex reach the receiver."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from django_brex_oauth import signals
from django_brex_oauth.models import (
    BrexConnection,
    BrexWebhookEvent,
    BrexWebhookSubscription,
    ConnectionEvent,
    EventKind,
    SubscriptionStatus,
)
from django_brex_oauth.services import webhook_subscriptions
from django_brex_oauth.services.revoke import disconnect
from django_brex_oauth.testing.factories import make_connection
from tests.factories import create_user

pytestmark = pytest.mark.django_db(transaction=True)

HOOK_URL = "https://partner.example.com/brex/webhook/?site=1"
TYPES = ["USER_UPDATED", "TRANSFER_FAILED", "EXPENSE_PAYMENT_UPDATED"]


@pytest.fixture
def webhook_settings(brex_settings):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH,
        "WEBHOOK_URL": HOOK_URL,
        "WEBHOOK_EVENT_TYPES": TYPES,
        "API_MAX_RETRIES": 0,
        "WEBHOOK_TASK_MAX_RETRIES": 2,
    }
    return brex_settings


def requests_to(fake, method, prefix):
    return [r for r in fake.requests if r["method"] == method and r["path"].startswith(prefix)]


def kinds(connection) -> list[str]:
    return list(ConnectionEvent.objects.filter(connection=connection)
                .order_by("created_at", "pk").values_list("kind", flat=True))


def test_connecting_subscribes_once_with_the_connections_token(flow, fake_brex, webhook_settings):
    flow.connect()

    connection = BrexConnection.objects.get()
    (post,) = requests_to(fake_brex, "POST", "/v1/webhooks")
    assert json.loads(post["body"]) == {"url": HOOK_URL, "event_types": TYPES}
    assert post["headers"]["Authorization"] == "Bearer " + connection.token.access_token
    subscription = BrexWebhookSubscription.objects.get()
    assert post["headers"]["Idempotency-Key"] == subscription.idempotency_key
    assert subscription.status == SubscriptionStatus.ACTIVE
    assert subscription.brex_webhook_id in fake_brex.webhooks.subscriptions
    assert fake_brex.webhooks.subscriptions[subscription.brex_webhook_id]["url"] == HOOK_URL
    assert EventKind.WEBHOOK_SUBSCRIBED in kinds(connection)


def test_without_event_types_nothing_is_subscribed(flow, fake_brex, brex_settings):
    flow.connect()
    assert not requests_to(fake_brex, "POST", "/v1/webhooks")
    assert not BrexWebhookSubscription.objects.exists()


def test_a_reconnect_keeps_its_subscription(flow, fake_brex, webhook_settings):
    flow.connect()
    flow.connect(force_login="1")
    assert len(requests_to(fake_brex, "POST", "/v1/webhooks")) == 1
    assert BrexWebhookSubscription.objects.get().status == SubscriptionStatus.ACTIVE


def test_disconnecting_deletes_the_subscription_before_revoking_the_grant(
    flow, fake_brex, webhook_settings, user
):
    flow.connect()
    connection = BrexConnection.objects.get()
    access_token = connection.token.access_token
    subscription = BrexWebhookSubscription.objects.get()

    disconnect(connection, actor=user)

    paths = [(r["method"], r["path"]) for r in fake_brex.requests]
    delete = paths.index(("DELETE", f"/v1/webhooks/{subscription.brex_webhook_id}"))
    revoke = paths.index(("POST", "/oauth2/default/v1/revoke"))
    assert delete < revoke
    (delete_request,) = requests_to(fake_brex, "DELETE", "/v1/webhooks/")
    assert delete_request["headers"]["Authorization"] == "Bearer " + access_token
    assert delete_request["status"] == 200
    assert fake_brex.webhooks.subscriptions[subscription.brex_webhook_id]["status"] == "DELETED"
    subscription.refresh_from_db()
    assert subscription.status == SubscriptionStatus.DELETED
    assert kinds(connection)[-3:] == [EventKind.WEBHOOK_UNSUBSCRIBED, EventKind.DISCONNECTED,
                                      EventKind.REVOKED]


def test_a_failed_subscription_is_recorded_and_retried_by_the_task(
    flow, fake_brex, webhook_settings
):
    fake_brex.fail_next("/v1/webhooks", status=503)
    flow.connect()  # the suite's tasks are eager: the retry runs at once

    connection = BrexConnection.objects.get()
    posts = requests_to(fake_brex, "POST", "/v1/webhooks")
    assert [p["status"] for p in posts] == [503, 200]
    assert len({p["headers"]["Idempotency-Key"] for p in posts}) == 1
    subscription = BrexWebhookSubscription.objects.get()
    assert (subscription.status, subscription.attempts) == (SubscriptionStatus.ACTIVE, 2)
    assert [k for k in kinds(connection) if k.startswith("webhook")] == [
        EventKind.WEBHOOK_SUBSCRIBE_FAILED, EventKind.WEBHOOK_SUBSCRIBED]
    failed = ConnectionEvent.objects.get(kind=EventKind.WEBHOOK_SUBSCRIBE_FAILED)
    assert "503" in failed.detail and "tried again" in failed.detail


def test_a_refused_subscription_is_not_retried_by_the_task(flow, fake_brex, webhook_settings):
    fake_brex.fail_next("/v1/webhooks", status=400)
    flow.connect()
    assert len(requests_to(fake_brex, "POST", "/v1/webhooks")) == 1
    subscription = BrexWebhookSubscription.objects.get()
    assert subscription.status == SubscriptionStatus.SUBSCRIBING
    assert "400" in subscription.last_error
    assert "--sync" in ConnectionEvent.objects.get(
        kind=EventKind.WEBHOOK_SUBSCRIBE_FAILED).detail


def test_a_failed_deletion_is_retried_while_the_grant_is_live(
    flow, fake_brex, webhook_settings, user
):
    flow.connect()
    connection = BrexConnection.objects.get()
    brex_id = BrexWebhookSubscription.objects.get().brex_webhook_id
    fake_brex.fail_next(f"/v1/webhooks/{brex_id}", status=502)
    disconnect(connection, actor=user)
    deletes = requests_to(fake_brex, "DELETE", "/v1/webhooks/")
    assert [d["status"] for d in deletes] == [502, 200]
    paths = [r["path"] for r in fake_brex.requests]
    assert paths.index("/oauth2/default/v1/revoke") > fake_brex.requests.index(deletes[-1])
    assert BrexWebhookSubscription.objects.get().status == SubscriptionStatus.DELETED


def test_a_deletion_left_after_the_revocation_uses_another_connection_of_the_company(
    fake_brex, webhook_settings
):
    first = make_connection(create_user("first"), fake=fake_brex)
    second = make_connection(create_user("second"), fake=fake_brex)
    webhook_subscriptions.subscribe(first)
    subscription = BrexWebhookSubscription.objects.get(connection=first)
    fake_brex.fail_next(f"/v1/webhooks/{subscription.brex_webhook_id}", status=503, times=10)
    disconnect(first)
    subscription.refresh_from_db()
    assert subscription.status == SubscriptionStatus.UNSUBSCRIBING  # retries exhausted
    fake_brex.clear_failures()

    result = webhook_subscriptions.attempt(subscription)

    assert result.subscription.status == SubscriptionStatus.DELETED
    last = requests_to(fake_brex, "DELETE", "/v1/webhooks/")[-1]
    assert last["headers"]["Authorization"] == "Bearer " + second.token.access_token


def test_a_deletion_with_no_live_grant_left_is_abandoned_and_recorded(fake_brex, webhook_settings):
    connection = make_connection(create_user("only"), fake=fake_brex)
    webhook_subscriptions.subscribe(connection)
    brex_id = BrexWebhookSubscription.objects.get().brex_webhook_id
    fake_brex.fail_next(f"/v1/webhooks/{brex_id}", status=503, times=10)
    disconnect(connection)
    fake_brex.clear_failures()

    result = webhook_subscriptions.attempt(BrexWebhookSubscription.objects.get())

    assert result.subscription.status == SubscriptionStatus.ABANDONED
    event = ConnectionEvent.objects.filter(
        kind=EventKind.WEBHOOK_UNSUBSCRIBE_FAILED).order_by("pk").last()
    assert "no live grant" in event.detail


# --- deliveries from the fake to the receiver, over HTTP ---------------------------------------


def test_an_event_emitted_by_brex_reaches_the_receiver_and_the_signal(
    live_server, flow, fake_brex, brex_settings
):
    url = live_server.url + "/brex/webhook/"
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "WEBHOOK_URL": url,
                                "WEBHOOK_EVENT_TYPES": ["USER_UPDATED"]}
    heard = []
    signals.webhook_received.connect(
        lambda sender, event, connections, **kw: heard.append((event.webhook_id, connections)),
        weak=False, dispatch_uid="test-heard",
    )
    try:
        flow.connect()
        connection = BrexConnection.objects.get()
        ada = fake_brex.default_user
        (delivery,) = fake_brex.emit("USER_UPDATED", {"user_id": ada["id"],
                                                      "updated_attributes": ["first_name"]})
        assert fake_brex.webhooks.wait([delivery], timeout=15)
        assert fake_brex.emit("TRANSFER_FAILED") == []  # not subscribed to it
    finally:
        signals.webhook_received.disconnect(dispatch_uid="test-heard")

    assert delivery.attempts == [200]
    event = BrexWebhookEvent.objects.get()
    assert event.webhook_id == delivery.webhook_id
    assert event.payload["user_id"] == ada["id"]
    assert event.company_id == connection.brex_company_id
    assert heard == [(delivery.webhook_id, [connection])]
    # A redelivery of the same webhook id is answered 200 and changes nothing.
    again = fake_brex.webhooks.redeliver(delivery)
    assert fake_brex.webhooks.wait([again], timeout=15) and again.attempts == [200]
    assert BrexWebhookEvent.objects.count() == 1 and len(heard) == 1


class FlakyReceiver(BaseHTTPRequestHandler):
    answers: list[int] = []
    seen: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"headers": dict(self.headers), "body": body})
        status = self.answers.pop(0) if self.answers else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_fake_retries_a_delivery_answered_non_2xx_with_the_same_id(fake_brex):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyReceiver)
    FlakyReceiver.answers = [500, 503]
    FlakyReceiver.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fake_brex.webhooks.subscriptions["wh_test"] = {
            "id": "wh_test", "url": f"http://127.0.0.1:{server.server_port}/hook",
            "event_types": ["TRANSFER_PROCESSED"], "status": "ACTIVE"}
        (delivery,) = fake_brex.emit("TRANSFER_PROCESSED", {"transfer_id": "t1"})
        assert fake_brex.webhooks.wait([delivery], timeout=15)
    finally:
        server.shutdown()
        server.server_close()
    assert delivery.attempts == [500, 503, 200] and delivery.delivered
    assert {s["headers"]["Webhook-Id"] for s in FlakyReceiver.seen} == {delivery.webhook_id}
    assert all(len(s["headers"]["Webhook-Signature"].split()) == 1 for s in FlakyReceiver.seen)
    assert json.loads(FlakyReceiver.seen[0]["body"]) == {
        "event_type": "TRANSFER_PROCESSED", "company_id": fake_brex.company["id"],
        "transfer_id": "t1"}


# --- manage.py brex_oauth_webhooks ------------------------------------------------------------


def run_command(*args) -> tuple[str, int]:
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    out = StringIO()
    try:
        call_command("brex_oauth_webhooks", *args, stdout=out)
    except CommandError as err:
        return out.getvalue() + str(err), 1
    return out.getvalue(), 0


def test_the_command_lists_subscriptions_here_and_at_brex(fake_brex, webhook_settings):
    connection = make_connection(create_user("lister"), fake=fake_brex)
    webhook_subscriptions.subscribe(connection)
    subscription = BrexWebhookSubscription.objects.get()
    fake_brex.webhooks.subscriptions["wh_stray"] = {
        "id": "wh_stray", "url": HOOK_URL, "event_types": ["USER_UPDATED"], "status": "ACTIVE"}

    output, code = run_command()

    assert code == 0
    assert "USER_UPDATED, TRANSFER_FAILED, EXPENSE_PAYMENT_UPDATED at " + HOOK_URL in output
    stored_part, brex_part = output.split("At Brex", 1)
    assert subscription.brex_webhook_id in stored_part
    assert subscription.brex_webhook_id in brex_part
    assert "wh_stray" in brex_part and "(not known here)" in brex_part


def test_sync_subscribes_updates_recreates_and_removes_strays(fake_brex, webhook_settings):
    webhooks = fake_brex.webhooks
    missing = make_connection(create_user("missing"), fake=fake_brex)  # never subscribed
    changed = make_connection(create_user("changed"), fake=fake_brex)
    vanished = make_connection(create_user("vanished"), fake=fake_brex)
    for connection in (changed, vanished):
        webhook_subscriptions.subscribe(connection)
    changed_sub = BrexWebhookSubscription.objects.get(connection=changed)
    vanished_sub = BrexWebhookSubscription.objects.get(connection=vanished)
    BrexWebhookSubscription.objects.filter(pk=changed_sub.pk).update(
        event_types=["USER_UPDATED"])
    webhooks.subscriptions[changed_sub.brex_webhook_id]["event_types"] = ["USER_UPDATED"]
    webhooks.subscriptions[vanished_sub.brex_webhook_id]["status"] = "DELETED"
    webhooks.subscriptions["wh_stray"] = {"id": "wh_stray", "url": HOOK_URL,
                                          "event_types": TYPES, "status": "ACTIVE"}
    webhooks.subscriptions["wh_other"] = {"id": "wh_other", "url": "https://other.example/",
                                          "event_types": TYPES, "status": "ACTIVE"}

    output, code = run_command("--sync")

    assert code == 0, output
    live = {k: v for k, v in webhooks.subscriptions.items() if v["status"] == "ACTIVE"}
    assert "wh_stray" not in live and "wh_other" in live
    assert webhooks.subscriptions[changed_sub.brex_webhook_id]["event_types"] == TYPES
    stored = BrexWebhookSubscription.objects.filter(status=SubscriptionStatus.ACTIVE)
    assert sorted(s.connection_id for s in stored) == sorted(
        [missing.pk, changed.pk, vanished.pk])
    assert all(s.brex_webhook_id in live and s.event_types == TYPES for s in stored)
    assert "wh_other" in output and "left alone" in output

    # A second run finds nothing to change.
    requests_before = len(requests_to(fake_brex, "POST", "/v1/webhooks"))
    output, code = run_command("--sync")
    assert code == 0 and len(requests_to(fake_brex, "POST", "/v1/webhooks")) == requests_before
    assert output.splitlines() == [
        "wh_other: for another URL (https://other.example/); left alone",
        "Brex's webhook subscriptions match.",
    ]


def test_sync_retries_a_pending_deletion_and_exits_1_when_brex_fails(fake_brex, webhook_settings):
    keeper = make_connection(create_user("keeper"), fake=fake_brex)
    leaver = make_connection(create_user("leaver"), fake=fake_brex)
    webhook_subscriptions.subscribe(leaver)
    webhook_subscriptions.subscribe(keeper)
    leaving = BrexWebhookSubscription.objects.get(connection=leaver)
    fake_brex.fail_next(f"/v1/webhooks/{leaving.brex_webhook_id}", status=503, times=10)
    disconnect(leaver)
    fake_brex.clear_failures()
    fake_brex.fail_next("/v1/webhooks", status=400)  # the listing fails once

    output, code = run_command("--sync")

    assert code == 1 and "could not list" in output
    leaving.refresh_from_db()
    assert leaving.status == SubscriptionStatus.DELETED  # through the keeper's grant
    assert fake_brex.webhooks.subscriptions[leaving.brex_webhook_id]["status"] == "DELETED"


# --- system checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"WEBHOOK_EVENT_TYPES": ["USER_UPDATED"]}, ["brex_oauth.E020"]),
        ({"WEBHOOK_EVENT_TYPES": "USER_UPDATED", "WEBHOOK_URL": HOOK_URL}, ["brex_oauth.E020"]),
        ({"WEBHOOK_URL": "http://partner.example.com/brex/webhook/"}, ["brex_oauth.E021"]),
        ({"WEBHOOK_URL": "http://127.0.0.1:8000/brex/webhook/"}, []),
        ({"WEBHOOK_URL": HOOK_URL, "WEBHOOK_EVENT_TYPES": TYPES}, []),
        ({"WEBHOOK_SECRETS_FETCHER": "nowhere.fetch"}, ["brex_oauth.E022"]),
        ({"WEBHOOK_URL": HOOK_URL, "WEBHOOK_EVENT_TYPES": TYPES, "SCOPES": ["users.readonly"]},
         ["brex_oauth.W020"]),
    ],
)
def test_system_checks_refuse_unusable_webhook_settings(settings, overrides, expected):
    from django_brex_oauth.checks import check_webhook_settings

    settings.BREX_OAUTH = {**settings.BREX_OAUTH, **overrides}
    assert [e.id for e in check_webhook_settings()] == expected


# --- the fake's subscription endpoints --------------------------------------------------------


def call(fake, method, path, token, body=None, key=None):
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(fake.api_base_url + path, data=data, method=method,
                                     headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def test_the_fakes_subscription_endpoints_behave_like_brexs(fake_brex, brex_settings):
    token = make_connection(create_user("api"), fake=fake_brex).token.access_token
    body = {"url": HOOK_URL, "event_types": TYPES}

    assert call(fake_brex, "POST", "/v1/webhooks", token, body)[0] == 400  # no key
    for bad in ({"url": "http://partner.example.com/hook", "event_types": TYPES},
                {"url": HOOK_URL, "event_types": []},
                {"url": HOOK_URL, "event_types": ["NOT_A_TYPE"]}):
        status, error = call(fake_brex, "POST", "/v1/webhooks", token, bad, key="k-bad")
        assert status == 400 and error["type"] == "BAD_REQUEST"
    assert call(fake_brex, "POST", "/v1/webhooks", "not-a-token", body, key="k1")[0] == 401

    status, created = call(fake_brex, "POST", "/v1/webhooks", token, body, key="k1")
    assert status == 200
    assert created == {"id": created["id"], "url": HOOK_URL, "event_types": TYPES,
                       "status": "ACTIVE"}
    assert call(fake_brex, "POST", "/v1/webhooks", token, body, key="k1")[1] == created
    assert call(fake_brex, "GET", f"/v1/webhooks/{created['id']}", token) == (200, created)
    status, page = call(fake_brex, "GET", "/v1/webhooks", token)
    assert page == {"items": [created], "next_cursor": None}

    changed = {"url": HOOK_URL, "event_types": ["USER_UPDATED"]}
    status, updated = call(fake_brex, "PUT", f"/v1/webhooks/{created['id']}", token, changed)
    assert (status, updated["event_types"]) == (200, ["USER_UPDATED"])

    assert call(fake_brex, "DELETE", f"/v1/webhooks/{created['id']}", token)[0] == 200
    assert call(fake_brex, "GET", f"/v1/webhooks/{created['id']}", token)[0] == 404
    assert call(fake_brex, "DELETE", f"/v1/webhooks/{created['id']}", token)[0] == 404
    assert call(fake_brex, "GET", "/v1/webhooks", token)[1]["items"] == []
    assert fake_brex.emit("USER_UPDATED") == []  # nothing subscribed any more


def test_a_disconnect_while_brex_creates_the_subscription_does_not_leave_it_active(
    fake_brex, webhook_settings
):
    from django import db

    from tests.conftest import require_postgres

    require_postgres()
    connection = make_connection(create_user("racer"), fake=fake_brex)
    fake_brex.set_latency(1.5, "/v1/webhooks")
    def subscribe():
        try:
            webhook_subscriptions.subscribe(connection)
        finally:
            db.connection.close()

    subscribing = threading.Thread(target=subscribe)
    subscribing.start()
    try:
        for _ in range(100):  # until the POST has reached Brex
            if requests_to(fake_brex, "POST", "/v1/webhooks"):
                break
            threading.Event().wait(0.02)
        disconnect(connection)
    finally:
        subscribing.join(10)
        fake_brex.set_latency(0, "/v1/webhooks")

    subscription = BrexWebhookSubscription.objects.get()
    assert subscription.brex_webhook_id  # what Brex made is known...
    assert subscription.status == SubscriptionStatus.ABANDONED  # ...and not taken as live
    assert [e for e in kinds(connection) if e == EventKind.WEBHOOK_SUBSCRIBED] == []
