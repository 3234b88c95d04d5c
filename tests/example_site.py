"""Running the example project (example_project/) from tests, through the demo's Stack."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from example_project import demo

REPO_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_DIR / "test-artifacts"

#: Variables the example site (or the demo) reads: none may leak in from the developer's
#: shell or CI into a test's site.
_SITE_VARIABLES = (
    "BREX_", "CELERY_", "DATABASE_URL", "CACHE_URL", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS",
    "FAKE_BREX_URL", "DATA_DIR", "ENV_FILE", "SHOW_DEMO_LOGIN", "DASHBOARD_POLL_SECONDS",
    "DJANGO_SETTINGS_MODULE",
)


def clean_environment() -> dict[str, str]:
    """This process's environment without anything the example site reads."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_SITE_VARIABLES)}


def keep_logs(data_dir: Path, name: str) -> Path:
    """Copy a stack's process logs to test-artifacts/<name>/ (CI keeps that folder)."""
    target = ARTIFACTS / name
    shutil.rmtree(target, ignore_errors=True)
    if (data_dir / "logs").is_dir():
        shutil.copytree(data_dir / "logs", target)
    return target


def query(data_dir: Path, sql: str, *params: Any, mode: str = "fake") -> list[tuple]:
    """Rows from the example site's SQLite database of ``mode`` (``fake``, ``staging`` or
    ``production``; plain columns only, tokens are encrypted)."""
    with sqlite3.connect(data_dir / mode / "db.sqlite3", timeout=20) as database:
        return database.execute(sql, params).fetchall()


__all__ = ["ARTIFACTS", "clean_environment", "demo", "keep_logs", "query"]
