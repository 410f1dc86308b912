"""The house rules on structure, checked from the source: no import circles among edgecl's modules, the runtime
never reaches training, export, the CLI or torch, library code never imports the CLI, and no file grows past 450
lines. Imports are read with `ast` (inside functions too), so a lazy import counts like a top-level one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import edgecl

ROOT = Path(edgecl.__file__).parent
MAX_LINES = 450
RUNTIME_MUST_NOT_REACH = ("edgecl.export", "edgecl.train", "edgecl.commands")
# The dispatcher imports the chosen command by name (importlib), which is its whole job.
CLI_DISPATCHER = "edgecl.cli"

Graph = dict[str, tuple[set[str], set[str]]]  # module → (modules of the package it imports, other top-level packages)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def scan(root: Path) -> tuple[dict[str, Path], Graph]:
    """Every module of the package at `root` and its imports (including those inside functions)."""
    top = root.name

    def module_name(path: Path) -> str:
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {module_name(p): p for p in sorted(root.rglob("*.py"))}

    def resolve(name: str) -> str | None:
        """The module an import names: itself, or its longest prefix that is a module (`from edgecl.arch import
        preset` names `edgecl.arch`)."""
        while name:
            if name in files:
                return name
            name = name.rpartition(".")[0]
        return None

    def imports(module: str) -> tuple[set[str], set[str]]:
        path = files[module]
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        ours, others = set(), set()

        def add(name: str) -> None:
            if _within(name, top):
                target = resolve(name)
                if target is not None and target != module:
                    ours.add(target)
            else:
                others.add(name.split(".")[0])

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `from . import x` / `from ..y import z`
                    parts = package.split(".")
                    origin = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{origin}.{alias.name}"
                    add(full if full in files else origin)
        return ours, others

    return files, {m: imports(m) for m in files}


def circles(graph: Graph) -> list[list[str]]:
    """One concrete circle through every group of modules that import each other (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v][0]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_circle_in(graph, c) for c in components]


def _circle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths, frontier = {start: [start]}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v][0] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no circle in {component}")  # impossible for a strongly connected component


def reachable(graph: Graph, module: str) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for w in graph[todo.pop()][0] - seen:
            seen.add(w)
            todo.append(w)
    return seen


FILES, GRAPH = scan(ROOT)


def test_the_walker_resolves_relative_lazy_and_attribute_imports_and_finds_circles(tmp_path):
    """The checks below on a package made for the purpose, so they cannot pass by seeing nothing."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {"__init__.py": "", "a.py": "from . import b\n",
               "b.py": "import numpy\ndef later():\n    from .sub.c import thing\n",
               "sub/__init__.py": "", "sub/c.py": "from ..a import something\nfrom pkg.sub import d\n",
               "sub/d.py": "import torch.nn\n"}
    for name, text in sources.items():
        (pkg / name).write_text(text)
    files, graph = scan(pkg)
    assert set(files) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    assert graph["pkg.a"][0] == {"pkg.b"} and graph["pkg.b"] == ({"pkg.sub.c"}, {"numpy"})
    assert graph["pkg.sub.c"][0] == {"pkg.a", "pkg.sub.d"} and graph["pkg.sub.d"][1] == {"torch"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert reachable(graph, "pkg.a") == {"pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d"}
    assert "edgecl.train.pipeline" in GRAPH["edgecl.commands.train"][0]  # and on edgecl itself: a lazy import


def test_no_import_circles():
    found = circles(GRAPH)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(m for m in FILES if _within(m, "edgecl.runtime")))
def test_runtime_never_reaches_training_export_cli_or_torch(module):
    """Followed through every module the runtime imports, directly or not: a device install has no torch."""
    reached = reachable(GRAPH, module)
    bad = sorted(m for m in reached if any(_within(m, p) for p in RUNTIME_MUST_NOT_REACH))
    assert not bad, f"{module} reaches {bad}"
    with_torch = sorted(m for m in reached if "torch" in GRAPH[m][1])
    assert not with_torch, f"{module} reaches torch through {with_torch}"


def test_only_commands_import_the_cli():
    offenders = sorted(m for m, (ours, _) in GRAPH.items() if not _within(m, "edgecl.commands")
                       and m != CLI_DISPATCHER and any(_within(t, "edgecl.commands") for t in ours))
    assert not offenders, f"library modules importing edgecl.commands: {offenders}"


def test_every_file_is_at_most_450_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in FILES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
