"""The refresh tasks: eagerly in the pytest process, and in real Celery worker processes on
the Redis broker and PostgreSQL against a fake Brex on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from django.db import connection as db_connection
from django.db.models.functions import Now
from django.utils import timezone

from django_brex_oauth import tasks
from django_brex_oauth.beat import BEAT_SCHEDULE
from django_brex_oauth.exceptions import BrexUnavailable, RefreshPaused
from django_brex_oauth.models import (
    BrexThrottle,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
)
from django_brex_oauth.services import refresh, sweep, throttle
from django_brex_oauth.testing import FakeBrex
from tests.conftest import require_postgres, require_service
from tests.factories import create_connection, create_connections, stored_token

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BREX_OAUTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SWEEP = "django_brex_oauth.tasks.refresh_due_connections"
REFRESH = "django_brex_oauth.tasks.refresh_connection"


def redis_reachable() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def require_worker_services() -> None:
    require_postgres()
    require_service(
        "Redis",
        redis_reachable(),
        "start redis-server on 127.0.0.1:6379 or set BREX_OAUTH_TEST_REDIS_URL",
    )


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# Eager (any database) ---------------------------------------------------------------------


@pytest.fixture
def fake_brex():
    with FakeBrex(rotate_refresh_tokens=True, refresh_grace_period=0.0) as server:
        yield server


def test_refresh_task_retries_transient_failures_with_backoff_and_jitter(
    brex_settings, fake_brex, countdowns
):
    brex_settings.BREX_OAUTH = {
        **brex_settings.BREX_OAUTH, "REFRESH_RETRY_BACKOFF": 10, "REFRESH_RETRY_BACKOFF_MAX": 30
    }
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    for status in (503, 429, 502):
        fake_brex.fail_next("/v1/token", status=status)

    outcome = tasks.refresh_connection.apply(args=[connection.pk]).get()

    assert outcome == "refreshed"
    assert len(countdowns) == 3
    for attempt, countdown in enumerate(countdowns):
        ceiling = min(30, 10 * 2**attempt)
        assert ceiling / 2 <= countdown <= ceiling
    assert fake_brex.stats["token_refresh_token"] == 1  # the three failures were not processed
    after = stored_token(connection)
    assert after.refresh_token != before.refresh_token
    assert fake_brex.is_refresh_token_active(after.refresh_token)
    kinds = list(
        ConnectionEvent.objects.filter(connection=connection)
        .order_by("created_at", "pk").values_list("kind", flat=True)
    )
    assert kinds == [EventKind.REFRESH_FAILED] * 3 + [EventKind.REFRESHED]


def test_refresh_task_gives_up_after_its_retries_and_loses_nothing(
    brex_settings, fake_brex, countdowns
):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REFRESH_TASK_MAX_RETRIES": 2}
    connection = create_connection(fake_brex, expires_in=30)
    before = stored_token(connection)
    fake_brex.fail_next("/v1/token", status=503, times=10)

    with pytest.raises(BrexUnavailable):
        tasks.refresh_connection.apply(args=[connection.pk]).get()

    assert len(countdowns) == 2
    after = stored_token(connection)
    assert after.refresh_token == before.refresh_token
    assert after.access_token == before.access_token
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert fake_brex.is_refresh_token_active(after.refresh_token)
    # Still due, so the next sweep tries again.
    assert list(sweep.due_connection_ids()) == [connection.pk]


def test_beat_schedule_runs_the_registered_sweep(celery_app):
    celery_app.loader.import_default_modules()
    assert BEAT_SCHEDULE
    for entry in BEAT_SCHEDULE.values():
        assert entry["task"] in celery_app.tasks
        assert entry["schedule"] > 0
    sweeps = [e for e in BEAT_SCHEDULE.values() if e["task"] == SWEEP]
    assert len(sweeps) == 1
    # Well inside REFRESH_MARGIN (10 minutes), so a failed refresh gets more chances.
    assert sweeps[0]["schedule"] <= 300
    assert {"django_brex_oauth.tasks.sweep_revocations", "django_brex_oauth.tasks.prune"} <= {
        e["task"] for e in BEAT_SCHEDULE.values()
    }
    assert tasks.refresh_due_connections.name == SWEEP
    assert tasks.refresh_connection.name == REFRESH


# Real workers (PostgreSQL + Redis) --------------------------------------------------------


class Worker:
    """A ``celery -A tests.celery_app worker`` process group on its own queue."""

    def __init__(self, queue: str, settings: dict, log: Path, concurrency: int = 2) -> None:
        self.queue = queue
        self.log = log
        env = {
            **os.environ,
            "BREX_OAUTH_TEST_CELERY_WORKER": "1",
            "BREX_OAUTH_TEST_REDIS_URL": REDIS_URL,
            "BREX_OAUTH_TEST_CELERY_QUEUE": queue,
            "BREX_OAUTH_TEST_WORKER_SETTINGS": json.dumps(settings),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self._log_file = open(log, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
                "--concurrency", str(concurrency), "--pool", "prefork",
                "-Q", queue, "-n", f"{log.stem}@%h", "-l", "INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited:\n{self.output()[-3000:]}")
            return " ready." in self.output()

        wait_for(ready, timeout, f"the Celery worker to start:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as the OOM killer or a lost host would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def broker():
    """A Celery app that only sends (as beat would), and a queue of this test's own."""
    import redis

    require_worker_services()
    queue = f"brex-oauth-test-{uuid.uuid4().hex[:12]}"
    sender = Celery("beat-stand-in", broker=REDIS_URL, set_as_current=False)
    sender.conf.task_default_queue = queue
    yield sender, queue
    sender.close()
    client = redis.Redis.from_url(REDIS_URL)
    leftovers = list(client.scan_iter(match=f"*{queue}*"))
    if leftovers:
        client.delete(*leftovers)


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(queue: str, settings: dict, concurrency: int = 2) -> Worker:
        worker = Worker(queue, settings, tmp_path / f"worker{len(started) + 1}.log", concurrency)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


