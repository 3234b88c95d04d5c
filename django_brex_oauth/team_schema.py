"""Turning team-owned connections on (or off) on a site whose tables exist already.

``BREX_OAUTH_TEAM_MODEL`` shapes ``BrexConnection``'s table, as ``AUTH_USER_MODEL`` shapes
the tables that point at users: with a team model the table has a ``team`` column, a
nullable ``owner`` and two partial unique constraints. The migration
``0007_team_owned_connections`` gives it that shape when the setting is set *when it
runs*. A site that ran it without a team model and sets one later keeps the old shape, as
Django keeps it when ``AUTH_USER_MODEL`` changes: this module changes the table in place,
with the same operations a migration would run, and nothing needs to be unapplied. The
``brex_oauth_team_schema`` command runs it; the database check below points to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.core.checks import Tags, Warning, register
from django.db import DEFAULT_DB_ALIAS, connections, migrations, models
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.state import ProjectState

from .models import (
    BrexConnection,
    owner_brex_user_constraint,
    owner_field,
    team_company_constraint,
    team_field,
    team_model_setting,
)

APP_LABEL = "brex_oauth"
MODEL_NAME = "brexconnection"
TEAM_COLUMN = "team_id"
OWNER_CONSTRAINT = "brex_oauth_unique_owner_brex_user"
TEAM_CONSTRAINT = "brex_oauth_unique_team_company"


class TeamSchemaError(Exception):
    """The table cannot be changed now; the message says what to do first."""


@dataclass(frozen=True)
class TeamSchema:
    """How the connections table stands against ``BREX_OAUTH_TEAM_MODEL``."""

    #: True when the setting names a team model.
    wanted: bool
    #: True when the table has the ``team`` column; None when the table does not exist yet
    #: (``migrate`` creates it in the right shape).
    present: bool | None

    @property
    def change(self) -> str:
        """``"add"``, ``"remove"`` or ``""`` (the table matches the setting)."""
        if self.present is None or self.present == self.wanted:
            return ""
        return "add" if self.wanted else "remove"


def inspect(using: str = DEFAULT_DB_ALIAS) -> TeamSchema:
    """Read whether the connections table has the ``team`` column."""
    connection = connections[using]
    table = BrexConnection._meta.db_table
    with connection.cursor() as cursor:
        if table not in connection.introspection.table_names(cursor):
            present = None
        else:
            columns = connection.introspection.get_table_description(cursor, table)
            present = TEAM_COLUMN in {column.name for column in columns}
    return TeamSchema(wanted=team_model_setting() is not None, present=present)


def _team_operations(team: models.Field) -> list[migrations.operations.base.Operation]:
    """From the shape without teams to the shape with them (``team`` as given)."""
    return [
        migrations.RemoveConstraint(MODEL_NAME, OWNER_CONSTRAINT),
        migrations.AddField(MODEL_NAME, "team", team),
        migrations.AlterField(MODEL_NAME, "owner", owner_field(teams=True)),
        migrations.AddConstraint(MODEL_NAME, owner_brex_user_constraint(teams=True)),
        migrations.AddConstraint(MODEL_NAME, team_company_constraint()),
    ]


def _personal_operations() -> list[migrations.operations.base.Operation]:
    """From the shape with teams to the shape without them."""
    return [
        migrations.RemoveConstraint(MODEL_NAME, TEAM_CONSTRAINT),
        migrations.RemoveConstraint(MODEL_NAME, OWNER_CONSTRAINT),
        migrations.RemoveField(MODEL_NAME, "team"),
        migrations.AlterField(MODEL_NAME, "owner", owner_field(teams=False)),
        migrations.AddConstraint(MODEL_NAME, owner_brex_user_constraint(teams=False)),
    ]


def _forwards(state: ProjectState, operations) -> ProjectState:
    state = state.clone()
    for operation in operations:
        operation.state_forwards(APP_LABEL, state)
    return state


def _shape(state: ProjectState) -> tuple:
    model = state.models[APP_LABEL, MODEL_NAME]
    fields = {
        name: field.deconstruct()[1:] for name, field in model.fields.items()
        if name in ("owner", "team")
    }
    constraints = sorted(
        (c.name, c.deconstruct()[1:]) for c in model.options.get("constraints", [])
    )
    return fields, constraints


def plan(using: str = DEFAULT_DB_ALIAS):
    """The states and operations that bring the table in line with the setting: (change,
    from state, operations). Raises :class:`TeamSchemaError` when that cannot be done now.
    """
    schema = inspect(using)
    if not schema.change:
        return schema.change, None, []
    connection = connections[using]
    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        raise TeamSchemaError(
            "Some migrations are not applied yet: run manage.py migrate first (it creates "
            "the team model's table), then this again."
        )
    # The state the models have now, built from the migrations as they read the setting.
    current = executor.loader.project_state()
    if schema.change == "add":
        operations = _team_operations(team_field(team_model_setting() or ""))
        start = _forwards(current, _personal_operations())
    else:
        _refuse_losing_teams(using)
        # What the team column was is not known any more (the setting is unset): a
        # nullable integer column of the same name stands for it; dropping it drops its
        # foreign key and indexes too.
        placeholder = models.BigIntegerField(
            null=True, blank=True, db_index=True, db_column=TEAM_COLUMN
        )
        operations = _personal_operations()
        start = _forwards(current, _team_operations(placeholder))
    # The operations must arrive at exactly the models' shape; a later migration that
    # changed it would show here, before anything is touched.
    if _shape(_forwards(start, operations)) != _shape(current):
        raise TeamSchemaError(
            "The team operations do not lead to the connections model's current shape; "
            "this version of django-brex-oauth cannot change the table in place."
        )
    return schema.change, start, operations


def _refuse_losing_teams(using: str) -> None:
    connection = connections[using]
    table = connection.ops.quote_name(BrexConnection._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*) FROM {table} WHERE {TEAM_COLUMN} IS NOT NULL "  # noqa: S608
            "OR owner_id IS NULL"
        )
        (count,) = cursor.fetchone()
    if count:
        raise TeamSchemaError(
            f"{count} connection(s) belong to a team or have no owner any more. Without a "
            "team model they could not be kept: delete them (which revokes them at Brex) "
            "or give each an owner and no team, with BREX_OAUTH_TEAM_MODEL still set, first."
        )


def apply(using: str = DEFAULT_DB_ALIAS) -> str:
    """Bring the connections table in line with ``BREX_OAUTH_TEAM_MODEL``: ``"add"`` (the
    team column and constraints added, ``owner`` made nullable), ``"remove"`` (the reverse)
    or ``""`` (nothing to do). Every row is kept; nothing is unapplied."""
    change, state, operations = plan(using)
    if not change:
        return change
    connection = connections[using]
    with connection.schema_editor(atomic=connection.features.can_rollback_ddl) as editor:
        for operation in operations:
            new_state = state.clone()
            operation.state_forwards(APP_LABEL, new_state)
            operation.database_forwards(APP_LABEL, editor, state, new_state)
            state = new_state
    return change


@register(Tags.database)
def check_team_schema(app_configs=None, databases=None, **kwargs):
    """``brex_oauth.W033``: the table's shape does not match ``BREX_OAUTH_TEAM_MODEL``
    (run by ``migrate`` and by ``check --database``)."""
    warnings = []
    for alias in databases or []:
        try:
            schema = inspect(alias)
        except Exception:  # noqa: BLE001 - a database that cannot be read is not ours to report
            continue
        if schema.change == "add":
            warnings.append(Warning(
                "BREX_OAUTH_TEAM_MODEL is set, but the Brex connections table was migrated "
                "without a team model and has no team column.",
                hint="After manage.py migrate, run manage.py brex_oauth_team_schema: it adds "
                "the column in place and keeps every connection (see the migration steps in "
                "the teams documentation).",
                id="brex_oauth.W033",
            ))
        elif schema.change == "remove":
            warnings.append(Warning(
                "BREX_OAUTH_TEAM_MODEL is not set, but the Brex connections table still has "
                "the team column of team-owned connections.",
                hint="Run manage.py brex_oauth_team_schema to remove it, or set "
                "BREX_OAUTH_TEAM_MODEL again.",
                id="brex_oauth.W033",
            ))
    return warnings
