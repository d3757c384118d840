"""The import graph of the project's own modules, read from the source (every `import`, at module level or inside a
function, except `if TYPE_CHECKING:` blocks): no circle anywhere, and the layers of docs/CODE_MAP.md hold:

    divae.utils  <-  divae  <-  data_pipeline  <-  runtime  <-  trainer, evaluation  <-  scripts, bench

(an arrow points from the importer down to what it imports; `data_pipeline` uses only `divae.utils` and the caption
tokenizer, `runtime` only `divae.utils`; `trainer` and `evaluation` are siblings that share `runtime` and import
nothing of each other, and no package imports `scripts`, `bench` or `tests`)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("divae", "data_pipeline", "runtime", "trainer", "evaluation", "scripts", "bench")

# importer prefix -> the project modules it may import (prefixes); anything else of the project is an upward arrow
ALLOWED = {
    "divae.utils": ("divae.utils",),
    "divae": ("divae",),
    "data_pipeline": ("data_pipeline", "divae.utils", "divae.text_tokenizer"),
    "runtime": ("runtime", "divae.utils"),
    "trainer": ("trainer", "divae", "data_pipeline", "runtime"),
    "evaluation": ("evaluation", "divae", "data_pipeline", "runtime"),
    "scripts": PACKAGES,
    "bench": PACKAGES,
}


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Imported names (`a.b` for `import a.b`, `a.b` and `a.b.c` for `from a.b import c`), skipping the bodies of
    `if TYPE_CHECKING:`."""
    out = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        stack.extend(ast.iter_child_nodes(node))
    return out


@cache
def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        targets = {resolve(t) for t in _runtime_imports(ast.parse(path.read_text(), str(path)))}
        # a package's own __init__ is not an edge to itself or to its parent packages (Python runs them anyway)
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_graph_is_read_from_the_source():
    graph = _graph()
    assert len(graph) > 80
    assert "trainer.checkpoint" in graph["trainer.train"] and "divae.unet" in graph["divae.model"]
    assert "runtime.signals" in graph["trainer.train"] and "runtime.collectives" in graph["evaluation.protocol"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None and _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_upward_import():
    upward = []
    for name, targets in _graph().items():
        layer = max((p for p in ALLOWED if name == p or name.startswith(p + ".")), key=len)
        upward += [f"{name} -> {t}" for t in sorted(targets)
                   if not any(t == a or t.startswith(a + ".") for a in ALLOWED[layer])]
    assert not upward, "\n".join(upward)
