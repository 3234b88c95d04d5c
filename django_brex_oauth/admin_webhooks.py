"""The admin of Brex webhooks: the events as received (with "Process again") and each
connection's webhook subscription at Brex. Read-only."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .admin_support import EMPTY, ReadOnlyAdminMixin
from .models import BrexWebhookEvent, BrexWebhookSubscription
from .services import webhook_events


@admin.register(BrexWebhookEvent)
class BrexWebhookEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Webhook events as received, newest first."""

    list_display = ("webhook_id", "event_type", "company_id", "status", "received_at",
                    "processed_at", "attempts")
    list_filter = ("event_type", "status", "company_id")
    search_fields = ("webhook_id", "company_id")
    date_hierarchy = "received_at"
    readonly_fields = ("webhook_id", "event_type", "company_id", "status", "received_at",
                       "processing_since", "processed_at", "attempts", "last_error",
                       "connection_list", "payload_json")
    exclude = ("payload", "connections")
    actions = ["process_again"]

    @admin.display(description=_("Connections"))
    def connection_list(self, obj: BrexWebhookEvent) -> str:
        return ", ".join(str(c) for c in obj.connections.all()) or EMPTY

    @admin.display(description=_("Payload"))
    def payload_json(self, obj: BrexWebhookEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))

    def has_process_permission(self, request: HttpRequest) -> bool:
        """Staff who may change webhook events may run their handlers again."""
        return request.user.has_perm("brex_oauth.change_brexwebhookevent")

    @admin.action(description=_("Process again"), permissions=["process"])
    def process_again(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Run the handlers (and ``webhook_received``) once more for each selected event."""
        for event in queryset.order_by("received_at", "pk"):
            result = webhook_events.process(event, again=True)
            if result is None:
                self.message_user(
                    request,
                    gettext("%(event)s: being processed right now; left alone.")
                    % {"event": event.webhook_id},
                    messages.WARNING,
                )
            else:
                level = messages.ERROR if result.last_error else messages.SUCCESS
                if result.last_error:
                    text = gettext("%(event)s: %(status)s (%(error)s).")
                else:
                    text = gettext("%(event)s: %(status)s.")
                self.message_user(request, text % {
                    "event": event.webhook_id,
                    "status": result.get_status_display().lower(),
                    "error": result.last_error,
                }, level)


@admin.register(BrexWebhookSubscription)
class BrexWebhookSubscriptionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Each connection's webhook subscription at Brex."""

    list_display = ("brex_webhook_id", "connection", "status", "url", "created_at",
                    "updated_at")
    list_filter = ("status",)
    search_fields = ("brex_webhook_id", "connection__brex_company_id",
                     "connection__brex_user_email")
    readonly_fields = ("connection", "brex_webhook_id", "url", "event_types", "status",
                       "attempts", "last_error", "created_at", "updated_at")
    exclude = ("idempotency_key",)
