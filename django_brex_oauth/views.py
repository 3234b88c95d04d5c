"""Views: parse the request, call a service, redirect or render one error template."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import get_object_or_404, render, resolve_url
from django.urls import reverse
from django.utils.translation import gettext
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_deny
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_GET, require_POST

from . import pending
from .conf import brex_settings
from .exceptions import BrexOAuthError, RedirectURINotConfigured, TeamNotAllowed, TeamNotFound
from .models import BrexConnection, ConnectionStatus
from .redirects import UnsafeNext, safe_next
from .services import connect as connect_service
from .services.revoke import disconnect as disconnect_connection
from .teams import can_manage, find_team, get_team_policy, teams_enabled

logger = logging.getLogger("django_brex_oauth")

ERROR_TEMPLATE = "brex_oauth/error.html"
CONNECTIONS_TEMPLATE = "brex_oauth/connections.html"
DISCONNECT_CONFIRM_TEMPLATE = "brex_oauth/disconnect_confirm.html"


def no_referrer(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Send ``Referrer-Policy: no-referrer`` with every response ``view`` returns, whatever
    ``SECURE_REFERRER_POLICY`` says (SecurityMiddleware only sets a policy a response lacks).

    The callback's URL holds the authorization code and the state: a page it answers with
    (or a page that follows it) must not hand that URL to anyone as the ``Referer``.
    """

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    return wrapped


def render_error(request: HttpRequest, error: BrexOAuthError) -> HttpResponse:
    """Render the error page for ``error``: what happened and what to do."""
    return render(
        request,
        ERROR_TEMPLATE,
        {
            "title": error.title,
            "message": error.user_message,
            "retry_url": reverse("brex_oauth:connect"),
        },
        status=error.http_status,
    )


#: Callback parameters that must not be repeated (RFC 6749 section 3.1: a repeated one is
#: refused rather than one of its values picked).
SINGLE_VALUED_PARAMS = ("state", "code", "iss", "error")

#: What the authorization code reads as in the request once the callback has taken it.
REDACTED = "[redacted]"


@sensitive_variables()
def take_callback_params(request: HttpRequest) -> dict[str, str]:
    """The callback's query parameters; the authorization code is then replaced in the
    request itself (``request.GET`` and the ``QUERY_STRING``).

    Whatever reads the request after the view has started, Django's technical 500 page and
    error e-mails, an error tracker's request data, the ``repr`` of the request in every
    frame of a traceback, then finds ``code=[redacted]`` instead of the code.
    """
    params = request.GET.dict()
    if "code" in request.GET:
        redacted = request.GET.copy()
        redacted["code"] = REDACTED
        query_string = redacted.urlencode(safe="[]")
        # Read-only again, as Django hands request.GET to a view.
        request.GET = QueryDict(query_string, encoding=redacted.encoding)
        request.META["QUERY_STRING"] = query_string
    return params


@never_cache
@require_GET
@login_required
def connect(request: HttpRequest) -> HttpResponse:
    """Start connecting a Brex account: send the person to Brex to sign in and consent.

    ``?next=`` (a path on this site) is where to land afterwards; ``?force_login=1``
    makes Brex ask the person to sign in again; ``?team=<pk>`` (with
    ``BREX_OAUTH_TEAM_MODEL``) connects for that team, when the team policy allows it (403
    otherwise, 404 for a team that does not exist, before anything is stored or sent to
    Brex). The callback URL given to Brex comes from the settings alone (``REDIRECT_URI``
    or ``SITE_URL``); without either, nothing starts.
    """
    redirect_uri = brex_settings.redirect_uri
    if not redirect_uri:
        logger.error(
            "Refused to start a Brex connection: set BREX_OAUTH['SITE_URL'] or "
            "BREX_OAUTH['REDIRECT_URI'] (system check brex_oauth.E010)."
        )
        return render_error(request, RedirectURINotConfigured())
    next_url = safe_next(request, request.GET.get("next"))
    if next_url is None:
        logger.warning("Refused an unsafe next URL on Brex connect for user %s", request.user.pk)
        return render_error(request, UnsafeNext())
    team = None
    if "team" in request.GET:
        if not teams_enabled():
            return render_error(request, TeamNotFound("no team model is configured"))
        try:
            team = find_team(request.user, request.GET["team"])
        except LookupError:
            logger.warning("Refused Brex connect for an unknown team (user %s)", request.user.pk)
            return render_error(request, TeamNotFound("unknown team"))
        except PermissionError:
            logger.warning(
                "Refused Brex connect for a team user %s may not act for", request.user.pk
            )
            return render_error(request, TeamNotAllowed("team not allowed"))
    try:
        auth_request, url = connect_service.start_authorization(
            user=request.user,
            redirect_uri=redirect_uri,
            next_url=next_url,
            force_login=request.GET.get("force_login") in ("1", "true", "yes"),
            team=team,
        )
    except BrexOAuthError as err:
        logger.warning("Could not start a Brex connection for user %s: %s", request.user.pk, err)
        return render_error(request, err)
    pending.remember(request.session, auth_request.state)
    return HttpResponseRedirect(url)


