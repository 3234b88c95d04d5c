#!/usr/bin/env python3
"""Run the example partner site against a fake Brex with one command.

From the repository root, with nothing but Python 3.10+ and pip::

    python example_project/demo.py

finds a Python with the package installed from this checkout (the one running it, else
``.venv/`` as the README's test command makes it), or else creates ``.venv-demo/`` in the
repository and installs ``-e ".[example]"`` into it (again only when pyproject.toml
changes). It then migrates a fresh SQLite database under
``example_project/var/``, creates the demo user (``demo`` / ``demo``), and starts:

* the fake Brex server (``python -m django_brex_oauth.testing.fake_brex``), whose access
  tokens last 60 seconds so refreshes happen while you watch;
* the site (``manage.py runserver``);
* a Celery worker and Celery beat, with the refresh sweep every 15 seconds, over a broker
  kept in files (no Redis needed).

Each runs in its own process group; Ctrl-C (or SIGTERM) stops them all. With
``BREX_CLIENT_ID`` and ``BREX_CLIENT_SECRET`` set (and ``BREX_ISSUER`` empty) the site
talks to Brex itself and no fake is started: see example_project/README.md.

The stack is importable too (:class:`Stack`): the test suite starts it to test the demo
and to drive the site in a real browser. Only the standard library is used here, so this
file runs before any virtual environment exists. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_DIR = EXAMPLE_DIR.parent
DEMO_VENV = REPO_DIR / ".venv-demo"
DEFAULT_DATA_DIR = EXAMPLE_DIR / "var"
DEFAULT_ENV_FILE = EXAMPLE_DIR / ".env"

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "demo"
#: The demo user's workspace. Workspaces are the site's teams: a connection made for a
#: workspace is seen by all its members (BREX_OAUTH_TEAM_MODEL, docs/teams.rst).
DEMO_WORKSPACE = "Ledgerline Books"
#: The other people of the demo, signing in with their username as password (no staff):
#: (username, workspace). One shares the demo user's workspace, one has a workspace of its own.
DEMO_PEOPLE = (("alex", DEMO_WORKSPACE), ("blake", "Harbor Accounting"))

#: The fake's client credentials (its defaults), given to the site in fake mode.
FAKE_CLIENT_ID = "test-client-id"
FAKE_CLIENT_SECRET = "test-client-secret"

#: Events each connection subscribes to in the demo (the fake's account page sends
#: USER_UPDATED).
WEBHOOK_EVENT_TYPES = ("USER_UPDATED", "EXPENSE_PAYMENT_UPDATED", "TRANSFER_PROCESSED",
                       "TRANSFER_FAILED")

#: What a fresh start with the fake Brex removes from a data directory: the fake's own
#: folder (its database, broker files and beat's schedule; see BREX_MODE in the site's
#: settings) and collected static files. The folders of Brex staging and production
#: (``staging/``, ``production/``) are never touched, nor the logs (see :func:`rotate_logs`).
DATA_FILES = ("fake", "static")

#: How many earlier runs' logs each process keeps beside its current one: ``site.log`` is
#: this run's, ``site.log.1`` the run before, up to ``site.log.5``.
KEPT_LOG_RUNS = 5

#: Site request lines not echoed to the terminal (still in the log file): the dashboard's
#: token-status polling and static files.
QUIET_SITE_LINES = re.compile(r'"GET /(token-status/|static/|favicon\.ico)')


class DemoError(RuntimeError):
    """The demo cannot start; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# processes