def worker_settings(brex_oauth: dict, **extra) -> dict:
    return {
        "DATABASES": {"default": {**db_connection.settings_dict}},
        "BREX_OAUTH": {**brex_oauth, **extra},
    }


def sweep_results(worker: Worker) -> list[int]:
    """How many tasks each finished sweep queued, from the worker's log."""
    pattern = re.escape(SWEEP) + r"\[[^\]]+\] succeeded in [\d.]+s: (\d+)"
    return [int(n) for n in re.findall(pattern, worker.output())]


def refresh_results(worker: Worker) -> list[str]:
    """The outcome of each finished refresh task, from the worker's log."""
    pattern = re.escape(REFRESH) + r"\[[^\]]+\] succeeded in [\d.]+s: '(\w+)'"
    return re.findall(pattern, worker.output())


def refreshed_events() -> int:
    return ConnectionEvent.objects.filter(kind=EventKind.REFRESHED).count()


def test_workers_sweep_hundreds_of_due_connections_each_refreshed_once(
    brex_settings, fake_brex, broker, workers
):
    sender, queue = broker
    count = 300
    ids = create_connections(fake_brex, count, expires_in=120)
    fresh = create_connection(fake_brex, expires_in=3000)
    worker = workers(queue, worker_settings(brex_settings.BREX_OAUTH))

    # Two beat ticks arriving together: both sweeps may see every connection as due.
    sender.send_task(SWEEP, queue=queue)
    sender.send_task(SWEEP, queue=queue)

    sweeps = wait_for(lambda: len(sweep_results(worker)) == 2 and sweep_results(worker), 60,
                      "both sweeps")
    queued = sum(sweeps)
    assert count <= queued <= 2 * count
    outcomes = wait_for(lambda: len(refresh_results(worker)) == queued and refresh_results(worker),
                        90, f"{queued} refresh tasks")

    assert outcomes.count("refreshed") == count
    assert set(outcomes) <= {"refreshed", "busy", "not_due"}
    assert refreshed_events() == count
    assert fake_brex.stats["token_refresh_token"] == count
    assert fake_brex.stats["refresh_token_reuse"] == 0
    tokens = BrexToken.objects.select_related("connection").filter(pk__in=ids)
    assert len(tokens) == count
    for token in tokens:
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert token.connection.last_refreshed_at is not None
        assert token.refresh_claimed_until is None
        assert not token.is_due_for_refresh()
        assert fake_brex.is_refresh_token_active(token.refresh_token)
    assert stored_token(fresh).connection.last_refreshed_at is None


def test_workers_sweep_past_a_malformed_answer_and_the_retry_heals_it(
    brex_settings, fake_brex, broker, workers
):
    # One connection's refresh gets a malformed answer (the refresh token rotated, the
    # access token null) from a Brex that allows no reuse at all. The others are refreshed
    # as usual; that one keeps the rotated refresh token, and its task's retry uses it.
    sender, queue = broker
    count = 6
    ids = create_connections(fake_brex, count, expires_in=120)
    fake_brex.tamper_next("/v1/token", access_token=None)
    worker = workers(queue, worker_settings(
        brex_settings.BREX_OAUTH, REFRESH_RETRY_BACKOFF=1, REFRESH_RETRY_BACKOFF_MAX=2
    ))

    sender.send_task(SWEEP, queue=queue)

    assert wait_for(lambda: sweep_results(worker), 30, "the sweep") == [count]
    wait_for(lambda: refreshed_events() == count, 60, "every connection refreshed")
    assert refresh_results(worker).count("refreshed") == count
    [failed] = ConnectionEvent.objects.filter(kind=EventKind.REFRESH_FAILED)
    assert "access_token is null" in failed.detail
    assert fake_brex.stats["token_refresh_token"] == count + 1
    assert fake_brex.stats["refresh_token_reuse"] == 0
    for token in BrexToken.objects.select_related("connection").filter(pk__in=ids):
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert token.connection.last_error == ""
        assert fake_brex.is_refresh_token_active(token.refresh_token)
        assert fake_brex.is_access_token_active(token.access_token)


