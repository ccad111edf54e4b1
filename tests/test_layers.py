"""The package's imports point one way: pure functions <- models <- checkpoint <- data <- train <- jobs <- cli.

Walks every module's imports with :mod:`ast` (including imports inside functions, which are still dependencies) and
fails on any import against the layer order or any cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "milan"
LAYERS = ["pure", "models", "checkpoint", "data", "train", "jobs", "cli"]
TOP = {"cli": "cli", "__main__": "cli"}  # top-level modules above the pure layer (and the package facade, below)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package facade (milan/__init__.py re-exports the public API)
        return LAYERS.index("cli")
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return LAYERS.index(TOP.get(parts[1], "pure"))


def imports(path: Path, module: str) -> set[str]:
    """The ``milan`` modules a file imports (``from milan.x import y`` counts ``milan.x.y`` if it is a module)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "milan")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "milan":
                continue
            if base != "milan":  # `from milan import distributed` is an import of milan.distributed, not the facade
                out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports(p, m) if i in files and i != m} for m, p in files.items()}


def test_imports_follow_the_layer_order() -> None:
    against = sorted(f"{m} ({LAYERS[layer(m)]}) imports {i} ({LAYERS[layer(i)]})"
                     for m, deps in graph().items() for i in deps if layer(i) > layer(m))  # fmt: skip
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_what_it_checks() -> None:
    """The checker itself: it finds the known edges and classifies modules into their layers."""
    g = graph()
    assert "milan.models.vit" in g["milan.models.milan"]
    assert layer("milan.masking") == 0 and layer("milan.jobs.pretrain") == LAYERS.index("jobs")
    assert layer("milan.cli") == LAYERS.index("cli")
