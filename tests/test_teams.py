"""Team-owned connections: without a team model nothing changes; with one, the team-mode
tests (tests/team_mode/) run in their own pytest process with tests.settings_teams, because
``BREX_OAUTH_TEAM_MODEL`` shapes the tables (as ``AUTH_USER_MODEL`` does)."""

from __future__ import annotations

import json
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


# Turning teams on later, and off again --------------------------------------------------


@pytest.fixture
def shared_database(tmp_path):
    """A database that processes with different settings take turns on: a SQLite file, or
    with BREX_OAUTH_TEST_DATABASE=postgres a PostgreSQL database of its own."""
    if os.environ.get("BREX_OAUTH_TEST_DATABASE") != "postgres":
        yield {"BREX_OAUTH_TEST_SQLITE_NAME": str(tmp_path / "site.sqlite3")}
        return
    import psycopg
    from django.db import connection

    params = connection.get_connection_params()
    name = f"{connection.settings_dict['NAME']}_team_switch"
    admin = {k: v for k, v in params.items() if k in ("host", "port", "user", "password")}
    with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    user = params.get("user", "postgres")
    auth = user + (f":{params['password']}" if params.get("password") else "")
    url = f"postgres://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{name}"
    try:
        yield {"DATABASE_URL": url}
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def step(database: dict, settings_module: str, name: str, *args) -> dict:
    """Run one step of tests/team_switch.py in a process of its own; what it printed."""
    env = {**os.environ, **database, "DJANGO_SETTINGS_MODULE": settings_module,
           "PYTHONPATH": "."}
    result = subprocess.run(
        [sys.executable, "-m", "tests.team_switch", name, *map(str, args)], cwd=REPO_DIR,
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


OFF, ON = "tests.settings", "tests.settings_teams"


def test_teams_turned_on_later_add_the_column_in_place_and_keep_every_connection(
    shared_database, tmp_path
):
    assert "W033" not in step(shared_database, OFF, "migrate")["check"]
    seeded = step(shared_database, OFF, "seed")
    pk = seeded["connection"]

    # The team model is set: migrate creates its table and warns what is left to do.
    assert "brex_oauth.W033" in step(shared_database, ON, "migrate")["check"]
    switched = step(shared_database, ON, "switch")

    assert "Added the team column" in switched["output"]
    assert "W033" not in switched["check"]
    # The same table as a site that had teams from the start.
    fresh = {**shared_database}
    if "BREX_OAUTH_TEST_SQLITE_NAME" in fresh:
        fresh["BREX_OAUTH_TEST_SQLITE_NAME"] = str(tmp_path / "fresh.sqlite3")
        step(fresh, ON, "migrate")
        assert switched["schema"] == step(fresh, ON, "schema")
    assert switched["schema"]["columns"]["team_id"] is True
    assert switched["schema"]["columns"]["owner_id"] is True
    assert switched["schema"]["named"] == [
        "brex_oauth_unique_owner_brex_user", "brex_oauth_unique_team_company"
    ]
    # Nothing lost, and the connection works as a team's connection.
    used = step(shared_database, ON, "use_teams", pk)
    assert used["before"] == {"owner": seeded["user"], "status": "active", "team": None,
                              "refresh_token": seeded["refresh_token"], "events": 1}
    assert used["after"] == {**used["before"], "owner": None, "team": used["team"]}
    assert used["second_refused"] is True
    # Run again, it has nothing to do.
    assert "nothing to do" in step(shared_database, ON, "switch")["output"]

    # Teams off again: refused while a connection belongs to a team...
    refused = step(shared_database, OFF, "remove_refused")["refused"]
    assert "1 connection(s) belong to a team" in refused
    assert step(shared_database, OFF, "kept", pk)["refresh_token"] == seeded["refresh_token"]
    # ... and done once every connection is someone's own again.
    owner = step(shared_database, ON, "make_personal", pk)["owner"]
    removed = step(shared_database, OFF, "switch")
    assert "Removed the team column" in removed["output"]
    assert "team_id" not in removed["schema"]["columns"]
    assert removed["schema"]["columns"]["owner_id"] is False
    assert removed["schema"]["named"] == ["brex_oauth_unique_owner_brex_user"]
    gone = step(shared_database, OFF, "owner_takes_it", pk)
    assert gone["before"] == {"owner": owner, "status": "active", "team": "no team field",
                              "refresh_token": seeded["refresh_token"], "events": 1}
    assert gone["gone"] is True
