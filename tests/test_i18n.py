"""Translations: every text a person sees is marked for translation, the catalogue covers
them, and the French translation that ships is complete and compiled.

Checks (``brex_oauth.*`` system checks) and log lines stay English, as Django's own do.
"""

from __future__ import annotations

import ast
import gettext as gettext_module
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.template.base import Lexer, TokenType
from django.urls import reverse
from django.utils import translation

from django_brex_oauth.models import BrexConnection, ConnectionStatus
from django_brex_oauth.testing.factories import make_connection
from tests.conftest import require_service

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "django_brex_oauth"
TEMPLATES_DIR = PACKAGE_DIR / "templates"
LOCALE_DIR = PACKAGE_DIR / "locale"
#: The translations that ship, each complete.
LANGUAGES = ["fr"]


# Templates --------------------------------------------------------------------------------

#: Attributes whose value a person reads (or hears, with a screen reader).
#: (data-label: the connections page shows it as each cell's label on a narrow screen.)
VISIBLE_ATTRIBUTES = ("title", "alt", "placeholder", "aria-label", "value", "data-label")
TRANSLATING_BLOCKS = {"blocktranslate": "endblocktranslate", "blocktrans": "endblocktrans"}
LETTERS = re.compile(r"[^\W\d_]", re.UNICODE)


def untranslated_template_text(source: str) -> list[str]:
    """The pieces of ``source`` (a Django template) a person would read that are not
    inside a translate tag: text outside ``{% translate %}`` and ``{% blocktranslate %}``,
    with the HTML tags, comments, ``<style>`` and ``<script>`` taken out, the values of
    visible attributes (``title``, ``alt``, ...) kept in, and literal text given to a
    ``default`` filter."""
    found: list[str] = []
    closing: str | None = None  # inside {% blocktranslate %} or {% comment %}
    skeleton = []
    for token in Lexer(source).tokenize():
        contents = token.contents.strip()
        if closing:
            if token.token_type == TokenType.BLOCK and contents.split()[:1] == [closing]:
                closing = None
            continue
        if token.token_type == TokenType.BLOCK:
            name = contents.split()[0] if contents else ""
            if name in TRANSLATING_BLOCKS:
                closing = TRANSLATING_BLOCKS[name]
            elif name == "comment":
                closing = "endcomment"
            elif contents.split()[:2] == ["block", "bodyclass"]:
                closing = "endblock"  # CSS classes of the admin's <body>
            skeleton.append("\x00")
        elif token.token_type == TokenType.VAR:
            found += re.findall(r"""\|default(?:_if_none)?:(["'][^"']*["'])""", contents)
            skeleton.append("\x00")
        elif token.token_type == TokenType.TEXT:
            skeleton.append(token.contents)
        else:
            skeleton.append("\x00")
    html = "".join(skeleton)
    html = re.sub(r"<!--.*?-->", " ", html, flags=re.S)
    html = re.sub(r"<(style|script)\b.*?</\1\s*>", " ", html, flags=re.S | re.I)
    for tag in re.findall(r"<[^>]*>", html):
        for _name, value in re.findall(
            r"""\b(%s)\s*=\s*["']([^"']*)["']""" % "|".join(VISIBLE_ATTRIBUTES), tag  # noqa: UP031
        ):
            if LETTERS.search(value.replace("\x00", "")):
                found.append(value)
    text = re.sub(r"<[^>]*>", " ", html)
    text = re.sub(r"&[a-zA-Z]+;|&#\d+;", " ", text)
    found += [piece.strip() for piece in text.split("\x00") if LETTERS.search(piece)]
    return [f for f in found if LETTERS.search(f)]


def app_templates() -> list[Path]:
    return sorted(TEMPLATES_DIR.rglob("*.html"))


def test_the_template_check_finds_untranslated_text():
    # The checker itself: what it must flag, and what it must let through.
    assert untranslated_template_text("<p>Hello</p>") == ["Hello"]
    assert untranslated_template_text('<a title="Go home">{% translate "x" %}</a>') == [
        "Go home"
    ]
    assert untranslated_template_text('{{ name|default:"Brex account" }}') == [
        '"Brex account"'
    ]
    assert untranslated_template_text(
        '{% load i18n %}<p class="note">{% translate "Hello" %}, {{ name }}!</p>'
        "{% blocktranslate %}Hi {{ name }}{% endblocktranslate %}"
        "{% comment %}For the engineer{% endcomment %}<!-- or this -->"
        "<style>body { color: red }</style>"
    ) == []


