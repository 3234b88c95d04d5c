"""Every event and signal about a team's connection names the team: revocations, scope
changes, failed and discarded refreshes, webhook subscriptions and webhooks."""

from __future__ import annotations

import pytest

from django_brex_oauth import signals
from django_brex_oauth.exceptions import BrexUnavailable
from django_brex_oauth.models import (
    BrexWebhookEvent,
    ConnectionEvent,
)
from django_brex_oauth.services import webhook_events, webhook_subscriptions
from django_brex_oauth.services.refresh import Outcome, refresh_connection
from django_brex_oauth.services.revoke import RevokeOutcome, disconnect, revoke_at_brex
from django_brex_oauth.testing.factories import make_connection

pytestmark = pytest.mark.django_db(transaction=True)

REVOKE_PATH = "/oauth2/default/v1/revoke"


def note(team) -> str:
    return f"For team {team} (id {team.pk})."


def details(connection, kind) -> list[str]:
    return list(
        ConnectionEvent.objects.filter(connection=connection, kind=kind)
        .order_by("pk").values_list("detail", flat=True)
    )


@pytest.fixture
def team_connection(member, team, fake_brex, brex_settings):
    return make_connection(member, fake=fake_brex, team=team)


@pytest.fixture
def personal_connection(member, fake_brex, brex_settings):
    return make_connection(member, fake=fake_brex, brex_user="grace.hopper@example.com")


def test_the_revocation_at_brex_names_the_team(team_connection, personal_connection, team):
    for connection in (team_connection, personal_connection):
        assert disconnect(connection).attempt.outcome == RevokeOutcome.REVOKED

    (revoked,) = details(team_connection, "revoked")
    assert note(team) in revoked
    assert "For team" not in details(personal_connection, "revoked")[0]


def test_a_failed_revocation_names_the_team(team_connection, team, fake_brex):
    fake_brex.fail_next(REVOKE_PATH, status=503, times=20)

    result = disconnect(team_connection)
    assert result.attempt.outcome == RevokeOutcome.FAILED
    fake_brex.clear_failures()
    assert revoke_at_brex(team_connection).outcome == RevokeOutcome.REVOKED

    failed = details(team_connection, "revoke_failed")
    assert failed and all(note(team) in detail for detail in failed)
    assert note(team) in details(team_connection, "revoked")[0]


def test_a_scope_change_on_refresh_names_the_team(team_connection, team, fake_brex):
    fake_brex.narrow_grant(team_connection.token.refresh_token, ["users.readonly"])

    result = refresh_connection(team_connection, force=True)

    assert result.outcome == Outcome.REFRESHED
    (changed,) = details(team_connection, "scopes_changed")
    assert "companies.readonly" in changed and note(team) in changed


def test_a_transient_refresh_failure_names_the_team(team_connection, team, fake_brex):
    fake_brex.fail_next("/v1/token", status=503)

    with pytest.raises(BrexUnavailable):
        refresh_connection(team_connection, force=True)

    failed = details(team_connection, "refresh_failed")
    assert failed and all(note(team) in detail for detail in failed)


def test_webhook_subscription_events_name_the_team(team_connection, team, brex_settings):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH,
        "WEBHOOK_URL": "https://partner.example/brex/webhook/",
        "WEBHOOK_EVENT_TYPES": ["USER_UPDATED"],
    }

    webhook_subscriptions.subscribe(team_connection)
    disconnect(team_connection)

    subscribed = details(team_connection, "webhook_subscribed")
    unsubscribed = details(team_connection, "webhook_unsubscribed")
    assert subscribed and unsubscribed
    assert all(note(team) in detail for detail in subscribed + unsubscribed)


def test_a_webhook_signal_names_the_teams_of_its_connections(
    team_connection, personal_connection, team, other_team, outsider, fake_brex
):
    other = make_connection(outsider, fake=fake_brex, team=other_team)
    company = team_connection.brex_company_id
    assert other.brex_company_id == personal_connection.brex_company_id == company
    heard = []
    signals.webhook_received.connect(lambda **kw: heard.append(kw), weak=False,
                                     dispatch_uid="test-team-webhook")
    try:
        event = BrexWebhookEvent.objects.create(
            webhook_id="msg_team", event_type="TRANSFER_PROCESSED", company_id=company,
            payload={"event_type": "TRANSFER_PROCESSED", "company_id": company},
        )
        webhook_events.process(event)
    finally:
        signals.webhook_received.disconnect(dispatch_uid="test-team-webhook")

    (kwargs,) = heard
    assert [c.pk for c in kwargs["connections"]] == [
        team_connection.pk, personal_connection.pk, other.pk
    ]
    assert kwargs["teams"] == [team, other_team]


def test_a_webhook_for_personal_connections_names_no_team(personal_connection):
    heard = []
    signals.webhook_received.connect(lambda **kw: heard.append(kw), weak=False,
                                     dispatch_uid="test-personal-webhook")
    company = personal_connection.brex_company_id
    try:
        webhook_events.process(BrexWebhookEvent.objects.create(
            webhook_id="msg_personal", event_type="TRANSFER_PROCESSED", company_id=company,
            payload={"event_type": "TRANSFER_PROCESSED", "company_id": company},
        ))
    finally:
        signals.webhook_received.disconnect(dispatch_uid="test-personal-webhook")

    assert [(len(kw["connections"]), kw["teams"]) for kw in heard] == [(1, [])]
