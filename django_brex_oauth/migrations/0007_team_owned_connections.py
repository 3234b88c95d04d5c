"""Team-owned connections.

``AuthorizationRequest.team_key`` is added in every site. The rest depends on
``settings.BREX_OAUTH_TEAM_MODEL`` when this migration runs (like ``AUTH_USER_MODEL``, it is
a swappable dependency): with a team model, ``BrexConnection`` gains ``team`` and ``owner``
becomes nullable (a team's connection outlives the user who connected it); without one,
nothing else changes. Setting the team model later: see the migration steps in the docs.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

import django_brex_oauth.models

TEAM_MODEL = getattr(settings, "BREX_OAUTH_TEAM_MODEL", None) or None

team_operations = [
    migrations.AddField(
        model_name="brexconnection",
        name="team",
        field=models.ForeignKey(
            blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
            related_name="brex_connections", to=TEAM_MODEL,
        ),
    ),
    migrations.AlterField(
        model_name="brexconnection",
        name="owner",
        field=models.ForeignKey(
            blank=True, null=True, on_delete=django_brex_oauth.models.owner_deleted,
            related_name="brex_connections", to=settings.AUTH_USER_MODEL,
        ),
    ),
    migrations.RemoveConstraint(
        model_name="brexconnection",
        name="brex_oauth_unique_owner_brex_user",
    ),
    migrations.AddConstraint(
        model_name="brexconnection",
        constraint=models.UniqueConstraint(
            condition=models.Q(team__isnull=True),
            fields=("owner", "environment", "brex_user_id"),
            name="brex_oauth_unique_owner_brex_user",
        ),
    ),
    migrations.AddConstraint(
        model_name="brexconnection",
        constraint=models.UniqueConstraint(
            condition=models.Q(team__isnull=False, status="active")
            & ~models.Q(brex_company_id=""),
            fields=("team", "environment", "brex_company_id"),
            name="brex_oauth_unique_team_company",
        ),
    ),
] if TEAM_MODEL else []


class Migration(migrations.Migration):

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("brex_oauth", "0006_token_generation_and_refresh_events"),
        *([migrations.swappable_dependency(TEAM_MODEL)] if TEAM_MODEL else []),
    ]

    operations = [
        migrations.AddField(
            model_name="authorizationrequest",
            name="team_key",
            field=models.CharField(blank=True, max_length=255),
        ),
        *team_operations,
    ]
