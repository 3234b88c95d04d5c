"""The package's metadata (pyproject.toml) agrees with what is tested and shipped.

Building the sdist and running the test suite from it is a step of .ci/run; these are
the cheap checks that keep pyproject.toml, tox.ini and README.md in step.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

REPO_DIR = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_DIR / "django_brex_oauth"
PYPROJECT = tomllib.loads((REPO_DIR / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def tox_factors(pattern: str) -> set[str]:
    """The factors of tox.ini's envlist matching ``pattern``, braces expanded."""
    parser = configparser.ConfigParser()
    parser.read(REPO_DIR / "tox.ini", encoding="utf-8")
    names = parser["tox"]["envlist"].split()
    while any("{" in name for name in names):
        expanded = []
        for name in names:
            match = re.search(r"\{([^}]*)\}", name)
            if not match:
                expanded.append(name)
                continue
            for choice in match[1].split(","):
                expanded.append(name[: match.start()] + choice.strip() + name[match.end() :])
        names = expanded
    return {f for name in names for f in name.split("-") if re.fullmatch(pattern, f)}


def test_django_classifiers_are_the_versions_tox_tests():
    tested = {f"{m[6]}.{m[7:]}" for m in tox_factors(r"django\d\d+")}
    declared = {
        c.rsplit(" :: ", 1)[1]
        for c in PROJECT["classifiers"]
        if c.startswith("Framework :: Django :: ")
    }
    assert tested and declared == tested


def test_python_classifiers_are_the_versions_tox_tests():
    tested = {f"{m[2]}.{m[3:]}" for m in tox_factors(r"py3\d+")}
    declared = {
        c.rsplit(" :: ", 1)[1]
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert tested and declared == tested
    oldest = min(tested, key=lambda version: int(version.split(".")[1]))
    assert PROJECT["requires-python"] == f">={oldest}"


def test_license_is_an_spdx_expression_matching_the_license_file():
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert (REPO_DIR / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])


def test_typed_package_says_so():
    assert (PACKAGE_DIR / "py.typed").is_file()
    assert "Typing :: Typed" in PROJECT["classifiers"]


def test_testing_extra_brings_what_the_fixtures_need():
    requirements = PROJECT["optional-dependencies"]["testing"]
    names = {re.split(r"[<>=\[; ]", r, maxsplit=1)[0] for r in requirements}
    assert names == {"pytest", "pytest-django"}
    plugin = "django_brex_oauth.testing.pytest_plugin"
    # The entry point's name is the module's, so an old pytest_plugins line does not
    # register the plugin a second time (test_testing_helpers runs both ways).
    assert PROJECT["entry-points"]["pytest11"] == {plugin: plugin}


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """setuptools' package-data glob (``*`` within a folder, ``**`` across folders)."""
    out = ""
    for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
    return re.compile(out)


def test_every_data_file_of_the_package_is_package_data():
    """A file that is neither Python nor listed in package-data would be left out of the
    wheel without a word (templates, translations, static files...)."""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["django_brex_oauth"]
    patterns = [_glob_regex(g) for g in globs]
    data_files = [
        path.relative_to(PACKAGE_DIR).as_posix()
        for path in PACKAGE_DIR.rglob("*")
        if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts
    ]
    assert "templates/brex_oauth/base.html" in data_files
    missing = [f for f in data_files if not any(p.fullmatch(f) for p in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_readme_links_are_absolute_and_point_at_the_repository():
    """README.md is the page on the package index, where a relative link leads nowhere."""
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    targets += re.findall(r"^\[[^\]]+\]:\s*(\S+)", readme, flags=re.MULTILINE)
    assert targets
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, f"relative links in README.md: {relative}"
    repository = PROJECT["urls"]["Repository"]
    for target in targets:
        if target.startswith(repository + "/blob/main/"):
            path = target.removeprefix(repository + "/blob/main/").split("#")[0]
            assert (REPO_DIR / path).exists(), f"README.md links to a missing file: {target}"


def test_the_built_wheel_ships_templates_and_compiled_translations(tmp_path):
    """What pip installs: the wheel built from the project carries the templates and each
    translation, compiled (.mo: what Django reads) beside its source (.po)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(REPO_DIR / name, source / name)
    shutil.copytree(
        PACKAGE_DIR, source / PACKAGE_DIR.name,
        ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=900,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    translations = {
        path.relative_to(REPO_DIR).as_posix()
        for path in (PACKAGE_DIR / "locale").glob("*/LC_MESSAGES/django.[mp]o")
    }
    assert "django_brex_oauth/locale/fr/LC_MESSAGES/django.mo" in translations
    assert translations <= names
    assert "django_brex_oauth/templates/brex_oauth/connections.html" in names
