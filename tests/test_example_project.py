"""The example project's settings: every BREX_OAUTH setting comes from the environment as
``BREX_<NAME>``, and the defaults need no service."""

from __future__ import annotations

import json
import subprocess
import sys

from django_brex_oauth.conf import DEFAULTS
from tests.example_site import REPO_DIR, clean_environment

PRINT_SETTINGS = """
import json
from partner_site import settings
print(json.dumps({
    "BREX_OAUTH": settings.BREX_OAUTH,
    "DATABASE": settings.DATABASES["default"],
    "BROKER": settings.CELERY_BROKER_URL,
    "BEAT": settings.CELERY_BEAT_SCHEDULE,
}, default=str))
"""


def example_settings(tmp_path, **variables: str) -> dict:
    """The example project's settings as they come out of ``variables``."""
    env = clean_environment()
    env.update({"ENV_FILE": "", "DATA_DIR": str(tmp_path / "data"), **variables})
    result = subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], cwd=REPO_DIR / "example_project", env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sample(name: str, default: object) -> tuple[str, object]:
    """A value for ``BREX_<name>`` and what the setting should become."""
    if isinstance(default, bool):
        return "true", True
    if isinstance(default, int):
        return "7", 7
    if isinstance(default, float):
        return "2.5", 2.5
    if isinstance(default, list):
        return "first,second third", ["first", "second", "third"]
    return f"value-of-{name.lower()}", f"value-of-{name.lower()}"


SWEEP = "django_brex_oauth.tasks.refresh_due_connections"


def test_every_setting_is_read_from_its_environment_variable(tmp_path):
    samples = {name: sample(name, default) for name, default in DEFAULTS.items()}
    variables = {f"BREX_{name}": raw for name, (raw, _) in samples.items()}
    # The sweep's interval is the example's own variable (the app's schedule, run faster).
    variables["BREX_SWEEP_INTERVAL"] = "15"

    settings = example_settings(tmp_path, **variables)

    assert settings["BREX_OAUTH"] == {name: value for name, (_, value) in samples.items()}
    (sweep,) = [e for e in settings["BEAT"].values() if e["task"] == SWEEP]
    assert sweep["schedule"] == 15.0


def test_defaults_use_the_fake_brex_sqlite_and_files_for_the_broker(tmp_path):
    settings = example_settings(tmp_path)

    brex = settings["BREX_OAUTH"]
    assert brex["ISSUER"] == "http://127.0.0.1:8765/oauth2/default"
    assert brex["API_BASE_URL"] == "http://127.0.0.1:8765"
    assert (brex["CLIENT_ID"], brex["CLIENT_SECRET"]) == ("test-client-id", "test-client-secret")
    assert settings["DATABASE"]["ENGINE"] == "django.db.backends.sqlite3"
    # The fake's data lives apart from Brex staging's and production's.
    assert settings["DATABASE"]["NAME"] == str(tmp_path / "data" / "fake" / "db.sqlite3")
    assert settings["BROKER"].startswith("filesystem://")
    for folder in ("queue", "processed", "control"):
        assert (tmp_path / "data" / "fake" / "broker" / folder).is_dir()
    (sweep,) = [e for e in settings["BEAT"].values() if e["task"] == SWEEP]
    assert sweep["schedule"] == 60.0  # the app's own schedule, untouched


def test_real_brex_credentials_turn_the_fake_off(tmp_path):
    settings = example_settings(
        tmp_path, BREX_CLIENT_ID="issued-id", BREX_CLIENT_SECRET="issued-secret",
        BREX_ENVIRONMENT="staging", BREX_ISSUER="",
    )

    brex = settings["BREX_OAUTH"]
    assert (brex["CLIENT_ID"], brex["CLIENT_SECRET"]) == ("issued-id", "issued-secret")
    assert brex["ISSUER"] is None and brex["API_BASE_URL"] is None
    assert brex["ENVIRONMENT"] == "staging"
    assert settings["DATABASE"]["NAME"] == str(tmp_path / "data" / "staging" / "db.sqlite3")
