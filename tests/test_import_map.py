"""docs/ARCHITECTURE.md's folder map, checked: every import of every module of the package (module level, inside
functions, under TYPE_CHECKING, relative or absolute) is read with `ast`, and an edge the map forbids, or an import
cycle between modules, fails with the file and line that makes it.

The map (who may import whom; a folder may always import itself):
    common/      -> nothing else (shared by the rollout actors and the learner)
    actors/      -> common/
    learner/     -> common/
    dopd/        -> common/, actors/, learner/ (the wiring: loop, backends, CLI, data loading)
    experiments/ -> dopd/, common/ (users of the public API, their own entry point)
    dashboards/  -> dopd/, common/
Nothing in the core (common, actors, learner, dopd) imports experiments/ or dashboards/.

An edge is explicit: `import a.b` and `from a.b import name` are edges to a.b; `from a import b` where b is a
module is an edge to a.b (and to a only if a name defined in a itself is taken). A module named as a string and
imported with importlib is an edge as well; `PLUGINS` lists the only ones allowed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package (pyproject.toml's package-dir)
FOLDERS = {
    "common": "dopd.common",
    "actors": "dopd.actors",
    "learner": "dopd.learner",
    "dopd": "dopd",
    "experiments": "dopd.experiments",
    "dashboards": "dopd.dashboards",
}
ALLOWED = {
    "common": {"common"},
    "actors": {"actors", "common"},
    "learner": {"learner", "common"},
    "dopd": {"dopd", "common", "actors", "learner"},
    "experiments": {"experiments", "dopd", "common"},
    "dashboards": {"dashboards", "dopd", "common"},
}
# modules named by string and imported at run time: (importing module, imported module) -> why
PLUGINS = {
    ("dopd.common.load", "dopd.learner.objectives"): "config resolution reads the objective registry by name",
}
# cycles known and owned elsewhere, each allowed only exactly as listed (the test fails once it changes or is gone,
# so the entry must then be removed): the objectives' package registers its submodules, which import `register`
# from the package (learner/objectives/, being reworked by the drafter-kind / objective work of issue 30 item 5)
KNOWN_CYCLES = {
    frozenset(
        {
            "dopd.learner.objectives",
            "dopd.learner.objectives.dvi",
            "dopd.learner.objectives.e2e_tv",
            "dopd.learner.objectives.expected_length",
            "dopd.learner.objectives.opd",
        }
    ),
}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # path:line


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package __init__) for every module of the installed package."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = list(f.relative_to(root / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = (f, is_pkg)
    return out


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "dopd" else "dopd"


def _base(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def edges(mods: dict[str, tuple[Path, bool]]) -> list[Edge]:
    out = []
    for name, (path, is_pkg) in mods.items():
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, is_pkg, node)
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in mods]
                if len(targets) < len(subs):  # a name defined in the module `base` itself
                    targets.append(base)
            elif _is_import_module(node):
                targets = _named(path, node)
            for t in targets:
                # `import dopd.common.x.y` may name a module or an object in one: the longest module prefix
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    out.append(Edge(name, t, f"{rel}:{node.lineno}"))
    return out


def _is_import_module(node: ast.AST) -> bool:
    """importlib.import_module(...) or import_module(...)"""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == "import_module"


def _named(path: Path, call: ast.Call) -> list[str]:
    """The dopd module names an import_module call passes: a string literal, or a module-level string constant."""
    names = []
    for n in ast.walk(call):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            names.append(n.value)
        elif isinstance(n, ast.Name):
            names += _constant(path, n.id)
    return [n for n in names if n.startswith("dopd")]


def _constant(path: Path, name: str) -> list[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return [node.value.value]
    return []


def plugin_edges(mods) -> set[tuple[str, str]]:
    """(src, dst) of every string-named import (importlib), to check them against PLUGINS."""
    found = set()
    for name, (path, _) in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if _is_import_module(node):
                found |= {(name, v) for v in _named(path, node)}
    return found


def forbidden(es: list[Edge], plugins=PLUGINS) -> list[str]:
    bad = []
    for e in es:
        a, b = folder_of(e.src), folder_of(e.dst)
        if b not in ALLOWED[a] and (e.src, e.dst) not in plugins:
            bad.append(f"{e.where}: {e.src} imports {e.dst} ({a}/ may import only {', '.join(sorted(ALLOWED[a]))})")
    return bad


def cycles(es: list[Edge]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in es:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe(cycle: frozenset[str], es: list[Edge]) -> str:
    inside = [f"{e.src} -> {e.dst} ({e.where})" for e in es if e.src in cycle and e.dst in cycle]
    return "import cycle: " + "; ".join(sorted(inside))


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, edges(mods)


def test_every_folder_is_mapped_and_read(graph):
    mods, es = graph
    assert {folder_of(m) for m in mods} == set(FOLDERS)
    # the walk sees the imports it must: a function-level one, a relative one, a TYPE_CHECKING one
    pairs = {(e.src, e.dst) for e in es}
    assert ("dopd.train", "dopd.local") in pairs  # inside backend_for()
    assert ("dopd.common.drafters", "dopd.common.drafters.eagle3") in pairs  # `from . import eagle3, ...`
    assert ("dopd.common.drafters.base", "dopd.common.record") in pairs  # under TYPE_CHECKING
    assert len(es) > 200


def test_no_forbidden_edge(graph):
    _, es = graph
    bad = forbidden(es)
    assert not bad, "imports the map (docs/ARCHITECTURE.md) forbids:\n" + "\n".join(bad)


def test_plugins_are_exactly_the_listed_ones(graph):
    mods, _ = graph
    assert plugin_edges(mods) == set(PLUGINS)


def test_no_import_cycle(graph):
    _, es = graph
    found = cycles(es)
    new = [describe(c, es) for c in found if c not in KNOWN_CYCLES]
    assert not new, "\n".join(new)
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"a known cycle is gone or changed, remove it from KNOWN_CYCLES: {gone}"


def test_the_checks_catch_an_injected_edge_and_cycle(tmp_path):
    """A copy of two folders with a forbidden edge and a cycle written in: both are reported."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "common" / "a.py").write_text("def f():\n    from dopd.learner import b  # function-level\n")
    (tmp_path / "learner" / "b.py").write_text("from dopd.common import a\n")
    (tmp_path / "common" / "c.py").write_text("from . import d\n")
    (tmp_path / "common" / "d.py").write_text("if True:\n    from .c import x\n")
    mods = modules(tmp_path)
    es = edges(mods)
    bad = forbidden(es)
    assert len(bad) == 1 and "dopd.common.a imports dopd.learner.b" in bad[0] and "a.py:2" in bad[0]
    assert sorted(sorted(c) for c in cycles(es)) == [
        ["dopd.common.a", "dopd.learner.b"],
        ["dopd.common.c", "dopd.common.d"],
    ]
