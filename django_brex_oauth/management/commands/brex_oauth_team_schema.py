"""Bring the Brex connections table in line with BREX_OAUTH_TEAM_MODEL, in place."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS

from django_brex_oauth import team_schema


class Command(BaseCommand):
    help = (
        "Add the team column to the Brex connections table after BREX_OAUTH_TEAM_MODEL was "
        "set on a site migrated without it (or remove it after the setting was unset), "
        "keeping every connection. Run it after manage.py migrate."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--check", action="store_true",
            help="Change nothing; exit with status 1 when the table does not match the setting.",
        )
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS,
            help="The database to change (default: 'default').",
        )

    def handle(self, *args, check: bool = False, database: str = DEFAULT_DB_ALIAS, **options):
        schema = team_schema.inspect(database)
        if schema.present is None:
            raise CommandError("The Brex connections table does not exist: run manage.py migrate.")
        if not schema.change:
            state = "has" if schema.present else "has no"
            self.stdout.write(f"The Brex connections table {state} a team column, as "
                              "BREX_OAUTH_TEAM_MODEL says; nothing to do.")
            return
        if check:
            raise CommandError(
                "The Brex connections table does not match BREX_OAUTH_TEAM_MODEL: run "
                "manage.py brex_oauth_team_schema.", returncode=1,
            )
        try:
            change = team_schema.apply(database)
        except team_schema.TeamSchemaError as err:
            raise CommandError(str(err)) from err
        if change == "add":
            message = ("Added the team column to the Brex connections table; every "
                       "connection is kept, as a personal connection.")
        else:
            message = "Removed the team column from the Brex connections table."
        self.stdout.write(self.style.SUCCESS(message))
