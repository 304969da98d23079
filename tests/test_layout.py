"""The layout the docs promise (docs/architecture.md): packages point down only (ptq <- qaft <-
compare <- recipes), no module imports itself back through others, no package file passes 400
lines. Imports are read from the source (module level and inside functions alike), so this
fails on the commit that adds a circle, whatever runs first."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ptq", "qaft", "compare", "recipes")  # each may import only those before it
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The toolkit's modules that `name` imports: `from a.b import c` is a.b.c when that is a
    module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_packages_point_down_only():
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert not upward, f"imports that point up the layers {LAYERS}: {upward}"


def find_circles(g: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the circle it closes ("a -> b -> a")."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path = path + [node]
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path)
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    return circles


def test_no_import_circles_between_modules():
    # package __init__ files are re-export hubs (every submodule is reachable through them), so
    # the circles that matter are between the modules that hold code
    def hub(m):
        return (ROOT / m.replace(".", "/") / "__init__.py").is_file()

    g = {a: {b for b in targets if not hub(b)} for a, targets in graph().items() if not hub(a)}
    circles = find_circles(g)
    assert not circles, f"import circles: {circles}"


def test_no_package_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these files (at most {MAX_LINES} lines each): {long}"


def test_the_checks_would_see_a_circle_and_the_real_arrows():
    """The reader above is not blind: it finds a planted circle, and the toolkit's known arrows."""
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_circles({"a": {"b"}, "b": set()}) == []
    g = graph()
    assert "ptq.sequential" in g["ptq.apply"]  # apply drives the block-by-block driver
    assert "ptq.records" in g["ptq.sequential"]
    assert "recipes.shared.common" in g["recipes.misalignment.recipe"]
    assert "recipes.misalignment.plots" in g["recipes.misalignment.report"]  # relative-free
    assert "qaft.train_config" in g["qaft.schedules"]
