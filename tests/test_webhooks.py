"""The webhook receiver: Standard Webhooks verification, stored once, signalled once.

Deliveries are signed with the fake Brex's own signing code (``signature_header``), with the
secrets the fake serves at ``/v1/webhooks/secrets``, which the app fetches over real HTTP
with a connection's access token.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import transaction
from django.urls import reverse

from django_brex_oauth import signals, webhooks
from django_brex_oauth.models import BrexConnection, BrexWebhookEvent, WebhookEventStatus
from django_brex_oauth.testing.factories import make_connection
from django_brex_oauth.testing.fake_webhooks import signature_header
from tests.conftest import require_postgres

URL = "/brex/webhook/"


def new_id() -> str:
    return "msg_" + uuid.uuid4().hex


def delivery_headers(body: bytes, secrets, *, webhook_id=None, timestamp=None) -> dict:
    webhook_id = webhook_id or new_id()
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Webhook-Id": webhook_id,
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": signature_header(secrets, webhook_id, timestamp, body),
    }


def wsgi_headers(headers: dict) -> dict:
    return {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}


class Deliverer:
    """Posts signed deliveries to the receiver through Django's test client."""

    def __init__(self, client, fake):
        self.client = client
        self.fake = fake

    def body(self, event_type="USER_UPDATED", **fields) -> bytes:
        payload = {"event_type": event_type, **fields}
        if "company_id" not in fields and event_type.startswith("USER"):
            payload["company_id"] = self.fake.company["id"]
        return json.dumps(payload).encode()

    def post(self, body: bytes, headers: dict | None = None, **signing):
        if headers is None:
            headers = delivery_headers(body, self.fake.webhooks.signing_secrets, **signing)
        return self.client.generic(
            "POST", URL, body, content_type="application/json", **wsgi_headers(headers)
        )


@pytest.fixture
def deliver(client, fake_brex, brex_settings):
    return Deliverer(client, fake_brex)


@pytest.fixture
def connection(db, user, fake_brex, brex_settings):
    return make_connection(user, fake=fake_brex)


@pytest.fixture
def received():
    """Every ``webhook_received`` sent during the test, as (event, connections)."""
    calls = []

    def receiver(sender, event, connections, **kwargs):
        calls.append((event, list(connections)))

    signals.webhook_received.connect(receiver, weak=False)
    yield calls
    signals.webhook_received.disconnect(receiver)


pytestmark = pytest.mark.django_db(transaction=True)


# --- Standard Webhooks cases ----------------------------------------------------------------


def test_a_valid_delivery_is_stored_once_and_signalled_with_its_connections(
    deliver, connection, received
):
    body = deliver.body(user_id=connection.brex_user_id, extra_field={"new": True})
    headers = delivery_headers(body, deliver.fake.webhooks.signing_secrets)

    response = deliver.post(body, headers)

    assert response.status_code == 200
    assert response.json() == {"status": "accepted", "webhook_id": headers["Webhook-Id"]}
    event = BrexWebhookEvent.objects.get()
    assert event.webhook_id == headers["Webhook-Id"]
    assert (event.event_type, event.company_id) == ("USER_UPDATED", connection.brex_company_id)
    assert event.payload == json.loads(body)  # unknown fields kept
    assert event.status == WebhookEventStatus.PROCESSED
    assert event.processed_at is not None and event.processed_at >= event.received_at
    assert list(event.connections.all()) == [connection]
    assert [(e.pk, [c.pk for c in conns]) for e, conns in received] == [
        (event.pk, [connection.pk])
    ]


def test_one_valid_signature_among_several_is_enough(deliver, connection, received):
    body = deliver.body()
    webhook_id, timestamp = new_id(), int(time.time())
    good = signature_header(deliver.fake.webhooks.signing_secrets, webhook_id, timestamp, body)
    forged = signature_header([base64.b64encode(b"x" * 32).decode()], webhook_id, timestamp, body)
    headers = {"Webhook-Id": webhook_id, "Webhook-Timestamp": str(timestamp),
               "Webhook-Signature": f"v2,abc {forged} {good}"}

    assert deliver.post(body, headers).status_code == 200
    assert len(received) == 1


@pytest.mark.parametrize("defect", ["tampered body", "wrong secret", "truncated signature",
                                    "signature of another id", "no v1 entry"])
