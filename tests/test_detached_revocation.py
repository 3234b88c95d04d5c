"""Deleted connections revoked at Brex by real Celery worker processes (Redis, PostgreSQL),
with Brex down for a while: the retries need nothing of the deleted rows."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from django_brex_oauth.models import BrexToken, DetachedRevocation
from django_brex_oauth.testing import make_connection
from tests.test_celery import broker, wait_for, worker_settings, workers  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

SWEEP_REVOCATIONS = "django_brex_oauth.tasks.sweep_revocations"
REVOKE_DETACHED = "django_brex_oauth.tasks.revoke_detached_token"


def test_a_worker_revokes_a_deleted_owners_token_retrying_while_brex_is_down(
    brex_settings, fake_brex, broker, workers, user  # noqa: F811
):
    sender, queue = broker
    brex_oauth = {
        **brex_settings.BREX_OAUTH,
        "REVOKE_RETRY_BACKOFF": 0.5,
        "REVOKE_RETRY_BACKOFF_MAX": 1,
    }
    brex_settings.BREX_OAUTH = brex_oauth
    connection = make_connection(user, fake=fake_brex)
    refresh_token = BrexToken.objects.get(pk=connection.pk).refresh_token

    # Brex is down while the owner is deleted: the in-process task gives up, the rows are
    # gone, and only the encrypted detached revocation is left.
    fake_brex.fail_next("/v1/revoke", status=503, times=100)
    user.delete()
    assert not BrexToken.objects.exists()
    assert DetachedRevocation.objects.count() == 1
    assert fake_brex.is_refresh_token_active(refresh_token)

    # Brex comes back but fails twice more: the worker's task retries with its backoff.
    fake_brex.clear_failures()
    fake_brex.fail_next("/v1/revoke", status=503, times=2)
    DetachedRevocation.objects.update(attempted_at=timezone.now() - timedelta(minutes=5))
    worker = workers(queue, worker_settings(brex_oauth))
    sender.send_task(SWEEP_REVOCATIONS, queue=queue)

    wait_for(lambda: not fake_brex.is_refresh_token_active(refresh_token), 60,
             "the worker to revoke the refresh token")
    wait_for(lambda: not DetachedRevocation.objects.exists(), 10, "the row to go")
    revokes = [r for r in fake_brex.requests if r["path"].endswith("/v1/revoke")]
    assert [r["status"] for r in revokes][-3:] == [503, 503, 200]
    assert revokes[-1]["form"]["token"] == refresh_token
    output = worker.output()
    assert len(re.findall(re.escape(REVOKE_DETACHED) + r"\[[^\]]+\] retry", output)) == 2
    assert refresh_token not in output
