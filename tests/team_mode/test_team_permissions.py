"""Who may do what with a team's connection: a member, a non-member, staff, and the user
who connected it but then left the team, over every view, admin action and queryset."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core import checks
from django.urls import reverse

from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionStatus,
)
from django_brex_oauth.teams import TeamPolicy, get_team_policy
from django_brex_oauth.testing.factories import make_connection

pytestmark = pytest.mark.django_db(transaction=True)

#: role -> (sees it, may disconnect it, may connect for the team, sees it in for_user)
MATRIX = {
    "member": (True, True, True, True),
    "outsider": (False, False, False, False),
    "staff": (True, True, False, False),
    "leaver": (False, False, False, False),
}


@pytest.fixture
def staff(django_user_model):
    user = django_user_model.objects.create_user("sam", "sam@example.com", "pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="brex_oauth",
            codename__in=["view_brexconnection", "change_brexconnection",
                          "revoke_brexconnection"],
        )
    )
    return user


@pytest.fixture
def people(member, outsider, staff, leaver, team, other_team):
    team.members.add(leaver)
    return {"member": member, "outsider": outsider, "staff": staff, "leaver": leaver}


@pytest.fixture
def team_connection(people, team, fake_brex, brex_settings):
    connection = make_connection(people["leaver"], fake=fake_brex, team=team)
    team.members.remove(people["leaver"])  # connected it, then left the team
    return connection


def client_of(client_class, user):
    client = client_class()
    client.force_login(user)
    return client


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_the_connections_page(role, people, team_connection, client_class):
    sees = MATRIX[role][0] and role != "staff"  # staff see all in the admin, not here
    page = client_of(client_class, people[role]).get(reverse("brex_oauth:connections"))

    assert page.status_code == 200
    assert (f'id="brex-connection-{team_connection.pk}"' in page.content.decode()) is sees


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_the_disconnect_confirmation_page(role, people, team_connection, client_class):
    url = reverse("brex_oauth:disconnect_confirm", args=[team_connection.pk])

    response = client_of(client_class, people[role]).get(url)

    assert response.status_code == (200 if MATRIX[role][1] else 403)


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_disconnect(role, people, team_connection, client_class, fake_brex):
    url = reverse("brex_oauth:disconnect", args=[team_connection.pk])

    response = client_of(client_class, people[role]).post(url)

    team_connection.refresh_from_db()
    if MATRIX[role][1]:
        assert response.status_code == 302
        assert team_connection.status == ConnectionStatus.REVOKED
    else:
        assert response.status_code in (403, 404)
        assert team_connection.status == ConnectionStatus.ACTIVE
        assert team_connection.token.refresh_token
        assert fake_brex.is_refresh_token_active(team_connection.token.refresh_token)


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_connect_for_the_team(role, people, team, team_connection, client_class):
    response = client_of(client_class, people[role]).get(
        reverse("brex_oauth:connect"), {"team": str(team.pk)}
    )

    if MATRIX[role][2]:
        assert response.status_code == 302
        assert AuthorizationRequest.objects.get().team_key == str(team.pk)
    else:
        assert response.status_code == 403
        assert not AuthorizationRequest.objects.exists()


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_the_querysets_and_the_policy(role, people, team, team_connection):
    user = people[role]
    policy = get_team_policy()

    assert (team_connection in BrexConnection.objects.for_user(user)) is MATRIX[role][3]
    assert policy.can_view(user, team_connection) is MATRIX[role][0]
    assert policy.can_disconnect(user, team_connection) is MATRIX[role][1]
    assert policy.can_connect(user, team) is MATRIX[role][2]
    assert policy.can_reconnect(user, team_connection) is MATRIX[role][2]
    assert list(BrexConnection.objects.for_team(team)) == [team_connection]


def test_the_admin_shows_and_filters_by_team(people, team, other_team, team_connection,
                                             client_class, fake_brex):
    other = make_connection(people["outsider"], fake=fake_brex, team=other_team)
    admin = client_of(client_class, people["staff"])
    url = reverse("admin:brex_oauth_brexconnection_changelist")

    page = admin.get(url, {"team__id__exact": str(team.pk)}).content.decode()

    assert "Rocket accountants" in page  # the team column and filter
    assert f"/{team_connection.pk}/change/" in page
    assert f"/{other.pk}/change/" not in page
    change = admin.get(
        reverse("admin:brex_oauth_brexconnection_change", args=[team_connection.pk])
    )
    assert "Rocket accountants" in change.content.decode()


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_the_admin_and_its_actions(role, people, team_connection, client_class, fake_brex):
    """Only staff reach the admin; for anyone else the list and both actions are the login
    page, and the connection is left as it was."""
    client = client_of(client_class, people[role])
    url = reverse("admin:brex_oauth_brexconnection_changelist")
    refresh_token = team_connection.token.refresh_token

    listing = client.get(url)
    actions = [
        client.post(url, {"action": action, "_selected_action": [str(team_connection.pk)]})
        for action in ("refresh_now", "revoke_at_brex")
    ]

    team_connection.refresh_from_db()
    if role == "staff":
        assert listing.status_code == 200
        assert f"/{team_connection.pk}/change/" in listing.content.decode()
        assert team_connection.status == ConnectionStatus.REVOKED
        assert fake_brex.stats["token_refresh_token"] == 1
    else:
        assert listing.status_code == 302 and "/admin/login/" in listing["Location"]
        assert all(r.status_code == 302 and "/admin/login/" in r["Location"]
                   for r in actions)
        assert team_connection.status == ConnectionStatus.ACTIVE
        assert team_connection.last_refreshed_at is None
        assert fake_brex.is_refresh_token_active(refresh_token)
        assert fake_brex.stats["token_refresh_token"] == 0


class MembersOnlyPolicy(TeamPolicy):
    """Staff may not disconnect a team's connection; only its members."""

    def can_disconnect(self, user, connection):
        if connection.team_id is None:
            return super().can_disconnect(user, connection)
        return self.is_member(user, connection.team)


