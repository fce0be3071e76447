"""The layout targets, held from now on: no module under ``salm/`` longer than 600 lines, no function or method
longer than 100, no import circle among salm's modules.

Files that broke a target when it was set are listed below with their size then: a listed file may shrink but
not grow, and the list must shrink as they are split (a file back within the target fails until it is removed
from the list). Every ``import`` statement counts, at module level or inside a function, because a circle
through a function-level import is still a circle a reader has to untangle. (That no library module imports
argparse or the command layer is held by ``tests/test_entry_points.py``.)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100

# being split: {path relative to the repository: its length in lines when the target was set}
KNOWN_LONG_MODULES: dict[str, int] = {}  # none today
# being split: {"path::qualified.name": its length in lines when the target was set} (none today)
KNOWN_LONG_FUNCTIONS: dict[str, int] = {}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every ``.py`` file of ``package`` under ``root``."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def module_lengths(root: Path, package: str) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in module_names(root, package).values()
    }


def function_lengths(root: Path, package: str) -> dict[str, int]:
    """{"path::Class.method" or "path::outer.inner": end_lineno - lineno + 1} for every function."""
    out = {}

    def visit(node: ast.AST, rel: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{rel}::{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
                visit(child, rel, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, rel, f"{prefix}{child.name}.")
            else:
                visit(child, rel, prefix)

    for path in module_names(root, package).values():
        visit(ast.parse(path.read_text(encoding="utf-8")), path.relative_to(root).as_posix(), "")
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The modules of ``known`` that one import statement in ``module`` names.

    ``from x import y`` is module ``x.y`` when that is a module, else ``x``; a relative import is resolved
    against ``module``'s package; a name that is no module of ``known`` counts as its nearest known parent.
    """
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    else:
        return
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            yield target


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its body}, without a submodule's imports of the
    packages it lives in (importing a submodule runs its parents first anyway: that is no circle)."""
    names = module_names(root, package)
    known = set(names)
    graph: dict[str, set[str]] = {m: set() for m in names}
    for module, path in names.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, module, is_package, known):
                if target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), as ``[a, b, ..., a]``, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(_circle_in(group, graph) for group in groups)


def _circle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest circle through the group's first module, staying inside the group (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # a strongly connected group always has one


def _over(lengths: dict[str, int], limit: int, known: dict[str, int], what: str) -> list[str]:
    problems = []
    for name, n in sorted(lengths.items()):
        ceiling = known.get(name)
        if n > limit and ceiling is None:
            problems.append(f"{name}: {n} lines (a {what} may have at most {limit})")
        elif ceiling is not None and n > ceiling:
            problems.append(f"{name}: {n} lines, grown past the {ceiling} it had when listed as being split")
    for name in sorted(known):
        if name not in lengths or lengths[name] <= limit:
            problems.append(f"{name}: within {limit} lines now (or gone): remove it from the known exceptions")
    return problems


# ----------------------------------------------------------------------------------------------------
# The targets on salm/
# ----------------------------------------------------------------------------------------------------


def test_no_module_is_longer_than_600_lines():
    problems = _over(module_lengths(REPO, "salm"), MAX_MODULE_LINES, KNOWN_LONG_MODULES, "module")
    assert problems == [], "\n".join(problems)


def test_no_function_is_longer_than_100_lines():
    problems = _over(function_lengths(REPO, "salm"), MAX_FUNCTION_LINES, KNOWN_LONG_FUNCTIONS, "function")
    assert problems == [], "\n".join(problems)


def test_no_import_circle_among_salms_modules():
    graph = import_graph(REPO, "salm")
    assert "salm.evaluation.runner" in graph and "salm.evaluation.modes" in graph["salm.evaluation.runner"]
    cycles = import_cycles(graph)
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(circle) for circle in cycles)


# ----------------------------------------------------------------------------------------------------
# The checks themselves find what they look for
# ----------------------------------------------------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_circle_through_a_function_level_relative_import_is_found(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import b\n",  # counts; b's import of its parent package does not
            "pkg/a.py": "import pkg.sub.b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "from . import c\nimport pkg\n",
            "pkg/sub/c.py": "def f():\n    from ..a import thing\n    from .. import a\n",
            "pkg/d.py": "from pkg import sub\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert graph == {
        "pkg": {"pkg.sub.b"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},
        "pkg.d": {"pkg.sub"},
    }
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]


def test_long_modules_and_functions_are_found_and_listed_ones_may_not_grow(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(99))
    root = _package(tmp_path, {"pkg/__init__.py": "", "pkg/m.py": f"class C:\n    def f(self):\n{body}"})
    functions = function_lengths(root, "pkg")
    assert functions == {"pkg/m.py::C.f": 100}
    assert _over(functions, 99, {}, "function") == ["pkg/m.py::C.f: 100 lines (a function may have at most 99)"]
    assert _over(functions, 99, {"pkg/m.py::C.f": 100}, "function") == []
    assert _over(functions, 99, {"pkg/m.py::C.f": 99}, "function") == [
        "pkg/m.py::C.f: 100 lines, grown past the 99 it had when listed as being split"
    ]
    assert module_lengths(root, "pkg") == {"pkg/__init__.py": 0, "pkg/m.py": 101}
    assert _over(module_lengths(root, "pkg"), 200, {"pkg/m.py": 101}, "module") == [
        "pkg/m.py: within 200 lines now (or gone): remove it from the known exceptions"
    ]
