"""The helpers partners use in their own tests: the pytest fixtures, the context manager
and the connection factory, each used against the fake Brex over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import requests
from django.conf import settings as django_settings

from django_brex_oauth.client import BrexClient
from django_brex_oauth.conf import brex_settings
from django_brex_oauth.exceptions import BrexAPIError, ConnectionNotUsable
from django_brex_oauth.models import BrexConnection, BrexToken
from django_brex_oauth.testing import FakeBrex, fake_brex_server, make_connection
from tests.conftest import Flow

pytestmark = pytest.mark.django_db(transaction=True)


# --- the pytest fixtures -----------------------------------------------------------------


def test_fake_brex_fixture_is_a_running_fake(fake_brex):
    assert isinstance(fake_brex, FakeBrex) and fake_brex.running
    answer = requests.get(fake_brex.issuer + "/.well-known/openid-configuration", timeout=5)
    assert answer.json()["token_endpoint"] == fake_brex.issuer + "/v1/token"


def test_brex_oauth_settings_points_the_app_at_the_fake_and_keeps_the_rest(
    brex_oauth_settings, fake_brex
):
    conf = django_settings.BREX_OAUTH
    assert brex_settings.issuer == fake_brex.issuer
    assert brex_settings.api_base_url == fake_brex.api_base_url
    assert (conf["CLIENT_ID"], conf["CLIENT_SECRET"]) == (
        fake_brex.client_id, fake_brex.client_secret
    )
    # The site's own choices stay.
    assert conf["ENCRYPTION_KEY"] == "tests-encryption-key-0123456789"
    assert conf["ENVIRONMENT"] == "staging"
    assert brex_settings.scopes == [
        "openid", "offline_access", "users.readonly", "companies.readonly"
    ]


# --- make_connection ---------------------------------------------------------------------


def test_connection_with_a_fake_has_tokens_the_fake_accepts(brex_oauth_settings, fake_brex, user):
    connection = make_connection(user, fake=fake_brex)

    assert connection.owner == user and connection.status == "active"
    assert connection.environment == "staging"
    assert connection.brex_user_id == fake_brex.default_user["id"]
    assert connection.brex_user_email == fake_brex.default_user["email"]
    assert connection.brex_company_name == fake_brex.company["legal_name"]
    assert connection.scopes == ["openid", "offline_access", "users.readonly", "companies.readonly"]
    token = BrexToken.objects.get(connection=connection)
    assert fake_brex.is_access_token_active(token.access_token)
    assert fake_brex.is_refresh_token_active(token.refresh_token)
    assert not token.access_token_expires_within(fake_brex.access_token_ttl - 60)

    client = BrexClient(connection)
    assert client.get_me()["email"] == fake_brex.default_user["email"]
    assert client.get_company()["id"] == fake_brex.company["id"]
    assert fake_brex.stats["token_refresh_token"] == 0


def test_expired_connection_is_refreshed_before_use(brex_oauth_settings, fake_brex, user):
    connection = make_connection(user, fake=fake_brex, expired=True)
    stale = BrexToken.objects.get(connection=connection)
    assert stale.access_token_expires_within(0)
    assert stale.is_due_for_refresh()

    assert BrexClient(connection).get_me()["id"] == fake_brex.default_user["id"]

    assert fake_brex.stats["token_refresh_token"] == 1
    fresh = BrexToken.objects.get(connection=connection)
    assert fresh.access_token != stale.access_token
    assert fresh.refresh_token != stale.refresh_token
    assert not fresh.access_token_expires_within(60)


def test_connection_with_some_scopes_cannot_read_the_rest(brex_oauth_settings, fake_brex, user):
    connection = make_connection(user, fake=fake_brex, scopes=["users.readonly"])

    assert connection.scopes == ["openid", "offline_access", "users.readonly"]
    assert connection.brex_company_id == "" and connection.brex_company_name == ""
    client = BrexClient(connection)
    assert client.get_me()["id"] == fake_brex.default_user["id"]
    with pytest.raises(BrexAPIError) as refused:
        client.get_company()
    assert refused.value.status == 403


def test_connection_needing_reauth_has_a_refresh_token_brex_refuses(
    brex_oauth_settings, fake_brex, user
):
    connection = make_connection(user, fake=fake_brex, status="needs_reauth")

    assert connection.status == "needs_reauth" and connection.last_error
    token = BrexToken.objects.get(connection=connection)
    assert token.access_token is None and token.access_token_expires_at is None
    assert token.refresh_token and not fake_brex.is_refresh_token_active(token.refresh_token)
    assert not BrexToken.objects.due_for_refresh().exists()
    with pytest.raises(ConnectionNotUsable):
        BrexClient(connection).get_me()


def test_revoked_connection_has_no_tokens(brex_oauth_settings, fake_brex, user):
    connection = make_connection(user, fake=fake_brex, status="revoked")

    assert connection.status == "revoked" and connection.revocation_status == "done"
    assert connection.revoked_at is not None
    token = BrexToken.objects.get(connection=connection)
    assert (token.access_token, token.refresh_token) == (None, None)
    with pytest.raises(ConnectionNotUsable):
        BrexClient(connection).get_me()


def test_one_owner_connects_several_fake_users(brex_oauth_settings, fake_brex, user):
    ada = make_connection(user, fake=fake_brex)
    grace = make_connection(user, fake=fake_brex, brex_user="grace.hopper@example.com")

    assert grace.brex_user_email == "grace.hopper@example.com"
    assert BrexClient(grace).get_me()["first_name"] == "Grace"
    assert BrexClient(ada).get_me()["first_name"] == "Ada"
    with pytest.raises(LookupError):
        make_connection(user, fake=fake_brex, brex_user="nobody@example.com")


def test_connection_without_a_fake_needs_no_server(user, other_user):
    first = make_connection(user)
    second = make_connection(user)
    theirs = make_connection(other_user, scopes=["users.readonly"], expired=True)

    assert BrexConnection.objects.count() == 3
    assert first.brex_user_id != second.brex_user_id
    tokens = [BrexToken.objects.get(connection=c) for c in (first, second, theirs)]
    assert len({t.access_token for t in tokens} | {t.refresh_token for t in tokens}) == 6
    assert theirs.brex_company_name == "" and tokens[2].access_token_expires_within(0)
    assert first.brex_company_name and not tokens[0].access_token_expires_within(60)


def test_unknown_status_is_refused(user):
    with pytest.raises(ValueError):
        make_connection(user, status="paused")
    assert not BrexConnection.objects.exists()


# --- fake_brex_server ----------------------------------------------------------------------


def test_fake_brex_server_overrides_settings_for_its_block_only(client, user):
    before = dict(django_settings.BREX_OAUTH)
    with fake_brex_server(access_token_ttl=120) as fake:
        assert fake.running
        assert brex_settings.issuer == fake.issuer
        assert django_settings.BREX_OAUTH["ENCRYPTION_KEY"] == before["ENCRYPTION_KEY"]

        client.force_login(user)
        response = Flow(client, fake).connect(scopes=["users.readonly"])
        assert response.status_code == 302
        connection = BrexConnection.objects.get(owner=user)
        assert connection.api_scopes == ["users.readonly"]
        assert not connection.token.access_token_expires_within(60)
        assert connection.token.access_token_expires_within(121)
    assert django_settings.BREX_OAUTH == before
    assert not fake.running


# --- in a partner's own test suite ---------------------------------------------------------

PARTNER_SETTINGS = """
SECRET_KEY = "partner"
INSTALLED_APPS = [
    "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django_brex_oauth",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
BREX_OAUTH = {
    "CLIENT_ID": "real-id", "CLIENT_SECRET": "real-secret",
    "SCOPES": ["users.readonly"], "ENCRYPTION_KEY": "partner-key",
}
"""

PARTNER_TEST = """
from django_brex_oauth.client import BrexClient
from django_brex_oauth.testing.factories import make_connection


def test_partner_code_reads_the_brex_user(brex_oauth_settings, fake_brex, django_user_model):
    owner = django_user_model.objects.create(username="customer")
    connection = make_connection(owner, fake=fake_brex)
    assert BrexClient(connection).get_me()["email"] == "ada.lovelace@example.com"
    assert brex_oauth_settings.BREX_OAUTH["ENCRYPTION_KEY"] == "partner-key"
    assert connection.scopes == ["openid", "offline_access", "users.readonly"]
"""


def run_partner_suite(tmp_path, conftest: str | None = None, *options: str):
    """Run PARTNER_TEST with pytest in a fresh process, as a partner's project would: the
    package comes from the environment it is installed in, not from this checkout."""
    (tmp_path / "partner_settings.py").write_text(textwrap.dedent(PARTNER_SETTINGS))
    if conftest is not None:
        (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_partner.py").write_text(textwrap.dedent(PARTNER_TEST))
    # Nothing from this run's own pytest configuration may reach the partner's run:
    # disabling autoload or preloading plugins would hide what the entry point does.
    env = {
        k: v for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
                     "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    }
    env["PYTHONPATH"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--ds", "partner_settings", "--rootdir", str(tmp_path), *options, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_partners_enable_the_fixtures_with_pytest_plugins(tmp_path):
    result = run_partner_suite(
        tmp_path, 'pytest_plugins = ["django_brex_oauth.testing.pytest_plugin"]\n'
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_installing_the_package_is_enough_for_the_fixtures(tmp_path):
    """The pytest11 entry point registers the plugin: no conftest.py at all."""
    result = run_partner_suite(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_naming_the_plugin_as_well_does_not_register_it_twice(tmp_path):
    """``-p`` (and the ``pytest_plugins`` line above) name a plugin the entry point has
    already registered; pytest must take it as the same one, not fail on a duplicate."""
    result = run_partner_suite(tmp_path, None, "-p", "django_brex_oauth.testing.pytest_plugin")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_entry_point_can_be_switched_off(tmp_path):
    """``-p no:<name>`` turns the plugin off, so the name documented for it is the real one."""
    result = run_partner_suite(
        tmp_path, None, "-p", "no:django_brex_oauth.testing.pytest_plugin"
    )
    assert result.returncode != 0
    assert "fixture 'brex_oauth_settings' not found" in result.stdout
