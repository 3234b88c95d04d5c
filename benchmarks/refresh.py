"""Refresh throughput: the app against the ideal minimal refresh and bare HTTP, one table.

    .venv/bin/python benchmarks/refresh.py

(from the repository root, with the ``test`` extra installed; PostgreSQL from
``DATABASE_URL``, default ``postgres://postgres@127.0.0.1:5432/test``, and Redis from
``BREX_OAUTH_TEST_REDIS_URL`` for the Celery rows). See ``docs/performance.rst``.

A token endpoint (``benchmarks/token_server.py``) runs in a process of its own on loopback.
For each database (a scratch PostgreSQL database ``<name>_bench`` and a SQLite file) it
creates ``--connections`` connections whose access tokens are due, then runs three loops
over the same connections, in turn, ``--rounds`` times (the order rotates each round):

``bare``
    a reused ``requests.Session().post`` to the token endpoint, no database;
``ideal``
    the least a correct refresh must do, in raw driver SQL: one claim ``UPDATE … RETURNING``
    of the encrypted refresh token, the token call, then one transaction that updates the
    (encrypted) tokens with a compare-and-set on the old refresh token, releasing the claim,
    and inserts one event;
``app``
    what ``manage.py brex_oauth_refresh --all`` runs for each connection:
    ``refresh_connection(pk, force=True, wait=False, budget=True)``.

With ``W`` > 1 the connections are split among ``W`` processes that run at once. The
figures are the median of the rounds; the ratios are of those medians. The query counts are
taken in a separate, untimed pass (``BEGIN``/``COMMIT`` included, as Django logs them).
The hot-path row is ``BrexClient`` getting a fresh access token for a connection (what a
request does before it is sent) against a plain ORM ``.get()`` of the same row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOPS = ("bare", "ideal", "app")
SCOPES = "openid offline_access users.readonly companies.readonly"


# Setting up Django on a scratch database ----------------------------------------------------


def setup_django(database: str, issuer: str, sqlite_path: str | None = None) -> str:
    """Configure and start Django on a scratch database; its name."""
    os.environ["BREX_OAUTH_TEST_DATABASE"] = "postgres" if database == "postgres" else "sqlite"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    db = settings.DATABASES["default"]
    if database == "postgres":
        name = f"{db['NAME']}_bench"
        _recreate_postgres(db, name)
        db["NAME"] = name
    else:
        db["NAME"] = sqlite_path or os.path.join(
            tempfile.gettempdir(), f"brex_oauth_bench_{os.getpid()}.sqlite3"
        )
        db.setdefault("OPTIONS", {})["timeout"] = 30
    settings.BREX_OAUTH = {
        **settings.BREX_OAUTH,
        "ISSUER": issuer,
        "SWEEP_RATE_LIMIT": 10**9,
    }
    django.setup()
    return db["NAME"]


def _recreate_postgres(db: dict, name: str) -> None:
    import psycopg

    with psycopg.connect(
        host=db.get("HOST") or None, port=db.get("PORT") or None, user=db.get("USER") or None,
        password=db.get("PASSWORD") or None, dbname="postgres", autocommit=True,
    ) as server:
        server.execute(f'DROP DATABASE IF EXISTS "{name}"')
        server.execute(f'CREATE DATABASE "{name}"')


def drop_scratch_database() -> None:
    from django.conf import settings
    from django.db import connections

    connections.close_all()
    db = settings.DATABASES["default"]
    if "sqlite" in db["ENGINE"]:
        with contextlib.suppress(OSError):
            os.remove(db["NAME"])
    else:
        import psycopg

        with psycopg.connect(
            host=db.get("HOST") or None, port=db.get("PORT") or None,
            user=db.get("USER") or None, password=db.get("PASSWORD") or None,
            dbname="postgres", autocommit=True,
        ) as server:
            server.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}"')


def migrate_and_fill(count: int) -> list[int]:
    """Migrate, then create ``count`` active connections whose access tokens are due."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.utils import timezone

    from django_brex_oauth.models import BrexConnection, BrexToken

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create(username="benchmark")
    now = timezone.now()
    connections = BrexConnection.objects.bulk_create(
        BrexConnection(owner=owner, environment="staging", brex_user_id=f"cuuser_{i}",
                       granted_scopes=SCOPES)
        for i in range(count)
    )
    BrexToken.objects.bulk_create(
        BrexToken(connection=c, access_token="at-initial", refresh_token=f"rt-initial-{c.pk}",
                  access_token_expires_at=now + timedelta(seconds=30),
                  refresh_token_issued_at=now, refresh_token_used_at=now,
                  refresh_token_expires_at=now + timedelta(days=90))
        for c in connections
    )
    return [c.pk for c in connections]


