"""Pruning what is no longer needed: expired authorization requests, old events and old
webhook events."""

from __future__ import annotations

import functools
import operator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from django.db.models import Q, QuerySet
from django.utils import timezone

from ..conf import brex_settings
from ..models import AuthorizationRequest, BrexWebhookEvent, ConnectionEvent, EventKind

#: How long an expired authorization request is kept, so that a person coming back from
#: Brex late is told the attempt expired (rather than that it is unknown).
EXPIRED_REQUEST_GRACE = timedelta(hours=1)

#: Rows deleted per statement, so that pruning a large backlog never holds long locks.
BATCH_SIZE = 2000


@dataclass
class PruneResult:
    """How many rows :func:`prune` deleted (or would delete, in a dry run)."""

    authorization_requests: int = 0
    events: int = 0
    webhook_events: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for a task result or a log line)."""
        return asdict(self)


def expired_authorization_requests(now: datetime | None = None) -> QuerySet:
    """Authorization requests that expired more than :data:`EXPIRED_REQUEST_GRACE` ago,
    used or not: none of them can complete a connection any more."""
    now = now or timezone.now()
    return AuthorizationRequest.objects.filter(expires_at__lt=now - EXPIRED_REQUEST_GRACE)


def old_events(now: datetime | None = None) -> QuerySet:
    """Events older than ``EVENT_RETENTION_DAYS``, and routine "refreshed" events older
    than ``REFRESH_EVENT_RETENTION_DAYS`` (a setting of ``None`` keeps them)."""
    now = now or timezone.now()
    conditions = []
    days = brex_settings.EVENT_RETENTION_DAYS
    if days is not None:
        conditions.append(Q(created_at__lt=now - timedelta(days=days)))
    refreshed_days = brex_settings.REFRESH_EVENT_RETENTION_DAYS
    if refreshed_days is not None:
        conditions.append(
            Q(kind=EventKind.REFRESHED, created_at__lt=now - timedelta(days=refreshed_days))
        )
    if not conditions:
        return ConnectionEvent.objects.none()
    return ConnectionEvent.objects.filter(functools.reduce(operator.or_, conditions))


def old_webhook_events(now: datetime | None = None) -> QuerySet:
    """Webhook events received more than ``WEBHOOK_EVENT_RETENTION_DAYS`` ago (``None``
    keeps them). Brex redelivers for days, not months, so their ids are no longer needed
    to recognise a duplicate."""
    now = now or timezone.now()
    days = brex_settings.WEBHOOK_EVENT_RETENTION_DAYS
    if days is None:
        return BrexWebhookEvent.objects.none()
    return BrexWebhookEvent.objects.filter(received_at__lt=now - timedelta(days=days))


def _delete_in_batches(queryset: QuerySet) -> int:
    model = queryset.model
    deleted = 0
    while True:
        batch = list(queryset.order_by("pk").values_list("pk", flat=True)[:BATCH_SIZE])
        if not batch:
            return deleted
        # Rows of this model only, not the many-to-many links deleted with them.
        deleted += model.objects.filter(pk__in=batch).delete()[1].get(model._meta.label, 0)


def prune(now: datetime | None = None, *, dry_run: bool = False) -> PruneResult:
    """Delete expired authorization requests, and events and webhook events past their
    retention period.

    With ``dry_run`` nothing is deleted; the counts say what would be.
    """
    now = now or timezone.now()
    querysets = (expired_authorization_requests(now), old_events(now), old_webhook_events(now))
    if dry_run:
        return PruneResult(*(queryset.count() for queryset in querysets))
    return PruneResult(*(_delete_in_batches(queryset) for queryset in querysets))
