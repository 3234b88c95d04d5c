"""Waits Brex asks for (Retry-After), the sweep's shared rate budget and the client pause:
parsing, sharing across processes, and the fake Brex's controls for them."""

from __future__ import annotations

import multiprocessing
import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
import requests
from django.db import connection as db_connection

from django_brex_oauth import client as client_module
from django_brex_oauth.client import BrexClient
from django_brex_oauth.http import parse_retry_after
from django_brex_oauth.models import BrexThrottle
from django_brex_oauth.services import throttle
from tests.conftest import require_postgres
from tests.factories import create_connection
from tests.refresh_workers import run_rounds, take_budget

pytestmark = pytest.mark.django_db(transaction=True)


# Parsing Retry-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("", None), (None, None), ("soon", None),
     ("-5", None), ("1.5", None), ("99999999", 3600.0)],
)
def test_retry_after_in_seconds(header, expected):
    assert parse_retry_after(header) == expected


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    ahead = datetime.fromtimestamp(now + 90, tz=dt_timezone.utc)
    assert parse_retry_after(ahead.strftime("%a, %d %b %Y %H:%M:%S GMT"), now=now) == 90.0
    behind = datetime.fromtimestamp(now - 90, tz=dt_timezone.utc)
    assert parse_retry_after(behind.strftime("%a, %d %b %Y %H:%M:%S GMT"), now=now) == 0.0
    # An HTTP-date is always GMT; one without a zone is not an HTTP-date.
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00", now=now) is None


def test_retry_after_max_caps_a_long_wait(settings):
    settings.BREX_OAUTH = {**settings.BREX_OAUTH, "RETRY_AFTER_MAX": 600}
    assert parse_retry_after("86400") == 600.0


# The fake Brex's controls -------------------------------------------------------------------


def test_fake_brex_sends_retry_after_and_enforces_a_rate_limit(fake_brex):
    token_url = f"{fake_brex.issuer}/v1/token"
    fake_brex.fail_next("/v1/token", status=429, retry_after=120)
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt_timezone.utc)
    fake_brex.fail_next("/v1/token", status=503, retry_after=when, headers={"X-Why": "test"})
    first = requests.post(token_url, data={}, timeout=5)
    second = requests.post(token_url, data={}, timeout=5)
    assert (first.status_code, first.headers["Retry-After"]) == (429, "120")
    assert first.json()["error"] == "too_many_requests"
    assert second.headers["Retry-After"] == "Wed, 02 Jan 2030 03:04:05 GMT"
    assert second.headers["X-Why"] == "test"

    fake_brex.rate_limit(2, per=30.0, path="/v2/company")
    statuses = [requests.get(f"{fake_brex.api_base_url}/v2/company", timeout=5)
                for _ in range(3)]
    assert [r.status_code for r in statuses] == [401, 401, 429]
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 30
    assert fake_brex.stats["rate_limited"] == 1
    fake_brex.rate_limit(None, path="/v2/company")
    assert requests.get(f"{fake_brex.api_base_url}/v2/company", timeout=5).status_code == 401


# Waits ----------------------------------------------------------------------------------


def test_a_wait_is_never_shortened_and_passes(settings):
    scope = throttle.token_scope()
    throttle.hold(scope, 120, "first")
    throttle.hold(scope, 5, "second")
    assert 110 < throttle.wait_left(scope) <= 120
    BrexThrottle.objects.filter(scope=scope).update(not_before=None)
    throttle.hold(scope, 0.3, "short")
    assert 0 < throttle.wait_left(scope) <= 0.3
    time.sleep(0.35)
    assert throttle.wait_left(scope) == 0


def test_a_short_api_retry_after_is_slept_through_then_retried(
    brex_settings, fake_brex, monkeypatch
):
    # An HTTP-date 5 s ahead, within RETRY_BACKOFF_MAX: the client waits it out, no less,
    # and retries; until then another client of the same account would wait too.
    connection = create_connection(fake_brex, expires_in=3000)
    slept = []
    monkeypatch.setattr(client_module._APIClient, "sleep", staticmethod(slept.append))
    when = datetime.now(dt_timezone.utc) + timedelta(seconds=6)
    fake_brex.fail_next("/v2/users/me", status=429, retry_after=when)

    assert BrexClient(connection).get_me()["id"] == fake_brex.default_user["id"]

    assert len(slept) == 1 and 4 <= slept[0] <= 6
    assert 3 < throttle.wait_left(throttle.api_scope(connection)) <= 6


# The budget, shared by processes ---------------------------------------------------------------


def test_the_budget_grants_exactly_its_limit_to_processes_taking_at_once(brex_settings):
    require_postgres()
    brex_oauth = {**brex_settings.BREX_OAUTH, "SWEEP_RATE_LIMIT": 50, "SWEEP_RATE_WINDOW": 120}
    databases = {"default": {**db_connection.settings_dict}}
    context = multiprocessing.get_context("spawn")
    processes_count = 4
    barrier = context.Barrier(processes_count + 1)
    results = context.Queue()
    processes = [
        context.Process(target=take_budget, args=(databases, brex_oauth, 30, barrier, results),
                        daemon=True)
        for _ in range(processes_count)
    ]
    reports = run_rounds(processes, barrier, results, rounds=1)

    assert [errors for _, errors in reports] == [[]] * processes_count
    # 120 takes at once against a budget of 50: exactly 50 granted, whoever got them.
    assert sum(granted for granted, _ in reports) == 50
    brex_settings.BREX_OAUTH = brex_oauth
    assert throttle.sweep_budget_use() == (50, 50, 70)
