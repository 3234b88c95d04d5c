"""Team-owned connections, end to end against the fake Brex (run with tests.settings_teams)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from django.urls import reverse

from django_brex_oauth import signals
from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    DetachedRevocation,
)
from django_brex_oauth.testing.factories import make_connection
from tests.conftest import Flow
from tests.teams_app.models import Team

pytestmark = pytest.mark.django_db(transaction=True)


def query(url):
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@pytest.fixture
def member_flow(client, member, fake_brex, brex_settings):
    client.force_login(member)
    return Flow(client, fake_brex)


def flow_for(client_class, user, fake_brex):
    client = client_class()
    client.force_login(user)
    return Flow(client, fake_brex)


def refresh_token_of(connection):
    return BrexToken.objects.get(connection=connection).refresh_token


def test_the_team_travels_with_the_pending_authorization_and_not_the_redirect_uri(
    member_flow, team
):
    personal = query(member_flow.start())
    for_team = query(member_flow.start(team=str(team.pk)))

    assert for_team["redirect_uri"] == personal["redirect_uri"]
    assert "team" not in for_team and str(team.pk) not in for_team["redirect_uri"]
    assert AuthorizationRequest.objects.get(state=for_team["state"]).team_key == str(team.pk)
    assert AuthorizationRequest.objects.get(state=personal["state"]).team_key == ""


def test_a_member_connects_for_the_team_and_the_signal_and_event_carry_it(
    member_flow, member, team, fake_brex
):
    received = []
    signals.connected.connect(lambda **kw: received.append(kw), weak=False,
                              dispatch_uid="test-team-connected")
    try:
        response = member_flow.connect(team=str(team.pk))
    finally:
        signals.connected.disconnect(dispatch_uid="test-team-connected")

    assert response.status_code == 302
    connection = BrexConnection.objects.get()
    assert (connection.team, connection.owner, connection.status) == (team, member, "active")
    assert connection.brex_company_id == fake_brex.company["id"]
    assert [(kw["connection"].pk, kw["team"], kw["user"]) for kw in received] == [
        (connection.pk, team, member)
    ]
    event = ConnectionEvent.objects.get(connection=connection)
    assert f"team {team} (id {team.pk})" in event.detail


def test_connecting_without_team_makes_a_personal_connection(member_flow, member, team):
    member_flow.connect()

    connection = BrexConnection.objects.get()
    assert (connection.team, connection.owner) == (None, member)


def test_a_non_member_gets_403_and_nothing_is_stored_or_sent(
    client, outsider, team, fake_brex, brex_settings
):
    client.force_login(outsider)
    requests_before = len(fake_brex.requests)

    response = client.get(reverse("brex_oauth:connect"), {"team": str(team.pk)})

    assert response.status_code == 403
    assert not AuthorizationRequest.objects.exists()
    assert len(fake_brex.requests) == requests_before


@pytest.mark.parametrize(
    "forged", ["", "abc", "999999", "-1", "1e999", "99999999999999999999999999", "1 OR 1=1"]
)
def test_a_forged_or_malformed_team_id_is_a_4xx(client, member, team, forged, brex_settings):
    client.force_login(member)

    response = client.get(reverse("brex_oauth:connect"), {"team": forged})

    assert 400 <= response.status_code < 500
    assert not AuthorizationRequest.objects.exists()


def test_a_member_who_left_between_connect_and_callback_gets_nothing_and_no_grant(
    member_flow, member, team, fake_brex
):
    authorize_url = member_flow.start(team=str(team.pk))
    back = fake_brex.consent(authorize_url)
    team.members.remove(member)

    response = member_flow.callback(back)

    assert response.status_code == 403
    assert b"cannot connect Brex for this team" in response.content
    assert not BrexConnection.objects.exists()
    assert fake_brex.live_grants() == []  # the code was never exchanged


def test_a_team_deleted_between_connect_and_callback_stores_nothing(
    member_flow, team, fake_brex
):
    authorize_url = member_flow.start(team=str(team.pk))
    back = fake_brex.consent(authorize_url)
    team.delete()

    response = member_flow.callback(back)

    assert response.status_code == 403
    assert not BrexConnection.objects.exists()
    assert fake_brex.live_grants() == []


def test_a_user_deleted_between_connect_and_callback_leaves_nothing_and_no_grant(
    member_flow, member, team, fake_brex
):
    authorize_url = member_flow.start(team=str(team.pk))
    back = fake_brex.consent(authorize_url)
    member.delete()

    response = member_flow.callback(back)

    # Signed out with the user gone: the callback goes to the login page, and nothing of
    # the attempt is left, here or at Brex.
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    assert not BrexConnection.objects.exists()
    assert not AuthorizationRequest.objects.exists()
    assert fake_brex.live_grants() == []


def test_the_same_company_connected_again_for_the_team_replaces_the_old_connection(
    client_class, member, second_member, team, fake_brex, brex_settings
):
    flow_for(client_class, member, fake_brex).connect(team=str(team.pk))
    first = BrexConnection.objects.get()
    old_refresh = refresh_token_of(first)

    # Another member, another Brex user of the same company.
    second = flow_for(client_class, second_member, fake_brex)
    second.callback(fake_brex.consent(second.start(team=str(team.pk)),
                                      user=fake_brex.users[1]["id"]))

    (connection,) = BrexConnection.objects.filter(team=team)
    assert connection.pk == first.pk and connection.status == ConnectionStatus.ACTIVE
    assert connection.owner == second_member
    assert connection.brex_user_id == fake_brex.users[1]["id"]
    assert not fake_brex.is_refresh_token_active(old_refresh)
    assert fake_brex.is_refresh_token_active(refresh_token_of(connection))


def test_two_teams_may_each_hold_the_same_company(
    client_class, member, outsider, team, other_team, fake_brex, brex_settings
):
    flow_for(client_class, member, fake_brex).connect(team=str(team.pk))
    flow_for(client_class, outsider, fake_brex).connect(team=str(other_team.pk))

    assert BrexConnection.objects.filter(status="active").count() == 2
    assert {c.team for c in BrexConnection.objects.all()} == {team, other_team}


def test_when_the_user_who_connected_is_deleted_the_team_keeps_its_connection(
    member, team, fake_brex, brex_settings
):
    team_connection = make_connection(member, fake=fake_brex, team=team)
    personal = make_connection(member, fake=fake_brex, brex_user=fake_brex.users[1]["id"])
    team_refresh, personal_refresh = refresh_token_of(team_connection), refresh_token_of(
        personal
    )

    member.delete()

    team_connection.refresh_from_db()
    assert (team_connection.owner, team_connection.team) == (None, team)
    assert team_connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(team_refresh)
    # The personal connection goes with its owner, revoked at Brex, as without teams.
    assert not BrexConnection.objects.filter(pk=personal.pk).exists()
    assert not fake_brex.is_refresh_token_active(personal_refresh)
    assert not DetachedRevocation.objects.exists()  # Brex confirmed


def test_a_deleted_team_has_its_connections_revoked_at_brex_first(
    member, team, fake_brex, brex_settings
):
    connection = make_connection(member, fake=fake_brex, team=team)
    refresh = refresh_token_of(connection)

    team.delete()

    assert not BrexConnection.objects.exists()
    assert not fake_brex.is_refresh_token_active(refresh)
    assert not DetachedRevocation.objects.exists()


def test_a_second_member_sees_the_teams_connection_and_another_team_does_not(
    client_class, member, second_member, outsider, team, other_team, fake_brex, brex_settings
):
    flow_for(client_class, member, fake_brex).connect(team=str(team.pk))
    connection = BrexConnection.objects.get()
    url = reverse("brex_oauth:connections")

    for user, sees in ((member, True), (second_member, True), (outsider, False)):
        client = client_class()
        client.force_login(user)
        page = client.get(url).content.decode()
        assert (f'id="brex-connection-{connection.pk}"' in page) is sees, user
    client = client_class()
    client.force_login(second_member)
    page = client.get(url).content.decode()
    assert f'id="brex-oauth-team-{team.pk}"' in page and "Rocket accountants" in page
    assert f"team={team.pk}" in page  # a member may connect for the team


def test_a_teams_revoked_connection_is_reconnected_for_the_team(
    client_class, member, team, fake_brex, brex_settings
):
    connection = make_connection(member, fake=fake_brex, team=team, status="revoked")
    client = client_class()
    client.force_login(member)

    page = client.get(reverse("brex_oauth:connections")).content.decode()

    row = page.split(f'<tr id="brex-connection-{connection.pk}">', 1)[1].split("</tr>", 1)[0]
    assert "Revoked" in row and "Disconnect" not in row
    assert f'href="/brex/connect/?team={team.pk}&amp;force_login=1&amp;next=' in row
    assert "Reconnect" in row


def test_for_team_and_for_user(member, outsider, team, other_team, brex_settings):
    mine = make_connection(member, team=team)
    personal = make_connection(member, brex_user="grace.hopper@example.com")
    theirs = make_connection(outsider, team=other_team)

    assert set(BrexConnection.objects.for_team(team)) == {mine}
    assert set(BrexConnection.objects.for_team(other_team.pk)) == {theirs}
    assert set(BrexConnection.objects.for_user(member)) == {mine, personal}
    assert set(BrexConnection.objects.for_user(outsider)) == {theirs}
    assert Team.objects.count() == 2


# Signals and events carry the team ------------------------------------------------------


@pytest.fixture
def heard():
    """What the connection signals sent, by signal name (kwargs of each send)."""
    received = {"disconnected": [], "token_refreshed": [], "refresh_failed": []}
    for name, kwargs_list in received.items():
        getattr(signals, name).connect(
            lambda kwargs_list=kwargs_list, **kw: kwargs_list.append(kw), weak=False,
            dispatch_uid=f"test-team-{name}",
        )
    yield received
    for name in received:
        getattr(signals, name).disconnect(dispatch_uid=f"test-team-{name}")


def event_detail(connection, kind):
    return ConnectionEvent.objects.get(connection=connection, kind=kind).detail


def test_a_refresh_sends_and_records_the_team(member, team, fake_brex, brex_settings, heard):
    from django_brex_oauth.services.refresh import Outcome, refresh_connection

    connection = make_connection(member, fake=fake_brex, team=team)
    personal = make_connection(member, fake=fake_brex)

    assert refresh_connection(connection, force=True).outcome == Outcome.REFRESHED
    assert refresh_connection(personal, force=True).outcome == Outcome.REFRESHED

    assert [(kw["connection"].pk, kw["team"]) for kw in heard["token_refreshed"]] == [
        (connection.pk, team), (personal.pk, None)
    ]
    assert all({"rotated", "old_scopes", "new_scopes"} <= set(kw)
               for kw in heard["token_refreshed"])
    assert f"For team {team} (id {team.pk})." in event_detail(connection, "refreshed")
    assert "For team" not in event_detail(personal, "refreshed")


def test_a_refused_refresh_sends_and_records_the_team(
    member, team, fake_brex, brex_settings, heard
):
    from django_brex_oauth.services.refresh import Outcome, refresh_connection

    connection = make_connection(member, fake=fake_brex, team=team)
    fake_brex.revoke_all()  # the customer removed the app at Brex

    assert refresh_connection(connection, force=True).outcome == Outcome.NEEDS_REAUTH

    assert [(kw["connection"].pk, kw["team"], kw["error"]) for kw in
            heard["refresh_failed"]] == [(connection.pk, team, "invalid_grant")]
    assert "description" in heard["refresh_failed"][0]
    assert f"For team {team} (id {team.pk})." in event_detail(connection, "needs_reauth")
    assert heard["token_refreshed"] == []


def test_an_undecryptable_connection_sends_and_records_the_team(
    member, team, fake_brex, brex_settings, heard
):
    from django_brex_oauth.services.unreadable import ERROR_CODE, mark_unreadable

    connection = make_connection(member, fake=fake_brex, team=team)

    assert mark_unreadable(connection.pk)

    assert [(kw["connection"].pk, kw["team"], kw["error"]) for kw in
            heard["refresh_failed"]] == [(connection.pk, team, ERROR_CODE)]
    assert f"For team {team} (id {team.pk})." in event_detail(connection, "needs_reauth")


def test_a_disconnect_sends_and_records_the_team(
    client_class, member, second_member, team, fake_brex, brex_settings, heard
):
    connection = make_connection(member, fake=fake_brex, team=team)
    client = client_class()
    client.force_login(second_member)  # another member of the team disconnects it

    response = client.post(reverse("brex_oauth:disconnect", args=[connection.pk]))

    assert response.status_code == 302
    assert [(kw["connection"].pk, kw["team"], kw["actor"], kw["revoked_at_brex"])
            for kw in heard["disconnected"]] == [(connection.pk, team, second_member, True)]
    assert f"For team {team} (id {team.pk})." in event_detail(connection, "disconnected")

