"""The layout's import rules, read from the source (every import counts: module level, inside functions,
and under ``if TYPE_CHECKING:``).

- no import cycle inside the engine (a part that needs the facade's type takes kvstore.ports.Engine);
- engine parts in layers (LAYERS): a module imports its own part or parts of its layer or below;
- no module reaches another module's private members; no engine part imports the facade; engine modules
  stay within 400 lines;
- the engine (``kvstore``) never imports the HTTP server, the SDK, the CLI, tests or benchmarks;
- the server never imports the CLI, tests or benchmarks;
- the SDK (``kvrag_client``) imports only the standard library, its declared dependencies and itself;
- benchmarks never import tests (builders they share live in ``kvstore.testing`` and ``server.testing``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level names the SDK may import: its own package and what client/pyproject.toml declares
# (httpx, pydantic; mcp, langchain-core and llama-index-core as extras).
SDK_ALLOWED = {"kvrag_client", "httpx", "pydantic", "mcp", "langchain_core", "llama_index"}

FORBIDDEN: dict[str, set[str]] = {
    "kvstore": {"server", "kvrag_client", "kvrag", "tests", "bench"},
    "server": {"kvrag", "tests", "bench"},
    "bench": {"tests"},
}


def imported_tops(path: Path) -> set[str]:
    """Top-level package names ``path`` imports, anywhere in the file (relative imports are its own package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    tops: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def sources(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(imported_tops(path) & FORBIDDEN[package])
        for path in sources(ROOT / package)
    }
    bad = {path: names for path, names in bad.items() if names}
    assert bad == {}, f"{package} imports what its layer may not: {bad}"


def test_the_sdk_imports_only_its_declared_dependencies() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = {
        str(path.relative_to(ROOT)): sorted(imported_tops(path) - stdlib - SDK_ALLOWED)
        for path in sources(ROOT / "client" / "kvrag_client")
    }
    bad = {path: names for path, names in bad.items() if names}
    assert bad == {}, f"the SDK imports undeclared packages: {bad}"


def engine_graph() -> dict[str, set[str]]:
    """kvstore module -> the kvstore modules it imports (a package import counts as its ``__init__``)."""
    graph: dict[str, set[str]] = {}
    for path in sources(ROOT / "kvstore"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        package = parts[:-1]  # what a relative import of this file starts from
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else ()
                module = ".".join([*base, *([node.module] if node.module else [])])
                deps.add(module)
                deps.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = deps
    return {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_engine_has_no_import_cycle() -> None:
    graph = engine_graph()
    assert len(graph) > 20  # the reader found the engine
    assert cycles(graph) == []


def test_the_graph_reads_relative_imports() -> None:
    assert "kvstore.model.attention_bias" in engine_graph()["kvstore.model.runner"]


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The reader is not vacuous: an import under TYPE_CHECKING and one inside a function both count."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from server.app import create_app\n"
        "def f():\n    import kvrag.cli\n"
    )
    assert {"server", "kvrag", "typing"} <= imported_tops(src)


# Private members of third-party objects the engine must set or read: transformers keeps the attention
# implementation only in a private config field, and a tiny test tokenizer is built from its backend.
THIRD_PARTY_PRIVATE = {"_attn_implementation", "_attn_implementation_internal", "_tokenizer"}
MAX_ENGINE_MODULE_LINES = 400


def private_reaches(path: Path) -> set[str]:
    """Private attributes ``path`` reads or writes on anything but ``self``/``cls``, less those it defines."""
    tree = ast.parse(path.read_text())
    defined = {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
    defined |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) for t in [n.target]
                if isinstance(t, ast.Name)}
    reached = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            reached.add(node.attr)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvstore"):
            reached.update(a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__"))
    return reached - defined - THIRD_PARTY_PRIVATE


@pytest.mark.parametrize("package", ["kvstore", "server", "kvrag", "bench"])
def test_no_module_touches_another_modules_private_members(package: str) -> None:
    bad = {str(p.relative_to(ROOT)): sorted(r) for p in sources(ROOT / package) if (r := private_reaches(p))}
    assert bad == {}


def test_the_private_reader_sees_a_reach(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from kvstore.x import _helper\nclass A:\n    def f(self, store):\n"
                   "        self._mine = 1\n        return store._bank, self._mine\n")
    assert private_reaches(src) == {"_helper", "_bank"}


def test_no_engine_part_imports_the_facade() -> None:
    graph = engine_graph()
    importers = sorted(name for name, deps in graph.items() if "kvstore.bank" in deps)
    assert importers == []


# Engine parts by layer: a module may import its own part and parts of a lower or equal layer, never a higher one
# (docs/DESIGN.md, "Layers"). Leaves first; the facade last.
LAYERS: dict[str, int] = {
    "types": 0, "errors": 0, "config": 0, "lru": 0,
    "storage": 1, "codec": 1,
    "model": 2,
    "memory": 3, "ports": 3, "testing": 3,
    "banks": 4, "ingest": 4, "query": 4, "sessions": 4, "contextmap": 4,
    "bank": 5,
}


def part_of(module: str) -> str:
    """``kvstore.memory.tiers`` -> ``memory``; ``kvstore.bank`` -> ``bank``; ``kvstore`` -> ``kvstore``."""
    return module.split(".")[1] if "." in module else module


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} -> {dep}" for name, deps in graph.items() for dep in deps
                  if part_of(name) in LAYERS and LAYERS.get(part_of(dep), 0) > LAYERS[part_of(name)])


def test_every_engine_part_has_a_layer() -> None:
    parts = {part_of(name) for name in engine_graph()} - {"kvstore"}
    assert parts == set(LAYERS)


def test_engine_parts_import_only_their_layer_or_below() -> None:
    assert upward_imports(engine_graph()) == []


def test_the_layer_rule_sees_an_upward_import() -> None:
    graph = {"kvstore.storage.catalog": {"kvstore.sessions.rows"}, "kvstore.sessions.rows": {"kvstore.types"}}
    assert upward_imports(graph) == ["kvstore.storage.catalog -> kvstore.sessions.rows"]


def test_engine_modules_stay_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sources(ROOT / "kvstore")}
    assert len(sizes) > 40
    assert {p: n for p, n in sizes.items() if n > MAX_ENGINE_MODULE_LINES} == {}


def test_the_public_entry_points_stay_where_the_readme_shows_them() -> None:
    from kvstore.bank import BankStore
    from kvstore.config import Settings

    readme = (ROOT / "README.md").read_text()
    assert "from kvstore.bank import BankStore" in readme and "from kvstore.config import Settings" in readme
    assert callable(BankStore) and callable(Settings)
