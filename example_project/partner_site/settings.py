"""Settings of the example partner site, read from the environment with django-environ.

Every value has a default that runs with no services: SQLite, a Celery broker kept in
files, and the fake Brex server at http://127.0.0.1:8765 (``python example_project/demo.py``
starts it). ``example_project/.env`` is read when it exists (``ENV_FILE`` names another
file); variables already in the environment win. See ``.env.example``.
"""

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import environ

from django_brex_oauth.beat import BEAT_SCHEDULE as BREX_OAUTH_BEAT_SCHEDULE
from django_brex_oauth.conf import DEFAULTS as BREX_OAUTH_DEFAULTS
from django_brex_oauth.http import is_loopback_url

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
ENV_FILE = env.str("ENV_FILE", default=str(BASE_DIR / ".env"))
if ENV_FILE and Path(ENV_FILE).is_file():
    environ.Env.read_env(ENV_FILE)

# Where the SQLite databases, the file broker's messages and beat's schedules live, one
# folder per Brex (see BREX_MODE below; a relative path is taken from example_project/).
DATA_DIR = BASE_DIR / env.str("DATA_DIR", default="var")
DATA_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env.str("SECRET_KEY", default="django-insecure-example-partner-site-only")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    # First, so that its templates (brex_oauth/base.html) override the app's.
    "partner_site",
    "workspaces",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_brex_oauth",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "partner_site.urls"
WSGI_APPLICATION = "partner_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://")}

AUTH_PASSWORD_VALIDATORS = []  # the demo user's password is "demo"
# The sign-in page shows the demo user's username and password.
SHOW_DEMO_LOGIN = env.bool("SHOW_DEMO_LOGIN", default=DEBUG)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Brex -------------------------------------------------------------------------------
# Connections may belong to a workspace rather than to one person: every member of the
# workspace sees them (docs/teams.rst). A personal connection (no workspace) stays possible.
BREX_OAUTH_TEAM_MODEL = "workspaces.Workspace"

# Without BREX_CLIENT_ID the site talks to the fake Brex server the demo starts; with it,
# to Brex itself (BREX_ENVIRONMENT picks production or staging) unless BREX_ISSUER and
# BREX_API_BASE_URL point elsewhere.
FAKE_BREX_URL = env.str("FAKE_BREX_URL", default="http://127.0.0.1:8765")
USE_FAKE_BREX = not env.str("BREX_CLIENT_ID", default="")

BREX_OAUTH = {
    "CLIENT_ID": env.str("BREX_CLIENT_ID", default="") or "test-client-id",
    "CLIENT_SECRET": env.str("BREX_CLIENT_SECRET", default="")
    or ("test-client-secret" if USE_FAKE_BREX else None),
    "ENVIRONMENT": env.str("BREX_ENVIRONMENT", default="staging"),
    "SCOPES": env.str("BREX_SCOPES", default="users.readonly companies.readonly")
    .replace(",", " ")
    .split(),
    "ISSUER": env.str("BREX_ISSUER", default="")
    or (f"{FAKE_BREX_URL}/oauth2/default" if USE_FAKE_BREX else None),
    "API_BASE_URL": env.str("BREX_API_BASE_URL", default="")
    or (FAKE_BREX_URL if USE_FAKE_BREX else None),
    "ENCRYPTION_KEY": env.str(
        "BREX_ENCRYPTION_KEY", default="example-partner-site-token-key-not-for-production"
    ),
    # The site's public address: Brex sends people back to SITE_URL + /brex/callback/ (the
    # app never builds it from the request's Host header). runserver's address in
    # development; with DEBUG off there is no default, so the checks ask for it.
    "SITE_URL": env.str("BREX_SITE_URL", default="http://127.0.0.1:8000" if DEBUG else "")
    or None,
    "CONNECT_REDIRECT_URL": env.str("BREX_CONNECT_REDIRECT_URL", default="dashboard"),
    "DISCONNECT_REDIRECT_URL": env.str("BREX_DISCONNECT_REDIRECT_URL", default="dashboard"),
}


