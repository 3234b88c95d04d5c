"""The partner site's pages: a dashboard of the Brex connections the signed-in user may
see: their own, and those of their workspaces."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Count, F, Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache

from django_brex_oauth.client import BrexClient
from django_brex_oauth.conf import brex_settings
from django_brex_oauth.exceptions import BrexAPIError, BrexOAuthError
from django_brex_oauth.models import BrexConnection, BrexToken, BrexWebhookEvent, EventKind
from django_brex_oauth.teams import get_team_policy, teams_enabled

USER_SCOPES = ("users", "users.readonly")
COMPANY_SCOPES = ("companies.readonly",)
#: Webhook events the dashboard lists.
LATEST_EVENTS = 10


@dataclass
class ConnectionView:
    """One connection as the dashboard shows it: its state and what Brex says live."""

    connection: BrexConnection
    token: BrexToken | None = None
    refresh_count: int = 0
    last_refreshed_at: datetime | None = None
    me: dict[str, Any] | None = None
    company: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    fetched_at: datetime | None = None

    @property
    def missing_scopes(self) -> list[str]:
        """Data this connection cannot read because the customer did not grant it."""
        missing = []
        if not self.connection.has_scope(*USER_SCOPES):
            missing.append("your Brex user profile (users.readonly)")
        if not self.connection.has_scope(*COMPANY_SCOPES):
            missing.append("your company details (companies.readonly)")
        return missing


def _with_refresh_counts(connections: QuerySet[BrexConnection]) -> QuerySet[BrexConnection]:
    """Each connection's refreshes since it was last connected: a reconnect (which moves
    ``connected_at`` on) starts the count again, as it starts a new pair of tokens."""
    return connections.annotate(
        refresh_count=Count(
            "events",
            filter=Q(
                events__kind=EventKind.REFRESHED,
                events__created_at__gte=F("connected_at"),
            ),
        )
    )


def last_refreshed_at(connection: BrexConnection) -> datetime | None:
    """When the connection's tokens were last refreshed since it was last connected (the
    app keeps ``last_refreshed_at`` across a reconnect)."""
    refreshed = connection.last_refreshed_at
    if refreshed is None or refreshed < connection.connected_at:
        return None
    return refreshed


def _token_times(connections: QuerySet[BrexConnection]) -> QuerySet[BrexToken]:
    """The tokens' expiries and bookkeeping, without loading (or decrypting) a token."""
    return BrexToken.objects.filter(connection__in=connections).defer(
        "access_token", "refresh_token"
    )


def _read_live_data(view: ConnectionView) -> None:
    """Call Brex through the app's client; the client refreshes tokens when it must."""
    connection = view.connection
    client = BrexClient(connection)
    try:
        if connection.has_scope(*USER_SCOPES):
            view.me = client.get_me()
        if connection.has_scope(*COMPANY_SCOPES):
            view.company = client.get_company()
    except BrexAPIError as err:
        view.problems.append(
            f"Brex answered {err.status} to {err.method} {err.path}: "
            f"{err.error_message or err.error_type or 'no details'}"
        )
    except BrexOAuthError as err:
        view.problems.append(err.user_message)
    view.fetched_at = timezone.now()


def _visible_connections(user) -> QuerySet[BrexConnection]:
    """The user's own connections and their workspaces' (the team policy decides)."""
    return BrexConnection.objects.for_user(user)


def _connectable_workspaces(user) -> list:
    """The workspaces the user may connect a Brex account for."""
    return list(get_team_policy().connectable_teams(user)) if teams_enabled() else []


def _brex_target() -> str:
    """Which Brex this site talks to, for the footer."""
    if brex_settings.ISSUER:
        return f"Brex at {brex_settings.api_base_url} (issuer {brex_settings.issuer})"
    return f"Brex {brex_settings.environment} ({brex_settings.api_base_url})"


@never_cache
@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """The user's connections, live data from Brex for each active one, and the buttons
    to connect, reconnect and disconnect."""
    connections = list(
        _with_refresh_counts(_visible_connections(request.user))
        .select_related(*(("team",) if teams_enabled() else ()))
        .order_by("pk")
    )
    views = []
    for connection in connections:
        view = ConnectionView(connection, refresh_count=connection.refresh_count)
        if connection.is_active:
            _read_live_data(view)
            # The client may just have refreshed the tokens, or found them refused.
            connection.refresh_from_db()
        view.last_refreshed_at = last_refreshed_at(connection)
        views.append(view)
    tokens = {t.connection_id: t for t in _token_times(_visible_connections(request.user))}
    for view in views:
        view.token = tokens.get(view.connection.pk)
    return render(
        request,
        "partner_site/dashboard.html",
        {
            "connection_views": views,
            "active_views": [v for v in views if v.connection.is_active],
            "brex_target": _brex_target(),
            "status_poll_seconds": settings.DASHBOARD_POLL_SECONDS,
            "webhook_events": [_event_row(e) for e in _latest_events(request.user)],
            "webhooks_on": bool(brex_settings.WEBHOOK_EVENT_TYPES),
            "workspaces": _connectable_workspaces(request.user),
        },
    )


@never_cache
@login_required
def token_status(request: HttpRequest) -> JsonResponse:
    """When each of the user's connections' access token expires and when it was last
    refreshed, for the dashboard to show refreshes as they happen. No token values."""
    connections = _with_refresh_counts(_visible_connections(request.user))
    tokens = {t.connection_id: t for t in _token_times(_visible_connections(request.user))}
    data = []
    for connection in connections:
        token = tokens.get(connection.pk)
        expires_at = token.access_token_expires_at if token else None
        refreshed_at = last_refreshed_at(connection)
        data.append(
            {
                "id": connection.pk,
                "status": connection.status,
                "access_token_expires_at": expires_at.isoformat() if expires_at else None,
                "last_refreshed_at": refreshed_at.isoformat() if refreshed_at else None,
                "refresh_count": connection.refresh_count,
            }
        )
    return JsonResponse({"now": timezone.now().isoformat(), "connections": data})


def _latest_events(user) -> QuerySet[BrexWebhookEvent]:
    """The newest webhook events Brex sent about the connections this user may see."""
    return (
        BrexWebhookEvent.objects.filter(connections__in=_visible_connections(user))
        .distinct()
        .order_by("-received_at", "-pk")[:LATEST_EVENTS]
    )


def _event_row(event: BrexWebhookEvent) -> dict[str, Any]:
    payload = event.payload if isinstance(event.payload, dict) else {}
    changed = payload.get("updated_attributes")
    return {
        "id": event.webhook_id,
        "type": event.event_type,
        "status": event.get_status_display(),
        "received_at": event.received_at.isoformat(),
        "summary": ("changed: " + ", ".join(map(str, changed))) if isinstance(changed, list)
        else "",
    }


@never_cache
@login_required
def webhook_events(request: HttpRequest) -> JsonResponse:
    """The newest webhook events for the dashboard to show as they arrive."""
    return JsonResponse({"events": [_event_row(e) for e in _latest_events(request.user)]})
