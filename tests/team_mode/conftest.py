"""Team-mode tests: they run only with ``--ds tests.settings_teams`` (tests/test_teams.py
starts that run), where ``BREX_OAUTH_TEAM_MODEL`` shapes the tables."""

import pytest

from tests.teams_app.models import Team


@pytest.fixture
def member(django_user_model):
    return django_user_model.objects.create_user("mia", "mia@example.com", "pw")


@pytest.fixture
def second_member(django_user_model):
    return django_user_model.objects.create_user("max", "max@example.com", "pw")


@pytest.fixture
def outsider(django_user_model):
    return django_user_model.objects.create_user("nora", "nora@example.com", "pw")


@pytest.fixture
def leaver(django_user_model):
    """Connected for the team, then left it."""
    return django_user_model.objects.create_user("lee", "lee@example.com", "pw")


@pytest.fixture
def team(member, second_member):
    team = Team.objects.create(name="Rocket accountants")
    team.members.add(member, second_member)
    return team


@pytest.fixture
def other_team(outsider):
    team = Team.objects.create(name="Other firm")
    team.members.add(outsider)
    return team


@pytest.fixture
def client_class():
    """Makes a fresh test client (one per person signed in)."""
    from django.test import Client

    return Client