class ManagedProcess:
    """A child process in its own process group, its output kept in a log file.

    Every output line goes to ``log_path`` and, when ``echo`` says so, to the terminal
    prefixed with the process's name. :meth:`wait_for` waits for a line matching a pattern;
    :meth:`stop` ends the whole process group (SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        echo: Callable[[str], bool] | None = None,
        out: IO[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.echo = echo
        self.out = out or sys.stdout
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._terminated = False

    def start(self) -> ManagedProcess:
        """Start the process in a new session (so it has its own process group)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read, name=f"demo-{self.name}-output", daemon=True
        )
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in self.process.stdout:
                line = raw.rstrip("\n")
                log.write(line + "\n")
                log.flush()
                if self.echo is not None and self.echo(line):
                    print(f"[{self.name:>6}] {line}", file=self.out, flush=True)
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id)."""
        return self.process.pid if self.process else None

    def running(self) -> bool:
        """Whether the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for an output line matching ``pattern``; raise :class:`DemoError` if the
        process exits or ``timeout`` seconds pass first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if not self.running() and (self._reader is None or not self._reader.is_alive()):
                    raise DemoError(f"{self.name} exited early; see {self.log_path}:\n"
                                    + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DemoError(f"{self.name} was not ready after {timeout:.0f}s; see "
                                    f"{self.log_path}:\n" + self.tail())
                self._changed.wait(min(left, 0.2))

    def tail(self, count: int = 15) -> str:
        """The last ``count`` output lines."""
        return "\n".join("    " + line for line in self.lines[-count:])

    def terminate(self) -> None:
        """Ask the whole process group to stop (SIGTERM), once: a second SIGTERM would cut
        a Celery worker's warm shutdown short."""
        if self.process is not None and not self._terminated:
            self._terminated = True
            _signal_group(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL what is left. Returns the exit code."""
        process = self.process
        if process is None:
            return None
        self.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(5)
        # Helpers the leader started (and did not take down with it) go too.
        _signal_group(process.pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(5)
        return process.returncode


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def rotate_logs(log_dir: Path, keep: int = KEPT_LOG_RUNS) -> None:
    """Move each ``<name>.log`` of ``log_dir`` to ``<name>.log.1`` (the older ones one
    further on, dropping what goes past ``keep``), so that a new run writes fresh logs and
    the last ``keep`` runs' stay readable."""
    if not log_dir.is_dir():
        return
    for current in sorted(log_dir.glob("*.log")):
        current.with_name(f"{current.name}.{keep}").unlink(missing_ok=True)
        for number in range(keep - 1, 0, -1):
            older = current.with_name(f"{current.name}.{number}")
            if older.exists():
                older.replace(current.with_name(f"{current.name}.{number + 1}"))
        current.replace(current.with_name(f"{current.name}.1"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound (as servers bind: connections closing are fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url`` without proxies; returns the status and the body (errors included)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode("utf-8", "replace")


def wait_for_http(url: str, timeout: float, process: ManagedProcess | None = None) -> None:
    """Poll ``url`` until it answers 200; raise :class:`DemoError` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and not process.running():
            raise DemoError(f"{process.name} exited; see {process.log_path}:\n" + process.tail())
        try:
            status, _ = http_get(url, timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as error:
            last = str(error)
        time.sleep(0.2)
    raise DemoError(f"{url} did not answer after {timeout:.0f}s ({last})")


# --------------------------------------------------------------------------------------------
# the stack


@dataclass
class StackConfig:
    """What to start, where, and how.

    ``fake_port=None`` starts no fake: ``extra_env`` then says which Brex to use (real Brex,
    or a fake the caller runs). ``fake_port=0`` lets the fake pick a free port.
    """

    python: str = sys.executable
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = DEFAULT_DATA_DIR
    env_file: str = str(DEFAULT_ENV_FILE)
    fake_port: int | None = 8765
    access_token_ttl: float = 60
    sweep_interval: float = 15
    refresh_margin: float = 30
    client_refresh_margin: float = 10
    worker: bool = True
    beat: bool = True
    echo: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    base_env: Mapping[str, str] | None = None
    ready_timeout: float = 60


class Stack:
    """The fake Brex, the site, a Celery worker and Celery beat, started and stopped together.

    ::

        with Stack(StackConfig(port=8001, data_dir=tmp)) as stack:
            stack.url        # http://127.0.0.1:8001/
            stack.issuer     # the fake's issuer (None without a fake)
    """

    def __init__(self, config: StackConfig, out: IO[str] | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.processes: dict[str, ManagedProcess] = {}
        self.issuer: str | None = None
        self.fake_url: str | None = None

    # --- addresses -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The site's address."""
        return f"http://{self.config.host}:{self.config.port}/"

    @property
    def webhook_url(self) -> str:
        """The site's webhook receiver, which the fake Brex posts its events to."""
        return self.url + "brex/webhook/"

    @property
    def log_dir(self) -> Path:
        """Where each process's output is kept."""
        return self.config.data_dir / "logs"

    # --- environment ------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The environment of the site, worker and beat."""
        config = self.config
        env = dict(os.environ if config.base_env is None else config.base_env)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "partner_site.settings",
                "ENV_FILE": config.env_file,
                "DATA_DIR": str(config.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.fake_url is not None:
            env.update(
                {
                    "BREX_CLIENT_ID": FAKE_CLIENT_ID,
                    "BREX_CLIENT_SECRET": FAKE_CLIENT_SECRET,
                    "BREX_ENVIRONMENT": "staging",
                    "BREX_ISSUER": str(self.issuer),
                    "BREX_API_BASE_URL": self.fake_url,
                    "BREX_REFRESH_MARGIN": _number(config.refresh_margin),
                    "BREX_CLIENT_REFRESH_MARGIN": _number(config.client_refresh_margin),
                    "BREX_SWEEP_INTERVAL": _number(config.sweep_interval),
                    # The fake delivers its events to the site's receiver.
                    "BREX_WEBHOOK_URL": self.webhook_url,
                    "BREX_WEBHOOK_EVENT_TYPES": ",".join(WEBHOOK_EVENT_TYPES),
                }
            )
        env.update(config.extra_env)
        # The callback Brex is given is the site's own address + /brex/callback/, unless the
        # environment or the .env file names the registered one.
        configured = brex_settings_from(env, config.env_file)
        if not (configured.get("BREX_SITE_URL") or configured.get("BREX_REDIRECT_URI")):
            env["BREX_SITE_URL"] = self.url.rstrip("/")
        return env

    def _echo_filter(self, name: str) -> Callable[[str], bool] | None:
        if not self.config.echo:
            return None
        if name == "site":
            return lambda line: not QUIET_SITE_LINES.search(line)
        return lambda line: True

    def _process(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> ManagedProcess:
        process = ManagedProcess(
            name, argv, env=env, cwd=EXAMPLE_DIR, log_path=self.log_dir / f"{name}.log",
            echo=self._echo_filter(name), out=self.out,
        ).start()
        self.processes[name] = process
        return process

    # --- steps ------------------------------------------------------------------------

    def start_fake(self) -> ManagedProcess:
        """Start the fake Brex and learn its issuer from its first lines."""
        config = self.config
        argv = [
            config.python, "-m", "django_brex_oauth.testing.fake_brex",
            "--host", config.host, "--port", str(config.fake_port),
            "--access-token-ttl", _number(config.access_token_ttl),
        ]
        for host in {config.host, "localhost", "127.0.0.1"}:
            argv += ["--redirect-uri", f"http://{host}:{config.port}/brex/callback/"]
        fake = self._process("brex", argv, self.environment())
        self.issuer = fake.wait_for(r"^issuer: (\S+)", config.ready_timeout).group(1)
        self.fake_url = fake.wait_for(r"^api_base_url: (\S+)", config.ready_timeout).group(1)
        return fake

    def manage(self, *args: str) -> str:
        """Run ``manage.py`` with the stack's environment; its output, or DemoError."""
        result = subprocess.run(
            [self.config.python, "manage.py", *args],
            cwd=EXAMPLE_DIR, env=self.environment(), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise DemoError(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> Stack:
        """Start everything and wait until each part answers."""
        config = self.config
        if not port_is_free(config.host, config.port):
            raise DemoError(f"{config.host}:{config.port} is in use; pass another --port.")
        if config.fake_port and not port_is_free(config.host, config.fake_port):
            raise DemoError(
                f"{config.host}:{config.fake_port} (the fake Brex) is in use; "
                "pass another --fake-port."
            )
        config.data_dir.mkdir(parents=True, exist_ok=True)
        rotate_logs(self.log_dir)
        try:
            if config.fake_port is not None:
                self.start_fake()
            self.manage("migrate", "--noinput", "-v", "0")
            env = self.environment()
            site = self._process(
                "site",
                [config.python, "manage.py", "runserver", f"{config.host}:{config.port}",
                 "--noreload", "--insecure"],
                env,
            )
            celery = [config.python, "-m", "celery", "-A", "partner_site"]
            if config.worker:
                self._process(
                    "worker",
                    [*celery, "worker", "--pool", "solo", "--loglevel", "INFO",
                     "--without-mingle", "--without-gossip", "--hostname", "demo@%h"],
                    env,
                )
            if config.beat:
                self._process("beat", [*celery, "beat", "--loglevel", "INFO"], env)
            # While those start up.
            self.manage("demo_user", "--username", DEMO_USERNAME, "--password", DEMO_PASSWORD,
                        "--workspace", DEMO_WORKSPACE)
            for username, workspace in DEMO_PEOPLE:
                self.manage("demo_user", "--username", username, "--password", username,
                            "--workspace", workspace, "--no-staff")
            wait_for_http(self.url + "login/", config.ready_timeout, site)
            if self.issuer:
                wait_for_http(
                    self.issuer + "/.well-known/openid-configuration", config.ready_timeout,
                    self.processes["brex"],
                )
            if config.worker:
                self.processes["worker"].wait_for(r"\bready\.", config.ready_timeout)
            if config.beat:
                self.processes["beat"].wait_for(r"beat: Starting", config.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def failed(self) -> ManagedProcess | None:
        """A process that exited although nobody stopped it."""
        return next((p for p in self.processes.values() if not p.running()), None)

    def stop(self) -> None:
        """Stop every process group: all are asked at once, then each is waited for."""
        processes = list(reversed(self.processes.values()))
        for process in processes:
            process.terminate()
        for process in processes:
            process.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------------------------
# environment and installation


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a .env file (comments, ``export`` and quotes allowed)."""
    values: dict[str, str] = {}
    if not path or not Path(path).is_file():
        return values
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


def brex_settings_from(environ: Mapping[str, str], env_file: str) -> dict[str, str]:
    """The ``BREX_*`` variables the site will see: the environment over the .env file."""
    values = read_env_file(env_file)
    values.update({k: v for k, v in environ.items() if k.startswith("BREX_")})
    return {k: v for k, v in values.items() if k.startswith("BREX_")}


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


_HAS_PACKAGE = "import celery, environ, django_brex_oauth; print(django_brex_oauth.__file__)"


def has_package(python: str | Path, *, from_checkout: bool = True) -> bool:
    """Whether ``python`` imports django_brex_oauth (from this checkout, unless
    ``from_checkout`` is false) with the example's dependencies (django-environ, Celery)."""
    try:
        result = subprocess.run(
            [str(python), "-c", _HAS_PACKAGE], cwd=EXAMPLE_DIR, capture_output=True, text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if result.returncode != 0:
        return False
    return not from_checkout or Path(result.stdout.strip()).resolve().is_relative_to(REPO_DIR)


def choose_python(*, install: bool = True, out: IO[str] | None = None) -> str:
    """The interpreter to run everything with.

    Without ``install``: this one, as it is (it must have the package). Otherwise this one
    when it has the package from this checkout; else ``.venv/`` (the test command's) when it
    has; else ``.venv-demo/``, created and installed as needed.
    """
    out = out or sys.stdout
    if not install:
        if not has_package(sys.executable, from_checkout=False):
            raise DemoError(
                f"{sys.executable} cannot import django_brex_oauth, django-environ and "
                'Celery; run without --no-install, or pip install -e ".[example]" first.'
            )
        return sys.executable
    for python in (Path(sys.executable), venv_python(REPO_DIR / ".venv")):
        if python.exists() and has_package(python):
            print(f"Using {_shown(python)} (it has django-brex-oauth from this checkout).",
                  file=out, flush=True)
            return str(python)
    return ensure_virtualenv(out=out)


def ensure_virtualenv(venv: Path = DEMO_VENV, out: IO[str] | None = None) -> str:
    """Create ``venv`` and install ``-e ".[example]"`` into it when needed; its python."""
    out = out or sys.stdout
    python = venv_python(venv)
    if not python.exists():
        print(f"Creating the virtual environment {_shown(venv)} ...", file=out, flush=True)
        if subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise DemoError(
                f"{sys.executable} -m venv failed (on Debian or Ubuntu: apt-get install "
                "python3-venv)."
            )
    stamp = venv / ".django-brex-oauth-demo"
    wanted = hashlib.sha256((REPO_DIR / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        print(f'Installing -e ".[example]" into {_shown(venv)} ...', file=out, flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
             "-e", ".[example]"],
            cwd=REPO_DIR, check=True,
        )
        stamp.write_text(wanted + "\n")
    return str(python)


def reset_data_dir(data_dir: Path) -> None:
    """Remove what an earlier run left in ``data_dir`` (only the files the demo writes)."""
    for name in DATA_FILES:
        target = data_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


# --------------------------------------------------------------------------------------------
# command line


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The demo's options, read from ``argv``."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python example_project/demo.py",
        description="Run the example partner site, a fake Brex, a Celery worker and beat.",
    )
    parser.add_argument("--port", type=int, default=8000, help="the site's port (8000)")
    parser.add_argument("--fake-port", type=int, default=8765,
                        help="the fake Brex's port (8765; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address the site and the fake Brex listen on, and the "
                        "site's address in the callback URL Brex is given (127.0.0.1)")
    parser.add_argument("--access-token-ttl", type=float, default=60,
                        help="seconds the fake's access tokens last (60)")
    parser.add_argument("--sweep-interval", type=float, default=15,
                        help="seconds between refresh sweeps of Celery beat (15)")
    parser.add_argument("--refresh-margin", type=float, default=30,
                        help="refresh access tokens expiring within this many seconds (30)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="database, broker files and logs (example_project/var); the "
                        "logs of the last runs are kept in its logs/ folder")
    parser.add_argument("--env-file", default=str(DEFAULT_ENV_FILE),
                        help="a .env file to read ('' for none; example_project/.env)")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the database of the last run (the fake forgets its tokens, "
                        "so earlier connections will need reconnecting)")
    parser.add_argument("--no-install", action="store_true",
                        help="run everything with this Python as it is (it must have the "
                        "package and the example's dependencies)")
    parser.add_argument("--quiet", action="store_true",
                        help="keep the processes' output in the log files only")
    parser.add_argument("--exit-after-ready", action="store_true",
                        help="stop everything as soon as it is all up (a smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Install if needed, start the stack, wait for Ctrl-C, stop it."""
    args = parse_args(argv)
    if os.name == "nt":
        print("The demo needs Linux or macOS (it uses process groups).", file=sys.stderr)
        return 2
    brex = brex_settings_from(os.environ, args.env_file)
    use_fake = not brex.get("BREX_CLIENT_ID")
    if not use_fake and not brex.get("BREX_CLIENT_SECRET"):
        print("BREX_CLIENT_ID is set but BREX_CLIENT_SECRET is not.", file=sys.stderr)
        return 2

    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stack: Stack | None = None
    try:
        python = choose_python(install=not args.no_install)
        if use_fake and not args.keep_data:
            reset_data_dir(args.data_dir)
        config = StackConfig(
            python=python, host=args.host, port=args.port, data_dir=args.data_dir.resolve(),
            env_file=args.env_file, fake_port=args.fake_port if use_fake else None,
            access_token_ttl=args.access_token_ttl, sweep_interval=args.sweep_interval,
            refresh_margin=args.refresh_margin, echo=not args.quiet,
        )
        stack = Stack(config)
        print("Starting the fake Brex, the site, a Celery worker and beat ..." if use_fake
              else "Starting the site, a Celery worker and beat against Brex ...", flush=True)
        stack.start()
        _print_ready(stack, use_fake, brex, staying=not args.exit_after_ready)
        if args.exit_after_ready:
            return 0
        while True:
            failed = stack.failed()
            if failed is not None:
                print(f"\n{failed.name} exited unexpectedly; see {failed.log_path}:\n"
                      + failed.tail(), file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
    except _Stop:
        return 0
    except DemoError as error:
        print(f"\nThe demo could not start: {error}", file=sys.stderr, flush=True)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"\n{' '.join(map(str, error.cmd))} failed (exit {error.returncode}).",
              file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C must not interrupt the clean-up.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        if stack is not None:
            print("\nStopping ...", flush=True)
            stack.stop()
            print("Stopped.", flush=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _print_ready(stack: Stack, use_fake: bool, brex: Mapping[str, str], staying: bool) -> None:
    config = stack.config
    lines = [
        "",
        "Ready.",
        f"  Site:       {stack.url}",
        f"  Sign in:    username {DEMO_USERNAME}, password {DEMO_PASSWORD} "
        f"(also for the admin at {stack.url}admin/); workspace {DEMO_WORKSPACE}",
        *(f"              or {name} / {name} (workspace {workspace})"
          for name, workspace in DEMO_PEOPLE),
    ]
    if use_fake:
        lines.append(
            f"  Fake Brex:  {stack.issuer} (access tokens last {_number(config.access_token_ttl)} "
            f"s; beat sweeps every {_number(config.sweep_interval)} s)"
        )
        lines.append(
            f"  Webhooks:   change your name at {stack.fake_url}/account and watch the "
            "dashboard's events"
        )
    else:
        target = brex.get("BREX_ISSUER") or f"Brex {brex.get('BREX_ENVIRONMENT', 'production')}"
        lines.append(f"  Brex:       {target} (no fake started)")
    lines.append(f"  Logs:       {_shown(stack.log_dir)}/")
    lines += ["Press Ctrl-C to stop.", ""] if staying else [""]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
