"""Brex webhook events: stored once per ``Webhook-Id``, then handled once.

:func:`receive` stores a verified delivery. Of any number of copies of one delivery, also
arriving at the same moment on several processes, exactly one inserts the row (the
``webhook_id`` is unique; the others find it and answer "duplicate"), and only that one
schedules the handling, after its transaction commits: in the same process, or in the
``brex_oauth.process_webhook_event`` task with ``WEBHOOK_PROCESS_IN_TASK``.

:func:`process` claims the event with one conditional update (``received`` →
``processing``), so a task delivered twice or two staff clicking "process again" still run
the handlers once per claim. A claim left by a process that died is taken over after
:data:`PROCESSING_TIMEOUT` (the handlers may then run a second time for that event).
It runs the app's own handler (``USER_UPDATED`` refreshes the stored Brex user details of
the matching connections) and then sends ``signals.webhook_received`` outside any
transaction. An event whose ``company_id`` matches
no active connection is ``ignored`` (recorded, not signalled); one without a
``company_id`` (referral events) is signalled with no connections.

Nothing here logs a payload.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from .. import signals
from ..client import BrexClient
from ..conf import brex_settings
from ..exceptions import BrexOAuthError
from ..models import BrexConnection, BrexWebhookEvent, ConnectionStatus, WebhookEventStatus
from ..teams import teams_of
from .queue import send_task

logger = logging.getLogger("django_brex_oauth")

#: The Celery task that runs :func:`process` when ``WEBHOOK_PROCESS_IN_TASK`` is set.
PROCESS_TASK = "brex_oauth.process_webhook_event"

USER_UPDATED = "USER_UPDATED"

#: Seconds after which an event still ``processing`` is taken to belong to a process that
#: died, so that a redelivered task or "process again" may handle it.
PROCESSING_TIMEOUT = 600
_USER_SCOPES = ("users", "users.readonly")


class ReceiveOutcome(str, enum.Enum):
    """What :func:`receive` did with a delivery."""

    #: Stored for the first time; its handling is scheduled.
    ACCEPTED = "accepted"
    #: This webhook id was stored before: nothing is done again.
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Received:
    """The result of :func:`receive`."""

    outcome: ReceiveOutcome
    event: BrexWebhookEvent


def receive(webhook_id: str, payload: Mapping[str, Any]) -> Received:
    """Store a verified delivery once and schedule its handling after the commit."""
    company_id = payload.get("company_id")
    with transaction.atomic():
        event, created = BrexWebhookEvent.objects.get_or_create(
            webhook_id=webhook_id,
            defaults={
                "event_type": str(payload.get("event_type") or "")[:64],
                "company_id": str(company_id)[:255] if company_id else "",
                "payload": dict(payload),
            },
        )
        if created:
            transaction.on_commit(lambda: _schedule(event.pk))
    if not created:
        logger.info("Brex webhook %s was received before; not processed again.", webhook_id)
        return Received(ReceiveOutcome.DUPLICATE, event)
    logger.info("Stored Brex webhook %s (%s).", webhook_id, event.event_type)
    return Received(ReceiveOutcome.ACCEPTED, event)


def _schedule(event_id: int) -> None:
    if not brex_settings.WEBHOOK_PROCESS_IN_TASK:
        process(event_id)
        return
    try:
        send_task(PROCESS_TASK, (event_id,))
    except Exception as err:  # noqa: BLE001 - any broker failure: handle it here instead
        logger.warning("Could not queue Brex webhook event %s (%s); handling it now.",
                       event_id, type(err).__name__)
        process(event_id)


def active_connections_for(company_id: str) -> list[BrexConnection]:
    """The active connections whose Brex company is ``company_id``."""
    if not company_id:
        return []
    return list(
        BrexConnection.objects.filter(
            brex_company_id=company_id, status=ConnectionStatus.ACTIVE
        ).order_by("pk")
    )


def process(event: BrexWebhookEvent | int, *, again: bool = False) -> BrexWebhookEvent | None:
    """Handle a stored event once: the app's own handler, then ``webhook_received``.

    Returns the event as stored afterwards, or None when another process holds it or it
    was handled already. With ``again`` (the admin's "process again") an event that is not
    being processed right now is handled once more.
    """
    event_id = event.pk if isinstance(event, BrexWebhookEvent) else int(event)
    now = timezone.now()
    # A claim older than PROCESSING_TIMEOUT belonged to a process that died (a worker
    # killed mid-way, whose task comes back with acks_late): it may be taken over.
    stale = Q(status=WebhookEventStatus.PROCESSING,
              processing_since__lt=now - timedelta(seconds=PROCESSING_TIMEOUT))
    claimable = BrexWebhookEvent.objects.filter(pk=event_id)
    if again:
        claimable = claimable.filter(~Q(status=WebhookEventStatus.PROCESSING) | stale)
    else:
        claimable = claimable.filter(Q(status=WebhookEventStatus.RECEIVED) | stale)
    with transaction.atomic():
        if not claimable.update(status=WebhookEventStatus.PROCESSING, processing_since=now,
                                last_error="", attempts=F("attempts") + 1):
            return None
        stored = BrexWebhookEvent.objects.get(pk=event_id)
        connections = active_connections_for(stored.company_id)
        stored.connections.set(connections)

    if stored.company_id and not connections:
        return _finish(stored, WebhookEventStatus.IGNORED, "", now)
    try:
        errors = _run_handlers(stored, connections)
    except Exception as err:
        # Never left "processing" (which "process again" leaves alone). Only the type is
        # kept: an exception's text may quote the payload.
        _finish(stored, WebhookEventStatus.FAILED,
                f"Handling failed: {type(err).__name__}.", now)
        raise
    status = WebhookEventStatus.FAILED if errors else WebhookEventStatus.PROCESSED
    return _finish(stored, status, " ".join(errors), now)


def _run_handlers(event: BrexWebhookEvent, connections: list[BrexConnection]) -> list[str]:
    """The app's own handler, then ``webhook_received``; the failures, described."""
    errors = []
    if event.event_type == USER_UPDATED:
        errors += _refresh_user_details(event.payload, connections)
    # After the app's own handler; a receiver that raises is recorded, not re-raised, so
    # that every receiver hears of the event once.
    for receiver, result in signals.webhook_received.send_robust(
        sender=BrexWebhookEvent, event=event, connections=connections,
        teams=teams_of(connections),
    ):
        if isinstance(result, Exception):
            name = getattr(receiver, "__qualname__", type(receiver).__name__)
            errors.append(f"Receiver {name} raised {type(result).__name__}.")
            logger.error("A webhook_received receiver (%s) raised %s for Brex webhook %s.",
                         name, type(result).__name__, event.webhook_id)
    return errors


def _finish(event: BrexWebhookEvent, status: str, error: str, started) -> BrexWebhookEvent:
    event.status = status
    event.last_error = error[:2000]
    event.processed_at = timezone.now()
    BrexWebhookEvent.objects.filter(pk=event.pk).update(
        status=status, last_error=event.last_error, processed_at=event.processed_at,
        processing_since=None,
    )
    logger.info("Brex webhook %s (%s): %s in %.0f ms.", event.webhook_id, event.event_type,
                status, (event.processed_at - started).total_seconds() * 1000)
    return event


def _refresh_user_details(payload: Mapping[str, Any], connections) -> list[str]:
    """``USER_UPDATED``: read the user again for each connection made by that Brex user."""
    user_id = str(payload.get("user_id") or "")
    errors = []
    for connection in connections:
        if connection.brex_user_id != user_id or not connection.has_scope(*_USER_SCOPES):
            continue
        try:
            me = BrexClient(connection).get_me()
        except BrexOAuthError as err:
            errors.append(f"Could not read the Brex user of connection {connection.pk}: "
                          f"{type(err).__name__}.")
            continue
        email = str(me.get("email") or "")[:254]
        if email and email != connection.brex_user_email:
            BrexConnection.objects.filter(pk=connection.pk).update(
                brex_user_email=email, updated_at=timezone.now()
            )
            connection.brex_user_email = email
        logger.info("Refreshed the Brex user details of connection %s (USER_UPDATED).",
                    connection.pk)
    return errors
