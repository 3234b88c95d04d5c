"""Code run in separate OS processes by tests/test_refresh_race.py (multiprocessing, spawn)."""

from __future__ import annotations

import os
import queue
import threading
import traceback
from collections import Counter
from typing import Any


def setup_django(databases: dict[str, Any], brex_oauth: dict[str, Any]) -> None:
    """Start Django in a fresh process against the test database of the parent."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    settings.DATABASES = databases
    settings.BREX_OAUTH = brex_oauth
    django.setup()


def race(
    mode: str,
    databases: dict[str, Any],
    brex_oauth: dict[str, Any],
    connection_ids: list[int],
    rounds: int,
    barrier,
    results,
) -> None:
    """Refresh every connection once per round, in lockstep with the other processes.

    ``mode``: ``client`` (an API call through BrexClient, refreshing on demand),
    ``on_demand`` (the refresh service, waiting for a winner) or ``sweep`` (skipping what
    another worker holds). Puts ``(mode, outcome counts, errors)`` on ``results``.
    """
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    try:
        setup_django(databases, brex_oauth)
        from django.db import connections

        from django_brex_oauth.client import BrexClient
        from django_brex_oauth.models import BrexConnection
        from django_brex_oauth.services import refresh

        for _ in range(rounds):
            barrier.wait(timeout=120)
            for connection_id in connection_ids:
                try:
                    if mode == "client":
                        me = BrexClient(BrexConnection.objects.get(pk=connection_id)).get_me()
                        outcomes["api_ok" if me.get("id") else "api_empty"] += 1
                    elif mode == "on_demand":
                        result = refresh.refresh_connection(connection_id, min_validity=60)
                        outcomes[result.outcome.value] += 1
                    else:
                        result = refresh.refresh_connection(connection_id, wait=False)
                        outcomes[result.outcome.value] += 1
                except Exception as err:  # reported to the parent, which fails the test
                    errors.append(f"{type(err).__name__}: {err}")
            barrier.wait(timeout=120)
        connections.close_all()
    except Exception:
        errors.append(traceback.format_exc())
        barrier.abort()
    results.put((mode, dict(outcomes), errors))


def run_rounds(processes, barrier, results, rounds: int, between_rounds=None) -> list:
    """Start ``processes``, release them ``rounds`` times through ``barrier`` (each round
    waits for all of them to finish it; ``between_rounds()`` runs before every round but the
    first), and return what each put on ``results``. Fails the test if one of them broke
    the barrier; kills any still running at the end."""
    import pytest

    for process in processes:
        process.start()
    try:
        for round_number in range(rounds):
            if round_number and between_rounds is not None:
                between_rounds()
            barrier.wait(timeout=120)  # go
            barrier.wait(timeout=120)  # every process went through the round
        return [results.get(timeout=60) for _ in processes]
    except (threading.BrokenBarrierError, queue.Empty):
        reports = []
        while not results.empty():
            reports.append(results.get())
        pytest.fail(f"a racing process failed: {reports}")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def take_budget(
    databases: dict[str, Any], brex_oauth: dict[str, Any], takes: int, barrier, results
) -> None:
    """Take the sweep's rate budget ``takes`` times in one round of :func:`run_rounds`, in
    step with the other processes; puts ``(granted, errors)`` on ``results``."""
    granted = 0
    errors: list[str] = []
    try:
        setup_django(databases, brex_oauth)
        from django.db import connections

        from django_brex_oauth.services import throttle

        barrier.wait(timeout=120)
        for _ in range(takes):
            granted += throttle.take_sweep_budget().granted
        barrier.wait(timeout=120)
        connections.close_all()
    except Exception:
        errors.append(traceback.format_exc())
        barrier.abort()
    results.put((granted, errors))