# The services commit as they go (the connection, a revocation's outcome) and call Brex
# between commits; a request-wide transaction under ATOMIC_REQUESTS would hold them open.
# no_referrer goes outside login_required so that its redirect to the login page (whose
# ``next`` holds the code) carries the policy too.
@sensitive_variables("params")
@no_referrer
@transaction.non_atomic_requests
@never_cache
@require_GET
@login_required
def callback(request: HttpRequest) -> HttpResponse:
    """Where Brex sends the person back with a code (or an error) and the state."""
    # Counted before the code is redacted (which leaves a single value).
    repeated = [name for name in SINGLE_VALUED_PARAMS if len(request.GET.getlist(name)) > 1]
    params = take_callback_params(request)
    if repeated:
        # Which value counts cannot be known: refuse, taking every attempt a state names.
        states = pending.take_all(request.session, request.GET.getlist("state"))
        err = connect_service.refuse_repeated_parameters(
            user=request.user, repeated=repeated, states_in_session=states
        )
        logger.warning("Brex connection failed for user %s: %s: %s", request.user.pk,
                       type(err).__name__, err)
        return render_error(request, err)
    in_session = pending.take(request.session, params.get("state", ""))
    try:
        result = connect_service.complete_authorization(
            user=request.user, params=params, state_in_session=in_session
        )
    except BrexOAuthError as err:
        logger.warning(
            "Brex connection failed for user %s: %s: %s", request.user.pk, type(err).__name__, err
        )
        return render_error(request, err)
    name = result.connection.display_name
    messages.success(
        request,
        (
            gettext("Your Brex account (%(name)s) is connected.") % {"name": name}
            if name
            else gettext("Your Brex account is connected.")
        ),
        fail_silently=True,
    )
    return HttpResponseRedirect(
        result.next_url or resolve_url(brex_settings.CONNECT_REDIRECT_URL)
    )


def _managed_connection(request: HttpRequest, pk: int) -> BrexConnection:
    connection = get_object_or_404(BrexConnection.objects.select_related("owner"), pk=pk)
    if not can_manage(request.user, connection):
        raise PermissionDenied(gettext("Not your Brex connection."))
    return connection


def _connect_url(**params: str) -> str:
    return reverse("brex_oauth:connect") + "?" + urlencode(params)


def _team_groups(user, connections: list[BrexConnection], here: str) -> list[dict]:
    """The connections page's groups: personal connections first, then one group per team
    the user may see (a team with no connection yet too, when the user may connect for it)."""
    policy = get_team_policy()
    personal = [c for c in connections if c.team_id is None]
    groups = [{
        "team": None,
        "connections": personal,
        "connect_url": _connect_url(next=here),
        "reconnect_url": _connect_url(force_login="1", next=here),
    }]
    connectable = {team.pk for team in policy.connectable_teams(user)}
    teams = {team.pk: team for team in policy.visible_teams(user)}
    for connection in connections:
        if connection.team_id is not None:
            teams.setdefault(connection.team_id, connection.team)
    for team_pk, team in sorted(teams.items(), key=lambda item: (str(item[1]), str(item[0]))):
        may_connect = team_pk in connectable
        groups.append({
            "team": team,
            "connections": [c for c in connections if c.team_id == team_pk],
            "connect_url": _connect_url(team=str(team_pk), next=here) if may_connect else "",
            "reconnect_url": (
                _connect_url(team=str(team_pk), force_login="1", next=here)
                if may_connect else ""
            ),
        })
    return groups


def _connection_name(connection: BrexConnection) -> str:
    return connection.display_name or gettext("Brex account")


# Pages with connection details and the disconnect button: never cached, never framed
# (clickjacking), whatever the site's X_FRAME_OPTIONS or middleware say.
@xframe_options_deny
@never_cache
@require_GET
@login_required
def connections(request: HttpRequest) -> HttpResponse:
    """The signed-in user's Brex connections, with connect, reconnect and disconnect; with
    a team model, grouped by team (what ``BrexConnection.objects.for_user`` returns)."""
    here = reverse("brex_oauth:connections")
    rows = BrexConnection.objects.for_user(request.user).order_by("-connected_at", "-pk")
    if teams_enabled():
        groups = _team_groups(request.user, list(rows.select_related("team")), here)
    else:
        groups = [{
            "team": None,
            "connections": list(rows),
            "connect_url": _connect_url(next=here),
            "reconnect_url": _connect_url(force_login="1", next=here),
        }]
    return render(
        request,
        CONNECTIONS_TEMPLATE,
        {
            "connections": [c for group in groups for c in group["connections"]],
            "groups": groups,
            "teams_enabled": teams_enabled(),
            "connect_url": groups[0]["connect_url"],
            "reconnect_url": groups[0]["reconnect_url"],
            "here": here,
        },
    )


@xframe_options_deny
@never_cache
@require_GET
@login_required
def disconnect_confirm(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask the person to confirm disconnecting; the page's form POSTs to ``disconnect``."""
    connection = _managed_connection(request, pk)
    next_url = safe_next(request, request.GET.get("next")) or ""
    return render(
        request,
        DISCONNECT_CONFIRM_TEMPLATE,
        {
            "connection": connection,
            "name": _connection_name(connection),
            "already_disconnected": connection.status == ConnectionStatus.REVOKED,
            "next": next_url,
            "cancel_url": next_url or reverse("brex_oauth:connections"),
        },
    )


@transaction.non_atomic_requests
@never_cache
@require_POST
@login_required
def disconnect(request: HttpRequest, pk: int) -> HttpResponse:
    """Disconnect a connection (POST with CSRF): stop using it and revoke it at Brex."""
    connection = _managed_connection(request, pk)
    result = disconnect_connection(connection, actor=request.user)
    level, text = result.user_message(_connection_name(connection))
    messages.add_message(request, level, text, fail_silently=True)
    next_url = safe_next(request, request.POST.get("next"))
    return HttpResponseRedirect(next_url or resolve_url(brex_settings.DISCONNECT_REDIRECT_URL))
