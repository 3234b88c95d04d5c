"""The webhook tables: each delivery from Brex as received, and each connection's webhook
subscription at Brex. Part of :mod:`django_brex_oauth.models`, which imports them (and from
which they are imported)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext


class WebhookEventStatus(models.TextChoices):
    RECEIVED = "received", _("Received, not processed yet")
    PROCESSING = "processing", _("Processing")
    PROCESSED = "processed", _("Processed")
    IGNORED = "ignored", _("Ignored: no active connection for its company")
    FAILED = "failed", _("A handler failed")


class BrexWebhookEvent(models.Model):
    """A webhook delivery from Brex, stored once per ``Webhook-Id`` after its signature was
    verified. ``payload`` is Brex's JSON body as received."""

    Status = WebhookEventStatus

    webhook_id = models.CharField(_("Webhook-Id"), max_length=255, unique=True)
    event_type = models.CharField(max_length=64, db_index=True, verbose_name=_("event type"))
    company_id = models.CharField(_("Brex company id"), max_length=255, blank=True, db_index=True)
    payload = models.JSONField(verbose_name=_("payload"))
    status = models.CharField(
        verbose_name=_("status"),
        max_length=16, choices=WebhookEventStatus.choices, default=WebhookEventStatus.RECEIVED
    )
    received_at = models.DateTimeField(
        default=timezone.now, db_index=True, verbose_name=_("received at")
    )
    processed_at = models.DateTimeField(null=True, blank=True, verbose_name=_("processed at"))
    processing_since = models.DateTimeField(
        verbose_name=_("processing since"),
        null=True, blank=True, help_text=_("When the handlers now running were started.")
    )
    attempts = models.PositiveIntegerField(
        verbose_name=_("attempts"),
        default=0, help_text=_("Times the handlers were run for this event.")
    )
    last_error = models.TextField(blank=True, verbose_name=_("last error"))
    connections = models.ManyToManyField(
        "brex_oauth.BrexConnection",
        blank=True,
        related_name="webhook_events",
        help_text=_("The active connections of the event's Brex company when it was processed."),
        verbose_name=_("connections"),
    )

    class Meta:
        verbose_name = _("Brex webhook event")
        verbose_name_plural = _("Brex webhook events")
        ordering = ["-received_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.event_type} {self.webhook_id}"

    def __repr__(self) -> str:
        return f"<BrexWebhookEvent {self.webhook_id} {self.event_type} {self.status}>"


class SubscriptionStatus(models.TextChoices):
    SUBSCRIBING = "subscribing", _("Being created at Brex")
    ACTIVE = "active", _("Active at Brex")
    UNSUBSCRIBING = "unsubscribing", _("Being deleted at Brex")
    DELETED = "deleted", _("Deleted at Brex")
    ABANDONED = "abandoned", _("Could not be deleted: no live grant left")


class BrexWebhookSubscription(models.Model):
    """A connection's webhook subscription at Brex (``POST /v1/webhooks``)."""

    Status = SubscriptionStatus

    connection = models.ForeignKey(
        "brex_oauth.BrexConnection", on_delete=models.CASCADE, related_name="webhook_subscriptions",
        verbose_name=_("connection"),
    )
    brex_webhook_id = models.CharField(
        _("Brex webhook id"), max_length=255, blank=True, db_index=True
    )
    url = models.URLField(max_length=1000, verbose_name=_("URL"))
    event_types = models.JSONField(default=list, verbose_name=_("event types"))
    status = models.CharField(
        verbose_name=_("status"),
        max_length=16, choices=SubscriptionStatus.choices, default=SubscriptionStatus.SUBSCRIBING
    )
    idempotency_key = models.CharField(max_length=128)
    attempts = models.PositiveIntegerField(default=0, verbose_name=_("attempts"))
    last_error = models.TextField(blank=True, verbose_name=_("last error"))
    created_at = models.DateTimeField(default=timezone.now, verbose_name=_("created at"))
    updated_at = models.DateTimeField(auto_now=True, verbose_name=_("updated at"))

    class Meta:
        verbose_name = _("Brex webhook subscription")
        verbose_name_plural = _("Brex webhook subscriptions")
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        name = self.brex_webhook_id or pgettext("webhook id not known yet", "pending")
        return f"{name} ({self.get_status_display()})"