# The three loops ------------------------------------------------------------------------------


def _token_request(session, token_url: str, refresh_token: str) -> dict:
    from django_brex_oauth.conf import brex_settings

    response = session.post(token_url, data={
        "grant_type": "refresh_token", "refresh_token": refresh_token,
        "client_id": brex_settings.CLIENT_ID, "client_secret": brex_settings.CLIENT_SECRET,
    }, timeout=10)
    response.raise_for_status()
    return response.json()


def bare_loop(ids: list[int]) -> None:
    import requests

    from django_brex_oauth import discovery

    token_url = discovery.get_endpoint("token_endpoint")
    session = requests.Session()
    for _pk in ids:
        _token_request(session, token_url, "rt-bare")


def ideal_loop(ids: list[int]) -> None:
    import requests
    from django.db import connection
    from django.utils import timezone

    from django_brex_oauth import discovery
    from django_brex_oauth.models import BrexToken

    token_url = discovery.get_endpoint("token_endpoint")
    session = requests.Session()
    field = BrexToken._meta.get_field("refresh_token")
    connection.ensure_connection()
    raw = connection.connection
    mark = "%s" if connection.vendor == "postgresql" else "?"
    adapt = connection.ops.adapt_datetimefield_value
    claim_sql = (
        "UPDATE brex_oauth_brextoken SET refresh_claimed_until = %s, refresh_claimed_by = %s "
        "WHERE connection_id = %s AND (refresh_claimed_until IS NULL OR "
        "refresh_claimed_until < %s) RETURNING refresh_token"
    ).replace("%s", mark)
    save_sql = (
        "UPDATE brex_oauth_brextoken SET access_token = %s, refresh_token = %s, "
        "access_token_expires_at = %s, refresh_token_used_at = %s, "
        "refresh_token_expires_at = %s, refresh_claimed_until = NULL, "
        "refresh_claimed_by = '', generation = generation + 1, updated_at = %s "
        "WHERE connection_id = %s AND refresh_token = %s"
    ).replace("%s", mark)
    event_sql = (
        "INSERT INTO brex_oauth_connectionevent (connection_id, kind, detail, created_at) "
        "VALUES (%s, 'refreshed', %s, %s)"
    ).replace("%s", mark)
    claimant = f"ideal:{os.getpid()}"
    cursor = _CountingCursor(raw.cursor())
    for pk in ids:
        now = timezone.now()
        cursor.execute(claim_sql, [adapt(now + timedelta(seconds=30)), claimant, pk, adapt(now)])
        row = cursor.fetchone()
        if row is None:
            raise RuntimeError(f"ideal: connection {pk} was claimed already")
        stored = row[0]
        answer = _token_request(session, token_url, field.from_db_value(stored, None, connection))
        received = timezone.now()
        cursor.execute("BEGIN")
        cursor.execute(save_sql, [
            field.get_db_prep_save(answer["access_token"], connection),
            field.get_db_prep_save(answer["refresh_token"], connection),
            adapt(received + timedelta(seconds=answer["expires_in"])), adapt(received),
            adapt(received + timedelta(days=90)), adapt(received), pk, stored,
        ])
        if cursor.rowcount != 1:
            raise RuntimeError(f"ideal: connection {pk} changed under its claim")
        cursor.execute(event_sql, [pk, "Access token refreshed.", adapt(received)])
        cursor.execute("COMMIT")


class _CountingCursor:
    """A driver cursor that counts the statements it runs (the ideal bypasses Django's)."""

    statements = 0

    def __init__(self, cursor) -> None:
        self.cursor = cursor

    def execute(self, sql, params=None):
        type(self).statements += 1
        return self.cursor.execute(sql, params) if params is not None else self.cursor.execute(sql)

    def __getattr__(self, name):
        return getattr(self.cursor, name)


