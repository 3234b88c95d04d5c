"""Team-owned connections: without a team model nothing changes; with one, the team-mode
tests (tests/team_mode/) run in their own pytest process with tests.settings_teams, because
``BREX_OAUTH_TEAM_MODEL`` shapes the tables (as ``AUTH_USER_MODEL`` does)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core import checks
from django.urls import reverse

from django_brex_oauth.models import AuthorizationRequest, BrexConnection, ConnectionEvent
from django_brex_oauth.teams import can_manage
from django_brex_oauth.testing.factories import make_connection
from tests.migration_steps import (
    BEFORE_TEAMS,
    connection_before_teams,
    migrate_to,
    migrate_to_latest,
)

REPO_DIR = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings_teams", "PYTHONPATH": "."}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_DIR, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_the_team_mode_suite_passes_with_a_team_model():
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "--ds", "tests.settings_teams",
                 "tests/team_mode")

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 30, output[-2000:]
    assert " failed" not in output and " error" not in output


def test_the_migrations_are_complete_with_a_team_model():
    result = run("-m", "django", "makemigrations", "--check", "--dry-run", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr


# Without a team model ------------------------------------------------------------------


def test_without_a_team_model_a_connection_has_no_team_and_goes_with_its_owner():
    field_names = {f.name for f in BrexConnection._meta.get_fields()}

    assert "team" not in field_names
    owner = BrexConnection._meta.get_field("owner")
    assert owner.null is False
    assert owner.remote_field.on_delete.__name__ == "CASCADE"


@pytest.mark.django_db
@pytest.mark.parametrize("team", ["1", "abc", ""])
def test_without_a_team_model_connect_with_a_team_is_a_404_and_starts_nothing(
    user_client, brex_settings, team
):
    response = user_client.get(reverse("brex_oauth:connect"), {"team": team})

    assert response.status_code == 404
    assert not AuthorizationRequest.objects.exists()


@pytest.mark.django_db
def test_without_a_team_model_for_user_is_the_users_own_and_for_team_refuses(user, other_user):
    mine = make_connection(user)
    make_connection(other_user)

    assert list(BrexConnection.objects.for_user(user)) == [mine]
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured):
        BrexConnection.objects.for_team(1)


@pytest.mark.django_db
def test_without_a_team_model_owners_and_staff_manage_as_before(user, other_user, staff_user):
    connection = make_connection(user)

    assert can_manage(user, connection)
    assert can_manage(staff_user, connection)
    assert not can_manage(other_user, connection)


def test_without_a_team_model_the_team_checks_say_nothing(settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "TEAM_POLICY": "no.such.Policy"}

    errors = checks.run_checks(tags=["brex_oauth"])

    assert not [e for e in errors if e.id.startswith("brex_oauth.E03")]


@pytest.mark.django_db(transaction=True)
def test_migrating_a_site_with_data_and_no_team_model_keeps_every_row():
    apps = migrate_to(BEFORE_TEAMS)
    user_pk, connection_pk = connection_before_teams(apps)

    migrate_to_latest()

    connection = BrexConnection.objects.get(pk=connection_pk)
    assert connection.owner_id == user_pk and connection.status == "active"
    assert connection.token.token_type == "Bearer"
    assert ConnectionEvent.objects.filter(connection=connection).count() == 1
    # And the owner still takes the connection with them.
    connection.owner.delete()
    assert not BrexConnection.objects.filter(pk=connection_pk).exists()


@pytest.mark.django_db
def test_without_a_team_model_the_client_for_a_user_is_for_their_own_connections(
    user, other_user
):
    from django_brex_oauth.client import BrexClient

    mine = make_connection(user)

    assert BrexClient.for_user(user, mine.pk).connection == mine
    with pytest.raises(BrexConnection.DoesNotExist):
        BrexClient.for_user(other_user, mine.pk)