@pytest.mark.parametrize(
    "template", app_templates(), ids=lambda p: p.relative_to(TEMPLATES_DIR).as_posix()
)
def test_templates_have_no_untranslated_text(template):
    source = template.read_text(encoding="utf-8")
    assert untranslated_template_text(source) == []
    assert "{% load i18n %}" in source or not re.search(r"{%\s*(block)?trans", source)


# Python -----------------------------------------------------------------------------------

#: Modules that speak to engineers only: the fake Brex for tests, migrations (which store
#: names as plain text) and the management commands' console output.
ENGINEER_ONLY = ("testing", "migrations", "management")
GETTEXT_NAMES = {
    "_", "gettext", "gettext_lazy", "ngettext", "ngettext_lazy", "pgettext",
    "pgettext_lazy", "npgettext", "npgettext_lazy", "format_lazy",
}
#: Keyword arguments whose value a person reads.
VISIBLE_KEYWORDS = {"verbose_name", "verbose_name_plural", "help_text", "description",
                    "user_message", "label", "empty_label"}
#: Class attributes whose value a person reads (error titles and texts, admin labels).
VISIBLE_ATTRIBUTES_PY = {"verbose_name", "verbose_name_plural", "title", "user_message",
                         "short_description", "empty_value_display"}
MESSAGE_FUNCTIONS = {"success", "error", "info", "warning", "debug", "add_message"}
#: Model fields whose first positional argument is their verbose name.
RELATION_FIELDS = {"ForeignKey", "OneToOneField", "ManyToManyField"}


def is_bare_text(node: ast.AST | None) -> bool:
    """Whether ``node`` builds a text with letters without a translation function."""
    if node is None:
        return False
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and bool(LETTERS.search(node.value))
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return is_bare_text(node.left) or (
            isinstance(node.op, ast.Add) and is_bare_text(node.right)
        )
    if isinstance(node, ast.IfExp):
        return is_bare_text(node.body) or is_bare_text(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        # "...".format(...) and "".join(...) of bare text
        return node.func.attr == "format" and is_bare_text(node.func.value)
    return False


def _called_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


@dataclass
class UnmarkedTexts(ast.NodeVisitor):
    path: str
    found: list[str] = field(default_factory=list)
    choices_depth: int = 0

    def flag(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.path}:{node.lineno}: {what}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                 for b in node.bases}
        is_choices = bool(bases & {"TextChoices", "IntegerChoices", "Choices"})
        for statement in node.body:
            if not isinstance(statement, ast.Assign):
                continue
            names = {t.id for t in statement.targets if isinstance(t, ast.Name)}
            if names & VISIBLE_ATTRIBUTES_PY and is_bare_text(statement.value):
                self.flag(statement, f"class attribute {sorted(names)[0]} is not translated")
            if (
                is_choices
                and isinstance(statement.value, ast.Tuple)
                and len(statement.value.elts) > 1
                and is_bare_text(statement.value.elts[-1])
            ):
                self.flag(statement, f"the label of choice {sorted(names)[0]} is not translated")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _called_name(node)
        if name in GETTEXT_NAMES:
            return  # what is inside is the text to translate
        for keyword in node.keywords:
            if keyword.arg in VISIBLE_KEYWORDS and is_bare_text(keyword.value):
                self.flag(keyword.value, f"{name}({keyword.arg}=...) is not translated")
        receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
        if (
            name in MESSAGE_FUNCTIONS
            and isinstance(receiver, ast.Name)
            and receiver.id == "messages"
            and len(node.args) > (2 if name == "add_message" else 1)
            and is_bare_text(node.args[2 if name == "add_message" else 1])
        ):
            self.flag(node, f"messages.{name}() text is not translated")
        if name == "message_user" and len(node.args) > 1 and is_bare_text(node.args[1]):
            self.flag(node, "message_user() text is not translated")
        if (
            name.endswith("Field")
            and name not in RELATION_FIELDS
            and isinstance(receiver, ast.Name)
            and receiver.id == "models"
            and node.args
            and is_bare_text(node.args[0])
        ):
            self.flag(node, f"the verbose name of a {name} is not translated")
        if name == "PermissionDenied" and node.args and is_bare_text(node.args[0]):
            self.flag(node, "PermissionDenied text (shown on the 403 page) is not translated")
        self.generic_visit(node)


def unmarked_texts(source: str, path: str = "<source>") -> list[str]:
    visitor = UnmarkedTexts(path)
    visitor.visit(ast.parse(source))
    return visitor.found


