"""The shape of the package, read from its source: no import cycle between its modules, few
imports hidden inside functions (each saying why), and no module too long to live in.

See docs/architecture.rst for the layers these keep in place.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import django_brex_oauth

PACKAGE = "django_brex_oauth"
PACKAGE_DIR = Path(django_brex_oauth.__file__).parent

#: Imports inside functions: at most this many in the whole package, each with a reason.
MAX_FUNCTION_LEVEL_IMPORTS = 5


def _module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@dataclass(frozen=True)
class _Import:
    module: str
    node: ast.Import | ast.ImportFrom
    in_function: bool


def _imports(module: str, tree: ast.Module) -> list[_Import]:
    """Every import statement of ``module``, noting which run inside a function; those
    under ``if TYPE_CHECKING:`` never run and are left out."""
    found: list[_Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(_Import(module, child, in_function))
            elif _is_type_checking_block(child):
                for branch in child.orelse:
                    visit(branch, in_function)
            else:
                visit(child, in_function or isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules that ``node`` in ``module`` makes Python import: each module
    named, and the packages above it (their ``__init__`` runs first), except the packages
    of ``module`` itself (already importing)."""
    is_package = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # ``from package import module`` imports that module; ``from module import name``
        # only the module.
        named = [
            f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
            for alias in node.names
        ]
    own_packages = set(_ancestors(module)) | {module}
    targets = set()
    for name in named:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        for candidate in [*_ancestors(name), name]:
            if candidate in MODULES and candidate not in own_packages:
                targets.add(candidate)
    return targets


def _all_imports() -> list[_Import]:
    found = []
    for module, path in MODULES.items():
        found.extend(_imports(module, ast.parse(path.read_text(), str(path))))
    return found


def module_level_graph() -> dict[str, set[str]]:
    """Which of the package's modules each module imports when it is imported."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for item in _all_imports():
        if not item.in_function:
            graph[item.module] |= _targets(item.module, item.node)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of modules that import each other
    (Tarjan's strongly connected components, then a path around each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(group, graph) for group in groups]


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    start = group[0]
    members = set(group)
    # Breadth-first from start back to start, inside the group: a shortest cycle.
    paths = {target: [start, target] for target in sorted(graph[start] & members)}
    frontier = list(paths)
    while start not in paths:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    next_frontier.append(target)
        frontier = next_frontier
    return paths[start]


_NOQA = re.compile(r"noqa(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?", re.IGNORECASE)


def _comments(path: Path) -> dict[int, str]:
    """Comment text by line number."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokens if tok.type == tokenize.COMMENT}


def _reason(item: _Import) -> str:
    """The comment saying why ``item`` sits inside a function: on its own lines, or the
    line just above it. A bare ``noqa`` is no reason."""
    path = MODULES[item.module]
    comments = _comments(path)
    node = item.node
    lines = range(node.lineno - 1, (node.end_lineno or node.lineno) + 1)
    text = " ".join(comments.get(line, "") for line in lines)
    words = re.findall(r"[A-Za-z]{2,}", _NOQA.sub("", text))
    return " ".join(words) if len(words) >= 3 else ""


def function_level_imports() -> list[_Import]:
    return [item for item in _all_imports() if item.in_function]


def _where(item: _Import) -> str:
    path = MODULES[item.module].relative_to(PACKAGE_DIR.parent)
    return f"{path}:{item.node.lineno}: {ast.unparse(item.node)}"


# The tests ----------------------------------------------------------------------------------


