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


def _put_while_a_worker_polls(channel_module: str, tmp_path) -> list[str]:
    """Put one message through ``channel_module``'s Channel while another thread polls the
    queue in the middle of the write; return what the poller saw."""
    import importlib
    import threading
    from queue import Empty
    from unittest import mock

    from kombu import Connection

    module = importlib.import_module(channel_module)
    folder = tmp_path / "queue"
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
               "store_processed": False}
    writing, polled = threading.Event(), threading.Event()
    real_dumps = module.dumps

    def slow_dumps(payload):
        writing.set()  # the message file exists (under some name) but holds nothing yet
        polled.wait(5)
        return real_dumps(payload)

    seen: list[str] = []
    with Connection("filesystem://", transport=module.Transport,
                    transport_options=options) as connection:
        channel = connection.default_channel
        with mock.patch.object(module, "dumps", slow_dumps):
            writer = threading.Thread(target=channel._put, args=("jobs", {"n": 1}))
            writer.start()
            writing.wait(5)
            try:
                seen.append(f"polled: {channel._get('jobs')}")
            except Empty:
                seen.append("polled: empty")
            except ValueError as err:  # JSONDecodeError: the worker would crash
                seen.append(f"polled: {type(err).__name__}")
            finally:
                polled.set()
                writer.join(5)
        try:
            seen.append(f"then: {channel._get('jobs')}")
        except Empty:
            seen.append("then: empty")
    return seen


def test_the_example_file_broker_never_hands_out_a_half_written_message(tmp_path):
    sys.path.insert(0, str(REPO_DIR / "example_project"))
    try:
        seen = _put_while_a_worker_polls("partner_site.broker", tmp_path)
    finally:
        sys.path.remove(str(REPO_DIR / "example_project"))
    assert seen == ["polled: empty", "then: {'n': 1}"]


def test_kombus_own_file_broker_can_hand_out_a_half_written_message(tmp_path):
    # Why the example site carries its own transport: with kombu's, the poller takes the
    # empty file and cannot decode it, and the message is lost.
    seen = _put_while_a_worker_polls("kombu.transport.filesystem", tmp_path)
    assert seen[0] == "polled: JSONDecodeError"


def test_the_example_site_uses_the_atomic_file_broker(tmp_path):
    env = clean_environment()
    env.update({"ENV_FILE": "", "DATA_DIR": str(tmp_path / "data")})
    result = subprocess.run(
        [sys.executable, "-c",
         "from partner_site.celery import app; print(type(app.connection_for_write().transport))"],
        cwd=REPO_DIR / "example_project", env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "partner_site.broker.Transport" in result.stdout


DASHBOARD_ACROSS_A_RECONNECT = """
import json
import os

from django_brex_oauth.testing import FakeBrex

fake = FakeBrex().start()
os.environ.update({
    "BREX_CLIENT_ID": fake.client_id, "BREX_CLIENT_SECRET": fake.client_secret,
    "BREX_ISSUER": fake.issuer, "BREX_API_BASE_URL": fake.api_base_url,
    "BREX_ENVIRONMENT": "staging", "BREX_SITE_URL": "http://testserver",
})
os.environ["DJANGO_SETTINGS_MODULE"] = "partner_site.settings"

import django

django.setup()

from urllib.parse import urlsplit

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.test.utils import setup_test_environment

from django_brex_oauth.models import BrexConnection
from django_brex_oauth.services.refresh import refresh_connection

setup_test_environment()
call_command("migrate", verbosity=0)
client = Client()
client.force_login(get_user_model().objects.create_user("ada", password="ada"))


def connect():
    authorize = client.get("/brex/connect/?force_login=1&next=/")["Location"]
    back = urlsplit(fake.consent(authorize))
    assert client.get(back.path + "?" + back.query).status_code == 302


def state(step):
    (row,) = json.loads(client.get("/token-status/").content)["connections"]
    page = client.get("/").content.decode()
    count = page.split('data-field="refresh-count">', 1)[1].split("<", 1)[0]
    last = page.split('data-field="last-refreshed">', 1)[1].split("</dd>", 1)[0]
    return {"step": step, "status": row["status"], "json_count": row["refresh_count"],
            "json_last": row["last_refreshed_at"], "page_count": int(count),
            "page_last": "not yet" if last == "not yet" else "a time"}


steps = []
connect()
steps.append(state("connected"))
connection = BrexConnection.objects.get()
for _ in range(2):
    refresh_connection(connection.pk, force=True)
steps.append(state("refreshed twice"))
client.post(f"/brex/disconnect/{connection.pk}/")
connect()
assert BrexConnection.objects.get().pk == connection.pk  # the same row, reconnected
steps.append(state("reconnected"))
refresh_connection(connection.pk, force=True)
steps.append(state("refreshed once more"))
fake.stop()
print(json.dumps(steps))
"""


def test_the_dashboards_refresh_count_starts_again_at_a_reconnect(tmp_path):
    env = clean_environment()
    env.update({"ENV_FILE": "", "DATA_DIR": str(tmp_path / "data"),
                "CELERY_TASK_ALWAYS_EAGER": "true", "DEBUG": "true"})
    result = subprocess.run(
        [sys.executable, "-c", DASHBOARD_ACROSS_A_RECONNECT], cwd=REPO_DIR / "example_project",
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = json.loads(result.stdout.strip().splitlines()[-1])

    shown = [(s["step"], s["status"], s["json_count"], s["page_count"], s["page_last"])
             for s in steps]
    assert shown == [
        ("connected", "active", 0, 0, "not yet"),
        ("refreshed twice", "active", 2, 2, "a time"),
        ("reconnected", "active", 0, 0, "not yet"),
        ("refreshed once more", "active", 1, 1, "a time"),
    ]
    assert [s["json_last"] is None for s in steps] == [True, False, True, False]