def test_a_bad_signature_is_refused_and_nothing_is_stored(deliver, connection, received, defect):
    body = deliver.body()
    secrets = deliver.fake.webhooks.signing_secrets
    headers = delivery_headers(body, secrets)
    if defect == "tampered body":
        body = body.replace(b"USER_UPDATED", b"USER_UPDATES")
    elif defect == "wrong secret":
        headers = delivery_headers(body, [base64.b64encode(b"k" * 32).decode()])
    elif defect == "truncated signature":
        headers["Webhook-Signature"] = headers["Webhook-Signature"][:-6]
    elif defect == "signature of another id":
        headers["Webhook-Id"] = new_id()
    else:
        headers["Webhook-Signature"] = headers["Webhook-Signature"].replace("v1,", "v0,")

    response = deliver.post(body, headers)

    assert response.status_code == (400 if defect == "no v1 entry" else 401)
    assert "error" in response.json()
    assert not BrexWebhookEvent.objects.exists()
    assert received == []


@pytest.mark.parametrize("offset", [-301, 301, -3600, 86400])
def test_a_timestamp_outside_the_tolerance_is_refused(deliver, connection, offset):
    body = deliver.body()
    response = deliver.post(body, timestamp=int(time.time()) + offset)
    assert response.status_code == 400
    assert "Webhook-Timestamp" in response.json()["error"]
    assert not BrexWebhookEvent.objects.exists()


def test_the_tolerance_is_a_setting(deliver, connection, brex_settings):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "WEBHOOK_TOLERANCE": 1000}
    assert deliver.post(deliver.body(), timestamp=int(time.time()) - 900).status_code == 200
    assert deliver.post(deliver.body(), timestamp=int(time.time()) + 900).status_code == 200
    assert deliver.post(deliver.body(), timestamp=int(time.time()) - 1100).status_code == 400


@pytest.mark.parametrize("header", ["Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"])
def test_a_missing_header_is_refused(deliver, connection, header):
    body = deliver.body()
    headers = delivery_headers(body, deliver.fake.webhooks.signing_secrets)
    del headers[header]
    response = deliver.post(body, headers)
    assert response.status_code == 400
    assert header in response.json()["error"]
    assert not BrexWebhookEvent.objects.exists()


def test_a_timestamp_that_is_not_integer_seconds_is_refused(deliver, connection):
    body = deliver.body()
    headers = delivery_headers(body, deliver.fake.webhooks.signing_secrets)
    headers["Webhook-Timestamp"] += ".5"
    assert deliver.post(body, headers).status_code == 400


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'{"company_id": "x"}', b"\xff\xfe",
    b'{"event_type": "USER_UPDATED", "amount": NaN}',
    b'{"event_type": "USER_UPDATED", "amount": -Infinity}',
    b'{"event_type": "USER_UPDATED", "note": "a\\u0000b"}',
    b'{"event_type": "USER_UPDATED", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_a_signed_body_that_is_not_an_event_is_refused(deliver, connection, body, received):
    response = deliver.post(body)
    assert response.status_code == 400
    assert not BrexWebhookEvent.objects.exists()
    assert received == []


def test_a_body_over_one_mebibyte_is_refused_with_413(deliver, connection):
    body = deliver.body(padding="x" * webhooks.MAX_BODY_BYTES)
    response = deliver.post(body)
    assert response.status_code == 413
    assert not BrexWebhookEvent.objects.exists()


def test_a_body_just_under_the_limit_is_accepted(deliver, connection):
    skeleton = deliver.body(padding="")
    body = deliver.body(padding="x" * (webhooks.MAX_BODY_BYTES - len(skeleton)))
    assert len(body) == webhooks.MAX_BODY_BYTES
    assert deliver.post(body).status_code == 200


def test_get_is_not_allowed_and_post_needs_no_csrf_token(client, deliver, connection):
    assert client.get(URL).status_code == 405
    assert reverse("brex_oauth:webhook") == URL
    client.handler.enforce_csrf_checks = True
    assert deliver.post(deliver.body()).status_code == 200


# --- secrets ------------------------------------------------------------------------------


def secrets_fetches(fake) -> int:
    return len([r for r in fake.requests if r["path"] == "/v1/webhooks/secrets"])


def test_secrets_come_from_brex_with_a_connection_token_and_are_cached(deliver, connection):
    for _ in range(3):
        assert deliver.post(deliver.body()).status_code == 200
    (fetch,) = [r for r in deliver.fake.requests if r["path"] == "/v1/webhooks/secrets"]
    assert fetch["headers"]["Authorization"] == "Bearer " + connection.token.access_token