def app_loop(ids: list[int]) -> None:
    from django_brex_oauth.services import refresh

    for pk in ids:
        result = refresh.refresh_connection(pk, force=True, wait=False, budget=True)
        if result.outcome != refresh.Outcome.REFRESHED:
            raise RuntimeError(f"app: connection {pk}: {result.outcome.value}")


LOOP_FUNCTIONS = {"bare": bare_loop, "ideal": ideal_loop, "app": app_loop}


# Running a loop in W processes ---------------------------------------------------------------


def _timed(loop: str, ids: list[int]) -> tuple[float, float]:
    """Seconds of wall time and of this process's CPU time that ``loop`` took over ``ids``."""
    started, cpu = time.perf_counter(), time.process_time()
    LOOP_FUNCTIONS[loop](ids)
    return time.perf_counter() - started, time.process_time() - cpu


def _worker(loop: str, ids: list[int], barrier, results) -> None:
    from django.db import connection

    connection.ensure_connection()
    barrier.wait()
    results.put(_timed(loop, ids))
    connection.close()


def run_loop(loop: str, ids: list[int], workers: int) -> tuple[float, float]:
    """Refreshes per second of ``loop`` over ``ids``, split among ``workers`` processes,
    and the CPU time of the refreshing processes per refresh, in milliseconds."""
    if workers == 1:
        elapsed, cpu = _timed(loop, ids)
        return len(ids) / elapsed, cpu / len(ids) * 1000
    from django.db import connections

    connections.close_all()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers)
    results = context.Queue()
    processes = [
        context.Process(target=_worker, args=(loop, ids[i::workers], barrier, results))
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    timings = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode:
            raise RuntimeError(f"{loop}: a worker process failed")
    return (len(ids) / max(elapsed for elapsed, _cpu in timings),
            sum(cpu for _elapsed, cpu in timings) / len(ids) * 1000)


def count_queries(loop: str, ids: list[int]) -> float:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    before = _CountingCursor.statements
    with CaptureQueriesContext(connection) as captured:
        LOOP_FUNCTIONS[loop](ids)
    return (len(captured) + _CountingCursor.statements - before) / len(ids)


def hot_path(ids: list[int], calls: int = 2000) -> dict:
    """Microseconds per call: ``BrexClient`` before sending a request, with a fresh token,
    against a plain ORM ``.get()`` of the same row; and the queries each takes."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_brex_oauth.client import BrexClient
    from django_brex_oauth.models import BrexConnection, BrexToken

    connection_obj = BrexConnection.objects.get(pk=ids[0])

    def client_call():
        client = BrexClient(connection_obj)
        scope = client._throttle_scope()
        client._wait_for_brex(scope, "GET", "/v2/users/me")
        client._access_token()

    def orm_get():
        BrexToken.objects.get(pk=ids[0])

    figures = {}
    for name, call in (("client", client_call), ("orm_get", orm_get)):
        call()
        with CaptureQueriesContext(connection) as captured:
            call()
        best = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls // 5):
                call()
            best.append((time.perf_counter() - started) / (calls // 5) * 1e6)
        figures[name] = {"us": statistics.median(best), "queries": len(captured)}
    return figures


def database_description() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW server_version")
            version = cursor.fetchone()[0].split()[0]
            cursor.execute("SHOW synchronous_commit")
            sync = cursor.fetchone()[0]
            cursor.execute("SHOW fsync")
            fsync = cursor.fetchone()[0]
            return f"PostgreSQL {version} (loopback, synchronous_commit={sync}, fsync={fsync})"
        cursor.execute("PRAGMA journal_mode")
        journal = cursor.fetchone()[0]
        cursor.execute("PRAGMA synchronous")
        sync = cursor.fetchone()[0]
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version} (file, journal_mode={journal}, synchronous={sync})"


def child_throughput(args) -> dict:
    setup_django(args.database, args.issuer)
    ids = migrate_and_fill(args.connections)
    from django.db import connection

    # Warm up: discovery, connections, code paths.
    for loop in LOOPS:
        LOOP_FUNCTIONS[loop](ids[:10])
    rows = []
    for workers in args.workers:
        rates: dict[str, list[float]] = {loop: [] for loop in LOOPS}
        cpu: dict[str, list[float]] = {loop: [] for loop in LOOPS}
        for round_no in range(args.rounds):
            order = LOOPS[round_no % 3:] + LOOPS[:round_no % 3]
            for loop in order:
                rate, cpu_ms = run_loop(loop, ids, workers)
                rates[loop].append(rate)
                cpu[loop].append(cpu_ms)
        connection.ensure_connection()
        rows.append({
            "workers": workers,
            "rates": {loop: statistics.median(values) for loop, values in rates.items()},
            "cpu_ms": {loop: statistics.median(values) for loop, values in cpu.items()},
            "all_rates": rates,
        })
    queries = {loop: count_queries(loop, ids[:50]) for loop in ("ideal", "app")}
    return {
        "database": database_description(),
        "vendor": connection.vendor,
        "connections": len(ids),
        "rows": rows,
        "queries": queries,
        "hot_path": hot_path(ids),
    }


# The Celery fan-out ---------------------------------------------------------------------------


def child_fanout(args) -> dict:
    """Refreshes per second through real Celery workers on Redis: the beat sweep's task
    queues one task per due connection, ``--celery-concurrency`` pool processes run them."""
    import redis
    from celery import Celery
    from django.conf import settings
    from django.db import connection

    setup_django("postgres", args.issuer)
    from django_brex_oauth.models import BrexConnection, ConnectionEvent

    results = []
    broker_url = os.environ.get("BREX_OAUTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    migrate_and_fill(0)
    for count in args.fanout:
        ConnectionEvent.objects.all().delete()
        BrexConnection.objects.all().delete()
        _fill(count)
        queue = f"brex-oauth-bench-{os.getpid()}"
        log = Path(tempfile.gettempdir()) / f"{queue}.log"
        worker_settings = {
            "DATABASES": {"default": {**connection.settings_dict}},
            "BREX_OAUTH": dict(settings.BREX_OAUTH),
        }
        env = {
            **os.environ, "BREX_OAUTH_TEST_CELERY_WORKER": "1",
            "BREX_OAUTH_TEST_REDIS_URL": broker_url, "BREX_OAUTH_TEST_CELERY_QUEUE": queue,
            "BREX_OAUTH_TEST_WORKER_SETTINGS": json.dumps(worker_settings, default=str),
            "PYTHONPATH": str(ROOT),
        }
        with open(log, "wb") as output:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
                 "--concurrency", str(args.celery_concurrency), "--pool", "prefork",
                 "-Q", queue, "-n", f"{queue}@%h", "-l", "WARNING", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            time.sleep(5)  # the worker starts (its pool processes connect lazily)
            sender = Celery("beat-stand-in", broker=broker_url, set_as_current=False)
            started = time.perf_counter()
            sender.send_task("django_brex_oauth.tasks.refresh_due_connections", queue=queue)
            refreshed = ConnectionEvent.objects.filter(kind="refreshed")
            while refreshed.count() < count:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited: {log.read_text()[-2000:]}")
                if time.perf_counter() - started > 3600:
                    raise RuntimeError("the fan-out did not finish within an hour")
                time.sleep(0.5)
            elapsed = time.perf_counter() - started
            sender.close()
        finally:
            os.killpg(worker.pid, 15)
            worker.wait(timeout=30)
            client = redis.Redis.from_url(broker_url)
            leftovers = list(client.scan_iter(match=f"*{queue}*"))
            if leftovers:
                client.delete(*leftovers)
        results.append({"connections": count, "rate": count / elapsed,
                        "processes": args.celery_concurrency})
    return {"fanout": results}


def child_sweep_memory(args) -> dict:
    """Peak memory (tracemalloc) of the beat sweep's task over ``--sweep-memory`` due
    connections: selecting them and queueing one task each to a sender that only counts
    (no broker), against holding all their ids in one list, as the sweep did before."""
    import tracemalloc
    from unittest import mock

    setup_django("postgres", args.issuer)
    from django.db import connection

    from django_brex_oauth import tasks
    from django_brex_oauth.models import BrexConnection, BrexToken

    migrate_and_fill(0)
    results = []
    for count in args.sweep_memory:
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {BrexConnection._meta.db_table} CASCADE")
        _fill(count, spread=True)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")  # as autovacuum would after such an insert
        sent = [0]

        def send(*_args, sent=sent, **_kwargs):
            sent[0] += 1

        figures = {}
        for name in ("warm-up", "sweep", "one list"):
            tracemalloc.start()
            tracemalloc.reset_peak()
            started = time.perf_counter()
            if name in ("warm-up", "sweep"):
                sent[0] = 0
                with mock.patch.object(tasks.refresh_connection, "apply_async", send), \
                        mock.patch.object(tasks.refresh_connection.app, "producer_or_acquire",
                                          lambda: contextlib.nullcontext()):
                    queued = tasks.refresh_due_connections.run()
                if queued != count or sent[0] != count:
                    raise RuntimeError(f"the sweep queued {queued} of {count}")
            else:
                ids = list(BrexToken.objects.refresh_candidates().unclaimed()
                           .order_by("access_token_expires_at")
                           .values_list("connection_id", flat=True))
                if len(ids) != count:
                    raise RuntimeError(f"listed {len(ids)} of {count}")
                del ids
            elapsed = time.perf_counter() - started
            _current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            figures[name] = {"peak": peak, "seconds": elapsed}
        results.append({"connections": count, **figures})
    return {"sweep_memory": results}


def _fill(count: int, spread: bool = False) -> None:
    """``count`` due connections; with ``spread``, their access tokens expire a
    microsecond apart (as real ones do) rather than all at once."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from django_brex_oauth.models import BrexConnection, BrexToken

    owner, _ = get_user_model().objects.get_or_create(username="benchmark")
    now = timezone.now()
    for start in range(0, count, 5000):
        made = BrexConnection.objects.bulk_create(
            BrexConnection(owner=owner, environment="staging", brex_user_id=f"cuuser_{i}",
                           granted_scopes=SCOPES)
            for i in range(start, min(count, start + 5000))
        )
        BrexToken.objects.bulk_create(
            BrexToken(connection=c, access_token="at-initial", refresh_token="rt-initial",
                      access_token_expires_at=now + timedelta(
                          seconds=30, microseconds=c.pk if spread else 0),
                      refresh_token_issued_at=now, refresh_token_used_at=now,
                      refresh_token_expires_at=now + timedelta(days=90))
            for c in made
        )


# The parent: token server, children, the table -----------------------------------------------


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import django

    return (
        f"{model}, {os.cpu_count()} cores, load {load}; Python {platform.python_version()}, "
        f"Django {django.get_version()}"
    )


def start_token_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "token_server.py")],
        stdout=subprocess.PIPE, text=True,
    )
    port = int(server.stdout.readline())
    return server, f"http://127.0.0.1:{port}"