@pytest.fixture
def slow_brex():
    """A fake Brex with Okta's default 30 s grace for a rotated-out refresh token."""
    with FakeBrex(rotate_refresh_tokens=True, refresh_grace_period=30.0) as server:
        yield server


@pytest.fixture
def refresh_in_flight(settings, slow_brex, broker, workers):
    """A refresh task running on a one-process worker, its token request answered by Brex
    but the answer held back: Brex has rotated the refresh token, the worker has not seen
    it. Yields (brex_oauth settings, connection, its token before, worker)."""
    sender, queue = broker
    brex_oauth = {
        **settings.BREX_OAUTH,
        **slow_brex.django_settings(),
        "HTTP_TIMEOUT": 3.0,
        "REFRESH_LEASE_SECONDS": 1,  # the lease is then HTTP_TIMEOUT + 5 = 8 s
    }
    settings.BREX_OAUTH = brex_oauth
    connection = create_connection(slow_brex, expires_in=60)
    before = stored_token(connection)
    worker = workers(queue, worker_settings(brex_oauth), concurrency=1)
    slow_brex.set_latency(60, "/v1/token")
    sender.send_task(REFRESH, args=[connection.pk], queue=queue)
    wait_for(lambda: slow_brex.stats["token_refresh_token"] == 1, 20, "the token request")
    return brex_oauth, connection, before, worker


def test_killed_worker_leaves_an_expiring_claim_and_another_worker_refreshes(
    slow_brex, broker, workers, refresh_in_flight
):
    sender, queue = broker
    brex_oauth, connection, before, doomed = refresh_in_flight
    doomed.kill()  # while Brex is answering: the claim is held, the answer never read

    held = stored_token(connection)
    assert held.refresh_claimed_by and held.refresh_claimed_until > timezone.now()
    assert held.refresh_token == before.refresh_token
    assert held.connection.status == ConnectionStatus.ACTIVE
    slow_brex.set_latency(0, "/v1/token")

    survivor = workers(queue, worker_settings(brex_oauth), concurrency=1)
    # A sweep while the dead worker's claim still runs leaves the connection alone...
    if timezone.now() < held.refresh_claimed_until - timedelta(seconds=1):
        sender.send_task(SWEEP, queue=queue)
        assert wait_for(lambda: sweep_results(survivor), 10, "the first sweep") == [0]
        assert stored_token(connection).refresh_claimed_by == held.refresh_claimed_by
        assert slow_brex.stats["token_refresh_token"] == 1
    # ...and once it has expired, the next sweep refreshes it.
    wait_for(lambda: timezone.now() > held.refresh_claimed_until, 15, "the claim to expire")
    sender.send_task(SWEEP, queue=queue)
    wait_for(lambda: refreshed_events() == 1, 20, "the refresh by the surviving worker")

    after = stored_token(connection)
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert after.refresh_claimed_until is None and after.refresh_claimed_by == ""
    assert after.refresh_token != before.refresh_token
    assert slow_brex.is_refresh_token_active(after.refresh_token)
    assert slow_brex.is_access_token_active(after.access_token)
    # The old refresh token was sent twice (the dead worker never saw Brex's answer), within
    # Brex's grace period, so nothing was revoked.
    assert slow_brex.stats["token_refresh_token"] == 2
    assert slow_brex.stats["refresh_token_reuse_rejected"] == 0


