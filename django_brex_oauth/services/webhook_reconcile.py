"""Listing and reconciling webhook subscriptions with Brex (``manage.py brex_oauth_webhooks``).

:func:`survey` reads, for each Brex company with an active connection, the subscriptions
Brex holds (``GET /v1/webhooks``, with one of that company's connections) and sets them
beside the ones stored here. :func:`reconcile` then makes Brex match the settings:

* subscriptions waiting to be created or deleted are tried again;
* an active connection with no subscription is subscribed; one whose stored subscription
  has another URL or other event types than the settings is updated (``PUT``); with
  ``WEBHOOK_EVENT_TYPES`` empty, subscriptions are deleted;
* a subscription stored as active that Brex no longer has is made again;
* a subscription at Brex for ``WEBHOOK_URL`` that nothing here knows (left by a lost
  answer, or a database restored from a backup) is deleted. Subscriptions for other URLs
  are listed and left alone: they are not this site's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..client import BrexClient
from ..exceptions import BrexOAuthError
from ..models import (
    BrexConnection,
    BrexWebhookSubscription,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    SubscriptionStatus,
    with_team_note,
)
from . import webhook_subscriptions as subs


@dataclass
class CompanyView:
    """One Brex company: the connection used to ask Brex, and what each side holds."""

    company_id: str
    connection: BrexConnection
    at_brex: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


@dataclass
class Report:
    """Lines saying what :func:`reconcile` did, and how many things failed."""

    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def add(self, line: str, *, failed: bool = False) -> None:
        self.lines.append(line)
        self.failures += int(failed)


def _companies() -> Iterator[tuple[str, BrexConnection]]:
    seen = set()
    for connection in BrexConnection.objects.filter(status=ConnectionStatus.ACTIVE).order_by(
        "-connected_at", "-pk"
    ):
        key = connection.brex_company_id or f"connection-{connection.pk}"
        if key not in seen:
            seen.add(key)
            yield key, connection


def survey() -> list[CompanyView]:
    """What Brex holds for each company with an active connection."""
    views = []
    for company_id, connection in _companies():
        view = CompanyView(company_id, connection)
        try:
            view.at_brex = list(BrexClient(connection).iter_items("/v1/webhooks"))
        except BrexOAuthError as err:
            view.error = f"{type(err).__name__}: {err}"
        views.append(view)
    return views


def stored() -> list[BrexWebhookSubscription]:
    """Subscriptions stored here that are not deleted."""
    return list(BrexWebhookSubscription.objects.exclude(status=SubscriptionStatus.DELETED)
                .select_related("connection").order_by("connection_id", "pk"))


def reconcile() -> Report:
    """Make Brex's subscriptions match the settings and the active connections."""
    report = Report()
    for subscription_id in subs.pending_subscription_ids():
        _note(report, subs.attempt(subscription_id), "retried")
    wanted = subs.configured()
    for connection in BrexConnection.objects.filter(status=ConnectionStatus.ACTIVE):
        live = list(connection.webhook_subscriptions.filter(status=SubscriptionStatus.ACTIVE))
        if wanted is None:
            for result in subs.unsubscribe(connection):
                _note(report, result, "deleted (no event types configured)")
        elif not live:
            _note(report, subs.subscribe(connection), "subscribed")
        else:
            for subscription in live:
                if (subscription.url, list(subscription.event_types)) != wanted:
                    _update(report, subscription, *wanted)
    known = set(BrexWebhookSubscription.objects.filter(status=SubscriptionStatus.ACTIVE)
                .values_list("brex_webhook_id", flat=True))
    for view in survey():
        _reconcile_company(report, view, known, wanted)
    return report


def _reconcile_company(report: Report, view: CompanyView, known: set[str],
                       wanted: tuple[str, list[str]] | None) -> None:
    if view.error:
        report.add(f"company {view.company_id}: could not list Brex's webhooks ({view.error})",
                   failed=True)
        return
    at_brex = {str(item.get("id")): item for item in view.at_brex}
    for subscription in BrexWebhookSubscription.objects.filter(
        status=SubscriptionStatus.ACTIVE, connection__brex_company_id=view.connection
        .brex_company_id, connection__environment=view.connection.environment,
    ).exclude(brex_webhook_id__in=list(at_brex)):
        subscription.status = SubscriptionStatus.DELETED
        subscription.save(update_fields=["status", "updated_at"])
        report.add(f"{subscription.brex_webhook_id}: gone at Brex; subscribing again")
        _note(report, subs.subscribe(subscription.connection_id), "subscribed")
    our_url = wanted[0] if wanted else None
    for brex_id, item in at_brex.items():
        if brex_id in known:
            continue
        if our_url is not None and item.get("url") == our_url:
            try:
                BrexClient(view.connection).delete(f"/v1/webhooks/{brex_id}")
            except BrexOAuthError as err:
                report.add(f"{brex_id}: unknown here, deleting it failed: {err}", failed=True)
            else:
                report.add(f"{brex_id}: unknown here, for {our_url}; deleted at Brex")
        else:
            report.add(f"{brex_id}: for another URL ({item.get('url')}); left alone")


def _update(report: Report, subscription: BrexWebhookSubscription, url: str,
            types: list[str]) -> None:
    try:
        BrexClient(subscription.connection).put(
            f"/v1/webhooks/{subscription.brex_webhook_id}", {"url": url, "event_types": types}
        )
    except BrexOAuthError as err:
        report.add(f"{subscription.brex_webhook_id}: updating failed: {err}", failed=True)
        return
    subscription.url, subscription.event_types = url, types
    subscription.save(update_fields=["url", "event_types", "updated_at"])
    ConnectionEvent.objects.create(
        connection_id=subscription.connection_id, kind=EventKind.WEBHOOK_SUBSCRIBED,
        detail=with_team_note(
            f"Subscription {subscription.brex_webhook_id} updated to "
            f"{', '.join(types)} at {url}.",
            subscription.connection_id,
        ),
    )
    report.add(f"{subscription.brex_webhook_id}: updated to {', '.join(types)}")


def _note(report: Report, result: subs.SyncResult | None, done: str) -> None:
    if result is None:
        return
    subscription = result.subscription
    name = subscription.brex_webhook_id or f"subscription {subscription.pk}"
    if result.ok:
        report.add(f"{name} (connection {subscription.connection_id}): {done}; "
                   f"{subscription.get_status_display().lower()}")
    else:
        report.add(f"{name} (connection {subscription.connection_id}): failed: "
                   f"{result.error}", failed=True)