def app_modules() -> list[Path]:
    return sorted(
        path for path in PACKAGE_DIR.rglob("*.py")
        if not set(path.relative_to(PACKAGE_DIR).parts[:-1]) & set(ENGINEER_ONLY)
    )


def test_the_python_check_finds_unmarked_texts():
    bare = '''
from django.contrib import admin, messages
from django.db import models

class Oops(Exception):
    title = "Something broke"
    user_message = f"Try {1} more time"

class Kind(models.TextChoices):
    ONE = "one", "One"

class Thing(models.Model):
    name = models.CharField("name", max_length=3, help_text="What it is called.")
    other = models.ForeignKey("auth.User", models.CASCADE, verbose_name="other")

    class Meta:
        verbose_name = "thing"

@admin.display(description="Who")
def who(obj): ...

def view(request, admin_obj, name):
    messages.success(request, "Done.")
    messages.warning(request, f"{name} is gone.")
    messages.info(request, "%s is gone." % name)
    admin_obj.message_user(request, "Refreshed " + name)
'''
    assert len(unmarked_texts(bare)) == 12
    marked = '''
from django.contrib import admin, messages
from django.db import models
from django.utils.translation import gettext, gettext_lazy as _, ngettext

class Oops(Exception):
    title = _("Something broke")

class Kind(models.TextChoices):
    ONE = "one", _("One")
    NONE = "", _("None")

class Thing(models.Model):
    name = models.CharField(_("name"), max_length=3, help_text=_("What it is called."))
    other = models.ForeignKey("auth.User", models.CASCADE, verbose_name=_("other"))

@admin.display(description=_("Who"))
def who(obj): ...

def view(request, admin_obj, name, count):
    messages.success(request, gettext("Done."))
    messages.warning(request, gettext("%(name)s is gone.") % {"name": name})
    admin_obj.message_user(request, ngettext("%d thing", "%d things", count) % count)
    logger.warning("Log lines stay English: %s", name)
'''
    assert unmarked_texts(marked) == []


def test_python_texts_people_see_are_marked_for_translation():
    found = []
    for path in app_modules():
        found += unmarked_texts(
            path.read_text(encoding="utf-8"), path.relative_to(PACKAGE_DIR).as_posix()
        )
    assert found == []


# Catalogues -------------------------------------------------------------------------------