def test_no_import_cycle_between_the_package_modules():
    cycles = find_cycles(module_level_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_import_walk_sees_the_package_as_python_does():
    graph = module_level_graph()
    # Both relative and absolute imports are followed, and a module's package comes first.
    assert "django_brex_oauth.conf" in graph["django_brex_oauth.http"]
    assert "django_brex_oauth.services.refresh" in graph["django_brex_oauth.tasks"]
    assert "django_brex_oauth.services" in graph["django_brex_oauth.tasks"]
    assert "django_brex_oauth.services" in graph[
        "django_brex_oauth.management.commands.brex_oauth_check"]
    # A module's own packages are not edges (they are being imported already).
    assert "django_brex_oauth" not in graph["django_brex_oauth.services.refresh"]


def test_the_cycle_finder_finds_and_prints_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_services_never_import_the_tasks():
    # Services queue tasks by name (services/queue.py); tasks import services.
    importers = sorted(
        item.module for item in _all_imports()
        if item.module.startswith(f"{PACKAGE}.services")
        and f"{PACKAGE}.tasks" in _targets(item.module, item.node)
    )
    assert importers == []


#: The protocol layer (see docs/architecture.rst): HTTP, OAuth and OpenID Connect, discovery.
PROTOCOL = {f"{PACKAGE}.{name}" for name in ("http", "oauth", "id_token", "discovery")}
#: What the protocol layer may import from the package: itself and the leaf modules.
BELOW_PROTOCOL = PROTOCOL | {
    PACKAGE, *(f"{PACKAGE}.{name}" for name in ("__about__", "conf", "exceptions", "backoff"))
}


def test_the_protocol_layer_imports_nothing_above_it():
    upward = sorted(
        f"{item.module} imports {target}"
        for item in _all_imports() if item.module in PROTOCOL
        for target in _targets(item.module, item.node) if target not in BELOW_PROTOCOL
    )
    assert upward == []


def test_few_imports_inside_functions_each_with_its_reason():
    hidden = function_level_imports()
    listing = "\n".join(_where(item) + f"   # {_reason(item) or 'NO REASON'}" for item in hidden)
    assert len(hidden) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(hidden)} imports inside functions (at most {MAX_FUNCTION_LEVEL_IMPORTS}):\n"
        + listing
    )
    unexplained = [_where(item) for item in hidden if not _reason(item)]
    assert not unexplained, (
        "imports inside functions need a comment saying why:\n" + "\n".join(unexplained)
    )


def test_the_function_import_count_sees_nested_and_method_imports(tmp_path):
    source = (
        "import os\n"
        "if TYPE_CHECKING:\n    import typing\n"
        "def f():\n    import json  # noqa: F401\n"
        "class C:\n    def m(self):\n        # the models load after the app configs\n"
        "        from . import models\n"
    )
    tree = ast.parse(source)
    found = _imports(PACKAGE, tree)
    assert [(ast.unparse(i.node), i.in_function) for i in found] == [
        ("import os", False), ("import json", True), ("from . import models", True),
    ]


#: The longest a module of the package may be, in lines.
MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines():
    too_long = sorted(
        f"{name}: {lines} lines"
        for name, lines in (
            (path.relative_to(PACKAGE_DIR.parent), len(path.read_text().splitlines()))
            for path in MODULES.values()
        )
        if lines > MAX_MODULE_LINES
    )
    assert not too_long, (
        f"modules over {MAX_MODULE_LINES} lines (split them by job):\n" + "\n".join(too_long)
    )


ARCHITECTURE_PAGE = PACKAGE_DIR.parent / "docs" / "architecture.rst"


#: Families of modules the page names together, as ``prefix*``.
FAMILIES = ("admin_", "services/webhook_")


def test_the_architecture_page_places_every_module():
    # Each module of the app (the package's top level and its services) has its place on
    # docs/architecture.rst, by name or in a family such as ``admin_*``.
    page = ARCHITECTURE_PAGE.read_text()
    names = sorted(
        name.removeprefix(PACKAGE + ".").replace(".", "/")
        for name, path in MODULES.items()
        if path.name != "__init__.py" and path.stem != "__about__"
        and (name.count(".") == 1 or name.startswith(f"{PACKAGE}.services."))
    )
    missing = [
        name for name in names
        if f"``{name}``" not in page
        and not any(name.startswith(f) and f"``{f}*``" in page for f in FAMILIES)
    ]
    assert "services/refresh" in names and "oauth" in names
    assert not missing, "not on docs/architecture.rst: " + ", ".join(missing)