def test_the_access_token_is_refreshed_before_fetching_the_secrets(deliver, user, fake_brex):
    make_connection(user, fake=fake_brex, expired=True)
    assert deliver.post(deliver.body()).status_code == 200
    assert fake_brex.stats["token_refresh_token"] == 1


def test_a_rotation_with_two_secrets_and_two_signatures(deliver, connection, received):
    fake = deliver.fake
    assert deliver.post(deliver.body()).status_code == 200  # caches the first secret
    fake.webhooks.rotate_secret()
    assert len(fake.webhooks.signing_secrets) == 2
    headers_seen = []
    body = deliver.body()
    headers = delivery_headers(body, fake.webhooks.signing_secrets)
    headers_seen.append(headers["Webhook-Signature"])
    assert len(headers["Webhook-Signature"].split()) == 2
    # The cached old secret verifies the delivery signed with both: no fetch needed.
    assert deliver.post(body, headers).status_code == 200
    assert secrets_fetches(fake) == 1

    # Rotation over: deliveries are signed with the new secret alone, which this site has
    # not seen; it fetches the secrets again (both listed while PENDING_REVOKE) and accepts.
    fake.webhooks.finish_rotation()
    assert deliver.post(deliver.body()).status_code == 200
    assert secrets_fetches(fake) == 2
    assert len(received) == 3


def test_a_pending_revoke_secret_still_counts(deliver, connection, received):
    old = deliver.fake.webhooks.signing_secrets
    deliver.fake.webhooks.rotate_secret()  # before this site has fetched anything
    body = deliver.body()
    assert deliver.post(body, delivery_headers(body, old)).status_code == 200
    assert secrets_fetches(deliver.fake) == 1 and len(received) == 1


def test_the_secrets_endpoint_lists_both_secrets_during_a_rotation(connection, fake_brex):
    old = fake_brex.webhooks.signing_secrets[0]
    new = fake_brex.webhooks.rotate_secret()
    request = urllib.request.Request(
        fake_brex.api_base_url + "/v1/webhooks/secrets",
        headers={"Authorization": "Bearer " + connection.token.access_token},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        listed = json.loads(answer.read())
    assert listed == [{"secret": new, "status": "ACTIVE"},
                      {"secret": old, "status": "PENDING_REVOKE"}]


def test_a_forged_signature_refetches_the_secrets_at_most_once_a_minute(deliver, connection):
    fake = deliver.fake
    assert deliver.post(deliver.body()).status_code == 200
    wrong = [base64.b64encode(b"w" * 32).decode()]
    for _ in range(5):
        body = deliver.body()
        assert deliver.post(body, delivery_headers(body, wrong)).status_code == 401
    assert secrets_fetches(fake) == 2  # the first fetch, then one re-fetch for five forgeries


def test_the_refetch_limit_lives_in_the_cache_that_every_process_shares(deliver, connection):
    from django.core.cache import cache

    assert deliver.post(deliver.body()).status_code == 200
    wrong = [base64.b64encode(b"w" * 32).decode()]
    for _ in range(2):
        body = deliver.body()
        assert deliver.post(body, delivery_headers(body, wrong)).status_code == 401
    assert secrets_fetches(deliver.fake) == 2
    # Another process sees the same cache: when the limit's entry expires (here: is
    # deleted), the next forgery may fetch again, and only then.
    limit = webhooks._REFETCH_KEY.format("staging")
    assert cache.get(limit) is not None
    cache.delete(limit)
    body = deliver.body()
    assert deliver.post(body, delivery_headers(body, wrong)).status_code == 401
    assert secrets_fetches(deliver.fake) == 3


def fixed_secrets():
    return [base64.b64encode(b"s" * 32).decode()]


def test_the_secrets_fetcher_is_pluggable(deliver, connection, brex_settings):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH,
        "WEBHOOK_SECRETS_FETCHER": "tests.test_webhooks.fixed_secrets",
    }
    body = deliver.body()
    assert deliver.post(body, delivery_headers(body, fixed_secrets())).status_code == 200
    assert secrets_fetches(deliver.fake) == 0
    assert deliver.post(deliver.body()).status_code == 401  # the fake's secret is not ours


def test_without_an_active_connection_the_receiver_answers_503_so_brex_retries(deliver):
    response = deliver.post(deliver.body())
    assert response.status_code == 503
    assert not BrexWebhookEvent.objects.exists()


# --- stored once, signalled once ----------------------------------------------------------