@dataclass
class PoEntry:
    msgid: str
    msgctxt: str | None = None
    msgid_plural: str | None = None
    msgstrs: dict[int, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    obsolete: bool = False


def _po_string(line: str) -> str:
    return ast.literal_eval(line)


def read_po(path: Path) -> tuple[dict[str, str], list[PoEntry]]:
    """A small reader of a gettext catalogue: its header and its entries."""
    entries: list[PoEntry] = []
    current: PoEntry | None = None
    flags: set[str] = set()
    obsolete = False
    key: tuple[str, int] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines() + [""]:
        line = raw.strip()
        if line.startswith("#~"):
            obsolete = True
            line = line[2:].strip()
        if not line or line.startswith("#"):
            if line.startswith("#,"):
                flags |= {f.strip() for f in line[2:].split(",")}
            if current is not None and not line:
                entries.append(current)
                current, key, flags, obsolete = None, None, set(), False
            continue
        keyword, _, rest = line.partition(" ")
        if line.startswith('"'):
            assert current is not None and key is not None, f"stray string in {path}: {raw}"
            keyword, rest = key[0], line
        elif keyword in ("msgctxt", "msgid") and current is not None and current.msgid:
            entries.append(current)
            current = None
        if current is None:
            current = PoEntry(msgid="", flags=flags, obsolete=obsolete)
        text = _po_string(rest)
        match = re.fullmatch(r"msgstr\[(\d+)\]", keyword)
        if keyword == "msgctxt":
            current.msgctxt = (current.msgctxt or "") + text
            key = ("msgctxt", 0)
        elif keyword == "msgid":
            current.msgid += text
            key = ("msgid", 0)
        elif keyword == "msgid_plural":
            current.msgid_plural = (current.msgid_plural or "") + text
            key = ("msgid_plural", 0)
        elif keyword == "msgstr" or match:
            index = int(match[1]) if match else 0
            current.msgstrs[index] = current.msgstrs.get(index, "") + text
            key = (keyword, index)
        else:
            raise AssertionError(f"unexpected line in {path}: {raw}")
    header_entry = next(e for e in entries if e.msgid == "" and e.msgctxt is None)
    header = dict(
        line.split(": ", 1) for line in header_entry.msgstrs[0].splitlines() if ": " in line
    )
    return header, [e for e in entries if e is not header_entry]


def catalogue(language: str, suffix: str = "po") -> Path:
    return LOCALE_DIR / language / "LC_MESSAGES" / f"django.{suffix}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_translation_is_complete(language):
    header, entries = read_po(catalogue(language))
    nplurals = int(re.search(r"nplurals=(\d+)", header["Plural-Forms"])[1])
    assert len(entries) > 100
    fuzzy = [e.msgid for e in entries if "fuzzy" in e.flags]
    obsolete = [e.msgid for e in entries if e.obsolete]
    untranslated = [
        e.msgid for e in entries
        if not e.obsolete and (
            len(e.msgstrs) != (nplurals if e.msgid_plural else 1)
            or not all(e.msgstrs.values())
        )
    ]
    assert (fuzzy, obsolete, untranslated) == ([], [], [])
    assert "fuzzy" not in header.get("#,", "")


def _placeholders(text: str) -> list[str]:
    return sorted(re.findall(r"%\(\w+\)[sd]|\{\w*\}", text))


@pytest.mark.parametrize("language", LANGUAGES)
def test_translations_keep_every_placeholder(language):
    _, entries = read_po(catalogue(language))
    for entry in entries:
        for index, text in entry.msgstrs.items():
            source = entry.msgid_plural if entry.msgid_plural and index else entry.msgid
            # A singular form may say "one" rather than repeat the number.
            expected = _placeholders(source)
            got = _placeholders(text)
            if entry.msgid_plural and "%(count)d" in expected and index == 0:
                expected = [p for p in expected if p != "%(count)d"]
                got = [p for p in got if p != "%(count)d"]
            assert got == expected, (entry.msgid, index, text)


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_compiled_catalogue_matches_the_source(language):
    """The .mo that ships says what the .po says, entry for entry."""
    _, entries = read_po(catalogue(language))
    with catalogue(language, "mo").open("rb") as mo:
        compiled = gettext_module.GNUTranslations(mo)
    header, _ = read_po(catalogue(language))
    assert compiled.info()["plural-forms"] == header["Plural-Forms"]
    for entry in entries:
        if entry.msgid_plural:
            for index, expected in entry.msgstrs.items():
                # A number that picks this plural form in this language.
                number = next(n for n in range(200) if compiled.plural(n) == index)
                if entry.msgctxt is None:
                    got = compiled.ngettext(entry.msgid, entry.msgid_plural, number)
                else:
                    got = compiled.npgettext(
                        entry.msgctxt, entry.msgid, entry.msgid_plural, number
                    )
                assert got == expected, entry.msgid
        elif entry.msgctxt is None:
            assert compiled.gettext(entry.msgid) == entry.msgstrs[0], entry.msgid
        else:
            assert compiled.pgettext(entry.msgctxt, entry.msgid) == entry.msgstrs[0]
    # Nothing more in the .mo than in the .po (the header is the one extra entry).
    assert len(compiled._catalog) == 1 + sum(  # type: ignore[attr-defined]
        len(e.msgstrs) for e in entries
    )


def _gettext_tool(name: str) -> str:
    path = shutil.which(name)
    require_service(
        f"GNU gettext's {name}", path is not None,
        "install GNU gettext (apt-get install gettext); .ci/run does",
    )
    assert path is not None
    return path


def test_the_catalogue_lists_every_marked_text(tmp_path, settings):
    """makemessages over today's code finds exactly the texts of the shipped catalogue:
    a newly marked text, or one changed in the code, fails until the catalogue (and the
    translations) are brought up to date (docs/i18n.rst says how)."""
    _gettext_tool("xgettext")
    _gettext_tool("msgmerge")
    from django.core.management import call_command

    copy = tmp_path / "django_brex_oauth"
    shutil.copytree(
        PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.mo", "*.po")
    )
    settings.LOCALE_PATHS = []
    import os

    here = os.getcwd()
    os.chdir(copy)
    try:
        call_command("makemessages", locale=["fr"], verbosity=0, no_obsolete=True)
    finally:
        os.chdir(here)
    _, fresh = read_po(copy / "locale" / "fr" / "LC_MESSAGES" / "django.po")
    key = lambda e: (e.msgctxt, e.msgid, e.msgid_plural)  # noqa: E731
    for language in LANGUAGES:
        _, shipped = read_po(catalogue(language))
        in_code = {key(e) for e in fresh}
        in_catalogue = {key(e) for e in shipped if not e.obsolete}
        assert (in_code - in_catalogue, in_catalogue - in_code) == (set(), set()), (
            f"locale/{language} is not up to date with the code (first set: texts only in the "
            "code; second: only in the catalogue). Regenerate and translate it: see "
            "docs/i18n.rst, 'Adding a language to the app, and keeping the catalogues up to "
            "date'."
        )


@pytest.mark.parametrize("language", LANGUAGES)
def test_msgfmt_accepts_the_catalogue(language, tmp_path):
    """GNU msgfmt's own checks: placeholders that match (python-format), the header and
    the plural forms; and what it compiles says what the .mo that ships says."""
    msgfmt = _gettext_tool("msgfmt")
    out = tmp_path / "django.mo"
    subprocess.run(
        [msgfmt, "--check", "--strict", "-o", str(out), str(catalogue(language))],
        check=True, capture_output=True,
    )
    with out.open("rb") as fresh, catalogue(language, "mo").open("rb") as shipped:
        assert (
            gettext_module.GNUTranslations(fresh)._catalog  # type: ignore[attr-defined]
            == gettext_module.GNUTranslations(shipped)._catalog  # type: ignore[attr-defined]
        )


# Pages in French --------------------------------------------------------------------------


@pytest.fixture
def connection(user, fake_brex, brex_settings):
    return make_connection(user, fake=fake_brex)


@pytest.fixture
def french():
    with translation.override("fr"):
        yield


@pytest.mark.django_db
def test_the_connections_page_reads_in_french(client, user, connection, french):
    client.force_login(user)
    BrexConnection.objects.filter(pk=connection.pk).update(status=ConnectionStatus.NEEDS_REAUTH)
    page = client.get(reverse("brex_oauth:connections"), HTTP_ACCEPT_LANGUAGE="fr")
    html = page.content.decode()
    assert page.status_code == 200
    assert '<html lang="fr"' in html
    assert "Connexions Brex" in html
    assert "Reconnecter" in html
    assert "Autorisation à renouveler" in html  # the status, from the model's choices
    assert "Brex connections" not in html


@pytest.mark.django_db
def test_a_connect_error_page_reads_in_french(client, user, brex_settings, french):
    client.force_login(user)
    page = client.get(
        reverse("brex_oauth:connect"), {"next": "https://elsewhere.example/"},
        HTTP_ACCEPT_LANGUAGE="fr",
    )
    html = page.content.decode()
    assert page.status_code == 400
    assert "Ce lien ne peut pas être suivi" in html
    assert "Connecter Brex à nouveau" in html
    assert "That link cannot be followed" not in html


@pytest.mark.django_db
def test_a_callback_error_page_reads_in_french(client, user, brex_settings, french):
    client.force_login(user)
    page = client.get(reverse("brex_oauth:callback"), {"code": "x"}, HTTP_ACCEPT_LANGUAGE="fr")
    html = page.content.decode()
    assert "Ce lien de connexion Brex n’est plus valide" in html
    assert "no longer valid" not in html


@pytest.mark.django_db(transaction=True)
def test_the_flash_message_after_disconnecting_reads_in_french(
    client, user, connection, french
):
    client.force_login(user)
    page = client.post(
        reverse("brex_oauth:disconnect", args=[connection.pk]), follow=True,
        HTTP_ACCEPT_LANGUAGE="fr",
    )
    assert "est déconnecté" in page.content.decode()


@pytest.mark.django_db
def test_the_admin_changelist_reads_in_french(client, connection, french):
    staff = get_user_model().objects.create_superuser("i18n-admin", "a@example.com", "pw")
    client.force_login(staff)
    page = client.get(
        reverse("admin:brex_oauth_brexconnection_changelist"), HTTP_ACCEPT_LANGUAGE="fr"
    )
    html = page.content.decode()
    assert page.status_code == 200
    assert "Connexions Brex" in html  # the app's and the model's names
    assert "Révoquer chez Brex" in html  # an action
    assert "Compte Brex" in html  # a column
    assert "expire bientôt" in html  # a filter's title
    assert "Brex account" not in html


def test_error_texts_stay_english_in_logs(french):
    from django_brex_oauth.exceptions import StateError

    error = StateError()
    assert str(error).startswith("The link that brought you back from Brex")
    assert str(error.title) == "Ce lien de connexion Brex n’est plus valide"