def pool_processes(worker: Worker) -> list[int]:
    """The pids of a worker's pool (its child processes)."""
    children = Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def test_a_killed_pool_process_is_replaced_and_the_refresh_finished_within_the_grace(
    slow_brex, refresh_in_flight
):
    # The OOM killer takes the pool process in the middle of a refresh: Brex has already
    # rotated the refresh token, the answer is never read. The task goes back on the queue,
    # finds the dead process's claim, and tries again the moment it runs out, while Brex
    # still accepts the refresh token that was sent (its grace period), with no sweep.
    _, connection, before, worker = refresh_in_flight
    [doomed] = pool_processes(worker)
    os.kill(doomed, signal.SIGKILL)
    killed_at = time.monotonic()
    held = stored_token(connection)
    assert held.refresh_claimed_by and held.refresh_token == before.refresh_token
    slow_brex.set_latency(0, "/v1/token")

    wait_for(lambda: refreshed_events() == 1, 25, "the refresh after the pool process died")
    # Within Brex's 30 s grace for the rotated-out refresh token.
    assert time.monotonic() - killed_at < 30
    after = stored_token(connection)
    assert after.connection.status == ConnectionStatus.ACTIVE
    assert after.refresh_token != before.refresh_token
    assert slow_brex.is_refresh_token_active(after.refresh_token)
    assert slow_brex.stats["token_refresh_token"] == 2
    assert slow_brex.stats["refresh_token_reuse"] == 1
    assert slow_brex.stats["refresh_token_reuse_rejected"] == 0
    assert pool_processes(worker) != [doomed]


def token_request_times(fake) -> list[float]:
    return [r["time"] for r in fake.requests if r["path"].endswith("/v1/token")]


def test_every_worker_honours_a_retry_after_one_worker_received(
    brex_settings, fake_brex, broker, workers
):
    sender, queue = broker
    # A short backoff: without Retry-After the retry would come back within a second.
    brex_oauth = {
        **brex_settings.BREX_OAUTH, "REFRESH_RETRY_BACKOFF": 1, "REFRESH_RETRY_BACKOFF_MAX": 2
    }
    first = create_connection(fake_brex, expires_in=60)
    second = create_connection(fake_brex, expires_in=60)
    fake_brex.fail_next("/v1/token", status=429, retry_after=6)
    worker = workers(queue, worker_settings(brex_oauth), concurrency=2)

    sender.send_task(REFRESH, args=[first.pk], queue=queue)
    wait_for(lambda: throttle.wait_left(throttle.token_scope()) > 0, 20,
             "the worker to record Brex's Retry-After")
    [asked_at] = token_request_times(fake_brex)
    # Other processes see it: a sweep queues nothing, another connection's task waits.
    sender.send_task(SWEEP, queue=queue)
    sender.send_task(REFRESH, args=[second.pk], queue=queue)
    assert wait_for(lambda: sweep_results(worker), 15, "the sweep") == [0]
    wait_for(lambda: refreshed_events() == 2, 40, "both refreshes after the wait")

    times = token_request_times(fake_brex)
    assert len(times) == 3
    assert min(times[1:]) - asked_at >= 6 - 0.5, worker.output()[-3000:]
    for connection in (first, second):
        token = stored_token(connection)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert fake_brex.is_refresh_token_active(token.refresh_token)
    assert fake_brex.stats["refresh_token_reuse"] == 0


def test_a_worker_honours_the_client_pause_and_resumes_once_the_secret_works(
    brex_settings, fake_brex, broker, workers
):
    sender, queue = broker
    # A probe interval no slow worker start can outlast: the test brings the probe time
    # forward itself once the paused sweep has been seen.
    good = {**brex_settings.BREX_OAUTH, "CLIENT_REJECTED_PROBE_INTERVAL": 300}
    connections = [create_connection(fake_brex, expires_in=60) for _ in range(3)]
    # A web process with a bad deploy of the secret finds it out; the workers have the
    # right one (the fix), but the pause holds them until its probe time.
    brex_settings.BREX_OAUTH = {**good, "CLIENT_SECRET": "a-bad-deploy"}
    with pytest.raises(RefreshPaused):
        refresh.refresh_connection(connections[0])
    brex_settings.BREX_OAUTH = good
    worker = workers(queue, worker_settings(good), concurrency=2)

    sender.send_task(SWEEP, queue=queue)
    assert wait_for(lambda: sweep_results(worker), 15, "the paused sweep") == [0]
    assert "Refresh sweep: nothing queued: Refreshing is paused" in worker.output()
    assert len(token_request_times(fake_brex)) == 1
    assert throttle.client_pause().left.total_seconds() > 0
    BrexThrottle.objects.filter(scope=throttle.client_scope()).update(not_before=Now())
    sender.send_task(SWEEP, queue=queue)
    wait_for(lambda: refreshed_events() == 3, 30, "the refreshes after the probe")

    assert sweep_results(worker) == [0, 3]
    assert throttle.client_pause() is None
    assert fake_brex.stats["token_refresh_token"] == 4  # the probe, then three refreshes
    assert "Brex accepts this site's client credentials again" in worker.output()
    for connection in connections:
        token = stored_token(connection)
        assert token.connection.status == ConnectionStatus.ACTIVE
        assert fake_brex.is_refresh_token_active(token.refresh_token)