def _brex_oauth_from_environment(names: Iterable[str]) -> dict[str, Any]:
    """Any other ``BREX_OAUTH`` setting, as ``BREX_<NAME>``, cast like its default; an
    empty value means ``None``."""
    values = {}
    for name in names:
        variable = f"BREX_{name}"
        if variable not in env.ENVIRON:
            continue
        default = BREX_OAUTH_DEFAULTS[name]
        if not env.str(variable):
            values[name] = None
        elif isinstance(default, bool):
            values[name] = env.bool(variable)
        elif isinstance(default, int):
            values[name] = env.int(variable)
        elif isinstance(default, float):
            values[name] = env.float(variable)
        elif isinstance(default, list):
            values[name] = env.str(variable).replace(",", " ").split()
        else:
            values[name] = env.str(variable)
    return values


# So every setting has its variable: e.g. BREX_REFRESH_MARGIN=30 (the demo's 60-second
# tokens), BREX_FORCE_LOGIN=true, BREX_ENCRYPTION_KEY_FALLBACKS=old-key-1,old-key-2.
BREX_OAUTH.update(
    _brex_oauth_from_environment(name for name in BREX_OAUTH_DEFAULTS if name not in BREX_OAUTH)
)

# Each Brex the site talks to keeps its data apart, in DATA_DIR/<mode>/ (the database,
# the broker's files and beat's schedule): "fake" for a fake Brex on this machine, else the
# environment ("staging" or "production"). Connections made at one Brex mean nothing at
# another, and their tokens are encrypted with that mode's key: switching the demo from the
# fake to Brex staging must not show the fake's connections, nor fail to decrypt them.
BREX_MODE = (
    "fake"
    if is_loopback_url(BREX_OAUTH["ISSUER"] or "")
    else re.sub(r"[^a-z0-9_-]", "-", str(BREX_OAUTH["ENVIRONMENT"]).lower())
)
MODE_DIR = DATA_DIR / BREX_MODE
MODE_DIR.mkdir(parents=True, exist_ok=True)

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{MODE_DIR / 'db.sqlite3'}")
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The site, the worker and beat share the file: take the write lock when a transaction
    # starts (no deadlock when two processes upgrade a read lock) and wait for it.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20}
    )

# --- Celery -----------------------------------------------------------------------------
# filesystem:// keeps messages in files under MODE_DIR: worker and beat run as separate
# processes with no broker server. Use redis://... or amqp://... in production.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = MODE_DIR / "broker"
    for _folder in ("queue", "processed", "control"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
    # kombu's own file transport can hand a worker a message it is still writing.
    CELERY_BROKER_TRANSPORT = "partner_site.broker:Transport"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(MODE_DIR / "celerybeat-schedule")

# The app's beat entries; BREX_SWEEP_INTERVAL (seconds) runs the refresh sweep more often
# than its one minute, as the demo does so that refreshes of 60-second tokens show.
_sweep_interval = env.float("BREX_SWEEP_INTERVAL", default=0) or None
CELERY_BEAT_SCHEDULE = {
    name: (
        {**entry, "schedule": _sweep_interval}
        if _sweep_interval and entry["task"].endswith(".refresh_due_connections")
        else entry
    )
    for name, entry in BREX_OAUTH_BEAT_SCHEDULE.items()
}

# How often the dashboard asks for the tokens' expiry and last refresh.
DASHBOARD_POLL_SECONDS = env.float("DASHBOARD_POLL_SECONDS", default=5)

# --- Logging ----------------------------------------------------------------------------
# Refreshes and failures of django_brex_oauth show in the worker's output; the
# authorization code and state in callback URLs never reach a log.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact_oauth": {"()": "partner_site.logs.RedactOAuthParameters"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_oauth"],
        },
    },
    "loggers": {
        "django_brex_oauth": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
