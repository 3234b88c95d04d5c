"""``manage.py brex_oauth_check`` validates the configuration against live discovery."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, ManagementUtility, call_command

# The command reads (and ends) the site-wide refresh pause kept in the database.
pytestmark = pytest.mark.django_db


def run():
    out = StringIO()
    call_command("brex_oauth_check", stdout=out)
    return out.getvalue()


def test_healthy_configuration(brex_settings, fake_brex):
    output = run()
    assert f"issuer:       {fake_brex.issuer}" in output
    assert f"{fake_brex.issuer}/v1/token" in output
    assert "client credentials:       accepted by the token endpoint" in output
    assert "Brex OAuth configuration OK." in output
    # One refresh of a token that does not exist, which Brex answers with invalid_grant.
    assert fake_brex.stats["token_refresh_token"] == 1


def test_configuration_error_is_reported(brex_settings, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "CLIENT_SECRET": ""}
    with pytest.raises(CommandError, match="brex_oauth.E002"):
        run()


def test_unreachable_issuer(settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ISSUER": "http://127.0.0.1:9/oauth2/default"}
    with pytest.raises(CommandError, match="Discovery failed"):
        run()


def test_algorithm_brex_does_not_offer(brex_settings, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ID_TOKEN_ALGORITHMS": ["ES256"]}
    with pytest.raises(CommandError, match="id_token_signing_alg_values_supported"):
        run()


def test_a_wrong_client_secret_is_reported(brex_settings, settings, fake_brex):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "CLIENT_SECRET": "not-the-secret"}
    with pytest.raises(CommandError, match=r"refused CLIENT_ID / CLIENT_SECRET") as caught:
        run()
    assert "not-the-secret" not in str(caught.value)


def test_warnings_are_printed_once(brex_settings, settings, fake_brex, capsys):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": None}
    # As manage.py runs it (call_command would skip Django's own system checks).
    ManagementUtility(["manage.py", "brex_oauth_check"]).execute()
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("brex_oauth.W001") == 1
