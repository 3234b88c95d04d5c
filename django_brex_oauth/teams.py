"""Team-owned connections: the team model and the policy that says who may do what.

All of it is inert unless ``settings.BREX_OAUTH_TEAM_MODEL`` names a model
(``"app_label.ModelName"``). The policy is the class named by
``BREX_OAUTH["TEAM_POLICY"]``; views, admin actions and
``BrexConnection.objects.for_user()`` ask it and nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ObjectDoesNotExist, ValidationError
from django.db import models
from django.utils.module_loading import import_string

from .conf import brex_settings, team_model_setting

if TYPE_CHECKING:
    from .models import BrexConnection

#: The model permission that lets staff act on every connection (the admin's revoke action).
REVOKE_PERMISSION = "brex_oauth.revoke_brexconnection"
#: The model permission that lets staff see every connection.
VIEW_PERMISSION = "brex_oauth.view_brexconnection"
#: The model permission that lets staff refresh any connection (the admin's "Refresh now").
CHANGE_PERMISSION = "brex_oauth.change_brexconnection"


def teams_enabled() -> bool:
    """True when ``BREX_OAUTH_TEAM_MODEL`` names a team model."""
    return team_model_setting() is not None


def get_team_model() -> type[models.Model]:
    """The model ``BREX_OAUTH_TEAM_MODEL`` names (``ImproperlyConfigured`` without one)."""
    name = team_model_setting()
    if name is None:
        raise ImproperlyConfigured("settings.BREX_OAUTH_TEAM_MODEL is not set.")
    try:
        return apps.get_model(name, require_ready=False)
    except (ValueError, LookupError) as err:
        raise ImproperlyConfigured(
            f"settings.BREX_OAUTH_TEAM_MODEL refers to {name!r}, which is not an installed "
            "model ('app_label.ModelName')."
        ) from err


def teams_of(connections) -> list:
    """The teams ``connections`` belong to, each once, in the order of their first
    connection (personal connections add none; always empty without a team model). One
    query, for the teams not already loaded."""
    if not teams_enabled():
        return []
    team_ids = list(dict.fromkeys(c.team_id for c in connections if c.team_id is not None))
    if not team_ids:
        return []
    by_pk = get_team_model()._default_manager.in_bulk(team_ids)
    return [by_pk[pk] for pk in team_ids if pk in by_pk]


def _is_staff_with(user, permission: str) -> bool:
    return bool(getattr(user, "is_staff", False) and user.has_perm(permission))


class TeamPolicy:
    """The default policy: membership is the team model's many-to-many relation to users
    named by ``BREX_OAUTH["TEAM_MEMBERS_ATTR"]`` (default ``"members"``).

    A member may connect for the team, see its connections, reconnect and disconnect them.
    Staff with ``brex_oauth.view_brexconnection`` may see any connection, and with
    ``brex_oauth.revoke_brexconnection`` disconnect any. A personal connection (no team)
    is its owner's alone, as without teams. Subclass and override what differs (for
    example, only a team's admins may disconnect), and name the subclass in
    ``BREX_OAUTH["TEAM_POLICY"]``.
    """

    @property
    def members_attr(self) -> str:
        return brex_settings.TEAM_MEMBERS_ATTR

    def member_teams(self, user) -> models.QuerySet:
        """The teams ``user`` is a member of."""
        model = get_team_model()
        if not getattr(user, "is_authenticated", False):
            return model._default_manager.none()
        return model._default_manager.filter(**{self.members_attr: user})

    def is_member(self, user, team) -> bool:
        return self.member_teams(user).filter(pk=team.pk).exists()

    # What the app asks -------------------------------------------------------------------

    def connectable_teams(self, user) -> models.QuerySet:
        """The teams ``user`` may connect a Brex account for (the connect page offers them)."""
        return self.member_teams(user)

    def can_connect(self, user, team) -> bool:
        """May ``user`` connect a Brex account for ``team``? Asked at connect and again at
        the callback (a member who left in between is refused)."""
        return self.connectable_teams(user).filter(pk=team.pk).exists()

    def visible_teams(self, user) -> models.QuerySet:
        """The teams whose connections ``user`` sees on the site's connections page."""
        return self.member_teams(user)

    def can_view(self, user, connection: BrexConnection) -> bool:
        """May ``user`` see ``connection``?"""
        if _is_staff_with(user, VIEW_PERMISSION) or _is_staff_with(user, REVOKE_PERMISSION):
            return True
        if connection.team_id is None:
            return connection.owner_id is not None and connection.owner_id == user.pk
        return self.visible_teams(user).filter(pk=connection.team_id).exists()

    def can_reconnect(self, user, connection: BrexConnection) -> bool:
        """May ``user`` reconnect ``connection`` (connect it again at Brex)?"""
        if connection.team_id is None:
            return connection.owner_id is not None and connection.owner_id == user.pk
        return self.can_connect(user, connection.team)

    def can_refresh(self, user, connection: BrexConnection) -> bool:
        """May ``user`` refresh ``connection``'s tokens now (the admin's "Refresh now")?
        Staff with ``brex_oauth.change_brexconnection``, and whoever may reconnect it."""
        if _is_staff_with(user, CHANGE_PERMISSION):
            return True
        return self.can_reconnect(user, connection)

    def can_disconnect(self, user, connection: BrexConnection) -> bool:
        """May ``user`` disconnect ``connection`` (revoke it at Brex)?"""
        if _is_staff_with(user, REVOKE_PERMISSION):
            return True
        if connection.team_id is None:
            return connection.owner_id is not None and connection.owner_id == user.pk
        return self.is_member(user, connection.team)


def get_team_policy() -> TeamPolicy:
    """An instance of the class ``BREX_OAUTH["TEAM_POLICY"]`` names."""
    path = brex_settings.TEAM_POLICY
    try:
        policy_class = import_string(path)
    except ImportError as err:
        raise ImproperlyConfigured(
            f"BREX_OAUTH['TEAM_POLICY'] = {path!r} cannot be imported."
        ) from err
    return policy_class()


def find_team(user, team_key: Any, *, for_connect: bool = True):
    """The team with primary key ``team_key`` when ``user`` may connect for it.

    Raises ``LookupError`` for a key that is malformed or names no team, and
    ``PermissionError`` for a team ``user`` may not act for.
    """
    model = get_team_model()
    try:
        team = model._default_manager.get(pk=team_key)
    except (ObjectDoesNotExist, ValueError, TypeError, ValidationError, OverflowError) as err:
        raise LookupError("no such team") from err
    if not get_team_policy().can_connect(user, team):
        raise PermissionError("not allowed to connect for this team")
    return team


def can_manage(user, connection: BrexConnection) -> bool:
    """May ``user`` disconnect ``connection``? The owner (or, for a team's connection, the
    policy), or staff with ``brex_oauth.revoke_brexconnection``."""
    if not teams_enabled():
        return connection.owner_id == user.pk or _is_staff_with(user, REVOKE_PERMISSION)
    return get_team_policy().can_disconnect(user, connection)


def can_refresh(user, connection: BrexConnection) -> bool:
    """May ``user`` refresh ``connection`` from the admin? Without a team model, anyone the
    admin lets change connections; with one, the policy says."""
    if not teams_enabled():
        return True
    return get_team_policy().can_refresh(user, connection)
