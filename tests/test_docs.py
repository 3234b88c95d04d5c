"""The documentation's configuration reference against the settings the code reads."""

import ast
import re
from pathlib import Path

import pytest

import django_brex_oauth
from django_brex_oauth.conf import DEFAULTS

REPO_DIR = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(django_brex_oauth.__file__).resolve().parent
REFERENCE = REPO_DIR / "docs" / "configuration.rst"

# One entry of the reference: its label, its ``NAME`` title, then a field list.
ENTRY = re.compile(
    r"^\.\. _setting-(?P<label>[A-Z0-9_]+):\n\n"
    r"``(?P<name>[A-Z0-9_]+)``\n~+\n\n"
    r"(?P<fields>(?::[^\n]+\n)+)",
    re.MULTILINE,
)
FIELD = re.compile(r"^:(?P<key>[^:]+): (?P<value>.*)$", re.MULTILINE)


def documented_settings() -> dict[str, dict[str, str]]:
    """``{name: {field: value}}`` for every entry of docs/configuration.rst."""
    entries: dict[str, dict[str, str]] = {}
    for match in ENTRY.finditer(REFERENCE.read_text(encoding="utf-8")):
        assert match["label"] == match["name"], f"label and title differ: {match.group(0)!r}"
        assert match["name"] not in entries, f"{match['name']} is documented twice"
        fields = {m["key"]: m["value"] for m in FIELD.finditer(match["fields"])}
        entries[match["name"]] = fields
    return entries


def settings_read_by_code() -> set[str]:
    """Every ``BREX_OAUTH`` key the package reads: ``brex_settings.NAME`` anywhere,
    ``self.NAME`` inside the settings class, and ``conf.get("NAME")`` / ``conf["NAME"]``
    on the raw dict in the system checks."""
    names: set[str] = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.isupper():
                owner = node.value
                if isinstance(owner, ast.Name) and (
                    owner.id == "brex_settings" or (owner.id == "self" and path.name == "conf.py")
                ):
                    names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "conf"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id == "conf"
                and isinstance(node.slice, ast.Constant)
            ):
                names.add(node.slice.value)
    return names


def test_the_scan_finds_the_settings_it_should():
    read = settings_read_by_code()
    # Read through brex_settings, through self in conf.py, and from the raw dict in checks.py.
    assert {"REFRESH_MARGIN", "ISSUER", "ENCRYPTION_KEY_FALLBACKS", "ENCRYPTION_KEY"} <= read


def test_every_setting_the_code_reads_is_a_known_setting():
    assert settings_read_by_code() - set(DEFAULTS) == set()


def test_every_setting_is_in_the_configuration_reference():
    documented = documented_settings()
    missing = (set(DEFAULTS) | settings_read_by_code()) - set(documented)
    assert not missing, f"not in docs/configuration.rst: {sorted(missing)}"


def test_the_reference_documents_no_setting_that_does_not_exist():
    stale = set(documented_settings()) - set(DEFAULTS)
    assert not stale, f"docs/configuration.rst documents unknown settings: {sorted(stale)}"


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_documented_default_is_the_real_one(name):
    fields = documented_settings()[name]
    default = re.match(r"``(.*?)``", fields.get("Default", ""))
    assert default, f"{name}: no ``Default`` field with a literal"
    assert ast.literal_eval(default[1]) == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_documented_environment_variable_is_the_example_projects(name):
    # The example project reads every setting as BREX_<NAME> (test_example_project.py
    # checks that it does).
    fields = documented_settings()[name]
    assert re.match(rf"``BREX_{name}``", fields.get("Environment variable", "")), fields


def test_every_system_check_is_documented():
    checks = (PACKAGE_DIR / "checks.py").read_text(encoding="utf-8")
    docs = "\n".join(
        path.read_text(encoding="utf-8")
        for path in (REPO_DIR / "docs").glob("*.rst")
        if path.name != "changelog.rst"
    )
    ids = set(re.findall(r"\b[EW]0\d\d\b", checks))
    assert {"E000", "E001", "E010", "E012", "W004"} <= ids
    missing = {check_id for check_id in ids if not re.search(rf"\b{check_id}\b", docs)}
    assert not missing, f"system checks no page of docs/ mentions: {sorted(missing)}"
