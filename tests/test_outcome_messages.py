"""What each refresh and disconnect outcome tells people: the result types describe
themselves, so the admin's actions and the disconnect view only show what they say."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from django.contrib.messages import constants as levels

from django_brex_oauth.models import BrexConnection, RevocationStatus
from django_brex_oauth.services.refresh import Outcome, RefreshResult
from django_brex_oauth.services.revoke import (
    DisconnectResult,
    RevocationAttempt,
    RevokeOutcome,
)
from django_brex_oauth.testing.factories import make_connection


def disconnect_result(outcome, *, disconnected=True, done=False, retry_queued=False,
                      error=""):
    connection = BrexConnection(
        pk=7, revocation_status=RevocationStatus.DONE if done else RevocationStatus.PENDING
    )
    attempt = RevocationAttempt(outcome=outcome, connection_id=7, error=error)
    return DisconnectResult(connection, disconnected, attempt, retry_queued)


@pytest.mark.parametrize(("result", "level", "text"), [
    (disconnect_result(RevokeOutcome.NOT_PENDING, disconnected=False, done=True),
     levels.INFO, "Acme was already disconnected."),
    (disconnect_result(RevokeOutcome.REVOKED, done=True), levels.SUCCESS,
     "Acme is disconnected, and Brex has revoked this site's access to it."),
    (disconnect_result(RevokeOutcome.NOT_POSSIBLE), levels.WARNING,
     "Acme is disconnected and this site no longer uses it. Brex could not be told to "
     "revoke the access, because this site can no longer read its stored credentials for "
     "it; the site's administrators can see this in its records."),
    (disconnect_result(RevokeOutcome.FAILED), levels.WARNING,
     "Acme is disconnected and this site no longer uses it. Brex could not be reached to "
     "revoke the access; this site will keep asking Brex until it does."),
    (disconnect_result(RevokeOutcome.QUEUED), levels.WARNING,
     "Acme is disconnected and this site no longer uses it. Brex could not be reached to "
     "revoke the access; this site will keep asking Brex until it does."),
])
def test_a_disconnect_tells_the_person_what_became_of_it(result, level, text):
    assert result.user_message("Acme") == (level, text)


@pytest.mark.parametrize(("result", "level", "text"), [
    (disconnect_result(RevokeOutcome.REVOKED, done=True), levels.SUCCESS,
     "Acme (#7): revoked at Brex; its tokens are wiped."),
    (disconnect_result(RevokeOutcome.NOT_PENDING, disconnected=False, done=True),
     levels.INFO, "Acme (#7): was revoked at Brex already."),
    (disconnect_result(RevokeOutcome.NOT_POSSIBLE), levels.ERROR,
     "Acme (#7): disconnected and its tokens wiped here, but Brex could not be told: no "
     "configured key decrypts its stored token (BREX_OAUTH['ENCRYPTION_KEY'] or "
     "ENCRYPTION_KEY_FALLBACKS)."),
    (disconnect_result(RevokeOutcome.QUEUED), levels.WARNING,
     "Acme (#7): disconnected here; Brex is not answering, so its revocation is queued."),
    (disconnect_result(RevokeOutcome.FAILED, retry_queued=True, error="Brex answered 503"),
     levels.WARNING,
     "Acme (#7): disconnected here, but Brex did not confirm the revocation (Brex answered "
     "503); it will be retried shortly."),
    (disconnect_result(RevokeOutcome.FAILED, error="timed out"), levels.WARNING,
     "Acme (#7): disconnected here, but Brex did not confirm the revocation (timed out); "
     "the revocation sweep will retry it."),
])
def test_a_revocation_in_the_admin_tells_staff_what_became_of_it(result, level, text):
    assert result.staff_message("Acme (#7)") == (level, text)


def when(value):
    return "never" if value is None else value.strftime("%H:%M")


@pytest.mark.django_db
@pytest.mark.parametrize(("outcome", "rotated", "level", "text"), [
    (Outcome.REFRESHED, True, levels.SUCCESS,
     "Acme (#7): refreshed; the access token is valid until 13:30, the refresh token was "
     "rotated."),
    (Outcome.REFRESHED, False, levels.SUCCESS,
     "Acme (#7): refreshed; the access token is valid until 13:30, the refresh token was "
     "kept."),
    (Outcome.NEEDS_REAUTH, False, levels.ERROR,
     "Acme (#7): Brex refused the refresh token; the customer must connect again."),
    (Outcome.BUSY, False, levels.INFO,
     "Acme (#7): another worker is refreshing it right now."),
    (Outcome.NOT_DUE, False, levels.INFO,
     "Acme (#7): was refreshed by another worker just now."),
    (Outcome.NOT_ACTIVE, False, levels.WARNING,
     "Acme (#7): not refreshed; its status is \"Revoked\"."),
    (Outcome.DEFERRED, False, levels.WARNING,
     "Acme (#7): not refreshed; its status is \"Revoked\"."),
])
def test_a_refresh_in_the_admin_tells_staff_what_became_of_it(
    user, outcome, rotated, level, text
):
    connection = make_connection(user)
    # The status as it stands in the database now, not as the caller last read it.
    BrexConnection.objects.filter(pk=connection.pk).update(status="revoked")
    token = connection.token
    token.access_token_expires_at = datetime(2030, 1, 1, 13, 30, tzinfo=timezone.utc)
    result = RefreshResult(outcome, connection.pk, token=token, rotated=rotated)

    assert result.staff_message("Acme (#7)", connection, when) == (level, text)


@pytest.mark.django_db
def test_a_connection_is_named_by_its_company_then_its_brex_users_email(user):
    connection = make_connection(user)
    connection.brex_company_name, connection.brex_user_email = "Acme", "mia@acme.test"
    assert connection.display_name == "Acme"
    assert str(connection).startswith("Acme (")

    connection.brex_company_name = ""
    assert connection.display_name == "mia@acme.test"

    connection.brex_user_email = ""
    assert connection.display_name == ""
    assert str(connection).startswith(f"{connection.brex_user_id} (")