def run_child(kind: str, database: str, issuer: str, args) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", kind, "--database", database,
        "--issuer", issuer, "--connections", str(args.connections), "--rounds", str(args.rounds),
        "--workers", ",".join(str(w) for w in (args.workers if database == "postgres" else [1])),
        "--fanout", ",".join(str(n) for n in args.fanout),
        "--celery-concurrency", str(args.celery_concurrency),
        "--sweep-memory", ",".join(str(n) for n in args.sweep_memory),
    ]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], fanout: list[dict]) -> None:
    print()
    print(f"Machine: {machine_description()}")
    for result in results:
        print(f"Database: {result['database']}")
    print()
    header = ("database", "W", "loop", "refreshes/s", "vs ideal", "vs bare", "queries/refresh",
              "CPU ms/refresh")
    lines = []
    for result in results:
        vendor = result["vendor"]
        for row in result["rows"]:
            rates = row["rates"]
            for loop in LOOPS:
                queries = result["queries"].get(loop)
                lines.append((
                    vendor, str(row["workers"]), loop, f"{rates[loop]:.0f}",
                    f"{rates[loop] / rates['ideal']:.2f}", f"{rates[loop] / rates['bare']:.2f}",
                    "-" if queries is None or row["workers"] != 1 else f"{queries:.1f}",
                    f"{row['cpu_ms'][loop]:.2f}",
                ))
        hot = result["hot_path"]
        for name, label in (("client", "hot path: BrexClient token"),
                            ("orm_get", "hot path: ORM .get()")):
            ratio = hot[name]["us"] / hot["orm_get"]["us"]
            lines.append((vendor, "1", label, f"{hot[name]['us']:.0f} us/call",
                          f"{ratio:.2f}x .get()", "", str(hot[name]["queries"]), ""))
    in_process = next((r["rows"][0]["rates"]["app"] for r in results
                       if r["vendor"] == "postgresql" and r["rows"][0]["workers"] == 1), None)
    for run in fanout:
        per_process = run["rate"] / run["processes"]
        lines.append((
            "postgresql", f"{run['processes']}p", f"Celery fan-out, {run['connections']:,} due",
            f"{run['rate']:.0f} ({per_process:.0f}/process)",
            f"{per_process / in_process:.2f}x in-process" if in_process else "", "", "-", "",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for line in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    print()
    print("refreshes/s: median of the rounds; vs ideal / vs bare: ratios of those medians; "
          "queries: statements Django logged per refresh (BEGIN/COMMIT included); CPU: the "
          "refreshing processes' own CPU time per refresh (median), not the database's or "
          "the token endpoint's.")


def print_sweep_memory(runs: list[dict]) -> None:
    print()
    print("Sweep memory (PostgreSQL; tracemalloc peak; queueing to a sender that only counts):")
    print()
    lines = [("due connections", "sweep (batches)", "one list of ids (before)")]
    for run in runs:
        lines.append((
            f"{run['connections']:,}",
            f"{run['sweep']['peak'] / 1024:,.0f} KiB in {run['sweep']['seconds']:.2f} s",
            f"{run['one list']['peak'] / 1024:,.0f} KiB in {run['one list']['seconds']:.2f} s",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    for n, line in enumerate(lines):
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300,
                        help="due connections each loop refreshes, per round (default 300)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each loop runs; the table gives medians (default 3)")
    parser.add_argument("--databases", default="postgres,sqlite",
                        help="comma-separated: postgres, sqlite (default both)")
    parser.add_argument("--workers", default="1,2,4",
                        help="concurrent processes to run on PostgreSQL (SQLite: 1)")
    parser.add_argument("--fanout", default="2000",
                        help="due connections to send through Celery workers on Redis, "
                             "comma-separated (empty: none)")
    parser.add_argument("--celery-concurrency", type=int, default=2,
                        help="pool processes of the Celery worker for --fanout (default 2)")
    parser.add_argument("--sweep-memory", default="",
                        help="due connections to measure the sweep's peak memory at, "
                             "comma-separated, e.g. 10000,100000 (empty: none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--issuer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.fanout = [int(n) for n in args.fanout.split(",") if n]
    args.sweep_memory = [int(n) for n in args.sweep_memory.split(",") if n]

    if args.child:
        try:
            child = {"fanout": child_fanout, "sweep_memory": child_sweep_memory}.get(
                args.child, child_throughput
            )
            result = child(args)
        finally:
            drop_scratch_database()
        print(json.dumps(result))
        return 0

    server, issuer = start_token_server()
    try:
        results = []
        for database in [d for d in args.databases.split(",") if d]:
            print(f"Running on {database}...", file=sys.stderr, flush=True)
            results.append(run_child("throughput", database, issuer, args))
        if args.sweep_memory:
            print("Measuring the sweep's memory...", file=sys.stderr, flush=True)
            sweep_memory = run_child("sweep_memory", "postgres", issuer, args)["sweep_memory"]
        else:
            sweep_memory = []
        if args.fanout and "postgres" in args.databases:
            print("Running the Celery fan-out...", file=sys.stderr, flush=True)
            fanout = run_child("fanout", "postgres", issuer, args)["fanout"]
        else:
            fanout = []
    finally:
        server.terminate()
        server.wait()
    if results or fanout:
        print_table(results, fanout)
    if sweep_memory:
        print_sweep_memory(sweep_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
