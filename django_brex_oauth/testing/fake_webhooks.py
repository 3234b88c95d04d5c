"""Brex webhooks in :class:`~django_brex_oauth.testing.FakeBrex`.

* ``GET|POST /v1/webhooks`` and ``GET|PUT|DELETE /v1/webhooks/{id}``: subscriptions, made with
  a customer's token; ``POST`` needs an ``Idempotency-Key`` (the same key answers the same
  subscription), a ``url`` (HTTPS, or plain HTTP on loopback for local sites) and a non-empty
  ``event_types`` list;
* ``GET /v1/webhooks/secrets``: the signing secrets, a bare JSON array of
  ``{"secret", "status"}``; :meth:`FakeWebhooks.rotate_secret` adds a new ``ACTIVE`` secret
  and marks the old one ``PENDING_REVOKE`` (both listed, both sign);
* deliveries: :meth:`FakeWebhooks.emit` signs the event the Standard Webhooks way and posts it
  to every subscription of that event type on a background thread, retrying a non-2xx
  answer; ``/account`` is a page where the fake user edits their name, which emits
  ``USER_UPDATED``.

``FakeBrex.webhooks`` is the instance; ``FakeBrex.emit(...)`` is a shortcut. No Django here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import json
import queue
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENT_TYPES", "Delivery", "FakeWebhooks"]

EVENT_TYPES: tuple[str, ...] = (
    "USER_UPDATED",
    "EXPENSE_PAYMENT_UPDATED",
    "TRANSFER_PROCESSED",
    "TRANSFER_FAILED",
    "REFERRAL_CREATED",
    "REFERRAL_ACTIVATED",
    "REFERRAL_APPLICATION_STATUS_CHANGED",
)
"""Event types a subscription may name."""

#: Events about a company carry its ``company_id``; the referral events do not.
_COMPANY_EVENTS = ("USER_UPDATED", "EXPENSE_PAYMENT_UPDATED", "TRANSFER_PROCESSED",
                   "TRANSFER_FAILED")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Delivery:
    """One event sent (or being sent) to one subscription's URL."""

    webhook_id: str
    subscription_id: str
    url: str
    event_type: str
    body: bytes
    #: One entry per attempt: the HTTP status, or the name of the network error.
    attempts: list[int | str] = field(default_factory=list)
    #: The ``Webhook-Timestamp`` sent with each attempt.
    timestamps: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def delivered(self) -> bool:
        """True once an attempt was answered 2xx."""
        return any(isinstance(a, int) and 200 <= a < 300 for a in self.attempts)

    @property
    def payload(self) -> dict[str, Any]:
        """The event as JSON."""
        return json.loads(self.body)


