"""Connecting a Brex account: start an authorization, then complete it on the callback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext, ngettext
from django.views.decorators.debug import sensitive_variables

from .. import oauth, signals
from ..client import BrexClient, get_with_token
from ..conf import brex_settings
from ..db import write_transaction
from ..exceptions import (
    AccessDenied,
    AuthorizationError,
    BrexOAuthError,
    IdTokenError,
    InvalidClient,
    NoScopesGranted,
    OfflineAccessNotGranted,
    RepeatedParameter,
    StateError,
    TeamNotAllowed,
    TeamNotFound,
)
from ..fields import UndecryptableValue
from ..models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    RevocationStatus,
    connection_pk,
    team_note,
)
from ..teams import find_team, teams_enabled
from . import throttle, webhook_subscriptions
from .queue import TASKS, send_task

logger = logging.getLogger("django_brex_oauth")


@sensitive_variables()
def start_authorization(
    *, user, redirect_uri: str, next_url: str = "", force_login: bool = False, team=None
) -> tuple[AuthorizationRequest, str]:
    """Create a single-use pending authorization for ``user`` and return it with the
    Brex authorization URL to send the person to.

    ``team`` (with ``BREX_OAUTH_TEAM_MODEL``) is the team the connection is for; the caller
    has asked the team policy already. It travels with the pending authorization, never in
    the URL: the ``redirect_uri`` is the same with or without a team.
    """
    now = timezone.now()
    scopes = brex_settings.scopes
    state, nonce, code_verifier = oauth.new_state(), oauth.new_nonce(), oauth.new_code_verifier()
    prompt_login = bool(force_login or brex_settings.FORCE_LOGIN)
    # Discovery first: when Brex cannot be reached nothing is stored.
    url = oauth.build_authorization_url(
        redirect_uri=redirect_uri,
        scopes=scopes,
        state=state,
        code_verifier=code_verifier,
        nonce=nonce,
        prompt_login=prompt_login,
    )
    auth_request = AuthorizationRequest.objects.create(
        state=state,
        user=user,
        environment=brex_settings.environment,
        code_verifier=code_verifier,
        nonce=nonce,
        redirect_uri=redirect_uri,
        requested_scopes=" ".join(scopes),
        next_url=next_url,
        prompt_login=prompt_login,
        team_key="" if team is None else str(team.pk),
        created_at=now,
        expires_at=now + timedelta(seconds=brex_settings.AUTHORIZATION_REQUEST_TTL),
    )
    return auth_request, url


@dataclass
class CompletedConnection:
    connection: BrexConnection
    created: bool
    next_url: str


def consume_authorization_request(*, user, state: str | None, state_in_session: bool):
    """Take the pending authorization for ``state`` exactly once, or raise StateError."""
    if not state:
        raise StateError(
            "missing state",
            user_message=gettext(
                "The answer from Brex did not say which connection attempt it belongs to. "
                "Nothing was connected. Please start connecting again."
            ),
        )
    if not state_in_session:
        raise StateError("state not bound to this session")
    taken = AuthorizationRequest.objects.filter(state=state, consumed_at__isnull=True).update(
        consumed_at=timezone.now()
    )
    auth_request = AuthorizationRequest.objects.filter(state=state).first()
    if auth_request is None:
        raise StateError("unknown state")
    if not taken:
        raise StateError(
            "state used already",
            user_message=gettext(
                "This Brex sign-in link was used already, so it cannot connect anything "
                "again. If your account is not connected yet, please start connecting again."
            ),
        )
    if auth_request.user_id != user.pk:
        raise StateError("state belongs to another user")
    if auth_request.is_expired:
        minutes = max(1, brex_settings.AUTHORIZATION_REQUEST_TTL // 60)
        raise StateError(
            "state expired",
            user_message=ngettext(
                "You took longer than %(minutes)d minute at Brex, so this attempt expired and "
                "nothing was connected. Please start connecting again.",
                "You took longer than %(minutes)d minutes at Brex, so this attempt expired and "
                "nothing was connected. Please start connecting again.",
                minutes,
            ) % {"minutes": minutes},
        )
    return auth_request


def refuse_repeated_parameters(
    *, user, repeated: list[str], states_in_session: list[str]
) -> RepeatedParameter:
    """The error for a callback that repeats a parameter (RFC 6749 section 3.1), after taking
    every pending authorization its ``state`` values name for this session, as any other
    refused callback does: none of them can complete a connection afterwards."""
    for state in states_in_session:
        try:
            consume_authorization_request(user=user, state=state, state_in_session=True)
        except StateError:
            pass  # Already taken, expired or someone else's: nothing left to take.
    return RepeatedParameter("repeated parameter(s) in the callback: " + ", ".join(repeated))


@sensitive_variables()
def complete_authorization(
    *, user, params: dict[str, str], state_in_session: bool
) -> CompletedConnection:
    """Finish the flow from the callback's query ``params``.

    Stores nothing unless every check passes: state, the answer's issuer (RFC 9207), Brex's
    answer, scopes, the code exchange and the id_token.
    """
    auth_request = consume_authorization_request(
        user=user, state=params.get("state"), state_in_session=state_in_session
    )
    # Asked again before the code is exchanged: a member who left the team (or a team
    # deleted) since connect gets no grant issued at all.
    team = _team_of(auth_request, user)
    # Before anything else is believed, an error included: an answer from another
    # authorization server must not reach Brex's token endpoint with our credentials.
    oauth.check_authorization_response_issuer(params.get("iss"))
    if params.get("error"):
        raise AccessDenied(params["error"], params.get("error_description", ""))
    code = params.get("code")
    if not code:
        raise AuthorizationError("no code in the callback")
    callback_scopes = params.get("scope")
    if callback_scopes is not None and oauth.required_scopes_only(callback_scopes.split()):
        raise NoScopesGranted("no API scope granted")

    try:
        tokens = oauth.exchange_code(
            code=code,
            redirect_uri=auth_request.redirect_uri,
            code_verifier=auth_request.code_verifier,
            granted_scopes=(
                callback_scopes.split()
                if callback_scopes is not None
                else auth_request.requested_scopes.split()
            ),
        )
    except InvalidClient as err:
        # The site's client credentials, as for a refused refresh: refreshing pauses until
        # they work again, and staff get the same alert. The person sees the error page.
        throttle.client_rejected(err)
        raise
    try:
        access_token = tokens.usable_access_token()
        if oauth.required_scopes_only(tokens.scopes):
            raise NoScopesGranted("no API scope granted")
        missing = oauth.missing_required_scopes(tokens.scopes)
        if missing:
            raise NoScopesGranted(
                "a required scope was not granted",
                user_message=ngettext(
                    "You did not grant a permission this site needs (%(scopes)s), so nothing "
                    "was connected. Connect again and leave it ticked.",
                    "You did not grant permissions this site needs (%(scopes)s), so nothing "
                    "was connected. Connect again and leave them ticked.",
                    len(missing),
                ) % {"scopes": ", ".join(missing)},
            )
        if not tokens.id_token:
            raise IdTokenError("Brex returned no id_token")
        claims = oauth.validate_id_token(
            tokens.id_token, nonce=auth_request.nonce, access_token=access_token
        )
        if not tokens.refresh_token:
            raise OfflineAccessNotGranted("no refresh token")
    except BrexOAuthError:
        oauth.revoke_quietly(
            tokens.refresh_token or tokens.access_token,
            "refresh_token" if tokens.refresh_token else "access_token",
        )
        raise

    # Who connected is read with the new access token. Whatever Brex answers (an error, a
    # body that is not JSON, the wrong shape), the connection is stored: the grant is
    # valid and usable, and only the email and company are left out, to be read again by
    # the read_identity task after the commit.
    identity = read_identity(lambda path: get_with_token(access_token, path),
                             tokens.scopes)
    if identity.email is None and _valid_email(claims.get("email")):
        identity.email = claims["email"]
    connection, created = _store_connection(
        user=user,
        team=team,
        environment=auth_request.environment,
        brex_user_id=str(claims["sub"]),
        identity=identity,
        tokens=tokens,
    )
    return CompletedConnection(connection, created, auth_request.next_url)


#: Scopes that allow reading ``GET /v2/users/me``.
USER_SCOPES = frozenset({"users", "users.readonly"})
#: The scope that allows reading ``GET /v2/company``.
COMPANY_SCOPE = "companies.readonly"


@dataclass
class Identity:
    """Who connected, as far as Brex's answers could be read. ``None`` means "not read"
    (the scope was not granted, or the answer was unusable), not "empty"."""

    email: str | None = None
    company_id: str | None = None
    company_name: str | None = None
    #: False when an answer the scopes allow could not be used (an error or a malformed
    #: body): worth reading again later.
    complete: bool = True


def _valid_email(value: Any) -> bool:
    if not isinstance(value, str) or not 0 < len(value) <= 254:
        return False
    try:
        validate_email(value)
    except ValidationError:
        return False
    return True


def _json_object(read: Callable[[str], Any], path: str) -> dict[str, Any] | None:
    """Brex's answer at ``path`` when it is a JSON object; None (and a warning that names
    what was wrong, never the body) when the call failed or answered anything else."""
    try:
        answer = read(path)
    except BrexOAuthError as err:
        logger.warning("Could not read %s from Brex: %s", path, err)
        return None
    if not isinstance(answer, dict):
        logger.warning(
            "Brex answered %s with %s instead of a JSON object.",
            path, "no JSON" if answer is None else f"a JSON {type(answer).__name__}",
        )
        return None
    return answer


def read_identity(read: Callable[[str], Any], scopes: list[str]) -> Identity:
    """The Brex user's email and company, as far as the granted ``scopes`` allow and
    Brex's answers make sense. ``read(path)`` GETs an API path and returns its parsed JSON
    (``None`` for a body that is not JSON). A field of the wrong type or size is left out,
    and the result is then marked incomplete."""
    identity = Identity()
    granted = set(scopes)
    if granted & USER_SCOPES:
        me = _json_object(read, "/v2/users/me")
        email = me.get("email") if me is not None else None
        if _valid_email(email):
            identity.email = email
        else:
            identity.complete = False
            if me is not None:
                logger.warning("Brex's /v2/users/me carried no usable email.")
    if COMPANY_SCOPE in granted:
        company = _json_object(read, "/v2/company")
        company_id = company.get("id") if company is not None else None
        name = company.get("legal_name") if company is not None else None
        if isinstance(company_id, str) and 0 < len(company_id) <= 255 and (
            name is None or isinstance(name, str)
        ):
            identity.company_id = company_id
            identity.company_name = (name or "")[:255]
        else:
            identity.complete = False
            if company is not None:
                logger.warning("Brex's /v2/company carried no usable id and legal name.")
    return identity


def update_identity(connection: BrexConnection | int) -> bool:
    """Read who connected again, for a connection whose identity could not be read when it
    connected, through :class:`~django_brex_oauth.client.BrexClient` (which refreshes and
    retries as for any call), and store what reads well. Returns True once the identity is
    complete; False when it is still not (the next reconnect reads it again), or the
    connection is no longer active."""
    connection = BrexConnection.objects.get(pk=connection_pk(connection))
    if not connection.is_active:
        return False
    identity = read_identity(BrexClient(connection).get, connection.scopes)
    changes = _identity_fields(identity)
    if changes:
        BrexConnection.objects.filter(pk=connection.pk).update(
            **changes, updated_at=timezone.now()
        )
    return identity.complete


def _identity_fields(identity: Identity) -> dict[str, str]:
    changes: dict[str, str] = {}
    if identity.email is not None:
        changes["brex_user_email"] = identity.email
    if identity.company_id is not None:
        changes["brex_company_id"] = identity.company_id
        changes["brex_company_name"] = identity.company_name or ""
    return changes


def _queue_identity_read(connection_id: int) -> None:
    try:
        send_task(TASKS + "read_identity", (connection_id,))
    except Exception as err:  # noqa: BLE001 - any broker failure; the identity stays unread
        logger.warning(
            "Could not queue reading the identity of Brex connection %s (%s); it is read "
            "again when the customer reconnects.", connection_id, type(err).__name__,
        )


def _team_of(auth_request: AuthorizationRequest, user):
    """The team a pending authorization is for (None: personal), checked with the policy."""
    if not auth_request.team_key:
        return None
    if not teams_enabled():
        raise TeamNotFound("a team was asked for but no team model is configured")
    try:
        return find_team(user, auth_request.team_key)
    except LookupError as err:
        raise TeamNotAllowed("the team is gone") from err
    except PermissionError as err:
        raise TeamNotAllowed("no longer allowed to connect for the team") from err


def _team_connection(*, team, environment, brex_user_id, identity):
    """The team's row this connect replaces, locked, or None.

    The team holds one live connection per Brex company (the same environment and company
    id), whoever connected it; when the company could not be read, the team's row for this
    Brex user.
    """
    rows = BrexConnection.objects.select_for_update().filter(
        environment=environment, team=team
    )
    if identity.company_id:
        same_company = rows.filter(brex_company_id=identity.company_id).order_by(
            # The live one first, then the newest.
            models.Case(models.When(status=ConnectionStatus.ACTIVE, then=0), default=1),
            "-connected_at", "-pk",
        ).first()
        if same_company is not None:
            return same_company
    return rows.filter(brex_user_id=brex_user_id).order_by("-connected_at", "-pk").first()


@sensitive_variables()
def _store_connection(*, user, environment, brex_user_id, identity, tokens, team=None):
    now = timezone.now()
    with write_transaction():
        if team is None:
            # With a team model, a personal connection is one without a team.
            personal = {"team": None} if hasattr(BrexConnection, "team") else {}
            connection, created = BrexConnection.objects.select_for_update().get_or_create(
                owner=user,
                environment=environment,
                brex_user_id=brex_user_id,
                **personal,
                defaults={"connected_at": now},
            )
        else:
            connection = _team_connection(
                team=team, environment=environment, brex_user_id=brex_user_id,
                identity=identity,
            )
            created = connection is None
            if created:
                connection = BrexConnection.objects.create(
                    owner=user, team=team, environment=environment,
                    brex_user_id=brex_user_id, connected_at=now,
                )
        replaced_refresh_token = None
        if not created:
            try:
                old = BrexToken.objects.filter(connection=connection).first()
            except UndecryptableValue:
                old = None  # no key reads it: it can be replaced, not revoked
            if old is not None and old.refresh_token and old.refresh_token != tokens.refresh_token:
                replaced_refresh_token = old.refresh_token
            connection.connected_at = now
            # A team's connection replaced by a member: who connected it is now them.
            connection.owner = user
            connection.brex_user_id = brex_user_id
        # What could not be read keeps its value from an earlier connect.
        for field, value in _identity_fields(identity).items():
            setattr(connection, field, value)
        connection.granted_scopes = " ".join(tokens.scopes)
        connection.status = ConnectionStatus.ACTIVE
        connection.revoked_at = None
        connection.revocation_status = RevocationStatus.NOT_REQUESTED
        connection.last_error = ""
        connection.save()
        token_fields = {
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
            "token_type": tokens.token_type,
            # From when Brex answered, not from now: the identity calls took a while.
            "access_token_expires_at": tokens.expires_at,
            "refresh_token_issued_at": now,
            "refresh_token_expires_at": now
            + timedelta(seconds=brex_settings.REFRESH_TOKEN_LIFETIME),
            "refresh_claimed_until": None,
            "refresh_claimed_by": "",
        }
        # An UPDATE, not update_or_create(): the stored row may be one no key decrypts. It
        # moves the generation on, so a refresh still in flight for the replaced tokens
        # cannot save over these (its save only applies to the generation it started from).
        if not BrexToken.objects.filter(connection=connection).update(
            **token_fields, generation=F("generation") + 1, updated_at=now
        ):
            BrexToken.objects.create(connection=connection, **token_fields)
        ConnectionEvent.objects.create(
            connection=connection,
            kind=EventKind.CONNECTED if created else EventKind.RECONNECTED,
            detail="Scopes granted: " + (" ".join(tokens.scopes) or "none")
            + ("" if team is None else ". " + team_note(team)),
            actor=user,
        )
        # The app's own follow-up first: a receiver that raises must not keep the replaced
        # refresh token alive at Brex.
        if replaced_refresh_token:
            # A partial, not a lambda: a lambda's frame would hold the token outside any
            # function marked sensitive when the commit runs it.
            issuer = brex_settings.issuer_for(environment)
            transaction.on_commit(
                partial(
                    oauth.revoke_quietly, replaced_refresh_token, "refresh_token", issuer=issuer
                )
            )
        transaction.on_commit(lambda: webhook_subscriptions.subscribe(connection))
        if not identity.complete:
            transaction.on_commit(lambda: _queue_identity_read(connection.pk))
        transaction.on_commit(
            lambda: signals.connected.send(
                sender=BrexConnection, connection=connection, user=user, created=created,
                team=team,
            )
        )
    return connection, created
