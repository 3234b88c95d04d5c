"""Webhook subscriptions that follow connections.

With ``WEBHOOK_EVENT_TYPES`` and ``WEBHOOK_URL`` set, :func:`subscribe` (called once a
connect has committed) sends one ``POST /v1/webhooks`` with that connection's access token:
``url`` = ``WEBHOOK_URL`` verbatim, the event types in their configured order, and an
``Idempotency-Key`` stored with the subscription, so a retry can never create a second one.
The subscription's Brex id is stored. A reconnect keeps the subscription it has.

:func:`unsubscribe` (called by the disconnect service before anything else) deletes the
subscription at Brex while the grant is still live, before the tokens are revoked.

Every outcome is a connection event. A failure that may pass (Brex unreachable, 429, 5xx)
is retried by the ``brex_oauth.sync_webhook_subscription`` task with backoff; others wait
for ``manage.py brex_oauth_webhooks --sync`` (:mod:`.webhook_reconcile`). A subscription
whose deletion is retried after the grant is gone is deleted with another active
connection of the same Brex company if there is one, else marked ``abandoned``.

Concurrency: the subscription row is locked while its state changes; the requests to Brex
run outside any transaction.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from django.db import transaction

from ..backoff import backoff_delay
from ..client import BrexClient
from ..conf import brex_settings
from ..exceptions import BrexAPIError, BrexOAuthError, BrexUnavailable, ConnectionNotUsable
from ..models import (
    BrexConnection,
    BrexWebhookSubscription,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    SubscriptionStatus,
    connection_pk,
    with_team_note,
)
from .queue import send_task

logger = logging.getLogger("django_brex_oauth")

#: The task that retries a subscription or an unsubscription.
SYNC_TASK = "brex_oauth.sync_webhook_subscription"

#: States in which a subscription exists (or may exist) at Brex.
LIVE = (SubscriptionStatus.SUBSCRIBING, SubscriptionStatus.ACTIVE)
PENDING = (SubscriptionStatus.SUBSCRIBING, SubscriptionStatus.UNSUBSCRIBING)


@dataclass(frozen=True)
class SyncResult:
    """What one attempt did. ``error`` is log-safe; ``retryable`` says a task should retry."""

    subscription: BrexWebhookSubscription
    error: str = ""
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return not self.error


def configured() -> tuple[str, list[str]] | None:
    """``(WEBHOOK_URL, WEBHOOK_EVENT_TYPES)`` when both are set, else None."""
    types = [str(t) for t in brex_settings.WEBHOOK_EVENT_TYPES or ()]
    url = brex_settings.WEBHOOK_URL
    if not types or not url:
        return None
    return str(url), types


def subscribe(connection: BrexConnection | int) -> SyncResult | None:
    """Subscribe an active connection to the configured events, unless it is already.

    Returns None when there is nothing to do (no event types configured, the connection is
    not active, or it has a live subscription already). Never raises for Brex's answer: a
    failure is recorded, and queued for a retry when it may pass.
    """
    wanted = configured()
    if wanted is None:
        return None
    url, types = wanted
    connection_id = connection_pk(connection)
    with transaction.atomic():
        locked = (BrexConnection.objects.select_for_update()
                  .filter(pk=connection_id, status=ConnectionStatus.ACTIVE).first())
        if locked is None or locked.webhook_subscriptions.filter(status__in=LIVE).exists():
            return None
        subscription = BrexWebhookSubscription.objects.create(
            connection=locked, url=url, event_types=types,
            idempotency_key=f"brex-oauth-webhook-{uuid.uuid4()}",
        )
    return _finish_with_retry(attempt(subscription))


def unsubscribe(
    connection: BrexConnection | int, *, actor=None
) -> list[SyncResult | None]:
    """Delete a connection's live subscriptions at Brex (while its grant still works).

    One query when the connection has none. Failures are recorded and retried as
    :func:`subscribe`'s are; the caller goes on with the disconnect either way. A result
    is None for a subscription gone by the time it was tried (see :func:`attempt`).
    """
    connection_id = connection_pk(connection)
    with transaction.atomic():
        subscriptions = list(
            BrexWebhookSubscription.objects.select_for_update()
            .filter(connection_id=connection_id, status__in=(*LIVE,
                                                             SubscriptionStatus.UNSUBSCRIBING))
        )
        for subscription in subscriptions:
            subscription.status = SubscriptionStatus.UNSUBSCRIBING
            subscription.attempts = 0
            subscription.save(update_fields=["status", "attempts", "updated_at"])
    return [_finish_with_retry(attempt(s, actor=actor)) for s in subscriptions]


def attempt(subscription: BrexWebhookSubscription | int, *, actor=None) -> SyncResult | None:
    """Try once to bring a pending subscription where it should be at Brex: create a
    ``subscribing`` one, delete an ``unsubscribing`` one. Others are left as they are."""
    subscription_id = subscription.pk if isinstance(subscription, BrexWebhookSubscription) \
        else int(subscription)
    with transaction.atomic():
        locked = (BrexWebhookSubscription.objects.select_for_update()
                  .select_related("connection").filter(pk=subscription_id).first())
        if locked is None:
            return None
        if locked.status not in PENDING:
            return SyncResult(locked)
        locked.attempts += 1
        locked.save(update_fields=["attempts", "updated_at"])
    if locked.status == SubscriptionStatus.SUBSCRIBING:
        return _create_at_brex(locked, actor)
    return _delete_at_brex(locked, actor)


def _create_at_brex(subscription: BrexWebhookSubscription, actor) -> SyncResult:
    connection = subscription.connection
    try:
        answer = BrexClient(connection).post(
            "/v1/webhooks",
            {"url": subscription.url, "event_types": list(subscription.event_types)},
            idempotency_key=subscription.idempotency_key,
        )
        brex_id = str((answer or {}).get("id") or "")
        if not brex_id:
            raise BrexAPIError(200, message="Brex's answer has no webhook id.",
                               method="POST", path="/v1/webhooks")
    except BrexOAuthError as err:
        if isinstance(err, ConnectionNotUsable):
            # Disconnected meanwhile: nothing was created with this grant.
            return _record(subscription, SubscriptionStatus.DELETED,
                           EventKind.WEBHOOK_SUBSCRIBE_FAILED,
                           "The connection can no longer be used; not subscribed.", actor,
                           error=str(err))
        return _failed(subscription, EventKind.WEBHOOK_SUBSCRIBE_FAILED, err, actor)
    with transaction.atomic():
        current = BrexWebhookSubscription.objects.select_for_update().get(pk=subscription.pk)
        if current.status != SubscriptionStatus.SUBSCRIBING:
            # Disconnected while Brex was answering: what Brex just made must go too.
            current.brex_webhook_id = brex_id[:255]
            current.status = SubscriptionStatus.UNSUBSCRIBING
            current.save(update_fields=["brex_webhook_id", "status", "updated_at"])
    if current.status == SubscriptionStatus.UNSUBSCRIBING:
        return _delete_at_brex(current, actor)
    subscription.brex_webhook_id = brex_id[:255]
    return _record(subscription, SubscriptionStatus.ACTIVE, EventKind.WEBHOOK_SUBSCRIBED,
                   f"Subscribed to {', '.join(subscription.event_types)} "
                   f"(Brex webhook {brex_id}).", actor)


def _delete_at_brex(subscription: BrexWebhookSubscription, actor) -> SyncResult:
    brex_id = subscription.brex_webhook_id
    if not brex_id:
        return _record(subscription, SubscriptionStatus.DELETED,
                       EventKind.WEBHOOK_UNSUBSCRIBED,
                       "The subscription had not been created at Brex; nothing to delete.",
                       actor)
    client = client_for(subscription.connection)
    if client is None:
        return _record(
            subscription, SubscriptionStatus.ABANDONED, EventKind.WEBHOOK_UNSUBSCRIBE_FAILED,
            f"Brex webhook {brex_id} could not be deleted: no live grant of its company is "
            "left. Events it still delivers are recorded and not signalled.", actor,
            error="no live grant left",
        )
    try:
        client.delete(f"/v1/webhooks/{brex_id}")
    except BrexAPIError as err:
        if err.status != 404:
            return _failed(subscription, EventKind.WEBHOOK_UNSUBSCRIBE_FAILED, err, actor)
    except BrexOAuthError as err:
        return _failed(subscription, EventKind.WEBHOOK_UNSUBSCRIBE_FAILED, err, actor)
    return _record(subscription, SubscriptionStatus.DELETED, EventKind.WEBHOOK_UNSUBSCRIBED,
                   f"Deleted Brex webhook {brex_id}.", actor)


def client_for(connection: BrexConnection) -> BrexClient | None:
    """A client for ``connection`` while it is active, else for another active connection
    of the same Brex company and environment (a subscription belongs to the company)."""
    if connection.status == ConnectionStatus.ACTIVE:
        return BrexClient(connection)
    if not connection.brex_company_id:
        return None
    other = (BrexConnection.objects.filter(
        status=ConnectionStatus.ACTIVE, brex_company_id=connection.brex_company_id,
        environment=connection.environment,
    ).exclude(pk=connection.pk).order_by("-connected_at").first())
    return BrexClient(other) if other is not None else None


def _failed(subscription, kind, err: BrexOAuthError, actor) -> SyncResult:
    retryable = isinstance(err, BrexUnavailable)
    error = str(err)[:1000]
    then = ("It will be tried again." if retryable
            else "Run manage.py brex_oauth_webhooks --sync to try again.")
    verb = "Subscribing to" if kind == EventKind.WEBHOOK_SUBSCRIBE_FAILED else "Deleting"
    detail = f"{verb} Brex webhooks failed (attempt {subscription.attempts}): {error} {then}"
    result = _record(subscription, subscription.status, kind, detail, actor, error=error)
    return SyncResult(result.subscription, error, retryable)


def _record(subscription, status, kind, detail, actor, *, error: str = "") -> SyncResult:
    with transaction.atomic():
        subscription.status = status
        subscription.last_error = error
        subscription.save(update_fields=["status", "last_error", "brex_webhook_id",
                                         "updated_at"])
        ConnectionEvent.objects.create(
            connection_id=subscription.connection_id, kind=kind,
            detail=with_team_note(detail, subscription.connection_id),
            actor=actor if getattr(actor, "pk", None) else None,
        )
    log = logger.warning if error else logger.info
    log("Brex connection %s, webhook subscription %s: %s", subscription.connection_id,
        subscription.pk, subscription.get_status_display())
    return SyncResult(subscription, error)


def _finish_with_retry(result: SyncResult | None, retries: int = 0) -> SyncResult | None:
    if result is not None and result.retryable:
        queue_retry(result.subscription.pk, retries)
    return result


def queue_retry(subscription_id: int, retries: int = 0) -> bool:
    """Queue the retry task with backoff; False when the broker refused it (``--sync``
    picks the subscription up then)."""
    countdown = backoff_delay(retries, base=brex_settings.WEBHOOK_RETRY_BACKOFF,
                              cap=brex_settings.WEBHOOK_RETRY_BACKOFF_MAX)
    try:
        send_task(SYNC_TASK, (subscription_id, retries), countdown=countdown)
    except Exception as err:  # noqa: BLE001 - any broker failure; --sync recovers
        logger.warning("Could not queue the retry of webhook subscription %s (%s).",
                       subscription_id, type(err).__name__)
        return False
    return True


def pending_subscription_ids() -> list[int]:
    """Subscriptions still waiting to be created or deleted at Brex."""
    return list(BrexWebhookSubscription.objects.filter(status__in=PENDING)
                .order_by("pk").values_list("pk", flat=True))

