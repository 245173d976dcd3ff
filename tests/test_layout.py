"""The package shape the README describes: imagery/ is read by everyone and reads no one's results."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def _engine_imports(path: Path) -> set[str]:
    """Dotted engine modules imported by ``path`` (relative imports resolved), at any depth of the file."""
    package = ".".join(path.relative_to(ENGINE.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if mod.startswith("engine"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("engine"))
    return out


def test_imagery_depends_only_on_foundations() -> None:
    allowed = (
        "engine.imagery",
        "engine.errors",
        "engine.geo",
        "engine.progress",
        "engine.atomic",
        "engine.output_guard",
    )
    for path in (ENGINE / "imagery").glob("*.py"):
        bad = {
            m
            for m in _engine_imports(path)
            if m not in ("engine", "engine.__version__") and not m.startswith(allowed)
        }
        assert not bad, f"{path.name} imports {sorted(bad)}: imagery must not depend on what reads it"


def test_no_import_cycle_inside_imagery() -> None:
    graph = {}
    for path in (ENGINE / "imagery").glob("*.py"):
        name = f"engine.imagery.{path.stem}"
        graph[name] = {m for m in _engine_imports(path) if m.startswith("engine.imagery.") and m != name}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    seen: dict[str, int] = {}

    def visit(node: str, stack: tuple[str, ...]) -> None:
        if seen.get(node) == 2:
            return
        assert seen.get(node) != 1, f"import cycle: {' -> '.join((*stack, node))}"
        seen[node] = 1
        for nxt in graph[node]:
            if not nxt.endswith("__init__"):
                visit(nxt, (*stack, node))
        seen[node] = 2

    for node in graph:
        visit(node, ())


def test_old_homes_are_gone() -> None:
    for old in ("imageio.py", "tiles", "index_store.py", "faiss_index.py", "search_area.py", "retrieval.py"):
        assert not (ENGINE / old).exists(), f"engine/{old} moved; the README's layout says where"
