"""One step of switching a site's team model on or off, run in a process of its own
(``python -m tests.team_switch STEP``) because ``BREX_OAUTH_TEAM_MODEL`` is read when the
models are built. tests/test_teams.py runs the steps one after another against one database
and reads the JSON each prints last."""

from __future__ import annotations

import io
import json
import sys

import django


def schema_shape() -> dict:
    """The connections table as the database describes it: nullable columns, and the
    constraints and indexes by their columns (names of Django's own indexes vary)."""
    from django.db import connection

    from django_brex_oauth.models import BrexConnection

    table = BrexConnection._meta.db_table
    with connection.cursor() as cursor:
        columns = {c.name: bool(c.null_ok)
                   for c in connection.introspection.get_table_description(cursor, table)}
        constraints = connection.introspection.get_constraints(cursor, table)
    named = sorted(name for name in constraints if name.startswith("brex_oauth_unique"))
    shapes = sorted(
        [",".join(c["columns"]), bool(c["unique"]), bool(c["foreign_key"]), bool(c["index"])]
        for c in constraints.values() if not c["primary_key"]
    )
    return {"columns": columns, "named": named, "constraints": shapes}


def migrate() -> dict:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    out = io.StringIO()
    call_command("check", "--database", "default", stdout=out, stderr=out)
    return {"check": out.getvalue()}


def seed() -> dict:
    """Teams off: a user with a connection, its tokens and an event."""
    from django.contrib.auth import get_user_model

    from django_brex_oauth.models import ConnectionEvent
    from django_brex_oauth.testing.factories import make_connection

    user = get_user_model().objects.create_user("early", "early@example.com", "pw")
    connection = make_connection(user)
    ConnectionEvent.objects.create(connection=connection, kind="connected", actor=user)
    return {"user": user.pk, "connection": connection.pk,
            "refresh_token": connection.token.refresh_token}


def switch() -> dict:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("brex_oauth_team_schema", stdout=out)
    check = io.StringIO()
    call_command("check", "--database", "default", stdout=check, stderr=check)
    return {"output": out.getvalue(), "check": check.getvalue(), "schema": schema_shape()}


def kept(pk: int) -> dict:
    from django_brex_oauth.models import BrexConnection, ConnectionEvent

    connection = BrexConnection.objects.get(pk=pk)
    return {
        "owner": connection.owner_id, "status": connection.status,
        "team": getattr(connection, "team_id", "no team field"),
        "refresh_token": connection.token.refresh_token,
        "events": ConnectionEvent.objects.filter(connection=connection).count(),
    }


def use_teams(pk: int) -> dict:
    """Teams on, after the switch: the old connection moves to a team and outlives its
    owner; the schema refuses a second live connection of the company for the team."""
    from django.db import IntegrityError, transaction

    from django_brex_oauth.models import BrexConnection
    from tests.teams_app.models import Team

    before = kept(pk)
    team = Team.objects.create(name="Late adopters")
    connection = BrexConnection.objects.get(pk=pk)
    BrexConnection.objects.filter(pk=pk).update(team=team)
    connection.owner.delete()
    after = kept(pk)
    try:
        with transaction.atomic():
            BrexConnection.objects.create(
                team=team, environment=connection.environment, brex_user_id="cuuser_other",
                brex_company_id=connection.brex_company_id,
            )
        refused = False
    except IntegrityError:
        refused = True
    return {"before": before, "after": after, "second_refused": refused, "team": team.pk}


def remove_refused() -> dict:
    from django.core.management import CommandError, call_command

    try:
        call_command("brex_oauth_team_schema", stdout=io.StringIO())
    except CommandError as err:
        return {"refused": str(err)}
    return {"refused": ""}


def make_personal(pk: int) -> dict:
    """Teams on: the team's connection goes back to being someone's own."""
    from django.contrib.auth import get_user_model

    from django_brex_oauth.models import BrexConnection

    user = get_user_model().objects.create_user("keeper", "keeper@example.com", "pw")
    BrexConnection.objects.filter(pk=pk).update(team=None, owner=user)
    return {"owner": user.pk}


def owner_takes_it(pk: int) -> dict:
    """Teams off again: the owner's deletion takes the connection with it, as before."""
    from django_brex_oauth.models import BrexConnection

    before = kept(pk)
    BrexConnection.objects.get(pk=pk).owner.delete()
    return {"before": before, "gone": not BrexConnection.objects.filter(pk=pk).exists()}


STEPS = {
    "migrate": migrate, "seed": seed, "switch": switch, "use_teams": use_teams,
    "remove_refused": remove_refused, "make_personal": make_personal,
    "owner_takes_it": owner_takes_it, "schema": schema_shape, "kept": kept,
}

if __name__ == "__main__":
    django.setup()
    step, *args = sys.argv[1:]
    result = STEPS[step](*map(int, args))
    print(json.dumps(result))
