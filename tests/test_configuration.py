"""The BREX_OAUTH settings and the system checks that guard them."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_brex_oauth.checks import check_settings
from django_brex_oauth.conf import brex_settings

BASE = {
    "CLIENT_ID": "id",
    "CLIENT_SECRET": "secret",
    "ENCRYPTION_KEY": "a-separate-key",
    "SCOPES": ["users.readonly"],
    "SITE_URL": "https://partner.example",
}


def ids(settings, **overrides):
    settings.BREX_OAUTH = {**BASE, **overrides}
    return sorted(message.id for message in check_settings())


def test_a_good_configuration_passes(settings):
    assert ids(settings) == []


@pytest.mark.parametrize(
    ("environment", "issuer", "api"),
    [
        ("production", "https://accounts-api.brex.com/oauth2/default", "https://api.brex.com"),
        ("staging", "https://accounts-api.staging.brexapps.com/oauth2/default",
         "https://api-staging.brex.com"),
    ],
)
def test_environment_picks_documented_urls(settings, environment, issuer, api):
    settings.BREX_OAUTH = {**BASE, "ENVIRONMENT": environment}
    assert brex_settings.issuer == issuer
    assert brex_settings.api_base_url == api


def test_issuer_and_api_base_url_override(settings):
    settings.BREX_OAUTH = {
        **BASE,
        "ISSUER": "https://accounts.brex.com/",
        "API_BASE_URL": "https://platform.brexapis.com/",
    }
    assert brex_settings.issuer == "https://accounts.brex.com"
    assert brex_settings.api_base_url == "https://platform.brexapis.com"
    assert ids(settings, ISSUER="https://accounts.brex.com") == []


def test_openid_and_offline_access_are_always_requested(settings):
    settings.BREX_OAUTH = {**BASE, "SCOPES": ["cards.readonly", "openid"]}
    assert brex_settings.scopes == ["openid", "offline_access", "cards.readonly"]


def test_unknown_setting_is_an_error(settings):
    settings.BREX_OAUTH = {**BASE, "CLIENT_SECRETS": "typo"}
    with pytest.raises(ImproperlyConfigured, match="CLIENT_SECRETS"):
        _ = brex_settings.CLIENT_ID
    assert ids(settings, CLIENT_SECRETS="x") == ["brex_oauth.E000"]


def test_missing_credentials(settings):
    assert ids(settings, CLIENT_ID="", CLIENT_SECRET=None) == [
        "brex_oauth.E001", "brex_oauth.E002"
    ]


def test_unknown_environment(settings):
    assert ids(settings, ENVIRONMENT="sandbox") == ["brex_oauth.E003"]
    with pytest.raises(ImproperlyConfigured, match="production' or 'staging"):
        _ = brex_settings.issuer


def test_scopes_without_an_api_scope(settings):
    assert ids(settings, SCOPES=["openid", "offline_access"]) == ["brex_oauth.E005"]
    assert ids(settings, SCOPES="users.readonly") == ["brex_oauth.E004"]


def test_undocumented_scope_warns(settings):
    assert ids(settings, SCOPES=["transactions"]) == ["brex_oauth.W002"]
    assert ids(settings, SCOPES=["transactions.card.readonly", "users"]) == []
    # Brex has these only as .readonly.
    assert ids(settings, SCOPES=["companies"]) == ["brex_oauth.W002"]
    assert ids(settings, SCOPES=["transactions.card", "users.readonly"]) == ["brex_oauth.W002"]


def test_redirect_uri_must_be_https_without_debug(settings):
    settings.DEBUG = False
    assert ids(settings, REDIRECT_URI="http://partner.example/brex/callback/") == [
        "brex_oauth.E006"
    ]
    assert ids(settings, REDIRECT_URI="https://partner.example/brex/callback/") == []
    settings.DEBUG = True
    assert ids(settings, REDIRECT_URI="http://localhost:8000/brex/callback/") == []


def test_plain_http_issuer_only_on_loopback(settings):
    assert ids(settings, ISSUER="http://127.0.0.1:8765/oauth2/default") == []
    assert ids(settings, ISSUER="http://brex.internal/oauth2/default") == ["brex_oauth.E008"]
    assert ids(settings, ISSUER="accounts-api.brex.com") == ["brex_oauth.E007"]


def test_insecure_id_token_algorithms(settings):
    assert ids(settings, ID_TOKEN_ALGORITHMS=["RS256", "none"]) == ["brex_oauth.E009"]
    assert ids(settings, ID_TOKEN_ALGORITHMS=["HS256"]) == ["brex_oauth.E009"]
    # A bare string would be read letter by letter.
    assert ids(settings, ID_TOKEN_ALGORITHMS="RS256") == ["brex_oauth.E009"]


def test_encryption_key_from_secret_key_warns(settings):
    assert ids(settings, ENCRYPTION_KEY=None) == ["brex_oauth.W001"]
    assert ids(settings, ENCRYPTION_KEY=settings.SECRET_KEY) == ["brex_oauth.W001"]


def test_atomic_requests_warns(settings, monkeypatch):
    from django.db import connections

    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)
    assert ids(settings) == ["brex_oauth.W003"]
    message = [m for m in check_settings() if m.id == "brex_oauth.W003"][0]
    assert "database(s) default" in message.msg
    assert "non_atomic_requests" in message.hint


def test_checks_run_at_start_up(settings):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    settings.BREX_OAUTH = {**BASE, "CLIENT_ID": ""}
    with pytest.raises(SystemCheckError, match="brex_oauth.E001"):
        call_command("check")


def test_a_broken_setting_raises_the_apps_configuration_error(settings):
    from django_brex_oauth.exceptions import BrexOAuthConfigurationError, BrexOAuthError

    settings.BREX_OAUTH = {**BASE, "CLIENT_SECRETS": "x"}
    with pytest.raises(BrexOAuthConfigurationError) as caught:
        _ = brex_settings.CLIENT_ID
    # An ImproperlyConfigured, outside the runtime errors that code may catch and retry.
    assert isinstance(caught.value, ImproperlyConfigured)
    assert not isinstance(caught.value, BrexOAuthError)


def test_numbers_are_read_as_their_declared_type(settings):
    settings.BREX_OAUTH = {
        **BASE,
        "REFRESH_MARGIN": "300",  # from the environment, uncast
        "HTTP_TIMEOUT": 4,
        "ID_TOKEN_LEEWAY": "30",
        "EVENT_RETENTION_DAYS": None,
        "REFRESH_EVENT_RETENTION_DAYS": "7",
    }
    assert brex_settings.REFRESH_MARGIN == 300.0
    assert type(brex_settings.REFRESH_MARGIN) is float
    assert type(brex_settings.HTTP_TIMEOUT) is float
    assert brex_settings.ID_TOKEN_LEEWAY == 30
    assert type(brex_settings.ID_TOKEN_LEEWAY) is int
    assert brex_settings.EVENT_RETENTION_DAYS is None
    assert brex_settings.REFRESH_EVENT_RETENTION_DAYS == 7
    assert ids(settings, REFRESH_MARGIN="300", HTTP_TIMEOUT=4) == []


def test_a_rate_limit_below_one_counts_as_one(settings):
    settings.BREX_OAUTH = {**BASE, "SWEEP_RATE_LIMIT": 0, "SWEEP_BATCH_SIZE": "-5"}
    assert brex_settings.SWEEP_RATE_LIMIT == 1
    assert brex_settings.SWEEP_BATCH_SIZE == 1


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("HTTP_TIMEOUT", "ten", "BREX_OAUTH['HTTP_TIMEOUT'] must be a number, not 'ten'."),
        ("REFRESH_MARGIN", None, "BREX_OAUTH['REFRESH_MARGIN'] must be a number, not None."),
        ("API_MAX_RETRIES", "1.5", "must be a whole number, not '1.5'"),
        ("EVENT_RETENTION_DAYS", [], "must be a whole number or None, not []"),
    ],
)
def test_a_value_that_is_not_of_its_settings_type_is_refused(settings, name, value, message):
    from django_brex_oauth.exceptions import BrexOAuthConfigurationError

    assert ids(settings, **{name: value}) == ["brex_oauth.E012"]
    assert message in check_settings()[0].msg
    with pytest.raises(BrexOAuthConfigurationError) as caught:
        getattr(brex_settings, name)
    assert message in str(caught.value)


def test_every_default_is_of_its_settings_type():
    from django_brex_oauth.conf import SETTINGS

    for name, setting in SETTINGS.items():
        assert setting.problem(setting.default) is None, name
        assert setting.convert(setting.default) == setting.default, name


def test_the_secret_is_never_converted_nor_shown(settings):
    # Only numbers and flags are converted; a bad one's message names that value only.
    from django_brex_oauth.conf import SETTINGS

    assert SETTINGS["CLIENT_SECRET"].cast is None
    settings.BREX_OAUTH = {**BASE, "CLIENT_SECRET": "s3cret-value", "HTTP_TIMEOUT": "x"}
    assert all("s3cret-value" not in m.msg for m in check_settings())
