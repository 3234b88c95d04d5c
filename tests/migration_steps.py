"""Migrating the test database back and forth with rows in it (the migration tests)."""

from __future__ import annotations

from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

BEFORE_TEAMS = ("brex_oauth", "0006_token_generation_and_refresh_events")


def migrate_to(*targets):
    """Migrate the test database to ``targets`` (app label, migration name) and return the
    historical apps at that point."""
    executor = MigrationExecutor(connection)
    executor.migrate(list(targets))
    executor.loader.build_graph()
    return executor.loader.project_state(list(targets)).apps


def migrate_to_latest():
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def connection_before_teams(apps):
    """A user with a connection, its tokens and an event, stored with the schema before
    teams; returns (user pk, connection pk)."""
    User = apps.get_model("auth", "User")
    BrexConnection = apps.get_model("brex_oauth", "BrexConnection")
    BrexToken = apps.get_model("brex_oauth", "BrexToken")
    ConnectionEvent = apps.get_model("brex_oauth", "ConnectionEvent")
    user = User.objects.create(username="before-teams", email="before@example.com")
    row = BrexConnection.objects.create(
        owner_id=user.pk, environment="staging", brex_user_id="cuuser_before",
        brex_company_id="cuacc_before", granted_scopes="openid offline_access users.readonly",
        status="active", connected_at=timezone.now(),
    )
    BrexToken.objects.create(connection_id=row.pk, token_type="Bearer")
    ConnectionEvent.objects.create(connection_id=row.pk, kind="connected", actor_id=user.pk)
    return user.pk, row.pk
