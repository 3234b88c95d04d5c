"""Migrating a site with rows in it to team-owned connections."""

from __future__ import annotations

import pytest

from django_brex_oauth.models import BrexConnection, ConnectionEvent
from tests.migration_steps import (
    BEFORE_TEAMS,
    connection_before_teams,
    migrate_to,
    migrate_to_latest,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_migrating_with_a_team_model_keeps_every_connection_personal_and_owned(team):
    apps = migrate_to(BEFORE_TEAMS)
    user_pk, connection_pk = connection_before_teams(apps)

    migrate_to_latest()

    connection = BrexConnection.objects.get(pk=connection_pk)
    assert (connection.owner_id, connection.team_id, connection.status) == (
        user_pk, None, "active"
    )
    assert connection.token.token_type == "Bearer"
    assert ConnectionEvent.objects.filter(connection=connection).count() == 1
    # Moved to a team, it outlives the user who connected it.
    BrexConnection.objects.filter(pk=connection_pk).update(team=team)
    connection.owner.delete()
    connection.refresh_from_db()
    assert (connection.owner_id, connection.team_id) == (None, team.pk)


def test_the_migrated_schema_refuses_a_second_live_connection_of_a_company_per_team(
    team, member
):
    from django.db import IntegrityError, transaction

    fields = dict(environment="staging", brex_company_id="cuacc_1", team=team, owner=member)
    BrexConnection.objects.create(brex_user_id="cuuser_1", **fields)

    with pytest.raises(IntegrityError), transaction.atomic():
        BrexConnection.objects.create(brex_user_id="cuuser_2", **fields)
    # A revoked one does not count.
    BrexConnection.objects.create(brex_user_id="cuuser_3", status="revoked", **fields)