def _new_secret() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signature_header(secrets_: Sequence[str], webhook_id: str, timestamp: int,
                     body: bytes) -> str:
    """``Webhook-Signature``: one ``v1,<base64>`` per secret, space-separated."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(
            hmac.new(base64.b64decode(secret), signed, hashlib.sha256).digest()
        ).decode("ascii")
        for secret in secrets_
    )


def _url_allowed(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class FakeWebhooks:
    """The webhook part of a fake Brex: subscriptions, secrets and signed deliveries.

    ``retry_delays`` are the pauses before the second, third... attempt of a delivery whose
    answer was not 2xx (Brex retries for days; the fake for seconds).
    """

    def __init__(self, fake: Any, responses: Mapping[str, Callable[..., Any]],
                 retry_delays: Sequence[float] = (0.2, 0.5, 1.0, 2.0)) -> None:
        self.fake = fake
        self._r = responses
        self.retry_delays = list(retry_delays)
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.secrets: list[dict[str, str]] = [{"secret": _new_secret(), "status": "ACTIVE"}]
        self.deliveries: list[Delivery] = []
        self._idempotency: dict[str, str] = {}
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------------ controls

    def rotate_secret(self) -> str:
        """Start a rotation: a new ``ACTIVE`` secret; the old ones become
        ``PENDING_REVOKE`` and still sign. Returns the new secret."""
        with self.fake._lock:
            for item in self.secrets:
                item["status"] = "PENDING_REVOKE"
            secret = _new_secret()
            self.secrets.insert(0, {"secret": secret, "status": "ACTIVE"})
            return secret

    def finish_rotation(self) -> None:
        """End a rotation: only the ``ACTIVE`` secret is listed and signs."""
        with self.fake._lock:
            self.secrets[:] = [s for s in self.secrets if s["status"] == "ACTIVE"]

    @property
    def signing_secrets(self) -> list[str]:
        """Every secret listed now (each signs a delivery)."""
        with self.fake._lock:
            return [item["secret"] for item in self.secrets]

    def emit(self, event_type: str, payload: Mapping[str, Any] | None = None, *,
             company_id: str | None = None, webhook_id: str | None = None) -> list[Delivery]:
        """Send an event to every active subscription of ``event_type``; return the
        deliveries (sent on a background thread: see :meth:`wait`).

        The body is ``{"event_type", "company_id", **payload}``; ``company_id`` defaults to
        the fake's company for company events and is left out of the referral events.
        """
        body: dict[str, Any] = {"event_type": event_type}
        if company_id is None and event_type in _COMPANY_EVENTS:
            company_id = self.fake.company["id"]
        if company_id is not None:
            body["company_id"] = company_id
        body.update(payload or {})
        raw = json.dumps(body).encode("utf-8")
        sent = []
        with self.fake._lock:
            for subscription in self.subscriptions.values():
                if subscription["status"] != "ACTIVE" or event_type not in subscription[
                    "event_types"
                ]:
                    continue
                delivery = Delivery(
                    webhook_id or "msg_" + secrets.token_hex(12), subscription["id"],
                    subscription["url"], event_type, raw,
                )
                self.deliveries.append(delivery)
                sent.append(delivery)
        for delivery in sent:
            self._send(delivery)
        return sent

    def redeliver(self, delivery: Delivery) -> Delivery:
        """Send ``delivery`` again with the same ``Webhook-Id`` (as Brex does)."""
        again = Delivery(delivery.webhook_id, delivery.subscription_id, delivery.url,
                         delivery.event_type, delivery.body)
        with self.fake._lock:
            self.deliveries.append(again)
        self._send(again)
        return again

    def wait(self, deliveries: Sequence[Delivery] | None = None, timeout: float = 10) -> bool:
        """Wait until ``deliveries`` (default: all so far) are delivered or given up."""
        deadline = time.monotonic() + timeout
        for delivery in list(self.deliveries if deliveries is None else deliveries):
            if not delivery.done.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def stop(self) -> None:
        """Stop the delivery thread (pending deliveries are dropped)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=5)

    # ------------------------------------------------------------------------ delivery

    def _send(self, delivery: Delivery) -> None:
        with self.fake._lock:
            if self._thread is None:
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="FakeBrex:webhooks")
                self._thread.start()
        self._queue.put(delivery)

    def _run(self) -> None:
        while not self._stopping.is_set():
            delivery = self._queue.get()
            if delivery is None:
                return
            self._attempt_all(delivery)

    def _attempt_all(self, delivery: Delivery) -> None:
        try:
            for pause in [0.0, *self.retry_delays]:
                if pause and self._stopping.wait(pause):
                    return
                if self._attempt(delivery):
                    return
        finally:
            delivery.done.set()

    def _attempt(self, delivery: Delivery) -> bool:
        timestamp = int(time.time())
        request = urllib.request.Request(delivery.url, data=delivery.body, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("Webhook-Id", delivery.webhook_id)
        request.add_header("Webhook-Timestamp", str(timestamp))
        request.add_header("Webhook-Signature", signature_header(
            self.signing_secrets, delivery.webhook_id, timestamp, delivery.body))
        delivery.timestamps.append(timestamp)
        try:
            with _OPENER.open(request, timeout=10) as response:
                status: int | str = response.status
        except urllib.error.HTTPError as error:
            status = error.code
            error.close()
        except OSError as error:
            status = type(error).__name__
        delivery.attempts.append(status)
        return isinstance(status, int) and 200 <= status < 300

    # ------------------------------------------------------------------------ endpoints

    def routes(self, path: str) -> tuple[dict[str, Callable[..., Any]] | None, dict[str, str]]:
        """The handlers of ``path``, if it is a webhook endpoint or the account page."""
        if path == "/v1/webhooks":
            return {"GET": self._list, "POST": self._create}, {}
        if path == "/v1/webhooks/secrets":
            return {"GET": self._secrets}, {}
        if path == "/account":
            return {"GET": self._account_page, "POST": self._account_submit}, {}
        if path.startswith("/v1/webhooks/") and path.count("/") == 3:
            webhook_id = urllib.parse.unquote(path.rsplit("/", 1)[1])
            return {"GET": self._get, "PUT": self._update, "DELETE": self._delete}, {
                "webhook_id": webhook_id}
        return None, {}

    def _auth(self, request: Any) -> Any:
        _, problem = self.fake._api_auth(request, "openid", user_token=True)
        return problem

    def _error(self, status: int, message: str) -> Any:
        return self._r["api_error"](status, message)

    def _check_body(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "The request body must be a JSON object"
        url = body.get("url")
        if not isinstance(url, str) or not _url_allowed(url):
            return "url must be an https URL"
        types = body.get("event_types")
        if not isinstance(types, list) or not types:
            return "event_types must be a non-empty list"
        unknown = [t for t in types if t not in EVENT_TYPES]
        if unknown:
            return f"Unknown event type(s): {', '.join(map(str, unknown))}"
        return None

    def _list(self, request: Any) -> Any:
        problem = self._auth(request)
        if problem is not None:
            return problem
        items = [dict(s) for s in self.subscriptions.values() if s["status"] != "DELETED"]
        return self._r["json"](200, {"items": items, "next_cursor": None})

    def _create(self, request: Any) -> Any:
        problem = self._auth(request)
        if problem is not None:
            return problem
        key = (request.headers.get("Idempotency-Key") or "").strip()
        if not key:
            return self._error(400, "Missing required header: Idempotency-Key")
        if key in self._idempotency:
            return self._r["json"](200, dict(self.subscriptions[self._idempotency[key]]))
        body = request.json()
        invalid = self._check_body(body)
        if invalid:
            return self._error(400, invalid)
        webhook_id = "wh_" + secrets.token_hex(8)
        self.subscriptions[webhook_id] = {
            "id": webhook_id, "url": body["url"], "event_types": list(body["event_types"]),
            "status": "ACTIVE",
        }
        self._idempotency[key] = webhook_id
        return self._r["json"](200, dict(self.subscriptions[webhook_id]))

    def _found(self, request: Any, webhook_id: str) -> tuple[dict[str, Any] | None, Any]:
        """The subscription, or the error answer (401 without a token, 404 unknown)."""
        problem = self._auth(request)
        if problem is not None:
            return None, problem
        subscription = self.subscriptions.get(webhook_id)
        if subscription is None or subscription["status"] == "DELETED":
            return None, self._error(404, f"Webhook {webhook_id} not found")
        return subscription, None

    def _get(self, request: Any, webhook_id: str) -> Any:
        subscription, problem = self._found(request, webhook_id)
        return problem or self._r["json"](200, dict(subscription or {}))

    def _update(self, request: Any, webhook_id: str) -> Any:
        subscription, problem = self._found(request, webhook_id)
        if subscription is None:
            return problem
        body = request.json()
        invalid = self._check_body(body)
        if invalid:
            return self._error(400, invalid)
        subscription.update(url=body["url"], event_types=list(body["event_types"]))
        if body.get("status") in ("ACTIVE", "INACTIVE"):
            subscription["status"] = body["status"]
        return self._r["json"](200, dict(subscription))

    def _delete(self, request: Any, webhook_id: str) -> Any:
        subscription, problem = self._found(request, webhook_id)
        if subscription is None:
            return problem
        subscription["status"] = "DELETED"
        return self._r["json"](200, {})

    def _secrets(self, request: Any) -> Any:
        problem = self._auth(request)
        if problem is not None:
            return problem
        return self._r["json"](200, [dict(item) for item in self.secrets])

    # ------------------------------------------------------------------------ account page

    def _account_user(self, request: Any) -> dict[str, Any]:
        wanted = (request.query.get("user") or [""])[0]
        return (self.fake.find_user(wanted) if wanted else None) or self.fake.default_user

    def _account_form(self, user: dict[str, Any], note: str = "") -> str:
        esc = html.escape
        content = (
            "<h1>Your Brex profile</h1>"
            f'<p class="who">{esc(user["email"])} · {esc(self.fake.company["legal_name"])}</p>'
            + (f'<p class="note" id="saved" role="status">{esc(note)}</p>' if note else "")
            + f'<form id="profile-form" method="post" action="/account?user={esc(user["id"])}">'
            '<label class="field" for="first_name">First name</label>'
            f'<input type="text" id="first_name" name="first_name" '
            f'value="{esc(user["first_name"])}" required>'
            '<label class="field" for="last_name">Last name</label>'
            f'<input type="text" id="last_name" name="last_name" '
            f'value="{esc(user["last_name"])}" required>'
            '<div class="actions"><button type="submit" id="save">Save</button></div></form>'
        )
        return self._r["page"]("Your Brex profile", content)

    def _account_page(self, request: Any) -> Any:
        return self._r["html"](200, self._account_form(self._account_user(request)))

    def _account_submit(self, request: Any) -> Any:
        user = self._account_user(request)
        form = {key: (values or [""])[0].strip() for key, values in request.form.items()}
        changed = [name for name in ("first_name", "last_name")
                   if form.get(name) and form[name] != user[name]]
        for name in changed:
            user[name] = form[name]
        note = "Nothing changed."
        if changed:
            # emit() only queues: the delivery thread posts, outside the fake's lock.
            sent = self.emit("USER_UPDATED", {"user_id": user["id"],
                                              "updated_attributes": changed})
            note = f"Saved. Brex sent USER_UPDATED to {len(sent)} subscription(s)."
        return self._r["html"](200, self._account_form(user, note))
