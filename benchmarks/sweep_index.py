"""How cheap is the refresh sweep's query at a million connections? (PostgreSQL)

    BREX_OAUTH_TEST_DATABASE=postgres .venv/bin/python benchmarks/sweep_index.py [--rows N]

Creates a scratch database (``brex_oauth_benchmark`` on the server of the test settings;
``--keep`` keeps it), migrates it and fills it with ``--rows`` connections as a site looks
one minute after its previous sweep:

* 90 % of the connections active, their access tokens expiring uniformly between 10 and 60
  minutes after that sweep (it refreshed everything within the 10-minute margin), and 0.1 %
  of them idle for 61 days;
* 7 % needing re-authorization and 3 % revoked, with no access token expiry left (as the
  refresh and revoke services leave them).

With ``--same-instant`` every active connection's access token expires at one instant,
due at that next sweep (a bulk import, or tokens issued together): the batches then differ
only by connection id.

Then it prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the sweep's query (what
``batched_due_connection_ids`` runs: ``BrexToken.objects.refresh_candidates()``, answered by
the partial indexes ``brex_oauth_token_due`` and ``brex_oauth_token_idle``), the same query
with those indexes dropped (inside a transaction that is rolled back), the single joined
``due_for_refresh()`` query for comparison, the plan of the batch in the middle of
``batched_due_connection_ids()`` (as it ran: keyset included), how many entries of the
two indexes the whole batched read looked at, and a table of figures: best of five warm
runs, as a sweep every minute keeps the pages cached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("BREX_OAUTH_TEST_DATABASE", "postgres")

INDEXES = ("brex_oauth_token_due", "brex_oauth_token_idle")

FILL_SQL = """
INSERT INTO auth_user (id, password, is_superuser, username, first_name, last_name, email,
                       is_staff, is_active, date_joined)
VALUES (1, '!', false, 'benchmark', '', '', '', false, true, {t0});

INSERT INTO brex_oauth_brexconnection
    (id, owner_id, environment, brex_user_id, brex_user_email, brex_company_id,
     brex_company_name, granted_scopes, status, connected_at, updated_at, revocation_status,
     revocation_attempts, last_error)
SELECT g, 1, 'production', 'cuuser_' || g, '', '', '', 'openid offline_access',
       CASE WHEN mod(g, 100) < 90 THEN 'active' WHEN mod(g, 100) < 97 THEN 'needs_reauth'
            ELSE 'revoked' END,
       {t0} - interval '30 days', {t0},
       CASE WHEN mod(g, 100) >= 97 THEN 'done' ELSE '' END, 0, ''
FROM generate_series(1, {rows}) AS g;

INSERT INTO brex_oauth_brextoken
    (connection_id, access_token, refresh_token, token_type, access_token_expires_at,
     refresh_token_issued_at, refresh_token_expires_at, refresh_token_used_at,
     refresh_claimed_until, refresh_claimed_by, updated_at)
SELECT c.id,
       CASE WHEN c.status = 'active' THEN '\\x00'::bytea END,
       CASE WHEN c.status <> 'revoked' THEN '\\x00'::bytea END,
       'Bearer',
       CASE WHEN c.status = 'active'
            THEN {t0} + interval '10 minutes' + random() * interval '50 minutes' END,
       {t0} - interval '30 days', {t0} + interval '60 days',
       CASE WHEN c.status = 'active' AND mod(c.id, 1000) = 0 THEN {t0} - interval '61 days'
            ELSE {t0} - random() * interval '60 minutes' END,
       NULL, '', {t0}
