"""No import circle among our modules: every `import` statement of `core/`, `service/`, `worker/`, `migrations/`
and `prunery/` (not the generated `prunery/v1/`), at module level or inside a function, read with `ast` and
resolved through the package map of pyproject (`prunery.core` is `core/`, ...), makes one edge; the graph has no
cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> folder (pyproject's [tool.setuptools.package-dir])
    "prunery.core": "core",
    "prunery.service": "service",
    "prunery.worker": "worker",
    "prunery.migrations": "migrations",
    "prunery": "prunery",
}
EXCLUDED = ("prunery/v1",)  # generated from protos/

def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package), for every Python file of ours."""
    found: dict[str, tuple[Path, bool]] = {}
    for package, folder in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel.startswith(ex + "/") for ex in EXCLUDED):
                continue
            parts = path.relative_to(base).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if name in found:  # a folder mapped to a package of its own (none today) is read once, under that name
                continue
            found[name] = (path, is_package)
    return found


def _ours(name: str, known: dict) -> str | None:
    """The deepest module of ours that `import name` runs (`prunery.core.graph` for `prunery.core.graph.X`)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def imports(name: str, path: Path, is_package: bool, known: dict) -> set[str]:
    """The modules of ours that module `name` imports, anywhere in its body (functions, `TYPE_CHECKING` blocks,
    try/except included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name, known)
                if target:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one; else a name of `pkg`
                target = _ours(f"{base}.{alias.name}", known) if alias.name != "*" else None
                if target != f"{base}.{alias.name}":
                    target = _ours(base, known)
                if target:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, is_pkg, known) for name, (path, is_pkg) in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (m0, m1, ..., m0) of the directed graph, or None (iterative depth-first search)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = black
                stack.pop()
                path.pop()
            elif colour.get(child, black) == grey:
                return path[path.index(child):] + [child]
            elif colour.get(child, black) == white:
                colour[child] = grey
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_module_map_reads_our_packages() -> None:
    graph = import_graph()
    assert "prunery.core.graph" in graph and "prunery.core.rules" in graph and "prunery.cli" in graph
    assert not any(m.startswith("prunery.v1") for m in graph)
    # the reader resolves relative, absolute and function-level imports
    assert "prunery.core.rules" in graph["prunery.core.graph"]
    assert "prunery.core.tensors" in graph["prunery.core.graph"]


def test_the_rules_do_not_import_the_graph() -> None:
    graph = import_graph()
    rule_modules = [m for m in graph if m == "prunery.core.rules" or m.startswith("prunery.core.rules.")]
    assert len(rule_modules) > 5
    for m in rule_modules:
        assert "prunery.core.graph" not in graph[m], m
        assert all(t.startswith("prunery.core.rules") or t == "prunery.core.builder" for t in graph[m]), (m, graph[m])


def test_core_has_no_import_cycle() -> None:
    graph = import_graph()
    core = {m: {t for t in ts if t.startswith("prunery.core.") or t == "prunery.core"}
            for m, ts in graph.items() if m.startswith("prunery.core.") or m == "prunery.core"}
    cycle = find_cycle(core)
    assert cycle is None, "import cycle in core/: " + " -> ".join(cycle or [])


def test_no_import_cycle_in_the_project() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
