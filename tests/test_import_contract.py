"""Who may import whom (the README's Layout table), read off the import statements (`tests/test_import_cycles.py`
builds the graph): the engine depends on nothing of ours, the API on neither the engine (but its torch-free job
spec) nor the workers, the stores on neither the API nor the engine, the workers on the engine and the stores
only; and nothing the API, the stores or the client load imports torch, directly or through a module of ours."""

from __future__ import annotations

import ast

import pytest

from tests.test_import_cycles import import_graph, modules

# package prefix -> the prefixes of ours its modules may import (their own always)
MAY_IMPORT = {
    "prunery.core": (),
    "prunery.service.store": (),
    "prunery.service.api": ("prunery.service.store", "prunery.core.spec", "prunery.spec_proto"),
    "prunery.worker": ("prunery.core", "prunery.service.store"),
    "prunery.migrations": ("prunery.service.store",),
    "prunery.v1": (),
}
TORCH_FREE = ("prunery.service", "prunery.core.spec", "prunery.spec_proto", "prunery.client")
HEAVY = ("torch", "numpy", "scipy", "safetensors")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _owner(name: str) -> str | None:
    matches = [p for p in MAY_IMPORT if _within(name, p)]
    return max(matches, key=len) if matches else None


def test_each_layer_imports_only_what_the_layout_allows() -> None:
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        owner = _owner(module)
        if owner is None:
            continue
        allowed = (owner, *MAY_IMPORT[owner])
        wrong += [f"{module} imports {t}" for t in sorted(targets)
                  if not any(_within(t, a) for a in allowed) and not t == "prunery"]
    assert not wrong, "\n".join(wrong)


def _third_party(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("root", TORCH_FREE)
def test_the_torch_free_parts_reach_no_torch(root: str) -> None:
    """Every module of ours the root reaches (at module level or late) imports none of torch, numpy, scipy."""
    graph, found = import_graph(), modules()
    reached = {m for m in graph if _within(m, root)}
    frontier = list(reached)
    while frontier:
        for target in graph[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached, root
    heavy = sorted(f"{m} imports {lib}" for m in reached for lib in _third_party(found[m][0]) & set(HEAVY))
    assert not heavy, "\n".join(heavy)
