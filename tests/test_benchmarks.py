"""The benchmark command still runs and prints its table (a smoke test: nothing is timed
or compared here; docs/performance.rst has the figures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_refresh_benchmark_prints_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "refresh.py"), "--databases", "sqlite",
         "--connections", "10", "--rounds", "1", "--fanout", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        cells[2]: cells
        for line in done.stdout.splitlines()
        if line.startswith("sqlite ")
        for cells in [[cell.strip() for cell in line.split("|")]]
    }
    assert set(rows) >= {"bare", "ideal", "app", "hot path: BrexClient token",
                         "hot path: ORM .get()"}, done.stdout
    for loop in ("bare", "ideal", "app"):
        assert float(rows[loop][3]) > 0
        assert float(rows[loop][7]) > 0  # CPU per refresh
    # The statements the app logged per refresh: SQLite writes the save's rows one by one.
    assert float(rows["app"][6]) <= 10, done.stdout
    assert "Machine:" in done.stdout and "Database: SQLite" in done.stdout
