"""Code run in separate OS processes by the SQLite race of tests/test_fault_matrix.py
(multiprocessing, spawn): cron's ``brex_oauth_refresh --all`` on a shared SQLite file."""

from __future__ import annotations

import io
import traceback
from typing import Any

from tests.refresh_workers import setup_django


def prepare(databases: dict[str, Any], brex_oauth: dict[str, Any],
            token_sets: list[dict[str, Any]], brex_user_id: str) -> list[int]:
    """Migrate the SQLite file and store one active connection per token set."""
    setup_django(databases, brex_oauth)
    from django.core.management import call_command
    from django.db import connections

    from tests.factories import store_connections

    call_command("migrate", verbosity=0)
    ids = store_connections(token_sets, brex_user_id)
    connections.close_all()
    return ids


def run_prepare(databases, brex_oauth, token_sets, brex_user_id, results) -> None:
    """:func:`prepare` in a child process; puts the ids (or a traceback) on ``results``."""
    try:
        results.put(("ids", prepare(databases, brex_oauth, token_sets, brex_user_id)))
    except Exception:
        results.put(("error", traceback.format_exc()))


def refresh_all(databases, brex_oauth, rounds: int, barrier, results) -> None:
    """Run ``manage.py brex_oauth_refresh --all`` once per round, in lockstep with the
    other processes; puts ``(summaries, errors)`` on ``results``."""
    summaries: list[str] = []
    errors: list[str] = []
    try:
        setup_django(databases, brex_oauth)
        from django.core.management import call_command
        from django.core.management.base import CommandError
        from django.db import connections

        for _ in range(rounds):
            barrier.wait(timeout=120)
            out = io.StringIO()
            try:
                call_command("brex_oauth_refresh", all_active=True, stdout=out)
            except CommandError as err:
                errors.append(f"CommandError: {err}")
            except Exception as err:  # reported to the parent, which fails the test
                errors.append(f"{type(err).__name__}: {err}")
            summaries.append(out.getvalue().strip())
            connections.close_all()
            barrier.wait(timeout=120)
    except Exception:
        errors.append(traceback.format_exc())
        barrier.abort()
    results.put((summaries, errors))


def _read_tokens(databases, brex_oauth, results) -> None:
    try:
        setup_django(databases, brex_oauth)
        from django_brex_oauth.models import BrexToken

        rows = {
            token.connection_id: (token.connection.status, token.refresh_token,
                                  token.access_token)
            for token in BrexToken.objects.select_related("connection")
        }
        results.put(("tokens", rows))
    except Exception:
        results.put(("error", traceback.format_exc()))


def stored_tokens(databases, brex_oauth, context) -> dict[int, tuple[str, str, str]]:
    """Each connection's status and tokens as the SQLite file has them, read by a fresh
    process: ``{id: (status, refresh_token, access_token)}``."""
    results = context.Queue()
    process = context.Process(target=_read_tokens, args=(databases, brex_oauth, results))
    process.start()
    kind, rows = results.get(timeout=120)
    process.join(30)
    assert kind == "tokens", rows
    return rows