def test_a_redelivery_answers_200_and_is_not_processed_again(deliver, connection, received):
    body = deliver.body()
    headers = delivery_headers(body, deliver.fake.webhooks.signing_secrets)
    first = deliver.post(body, headers)
    # Brex signs each attempt afresh: same id, new timestamp.
    again = delivery_headers(body, deliver.fake.webhooks.signing_secrets,
                             webhook_id=headers["Webhook-Id"], timestamp=int(time.time()) - 5)
    second = deliver.post(body, again)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["status"] == "duplicate"
    assert BrexWebhookEvent.objects.count() == 1
    assert len(received) == 1
    assert BrexWebhookEvent.objects.get().attempts == 1


def test_an_event_for_a_company_without_an_active_connection_is_recorded_not_signalled(
    deliver, connection, received
):
    body = deliver.body(company_id="cuacc_somebody_else")
    assert deliver.post(body).status_code == 200
    event = BrexWebhookEvent.objects.get()
    assert event.status == WebhookEventStatus.IGNORED
    assert received == []

    BrexConnection.objects.filter(pk=connection.pk).update(status="revoked")
    assert deliver.post(deliver.body()).status_code == 200
    assert received == []
    assert BrexWebhookEvent.objects.filter(status=WebhookEventStatus.IGNORED).count() == 2


def test_an_event_without_a_company_is_signalled_with_no_connections(
    deliver, connection, received
):
    body = deliver.body("REFERRAL_CREATED", referral_id="referral_1")
    assert deliver.post(body).status_code == 200
    ((event, connections),) = received
    assert event.event_type == "REFERRAL_CREATED" and connections == []


def test_an_unknown_event_type_is_recorded_and_signalled(deliver, connection, received):
    body = deliver.body("CARD_SOMETHING_NEW", company_id=connection.brex_company_id)
    assert deliver.post(body).status_code == 200
    ((event, connections),) = received
    assert event.event_type == "CARD_SOMETHING_NEW" and connections == [connection]


def test_the_signal_is_sent_after_the_commit(deliver, connection):
    seen = []

    def receiver(sender, event, connections, **kwargs):
        seen.append((transaction.get_connection().in_atomic_block,
                     BrexWebhookEvent.objects.filter(pk=event.pk).exists()))

    signals.webhook_received.connect(receiver, weak=False)
    try:
        assert deliver.post(deliver.body()).status_code == 200
    finally:
        signals.webhook_received.disconnect(receiver)
    assert seen == [(False, True)]


def test_the_signal_waits_for_the_commit_under_atomic_requests(
    deliver, connection, atomic_requests, received
):
    from django_brex_oauth.services import webhook_events

    seen = atomic_requests.watch(webhook_events, "process")
    assert deliver.post(deliver.body()).status_code == 200
    assert seen == [False] and len(received) == 1


def test_a_bug_while_handling_leaves_the_event_failed_not_processing(
    deliver, connection, monkeypatch
):
    from django_brex_oauth.services import webhook_events

    def broken(*args):
        raise KeyError("payload-value")

    monkeypatch.setattr(webhook_events, "_refresh_user_details", broken)
    with pytest.raises(KeyError):
        deliver.post(deliver.body())
    event = BrexWebhookEvent.objects.get()
    assert (event.status, event.last_error) == (WebhookEventStatus.FAILED,
                                                "Handling failed: KeyError.")
    monkeypatch.undo()
    assert webhook_events.process(event, again=True).status == WebhookEventStatus.PROCESSED


def test_a_receiver_that_raises_is_recorded_and_the_others_still_hear(
    deliver, connection, received
):
    def broken(sender, **kwargs):
        raise RuntimeError("partner bug")

    signals.webhook_received.connect(broken, weak=False)
    try:
        response = deliver.post(deliver.body())
    finally:
        signals.webhook_received.disconnect(broken)
    assert response.status_code == 200
    event = BrexWebhookEvent.objects.get()
    assert event.status == WebhookEventStatus.FAILED
    assert "RuntimeError" in event.last_error
    assert len(received) == 1


def test_user_updated_refreshes_the_stored_brex_user_details(deliver, connection, received):
    ada = deliver.fake.default_user
    ada["email"] = "ada.byron@example.com"
    body = deliver.body(user_id=ada["id"], updated_attributes=["email"])
    assert deliver.post(body).status_code == 200
    connection.refresh_from_db()
    assert connection.brex_user_email == "ada.byron@example.com"
    # The partner's receivers see the refreshed details.
    ((event, connections),) = received
    assert connections[0].brex_user_email == "ada.byron@example.com"


