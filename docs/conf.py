"""Sphinx configuration for the django-brex-oauth documentation.

Build it with ``tox -e docs`` (warnings are errors) or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import sys
from pathlib import Path

import django
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# autodoc imports the app's modules, and those need Django set up.
if not settings.configured:
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.admin",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django_brex_oauth",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        SECRET_KEY="docs-build-only",
        BREX_OAUTH={"CLIENT_ID": "docs", "CLIENT_SECRET": "docs", "ENCRYPTION_KEY": "docs"},
        USE_TZ=True,
    )
django.setup()

about: dict = {}
exec((ROOT / "django_brex_oauth" / "__about__.py").read_text(), about)

project = "django-brex-oauth"
author = "django-brex-oauth contributors"
copyright = "django-brex-oauth contributors"
release = about["__version__"]
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
templates_path = []
root_doc = "index"
default_role = "literal"
highlight_language = "python"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}

html_theme = "furo"
html_title = f"django-brex-oauth {release}"
html_static_path = []
html_show_sourcelink = False
