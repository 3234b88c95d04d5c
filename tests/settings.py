"""Settings for the test suite.

``BREX_OAUTH_TEST_DATABASE=postgres`` runs it on PostgreSQL (127.0.0.1:5432, database
``test``; ``DATABASE_URL`` overrides); otherwise SQLite.
"""

import os

SECRET_KEY = "tests-secret-key-not-for-production"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_brex_oauth",
    # A partner's team model; BREX_OAUTH_TEAM_MODEL names it in tests/settings_teams.py.
    "tests.teams_app",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "tests.urls"

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

if os.environ.get("BREX_OAUTH_TEST_DATABASE") == "postgres":
    import environ

    DATABASES = {
        "default": environ.Env.db_url_config(
            os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
        )
    }
else:
    # BREX_OAUTH_TEST_SQLITE_NAME: a database file several processes share (the tests that
    # migrate a site in one process and switch teams on in another).
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("BREX_OAUTH_TEST_SQLITE_NAME", ":memory:"),
    }}

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGIN_URL = "/login/"
STATIC_URL = "/static/"

BREX_OAUTH = {
    "CLIENT_ID": "test-client-id",
    "CLIENT_SECRET": "test-client-secret",
    "ENVIRONMENT": "staging",
    "SCOPES": ["users.readonly", "companies.readonly"],
    "ENCRYPTION_KEY": "tests-encryption-key-0123456789",
    # The callback URL Brex is given: this plus /brex/callback/ (the test client's host; the
    # flow helpers follow only the path and query back to the site).
    "SITE_URL": "https://testserver",
}

CELERY_TASK_ALWAYS_EAGER = True
if os.environ.get("BREX_OAUTH_TEST_CELERY_WORKER") == "1":
    # A real worker started by tests/test_celery.py (see tests/celery_app.py).
    CELERY_TASK_ALWAYS_EAGER = False
    CELERY_BROKER_URL = os.environ.get("BREX_OAUTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    CELERY_TASK_DEFAULT_QUEUE = os.environ.get("BREX_OAUTH_TEST_CELERY_QUEUE", "celery")
