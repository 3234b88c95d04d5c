"""The README's demo command brings the example site up, and Ctrl-C takes it all down.

``python example_project/demo.py`` runs here as a user runs it (from the repository root, in
its own process group), with test-only choices of ports, data folder and sweep interval, and
``--no-install`` so that it runs with this interpreter whatever installed the package here.
Its processes' logs are kept in test-artifacts/demo-logs/.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from django_brex_oauth.testing.fake_brex import cli as fake_brex_cli
from tests.example_site import REPO_DIR, clean_environment, demo, keep_logs

DEMO = REPO_DIR / "example_project" / "demo.py"


def processes_with(variable: str, value: str) -> list[int]:
    """Live processes whose environment has ``variable=value`` (Linux /proc)."""
    wanted = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_for_file_line(path: Path, pattern: str, timeout: float) -> str:
    """The first line of ``path`` matching ``pattern``, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if regex.search(line):
                    return line
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in {path} after {timeout}s")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def signed_in_browser(site_url: str) -> urllib.request.OpenerDirector:
    """An HTTP client with cookies, signed in to the site as the demo user."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar), _NoRedirect()
    )
    with opener.open(site_url + "login/", timeout=10) as response:
        page = response.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": token, "username": demo.DEMO_USERNAME,
         "password": demo.DEMO_PASSWORD, "next": "/"}
    ).encode()
    try:
        opener.open(site_url + "login/", data=form, timeout=10)
    except urllib.error.HTTPError as answer:
        assert answer.code == 302, f"signing in answered {answer.code}"
        assert answer.headers["Location"] == "/"
    return opener


def redirect_location(opener: urllib.request.OpenerDirector, url: str) -> str:
    """Where ``url`` redirects to (it must redirect)."""
    try:
        opener.open(url, timeout=10)
    except urllib.error.HTTPError as answer:
        assert answer.code == 302, f"{url} answered {answer.code}"
        return answer.headers["Location"]
    raise AssertionError(f"{url} did not redirect")


def test_demo_command_starts_everything_and_ctrl_c_stops_it_all(tmp_path):
    port, fake_port = demo.free_port(), demo.free_port()
    data_dir = tmp_path / "demo"
    command = demo.ManagedProcess(
        "demo",
        [sys.executable, str(DEMO), "--port", str(port), "--fake-port", str(fake_port),
         "--data-dir", str(data_dir), "--env-file", "", "--sweep-interval", "1", "--quiet",
         "--no-install"],
        env=clean_environment(),
        cwd=REPO_DIR,
        log_path=tmp_path / "demo-output.log",
    )
    site = f"http://127.0.0.1:{port}/"
    issuer = f"http://127.0.0.1:{fake_port}/oauth2/default"
    # What an earlier run left in the logs is kept, beside this run's.
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / "logs" / "site.log").write_text("a line of the previous run\n")
    try:
        command.start()
        command.wait_for(r"Press Ctrl-C to stop", timeout=60)
        output = "\n".join(command.lines)
        assert f"Site:       {site}" in output
        assert "Sign in:    username demo, password demo" in output
        assert f"Fake Brex:  {issuer}" in output
        logs = data_dir / "logs"
        assert (logs / "site.log.1").read_text() == "a line of the previous run\n"
        wait_for_file_line(logs / "site.log", r'"GET /login/', timeout=15)
        assert "previous run" not in (logs / "site.log").read_text()

        # The site answers, with the demo sign-in on its login page.
        status, page = demo.http_get(site + "login/")
        assert status == 200
        assert "Demo sign-in: username <strong>demo</strong>" in page

        # The fake Brex answers, as the issuer the site was given.
        status, body = demo.http_get(issuer + "/.well-known/openid-configuration")
        assert status == 200
        assert json.loads(body)["issuer"] == issuer

        # The demo user signs in, and Connect sends them to the fake's consent page.
        browser = signed_in_browser(site)
        authorize = redirect_location(browser, site + "brex/connect/")
        assert authorize.startswith(issuer + "/v1/authorize?")
        assert f"redirect_uri={urllib.parse.quote(site, safe='')}brex%2Fcallback%2F" in authorize

        # Beat sends the refresh sweep through the file broker; the worker runs it.
        wait_for_file_line(
            data_dir / "logs" / "worker.log",
            r"refresh_due_connections\[[^\]]+\] succeeded", timeout=15,
        )
        running = processes_with("DATA_DIR", str(data_dir))
        assert len(running) >= 4  # the fake, the site, the worker and beat

        # Ctrl-C: the terminal sends SIGINT to the demo's process group.
        os.killpg(command.pid, signal.SIGINT)
        assert command.process.wait(30) == 0
        command.wait_for(r"^Stopped\.$", timeout=5)
        assert processes_with("DATA_DIR", str(data_dir)) == []
        assert demo.port_is_free("127.0.0.1", port)
        assert demo.port_is_free("127.0.0.1", fake_port)
    finally:
        command.stop()
        for pid in processes_with("DATA_DIR", str(data_dir)):
            os.kill(pid, signal.SIGKILL)
        keep_logs(data_dir, "demo-logs")


@pytest.mark.parametrize(
    ("environment", "file_lines", "expected"),
    [
        ({}, [], {}),
        (
            {"BREX_CLIENT_ID": "real-id"},
            ["BREX_CLIENT_ID=from-file"],
            {"BREX_CLIENT_ID": "real-id"},
        ),
        (
            {},
            ["# comment", "export BREX_CLIENT_ID='quoted id'", "BREX_ISSUER=", "DEBUG=true",
             "BREX_SCOPES=users.readonly # trailing comment"],
            {"BREX_CLIENT_ID": "quoted id", "BREX_ISSUER": "", "BREX_SCOPES": "users.readonly"},
        ),
    ],
)
def test_demo_reads_brex_settings_like_the_site(tmp_path, environment, file_lines, expected):
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(file_lines) + "\n")
    assert demo.brex_settings_from(environment, str(env_file)) == expected


def test_demo_runs_with_a_python_that_has_this_checkout():
    if not demo.has_package(sys.executable):
        pytest.skip("the package here is not installed from this checkout (e.g. tox's wheel)")
    assert demo.choose_python() == sys.executable
    assert demo.choose_python(install=False) == sys.executable


def test_each_run_keeps_the_logs_of_the_runs_before(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for run in range(1, 5):
        demo.rotate_logs(logs, keep=2)
        (logs / "site.log").write_text(f"run {run}\n")
        (logs / "beat.log").write_text(f"beat of run {run}\n")

    assert sorted(path.name for path in logs.iterdir()) == [
        "beat.log", "beat.log.1", "beat.log.2", "site.log", "site.log.1", "site.log.2",
    ]
    assert [(logs / name).read_text() for name in ("site.log", "site.log.1", "site.log.2")] == [
        "run 4\n", "run 3\n", "run 2\n",
    ]
    # A fresh start with the fake Brex clears the database, never the logs.
    demo.reset_data_dir(tmp_path)
    assert (logs / "site.log.2").exists()


LIST_UNDOCUMENTED_OPTIONS = """
import json

import django

django.setup()
from django.core.management import get_commands, load_command_class

missing = {}
for name, app in sorted(get_commands().items()):
    if app in ("partner_site", "django_brex_oauth"):
        parser = load_command_class(app, name).create_parser("manage.py", name)
        missing[name] = [a.option_strings for a in parser._actions if not a.help]
print(json.dumps(missing))
"""


def undocumented(parser) -> list[list[str]]:
    return [action.option_strings for action in parser._actions if not action.help]


def test_every_option_says_what_it_does(tmp_path):
    """``--help`` of the demo, of the fake Brex it starts and of every command of the app
    and the example site explains each option."""
    assert undocumented(demo.build_parser()) == []
    assert undocumented(fake_brex_cli._parser()) == []

    env = clean_environment()
    env.update({"ENV_FILE": "", "DATA_DIR": str(tmp_path / "data"),
                "DJANGO_SETTINGS_MODULE": "partner_site.settings"})
    result = subprocess.run(
        [sys.executable, "-c", LIST_UNDOCUMENTED_OPTIONS], cwd=REPO_DIR / "example_project",
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    missing = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"demo_user", "brex_oauth_rotate_key", "brex_oauth_refresh"} <= set(missing)
    assert {name: options for name, options in missing.items() if options} == {}
