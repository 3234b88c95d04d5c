"""Tokens are encrypted at rest with their own key, and the key can be rotated."""

from __future__ import annotations

import pytest
from django.db import connection as db_connection

from django_brex_oauth.fields import UndecryptableValue
from django_brex_oauth.models import BrexConnection, BrexToken

pytestmark = pytest.mark.django_db


@pytest.fixture
def stored(user):
    connection = BrexConnection.objects.create(
        owner=user, environment="staging", brex_user_id="cuuser_1"
    )
    BrexToken.objects.create(
        connection=connection, access_token="access-SECRET", refresh_token="refresh-SECRET"
    )
    return connection


def raw_column(pk):
    with db_connection.cursor() as cursor:
        cursor.execute(
            "SELECT refresh_token FROM brex_oauth_brextoken WHERE connection_id = %s", [pk]
        )
        return bytes(cursor.fetchone()[0])


def test_raw_column_is_ciphertext(stored):
    raw = raw_column(stored.pk)
    assert b"refresh-SECRET" not in raw
    assert BrexToken.objects.get(pk=stored.pk).refresh_token == "refresh-SECRET"


def test_encryption_does_not_depend_on_secret_key(stored, settings):
    settings.SECRET_KEY = "a-rotated-secret-key"
    assert BrexToken.objects.get(pk=stored.pk).refresh_token == "refresh-SECRET"


def test_rotating_the_key_keeps_every_token(stored, settings):
    old_key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ENCRYPTION_KEY": "the-new-key",
        "ENCRYPTION_KEY_FALLBACKS": [old_key],
    }
    token = BrexToken.objects.get(pk=stored.pk)
    assert token.refresh_token == "refresh-SECRET"
    token.save()  # re-encrypts with the new key
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": []}
    assert BrexToken.objects.get(pk=stored.pk).refresh_token == "refresh-SECRET"


def test_wrong_key_is_a_clear_error_without_the_token(stored, settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": "not-the-key"}
    with pytest.raises(UndecryptableValue, match="ENCRYPTION_KEY") as info:
        BrexToken.objects.get(pk=stored.pk)
    assert "SECRET" not in str(info.value)


def test_rotate_key_command_reencrypts_every_row(stored, settings, user):
    from io import StringIO

    from django.core.management import call_command

    second = BrexConnection.objects.create(owner=user, environment="production",
                                           brex_user_id="cuuser_2")
    BrexToken.objects.create(connection=second, access_token="a2", refresh_token="r2")
    old_key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ENCRYPTION_KEY": "the-new-key",
        "ENCRYPTION_KEY_FALLBACKS": [old_key],
    }
    out = StringIO()
    call_command("brex_oauth_rotate_key", stdout=out)
    assert "2 connection(s)" in out.getvalue()
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": []}
    assert BrexToken.objects.get(pk=second.pk).refresh_token == "r2"
    assert BrexToken.objects.get(pk=stored.pk).access_token == "access-SECRET"


def test_moving_off_the_secret_key_fallback(user, settings):
    # A site that started without ENCRYPTION_KEY (warning W001) stored its tokens under
    # SECRET_KEY; it sets ENCRYPTION_KEY, lists the old SECRET_KEY as a fallback, rotates.
    from django.core.management import call_command

    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY": None}
    connection = BrexConnection.objects.create(
        owner=user, environment="staging", brex_user_id="cuuser_3"
    )
    BrexToken.objects.create(connection=connection, access_token="a3", refresh_token="r3")
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ENCRYPTION_KEY": "its-own-key",
        "ENCRYPTION_KEY_FALLBACKS": [settings.SECRET_KEY],
    }
    call_command("brex_oauth_rotate_key", stdout=None)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": []}
    settings.SECRET_KEY = "a-new-secret-key"
    assert BrexToken.objects.get(pk=connection.pk).refresh_token == "r3"


def test_rotate_key_reencrypts_used_authorization_requests_too(user, settings):
    from datetime import timedelta

    from django.core.management import call_command
    from django.utils import timezone

    from django_brex_oauth.models import AuthorizationRequest

    used = AuthorizationRequest.objects.create(
        user=user, state="s" * 43, environment="staging", code_verifier="v" * 43,
        nonce="n" * 32, redirect_uri="https://partner.example/brex/callback/",
        requested_scopes="openid offline_access users.readonly",
        expires_at=timezone.now() + timedelta(minutes=10), consumed_at=timezone.now(),
    )
    old_key = settings.BREX_OAUTH["ENCRYPTION_KEY"]
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ENCRYPTION_KEY": "the-new-key",
        "ENCRYPTION_KEY_FALLBACKS": [old_key],
    }
    call_command("brex_oauth_rotate_key", stdout=None)
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "ENCRYPTION_KEY_FALLBACKS": []}
    assert AuthorizationRequest.objects.get(pk=used.pk).code_verifier == "v" * 43


@pytest.mark.parametrize("serialisation", ["json", "xml"])
def test_a_null_token_is_dumped_and_loaded_as_null(user, serialisation, tmp_path):
    from django.core.management import call_command

    connection = BrexConnection.objects.create(
        owner=user, environment="staging", brex_user_id="cuuser_null"
    )
    BrexToken.objects.create(
        connection=connection, access_token=None, refresh_token="refresh-SECRET"
    )
    dump = tmp_path / f"tokens.{serialisation}"
    call_command("dumpdata", "brex_oauth.brextoken", format=serialisation,
                 output=str(dump), verbosity=0)
    assert dump.read_text().count("brex-oauth-encrypted:") == 1
    BrexToken.objects.all().delete()
    call_command("loaddata", str(dump), verbosity=0)
    token = BrexToken.objects.get(pk=connection.pk)
    assert (token.access_token, token.refresh_token) == (None, "refresh-SECRET")
