"""Sphinx configuration for the django-brex-oauth documentation.

Build it with ``tox -e docs`` (warnings are errors) or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import importlib
import pkgutil
import sys
from pathlib import Path

import django
from django.conf import settings
from sphinx.pycode import ModuleAnalyzer

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


def _doc_comment_where_defined(app, what, name, obj, options, lines):
    """Re-exported data keeps the doc comment it has where it is defined.

    The fake Brex's constants are defined in the submodules of
    ``django_brex_oauth.testing.fake_brex`` and documented (and imported) from the package;
    autodoc only reads doc comments in the module it is given, and would show the docstring
    of ``str`` or ``dict`` instead.
    """
    if what != "data":
        return
    package_name, _, attr = name.rpartition(".")
    package = sys.modules.get(package_name)
    if package is None or not hasattr(package, "__path__"):
        return
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name == "__main__":  # importing it would run it
            continue
        module_name = f"{package_name}.{module_info.name}"
        module = importlib.import_module(module_name)
        if getattr(module, attr, None) is not obj:
            continue
        analyzer = ModuleAnalyzer.for_module(module_name)
        comment = analyzer.find_attr_docs().get(("", attr))
        if comment:
            lines[:] = list(comment)
            return


def setup(app):
    app.connect("autodoc-process-docstring", _doc_comment_where_defined)