def test_the_admins_revoke_action_asks_the_policy(people, team_connection, client_class,
                                                  settings):
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "TEAM_POLICY": f"{__name__}.MembersOnlyPolicy",
    }
    admin = client_of(client_class, people["staff"])
    url = reverse("admin:brex_oauth_brexconnection_changelist")

    response = admin.post(url, {"action": "revoke_at_brex", "_selected_action":
                                [str(team_connection.pk)]}, follow=True)

    assert "you may not disconnect it" in response.content.decode()
    team_connection.refresh_from_db()
    assert team_connection.status == ConnectionStatus.ACTIVE


def test_the_admins_revoke_action_revokes_for_staff_the_default_policy_allows(
    people, team_connection, client_class
):
    admin = client_of(client_class, people["staff"])
    url = reverse("admin:brex_oauth_brexconnection_changelist")

    admin.post(url, {"action": "revoke_at_brex",
                     "_selected_action": [str(team_connection.pk)]})

    team_connection.refresh_from_db()
    assert team_connection.status == ConnectionStatus.REVOKED


class NoStaffRefreshPolicy(TeamPolicy):
    """Only a team's members may refresh its connections; staff may not."""

    def can_refresh(self, user, connection):
        return self.can_reconnect(user, connection)


def test_the_admins_refresh_action_asks_the_policy(people, team_connection, client_class,
                                                   settings, fake_brex):
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "TEAM_POLICY": f"{__name__}.NoStaffRefreshPolicy",
    }
    before = team_connection.token.refresh_token
    admin = client_of(client_class, people["staff"])
    url = reverse("admin:brex_oauth_brexconnection_changelist")

    response = admin.post(url, {"action": "refresh_now", "_selected_action":
                                [str(team_connection.pk)]}, follow=True)

    assert "you may not refresh it" in response.content.decode()
    team_connection.refresh_from_db()
    assert team_connection.last_refreshed_at is None
    assert BrexToken.objects.get(pk=team_connection.pk).refresh_token == before
    assert fake_brex.stats["token_refresh_token"] == 0


def test_the_admins_refresh_action_refreshes_for_staff_the_default_policy_allows(
    people, team_connection, client_class, fake_brex
):
    admin = client_of(client_class, people["staff"])
    url = reverse("admin:brex_oauth_brexconnection_changelist")

    response = admin.post(url, {"action": "refresh_now", "_selected_action":
                                [str(team_connection.pk)]}, follow=True)

    assert ": refreshed;" in response.content.decode()
    team_connection.refresh_from_db()
    assert team_connection.last_refreshed_at is not None
    assert fake_brex.stats["token_refresh_token"] == 1


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_the_default_policy_on_refreshing(role, people, team_connection):
    may = {"member": True, "outsider": False, "staff": True, "leaver": False}[role]
    assert get_team_policy().can_refresh(people[role], team_connection) is may


# System checks --------------------------------------------------------------------------


def team_errors():
    return [e.id for e in checks.run_checks(tags=["brex_oauth"]) if e.id.startswith(
        "brex_oauth.E03")]


def test_the_default_policy_passes_the_checks():
    assert team_errors() == []


@pytest.mark.parametrize("policy", ["no.such.Policy", "django_brex_oauth.teams.get_team_model",
                                    "builtins.object"])
def test_a_team_model_without_a_usable_policy_is_refused(settings, policy):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "TEAM_POLICY": policy}

    assert team_errors() == ["brex_oauth.E031"]


def test_the_default_policy_needs_the_members_relation(settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "TEAM_MEMBERS_ATTR": "name"}

    assert team_errors() == ["brex_oauth.E032"]


def test_a_team_model_that_is_not_installed_is_refused(settings):
    settings.BREX_OAUTH_TEAM_MODEL = "teams_app.Nothing"

    assert team_errors() == ["brex_oauth.E030"]


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_the_client_for_a_user(role, people, team_connection, fake_brex):
    from django_brex_oauth.client import BrexClient

    if MATRIX[role][3]:
        client = BrexClient.for_user(people[role], team_connection.pk)
        assert client.get_company()["id"] == fake_brex.company["id"]
    else:
        with pytest.raises(BrexConnection.DoesNotExist):
            BrexClient.for_user(people[role], team_connection.pk)
