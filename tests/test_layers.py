"""The package's import graph (built here with ast from the source): no circles among module-level imports,
and none running from a lower layer to a higher one:

    foundation <- models <- codegen <- passes <- core <- api and tools

foundation: config, nodes, opnames, hardware, errors, progress;
core: capture, pipeline, numerics, zoo, cuda_graphs; api and tools: everything else in fxopt/, the package's
__init__ included (it re-exports the API)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (("fxopt", "fxopt"), ("models", "fxopt.models"), ("codegen", "fxopt.codegen"), ("passes", "fxopt.passes"))
FOUNDATION = {"fxopt.config", "fxopt.nodes", "fxopt.opnames", "fxopt.hardware", "fxopt.errors", "fxopt.progress"}
CORE = {"fxopt.capture", "fxopt.pipeline", "fxopt.numerics", "fxopt.zoo", "fxopt.cuda_graphs"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def module_level_imports() -> nx.DiGraph:
    """Edges a -> b for every import of b that runs when a is imported (module body, also under if/try)."""
    mods, graph = modules(), nx.DiGraph()
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        graph.add_node(name)
        body = [n for stmt in tree.body for n in (ast.walk(stmt) if isinstance(stmt, (ast.If, ast.Try)) else [stmt])]
        for node in body:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in mods]
                targets = subs or [node.module]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in mods and t != name)
    return graph


def layer(module: str) -> int:
    if module in FOUNDATION:
        return 0
    for rank, prefix in ((1, "fxopt.models"), (2, "fxopt.codegen"), (3, "fxopt.passes")):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return 4 if module in CORE else 5


def test_module_level_imports_have_no_circles():
    graph = module_level_imports()
    assert graph.number_of_edges() > 50  # the graph was actually built
    assert list(nx.simple_cycles(graph)) == []


def test_no_module_imports_a_higher_layer():
    graph = module_level_imports()
    upward = sorted((a, b) for a, b in graph.edges() if layer(b) > layer(a))
    assert upward == []


def test_every_package_directory_is_listed_in_pyproject():
    """A subpackage missing from pyproject's `packages` imports from a checkout but not once installed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert found == listed