def test_user_updated_for_another_user_of_the_company_changes_nothing(deliver, connection):
    before = connection.brex_user_email
    deliver.fake.users[1]["email"] = "changed@example.com"
    body = deliver.body(user_id=deliver.fake.users[1]["id"])
    assert deliver.post(body).status_code == 200
    connection.refresh_from_db()
    assert connection.brex_user_email == before
    assert not [r for r in deliver.fake.requests if r["path"] == "/v2/users/me"]


def test_handlers_can_run_in_a_celery_task(deliver, connection, received, brex_settings):
    from celery.signals import task_prerun

    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "WEBHOOK_PROCESS_IN_TASK": True}
    ran = []

    def record(sender=None, task=None, args=None, **kwargs):
        ran.append((task.name, args))

    task_prerun.connect(record, weak=False)
    try:
        assert deliver.post(deliver.body()).status_code == 200  # the suite's tasks are eager
    finally:
        task_prerun.disconnect(record)
    assert ran == [("brex_oauth.process_webhook_event", [BrexWebhookEvent.objects.get().pk])]
    assert BrexWebhookEvent.objects.get().status == WebhookEventStatus.PROCESSED
    assert len(received) == 1


# --- no secret or payload in any log record -----------------------------------------------


def test_no_log_record_holds_a_secret_a_signature_or_a_payload(deliver, connection, caplog):
    marker = "payload-marker-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    fake = deliver.fake
    posted = []

    def post(body, headers=None, **signing):
        headers = headers or delivery_headers(body, fake.webhooks.signing_secrets, **signing)
        posted.append(headers["Webhook-Signature"])
        return deliver.post(body, headers)

    body = deliver.body(note=marker, user_id=connection.brex_user_id)
    assert post(body).status_code == 200
    assert post(body).status_code == 200  # a new id, same payload
    fake.webhooks.rotate_secret()
    fake.webhooks.finish_rotation()
    assert post(deliver.body(note=marker)).status_code == 200  # re-fetch
    assert post(deliver.body(note=marker), timestamp=int(time.time()) - 999).status_code == 400
    wrong = [base64.b64encode(b"w" * 32).decode()]
    bad = deliver.body(note=marker)
    assert post(bad, delivery_headers(bad, wrong)).status_code == 401
    assert post(f'{{"note": "{marker}"'.encode()).status_code == 400
    assert post(deliver.body(note=marker, company_id="cuacc_x")).status_code == 200

    secrets = [s["secret"] for s in fake.webhooks.secrets] + fake.webhooks.signing_secrets
    signatures = [value.split(",", 1)[1] for header in posted for value in header.split()]
    text = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    )
    assert caplog.records, "nothing was logged at all"
    assert marker not in text
    assert not [s for s in secrets + signatures if s in text]
    assert connection.token.access_token not in text


# --- real concurrent deliveries -----------------------------------------------------------


def post_over_http(url: str, body: bytes, headers: dict) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_concurrent_copies_of_one_delivery_are_stored_and_signalled_once(
    live_server, fake_brex, brex_settings, user, received
):
    require_postgres()
    connection = make_connection(user, fake=fake_brex)
    url = live_server.url + URL
    warm = json.dumps({"event_type": "USER_UPDATED", "company_id": "cuacc_none"}).encode()
    assert post_over_http(url, warm, delivery_headers(warm, fake_brex.webhooks.signing_secrets)
                          ) == 200  # secrets cached before the race
    body = json.dumps({"event_type": "TRANSFER_PROCESSED",
                       "company_id": connection.brex_company_id}).encode()
    headers = delivery_headers(body, fake_brex.webhooks.signing_secrets)
    copies = 8
    start = threading.Barrier(copies)

    def send(_):
        start.wait()
        return post_over_http(url, body, headers)

    with ThreadPoolExecutor(copies) as pool:
        statuses = list(pool.map(send, range(copies)))

    assert statuses == [200] * copies
    assert BrexWebhookEvent.objects.filter(webhook_id=headers["Webhook-Id"]).count() == 1
    transfer_signals = [e for e, _ in received if e.event_type == "TRANSFER_PROCESSED"]
    assert len(transfer_signals) == 1
    assert BrexWebhookEvent.objects.get(webhook_id=headers["Webhook-Id"]).attempts == 1
