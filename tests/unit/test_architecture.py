"""ARCHITECTURE.md against the package: it names every module of grpokit/ and no module that is gone, and the import
rules between layers hold, read from each module's import statements (module level, in functions, under
TYPE_CHECKING alike)."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "grpokit"
DOC = ROOT / "ARCHITECTURE.md"
# a module is named by its path from the repository root, in backquotes: `grpokit/train/trainer.py`
NAMED = re.compile(r"`(grpokit/[\w/]+\.py)`")
TOP = {"grpokit/cli.py", "grpokit/api.py", "grpokit/__init__.py", "grpokit/__main__.py"}


@dataclass(frozen=True, slots=True)
class Import:
    """One name an import statement brings in: `target` is dotted (`grpokit.train.state`), `line` its line."""

    module: str
    target: str
    line: int


@dataclass(frozen=True, slots=True)
class Rule:
    """A layer rule: modules `applies` to may not import a target `forbids`."""

    name: str
    applies: Callable[[str], bool]
    forbids: Callable[[str], bool]


def modules() -> list[str]:
    """Every .py file of the package (packages' `__init__.py` included), as a path from the repository root."""
    return sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))


def named_modules(text: str) -> set[str]:
    return set(NAMED.findall(text))


def imports_in(module: str, source: str) -> list[Import]:
    """What `module` (a path such as grpokit/rollout/collect.py) imports, relative imports resolved. A from-import
    gives its module and each name under it, so `from grpokit import cli` is seen as grpokit.cli."""
    parts = module.removesuffix(".py").split("/")
    package = parts[:-1]  # the package a relative import starts from (for __init__.py: the package itself)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                start = package[:len(package) - (node.level - 1)]
                base = ".".join(start + ([base] if base else []))
            found.append(Import(module, base, node.lineno))
            found += [Import(module, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _under(*prefixes: str) -> Callable[[str], bool]:
    """A dotted name at or below one of `prefixes`."""
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


def _in(*packages: str) -> Callable[[str], bool]:
    """A module path inside one of the packages (`grpokit/algo`) or equal to one of the files."""
    return lambda path: any(path == p or path.startswith(p + "/") for p in packages)


RULES = [
    Rule("algo/ imports nothing else of grpokit", _in("grpokit/algo"),
         lambda name: _under("grpokit")(name) and not _under("grpokit.algo")(name)),
    Rule("errors.py and userimport.py import nothing else of grpokit",
         _in("grpokit/errors.py", "grpokit/userimport.py"),
         lambda name: _under("grpokit")(name) and not _under("grpokit.errors", "grpokit.userimport")(name)),
    Rule("config/ imports no torch", _in("grpokit/config"), _under("torch", "transformers")),
    Rule("rewards/, rollout/, observe/, models/, data/ do not import train/",
         _in("grpokit/rewards", "grpokit/rollout", "grpokit/observe", "grpokit/models", "grpokit/data"),
         _under("grpokit.train")),
    Rule("nothing below the top imports cli.py or api.py", lambda path: path not in TOP,
         _under("grpokit.cli", "grpokit.api")),
]


def test_architecture_names_every_module_and_only_modules_that_exist():
    on_disk, named = set(modules()), named_modules(DOC.read_text())
    assert len(on_disk) > 50, on_disk  # the package was found
    missing, gone = sorted(on_disk - named), sorted(named - on_disk)
    assert not missing, f"modules that ARCHITECTURE.md does not name: {missing}"
    assert not gone, f"ARCHITECTURE.md names modules that do not exist: {gone}"


def test_the_import_reader_sees_every_form():
    source = ("import torch\nfrom . import loss\nfrom ..train.state import TrainState\nfrom grpokit import cli\n"
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from grpokit.api import GRPOTrainer\n"
              "def f():\n    import grpokit.train.trainer as t\n")
    targets = {i.target for i in imports_in("grpokit/algo/advantages.py", source)}
    assert {"torch", "grpokit.algo.loss", "grpokit.train.state", "grpokit.train.state.TrainState", "grpokit.cli",
            "grpokit.api.GRPOTrainer", "grpokit.train.trainer"} <= targets, targets
    assert "grpokit.config.x" in {i.target for i in imports_in("grpokit/config/__init__.py", "from .x import y")}


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_layer_rule(rule):
    broken: dict[tuple[str, int], str] = {}  # one entry per statement, its longest name: `from grpokit import cli`
    for module in filter(rule.applies, modules()):
        for i in imports_in(module, (ROOT / module).read_text()):
            if rule.forbids(i.target) and len(i.target) > len(broken.get((i.module, i.line), "")):
                broken[i.module, i.line] = i.target
    assert not broken, f"{rule.name}: " + "; ".join(f"{m}:{n} imports {t}" for (m, n), t in broken.items())


def layer_graph() -> dict[str, set[str]]:
    """Which sub-package imports which other sub-package (the top files and errors.py/userimport.py left out)."""
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    graph: dict[str, set[str]] = {layer: set() for layer in layers}
    for module in modules():
        parts = module.split("/")
        if len(parts) < 3:
            continue
        for i in imports_in(module, (ROOT / module).read_text()):
            target = i.target.split(".")
            if target[0] == "grpokit" and len(target) > 1 and target[1] in layers and target[1] != parts[1]:
                graph[parts[1]].add(target[1])
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_cycle_finder_finds_a_cycle_and_none_where_there_is_none():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_layers_form_one_order():
    graph = layer_graph()
    assert {"algo", "train", "rollout", "evaluation"} <= set(graph), graph
    cycle = cycle_in(graph)
    assert cycle is None, "layers import each other: " + " -> ".join(cycle)


def test_the_order_architecture_md_gives_is_the_import_order():
    text = " ".join(DOC.read_text().split())
    listed = re.search(r"bottom to top: ((?:`\w+`(?:, )?)+)\)", text)
    assert listed, "ARCHITECTURE.md gives no layer order ('bottom to top: `a`, `b`, ...')"
    order = re.findall(r"`(\w+)`", listed.group(1))
    graph = layer_graph()
    assert sorted(order) == sorted(graph), f"the order names {order}; the layers are {sorted(graph)}"
    late = [(a, b) for a in graph for b in graph[a] if order.index(b) > order.index(a)]
    assert not late, f"layers that import a layer listed above them: {late}"
