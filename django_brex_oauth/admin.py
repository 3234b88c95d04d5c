"""The Django admin: Brex connections, their event log and pending authorizations; the
webhook events and subscriptions (:mod:`~django_brex_oauth.admin_webhooks`).

No token value is ever loaded into a page: :class:`~django_brex_oauth.models.BrexToken` is not
registered, and the token columns of the connection list are annotations of its expiry
fields, so the encrypted columns are not even read. Actions call the service layer.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.text import Truncator, format_lazy
from django.utils.translation import gettext, ngettext, pgettext
from django.utils.translation import gettext_lazy as _

from . import admin_health
from .admin_support import (
    EMPTY,
    REVOKED_STATUS,
    ReadOnlyAdminMixin,
    brex_notices,
    user_search_fields,
)
from .admin_support import connection_label as _connection_label
from .admin_support import days as _days
from .admin_support import may_see_connections as _may_see_connections
from .admin_support import when as _when
from .admin_webhooks import BrexWebhookEventAdmin, BrexWebhookSubscriptionAdmin
from .conf import brex_settings
from .exceptions import BrexOAuthError
from .models import (
    AuthorizationRequest,
    BrexConnection,
    ConnectionEvent,
    ConnectionStatus,
    RevocationStatus,
)
from .services import refresh as refresh_service
from .services import revoke as revoke_service
from .teams import can_manage, can_refresh, teams_enabled

#: Events shown inline on a connection's page; the rest are one click away.
INLINE_EVENTS = 50


class ExpiringSoonFilter(admin.SimpleListFilter):
    """Connections that need attention soon: the refresh token is within
    ``EXPIRING_SOON_DAYS`` of the end of its 90 days, or the access token has expired.
    Revoked connections are left out."""

    title = _("expiring soon")
    parameter_name = "expiring"

    def lookups(self, request, model_admin):
        days = brex_settings.EXPIRING_SOON_DAYS
        return [
            ("any", ngettext(
                "Refresh token ends within %(days)s day, or access token expired",
                "Refresh token ends within %(days)s days, or access token expired",
                days,
            ) % {"days": days}),
            ("refresh_token", ngettext(
                "Refresh token ends within %(days)s day", "Refresh token ends within %(days)s days",
                days,
            ) % {"days": days}),
            ("access_token", _("Access token expired")),
        ]

    def queryset(self, request, queryset):
        now = timezone.now()
        refresh_ending = Q(
            token__refresh_token__isnull=False,
            token__refresh_token_expires_at__lte=now
            + timedelta(days=brex_settings.EXPIRING_SOON_DAYS),
        )
        access_expired = Q(token__access_token_expires_at__lte=now)
        condition = {
            "any": refresh_ending | access_expired,
            "refresh_token": refresh_ending,
            "access_token": access_expired,
        }.get(self.value() or "")
        if condition is None:
            return None
        return queryset.exclude(status=ConnectionStatus.REVOKED).filter(condition)


class LatestEventsFormSet(BaseInlineFormSet):
    """Only the latest :data:`INLINE_EVENTS` events of the connection."""

    def get_queryset(self):
        if not hasattr(self, "_latest_events"):
            self._latest_events = super().get_queryset()[:INLINE_EVENTS]
        return self._latest_events


class ConnectionEventInline(ReadOnlyAdminMixin, admin.TabularInline):
    """The connection's event log, newest first, read-only."""

    model = ConnectionEvent
    formset = LatestEventsFormSet
    fields = ("created_at", "kind", "detail", "actor")
    readonly_fields = fields
    ordering = ("-created_at", "-pk")
    extra = 0
    can_delete = False
    verbose_name_plural = format_lazy(_("events (latest {count})"), count=INLINE_EVENTS)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("actor")

    def has_view_permission(self, request, obj=None):
        return _may_see_connections(request.user)


