"""``manage.py brex_oauth_check`` validates the configuration against live discovery."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command


def run():
    out = StringIO()
    call_command("brex_oauth_check", stdout=out)
    return out.getvalue()


def test_healthy_configuration(brex_settings, fake_brex):
    output = run()
    assert f"issuer:       {fake_brex.issuer}" in output
    assert f"{fake_brex.issuer}/v1/token" in output
    assert "Brex OAuth configuration OK." in output


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