FROM brex_oauth_brexconnection AS c;
"""


def execution_ms(plan: str) -> float:
    for line in plan.splitlines():
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return float("nan")


def best_plan(queryset, runs: int = 5) -> str:
    """The EXPLAIN ANALYZE of the fastest of ``runs`` executions (after one to warm up)."""
    queryset.explain(analyze=True)
    plans = [queryset.explain(analyze=True, buffers=True) for _ in range(runs)]
    return min(plans, key=execution_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database", default="brex_oauth_benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--same-instant", action="store_true",
                        help="every active access token expires at one instant, due")
    args = parser.parse_args()

    import django
    from django.conf import settings

    admin_db = dict(settings.DATABASES["default"])
    if "postgresql" not in admin_db["ENGINE"]:
        print("This benchmark needs PostgreSQL (BREX_OAUTH_TEST_DATABASE=postgres).")
        return 2
    settings.DATABASES["default"]["NAME"] = args.database
    django.setup()

    import psycopg
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from django_brex_oauth.conf import brex_settings
    from django_brex_oauth.models import BrexToken
    from django_brex_oauth.services import sweep

    server = psycopg.connect(
        host=admin_db.get("HOST") or None, port=admin_db.get("PORT") or None,
        user=admin_db.get("USER") or None, password=admin_db.get("PASSWORD") or None,
        dbname=admin_db["NAME"], autocommit=True,
    )
    server.execute(f'DROP DATABASE IF EXISTS "{args.database}"')
    server.execute(f'CREATE DATABASE "{args.database}"')
    try:
        call_command("migrate", verbosity=0)
        previous_sweep = datetime.now(dt_timezone.utc).replace(microsecond=0)
        t0 = f"timestamptz '{previous_sweep.isoformat()}'"
        started = time.monotonic()
        with connection.cursor() as cursor:
            for statement in FILL_SQL.format(rows=int(args.rows), t0=t0).split(";"):
                if statement.strip():
                    cursor.execute(statement)
            if args.same_instant:
                cursor.execute(
                    "UPDATE brex_oauth_brextoken SET access_token_expires_at = "
                    f"{t0} + interval '5 minutes' WHERE access_token_expires_at IS NOT NULL"
                )
            cursor.execute("VACUUM ANALYZE")
        print(f"Filled {args.rows:,} connections in {time.monotonic() - started:.1f} s.")

        now = previous_sweep + timedelta(minutes=1)  # the next sweep
        sweep_query = (
            BrexToken.objects.refresh_candidates(now)
            .order_by("access_token_expires_at")
            .unclaimed(now)
            .values_list("connection_id", flat=True)
        )
        joined = BrexToken.objects.due_for_refresh(now).values_list("connection_id", flat=True)
        due = joined.count()
        with connection.cursor() as cursor:
            sizes = []
            for relation in ("brex_oauth_brextoken", *INDEXES):
                cursor.execute("SELECT pg_size_pretty(pg_relation_size(%s::regclass))", [relation])
                sizes.append(f"{relation} {cursor.fetchone()[0]}")
        print(f"Due at the next sweep: {due:,} connections. Sizes: {', '.join(sizes)}.")

        with_indexes = best_plan(sweep_query)
        joined_plan = best_plan(joined)
        batch_size = int(brex_settings.SWEEP_BATCH_SIZE)
        timings = []
        with mock.patch("django.utils.timezone.now", return_value=now):
            for _ in range(5):
                started = time.monotonic()
                batches = list(sweep.batched_due_connection_ids())
                timings.append((time.monotonic() - started) * 1000)
        listed = sum(len(batch) for batch in batches)
        # Once more, counting the rows read (this transaction's own statistics) and keeping
        # the statements, to show the plan of the batch in the middle.
        read = ("SELECT sum(pg_stat_get_xact_tuples_returned(i::regclass)) FILTER (WHERE i <> %s),"
                " sum(pg_stat_get_xact_tuples_returned(i::regclass)) FILTER (WHERE i = %s)"
                " FROM unnest(%s::text[]) AS i")
        read_params = ["brex_oauth_brextoken"] * 2 + [[*INDEXES, "brex_oauth_brextoken"]]
        with transaction.atomic(), connection.cursor() as cursor, \
                mock.patch("django.utils.timezone.now", return_value=now):
            # Every row read counted in this backend (no parallel workers).
            cursor.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            cursor.execute(read, read_params)
            read_before = cursor.fetchone()
            with CaptureQueriesContext(connection) as batch_queries:
                for _batch in sweep.batched_due_connection_ids():
                    pass
            cursor.execute(read, read_params)
            entries_read, rows_scanned = (
                after - before for after, before in zip(cursor.fetchone(), read_before, strict=True)
            )
            middle = batch_queries[len(batch_queries) // 2]["sql"]
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {middle}")
            middle_plan = "\n".join(row[0] for row in cursor.fetchall())
        with transaction.atomic():
            with connection.cursor() as cursor:
                for name in INDEXES:
                    cursor.execute(f'DROP INDEX "{name}"')
            without_indexes = best_plan(sweep_query)
            transaction.set_rollback(True)

        print("\n=== The sweep's query ===")
        print(str(sweep_query.query))
        print("\n=== EXPLAIN, with the partial indexes ===")
        print(with_indexes)
        print("\n=== EXPLAIN, with the two indexes dropped ===")
        print(without_indexes)
        print("\n=== EXPLAIN of the joined due_for_refresh() query, for comparison ===")
        print(joined_plan)
        print(f"\n=== EXPLAIN of batch {len(batch_queries) // 2 + 1} of {len(batch_queries)} "
              "of batched_due_connection_ids(), as it ran ===")
        print(middle)
        print(middle_plan)

        print("\n=== Figures (best of 5, warm) ===")
        print(f"connections                                   {args.rows:>10,}")
        print(f"due at the next sweep                         {due:>10,}")
        print(f"sweep query, partial indexes          {execution_ms(with_indexes):>13.1f} ms")
        print(f"sweep query, indexes dropped          {execution_ms(without_indexes):>13.1f} ms")
        print(f"joined due_for_refresh() query        {execution_ms(joined_plan):>13.1f} ms")
        print(f"batched_due_connection_ids(): {listed:,} ids in {len(batches)} batches "
              f"of {batch_size}: {min(timings):.1f} ms")
        print(f"  rows read: {entries_read:,} index entries, {rows_scanned:,} table rows by "
              f"sequential scans ({(entries_read + rows_scanned) / max(listed, 1):.2f} per id "
              f"listed); middle batch {execution_ms(middle_plan):.1f} ms")
        uses = all(name in with_indexes for name in INDEXES)
        print(f"sweep plan uses both partial indexes: {uses}")
        batch_uses = "brex_oauth_token_due" in middle_plan
        print(f"middle batch reads brex_oauth_token_due: {batch_uses}")
        # With every token due, reading the whole table is the better plan for the query
        # in one piece; the batches must still read their index.
        return 0 if batch_uses and (uses or args.same_instant) else 1
    finally:
        connection.close()
        if not args.keep:
            server.execute(f'DROP DATABASE IF EXISTS "{args.database}"')
        server.close()


if __name__ == "__main__":
    sys.exit(main())