@admin.register(BrexConnection)
class BrexConnectionAdmin(admin.ModelAdmin):
    """Connections: who, which Brex company, status, and the state of both tokens.

    Read-only: staff change a connection only through the actions, which call the
    services ("Revoke at Brex" needs ``brex_oauth.revoke_brexconnection``, "Refresh now"
    the change permission). A connection may be deleted only once Brex has confirmed its
    revocation.
    """

    # What an operator scans for, in 1,280 px with the admin's navigation and the filters
    # beside it: whose (and in which environment), how it stands and what went wrong last,
    # how long its refresh token has left, when it was last refreshed. Scopes, the access
    # token's expiry and the refresh token chain's age are on the connection's page.
    list_display = (
        "brex_account",
        "owner",
        "status_and_error",
        "refresh_token_days_left",
        "last_refreshed",
    )
    list_display_links = ("brex_account",)
    empty_value_display = EMPTY
    list_filter = ("status", "environment", ExpiringSoonFilter, "revocation_status")
    ordering = ("-connected_at", "-pk")
    list_per_page = 100
    actions = ("revoke_at_brex", "refresh_now")
    inlines = (ConnectionEventInline,)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "owner", "environment", "status", "brex_user_id", "brex_user_email",
                    "brex_company_id", "brex_company_name", "granted_scopes",
                )
            },
        ),
        (
            _("Tokens (values are never shown)"),
            {
                "fields": (
                    "access_token_expiry", "refresh_token_issued", "refresh_token_expiry",
                    "refresh_token_used", "refresh_in_progress",
                )
            },
        ),
        (
            _("History"),
            {
                "fields": (
                    "connected_at", "last_refreshed_at", "last_error", "revoked_at",
                    "revocation_status", "revocation_attempts", "revocation_attempted_at",
                    "updated_at", "all_events",
                )
            },
        ),
    )
    readonly_fields = (
        "access_token_expiry", "refresh_token_issued", "refresh_token_expiry",
        "refresh_token_used", "refresh_in_progress", "all_events",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # Token bookkeeping comes in as annotations: one join, and no encrypted column read.
        return (
            super()
            .get_queryset(request)
            .select_related("owner", *(("team",) if teams_enabled() else ()))
            .annotate(
                access_token_expires=F("token__access_token_expires_at"),
                refresh_token_issued_at=F("token__refresh_token_issued_at"),
                refresh_token_expires_at=F("token__refresh_token_expires_at"),
                refresh_token_used_at=F("token__refresh_token_used_at"),
                refresh_claimed_until=F("token__refresh_claimed_until"),
            )
        )

    # With BREX_OAUTH_TEAM_MODEL, the team is shown beside the owner, and filtered by.

    def get_list_display(self, request: HttpRequest):
        columns = super().get_list_display(request)
        if not teams_enabled():
            return columns
        at = list(columns).index("owner") + 1
        return (*columns[:at], "team", *columns[at:])

    def get_list_filter(self, request: HttpRequest):
        filters = super().get_list_filter(request)
        return (*filters, "team") if teams_enabled() else filters

    def get_fieldsets(self, request: HttpRequest, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if not teams_enabled():
            return fieldsets
        (name, options), *rest = fieldsets
        return ((name, {**options, "fields": ("team", *options["fields"])}), *rest)

    def get_search_fields(self, request: HttpRequest):
        return (
            *user_search_fields("owner"),
            "brex_user_id",
            "brex_user_email",
            "brex_company_name",
            "brex_company_id",
        )

    # Permissions --------------------------------------------------------------------------

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        # The change permission allows "Refresh now"; no connection is edited by hand.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and not (
            obj.status == ConnectionStatus.REVOKED
            and obj.revocation_status == RevocationStatus.DONE
        ):
            return False
        return super().has_delete_permission(request, obj)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        """Whether the user may revoke connections at Brex."""
        return request.user.has_perm("brex_oauth.revoke_brexconnection")

    def get_actions(self, request, action_location=None):
        # Django 6.1 passes where the actions are shown, and only to an override whose
        # signature names action_location; older versions take no such argument.
        if action_location is None:
            actions = super().get_actions(request)
        else:
            # The typecheck extra's django-stubs (< 6.1) describe Django 6.0's signature.
            actions = super().get_actions(  # type: ignore[call-arg]
                request, action_location=action_location
            )
        # Bulk deletion would drop live connections without revoking them at Brex.
        actions.pop("delete_selected", None)
        return actions

    # Columns ------------------------------------------------------------------------------

    @admin.display(description=_("Brex account"), ordering="brex_company_name")
    def brex_account(self, obj: BrexConnection):
        """The company; under it the environment and who connected it at Brex."""
        who = obj.brex_user_email or obj.brex_user_id
        below = [str(obj.get_environment_display())]
        if obj.brex_company_name:
            below.append(who)
        return format_html(
            '{}<br><span class="quiet">{}</span>', obj.brex_company_name or who,
            " · ".join(below),
        )

    @admin.display(description=_("status"), ordering="status")
    def status_display(self, obj: BrexConnection) -> str:
        if obj.status != ConnectionStatus.REVOKED:
            return obj.get_status_display()
        return str(REVOKED_STATUS.get(obj.revocation_status, obj.get_status_display()))

    @admin.display(description=_("access token expires"), ordering="access_token_expires")
    def access_token_expiry(self, obj: BrexConnection):
        expires = getattr(obj, "access_token_expires", None)
        if expires is None:
            return EMPTY
        if expires <= timezone.now():
            return format_html(
                '<span class="brex-expired">{}</span>',
                _("%(when)s (expired)") % {"when": _when(expires)},
            )
        return _when(expires)

    # An estimate (the value says "about"): the app's reckoning, Brex does not say.
    @admin.display(description=_("refresh token ends"), ordering="refresh_token_expires_at")
    def refresh_token_days_left(self, obj: BrexConnection) -> str:
        # The app's reckoning (REFRESH_TOKEN_LIFETIME from the last refresh), not Brex's.
        left = self._refresh_token_days_left(obj)
        if left is None:
            return EMPTY
        return ngettext("in about %(days)s day", "in about %(days)s days", left) % {
            "days": left
        }

    @staticmethod
    def _refresh_token_days_left(obj: BrexConnection) -> int | None:
        expires = getattr(obj, "refresh_token_expires_at", None)
        if expires is None or obj.status == ConnectionStatus.REVOKED:
            return None
        return max(0, (expires - timezone.now()).days)

    @admin.display(description=_("last refreshed"), ordering="last_refreshed_at")
    def last_refreshed(self, obj: BrexConnection) -> str:
        return _when(obj.last_refreshed_at)

    @admin.display(description=_("status"), ordering="status")
    def status_and_error(self, obj: BrexConnection):
        """The status, and under it the start of the last error, if any."""
        if not obj.last_error:
            return self.status_display(obj)
        return format_html(
            '{}<br><span class="quiet">{}</span>', self.status_display(obj),
            Truncator(obj.last_error).chars(80),
        )

    # Change page fields -------------------------------------------------------------------

    @admin.display(description=_("refresh token chain issued"))
    def refresh_token_issued(self, obj: BrexConnection) -> str:
        issued = getattr(obj, "refresh_token_issued_at", None)
        if issued is None:
            return EMPTY
        if obj.status == ConnectionStatus.REVOKED:
            return _when(issued)
        return _("%(when)s (%(age)s ago, at the last connect)") % {
            "when": _when(issued), "age": _days((timezone.now() - issued).days),
        }

    @admin.display(description=_("refresh token expires (estimate)"))
    def refresh_token_expiry(self, obj: BrexConnection) -> str:
        # A revoked connection's refresh token is gone: it has no end to show.
        left = self._refresh_token_days_left(obj)
        if left is None:
            return EMPTY
        return ngettext(
            "%(when)s (%(days)s day left, reckoned from the last refresh; Brex does not say)",
            "%(when)s (%(days)s days left, reckoned from the last refresh; Brex does not say)",
            left,
        ) % {"when": _when(getattr(obj, "refresh_token_expires_at", None)), "days": left}

    @admin.display(description=_("refresh token last used"))
    def refresh_token_used(self, obj: BrexConnection) -> str:
        return _when(getattr(obj, "refresh_token_used_at", None))

    @admin.display(description=_("refresh in progress until"))
    def refresh_in_progress(self, obj: BrexConnection) -> str:
        until = getattr(obj, "refresh_claimed_until", None)
        if until is None or until <= timezone.now():
            return gettext("no refresh in progress")
        return _when(until)

    @admin.display(description=_("event log"))
    def all_events(self, obj: BrexConnection):
        if obj.pk is None:
            return EMPTY
        url = reverse("admin:brex_oauth_connectionevent_changelist")
        count = obj.events.count()
        text = ngettext(
            "All %(count)s event of this connection", "All %(count)s events of this connection",
            count,
        ) % {"count": count}
        return format_html('<a href="{}?connection__id__exact={}">{}</a>', url, obj.pk, text)

    # The health page ----------------------------------------------------------------------

    def get_urls(self):
        # Before the model's own URLs, whose "<object_id>/" would take "health/".
        return [
            path(
                "health/",
                self.admin_site.admin_view(self.health_view),
                name=f"{self.opts.app_label}_health",
            ),
            *super().get_urls(),
        ]

    def health_view(self, request: HttpRequest):
        """Every connection at a glance (:mod:`django_brex_oauth.admin_health`)."""
        return admin_health.health_view(self, request)

    # Actions ------------------------------------------------------------------------------

    # The actions refresh and revoke at Brex: a rotated refresh token must be committed at
    # once, not rolled back with the request under ATOMIC_REQUESTS.
    @method_decorator(transaction.non_atomic_requests)
    def changelist_view(self, request: HttpRequest, extra_context=None):
        extra_context = {
            # Nothing on the list can be changed (the change permission allows "Refresh
            # now"), so it reads "to view" whatever the permissions, in Django's words.
            "title": gettext("Select %s to view") % self.opts.verbose_name,
            "brex_oauth_notices": brex_notices(),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context)

    @admin.action(description=_("Revoke at Brex"), permissions=["revoke"])
    def revoke_at_brex(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Disconnect each selected connection and revoke it at Brex, reporting each one.

        Once Brex has failed to answer for one connection, the rest are disconnected
        without waiting for Brex and their revocations handed to the task.
        """
        brex_down = False
        for connection in queryset:
            label = _connection_label(connection)
            if not can_manage(request.user, connection):
                # The team policy has the last word, in the admin as on the site.
                self.message_user(
                    request,
                    gettext("%(label)s: not revoked; you may not disconnect it.")
                    % {"label": label},
                    messages.ERROR,
                )
                continue
            result = revoke_service.disconnect(
                connection, actor=request.user, attempt_now=not brex_down
            )
            brex_down = brex_down or result.attempt.retryable
            level, text = result.staff_message(label)
            self.message_user(request, text, level)

    @admin.action(description=_("Refresh now"), permissions=["change"])
    def refresh_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Refresh each selected connection's tokens at once, reporting each one."""
        for connection in queryset:
            label = _connection_label(connection)
            if not can_refresh(request.user, connection):
                # The team policy has the last word, as for "Revoke at Brex".
                self.message_user(
                    request,
                    gettext("%(label)s: not refreshed; you may not refresh it.")
                    % {"label": label},
                    messages.ERROR,
                )
                continue
            try:
                result = refresh_service.refresh_connection(connection, force=True, wait=False)
            except BrexOAuthError as err:
                self.message_user(
                    request,
                    gettext("%(label)s: not refreshed: %(error)s")
                    % {"label": label, "error": err},
                    messages.ERROR,
                )
                continue
            level, text = result.staff_message(label, connection, _when)
            self.message_user(request, text, level)


@admin.register(ConnectionEvent)
class ConnectionEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The event log of every connection, read-only."""

    list_display = ("created_at", "connection_link", "kind", "detail_short", "actor")
    list_filter = ("kind",)
    list_select_related = ("connection", "actor")
    ordering = ("-created_at", "-pk")
    fields = ("connection", "kind", "detail", "actor", "created_at")
    list_per_page = 100

    def get_search_fields(self, request: HttpRequest):
        return (
            "connection__brex_user_email",
            "connection__brex_company_name",
            "connection__brex_user_id",
            *user_search_fields("connection__owner"),
        )

    @admin.display(description=_("connection"), ordering="connection")
    def connection_link(self, obj: ConnectionEvent):
        url = reverse("admin:brex_oauth_brexconnection_change", args=[obj.connection_id])
        return format_html('<a href="{}">{}</a>', url, _connection_label(obj.connection))

    @admin.display(description=_("detail"))
    def detail_short(self, obj: ConnectionEvent) -> str:
        return Truncator(obj.detail).chars(120)

    def has_view_permission(self, request, obj=None):
        return super().has_view_permission(request, obj) or _may_see_connections(request.user)


@admin.register(AuthorizationRequest)
class AuthorizationRequestAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Pending and recent authorizations, read-only; the state, nonce and PKCE verifier are
    never shown."""

    list_display = ("pk", "user", "environment", "outcome", "created_at", "expires_at",
                    "consumed_at", "prompt_login")
    list_filter = ("environment", "prompt_login")
    list_select_related = ("user",)
    ordering = ("-created_at", "-pk")
    fields = ("user", "environment", "requested_scopes", "redirect_uri", "next_url",
              "prompt_login", "created_at", "expires_at", "consumed_at")
    list_per_page = 100

    def get_search_fields(self, request: HttpRequest):
        return tuple(user_search_fields("user"))

    @admin.display(description=_("outcome"))
    def outcome(self, obj: AuthorizationRequest) -> str:
        if obj.consumed_at is not None:
            return pgettext("authorization outcome", "used")
        if obj.is_expired:
            return pgettext("authorization outcome", "expired")
        return pgettext("authorization outcome", "pending")

# The webhook admins live in admin_webhooks; importing it (above) registers them.
__all__ = [
    "AuthorizationRequestAdmin",
    "BrexConnectionAdmin",
    "BrexWebhookEventAdmin",
    "BrexWebhookSubscriptionAdmin",
    "ConnectionEventAdmin",
    "brex_notices",
]
