"""Prunery's DepGraph engine (`core/`, imported as `prunery.core`): safe intake, dependency graph, group pruning,
re-export, and the recipe around them.

Imports torch and nothing else of ours. The names below load on first use (PEP 562), so importing the
torch-free `prunery.core.spec` (the job spec, which the API and the client share) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# name -> the module of this package that defines it
_EXPORTS = {
    "Counts": "counting", "count": "counting",
    "Dataset": "data", "DatasetError": "data", "load_dataset": "data",
    "DependencyGraph": "graph", "Group": "graph", "Member": "graph", "build_graph": "graph",
    "PruneConfig": "prune", "PruneError": "prune", "PrunePlan": "prune", "PruneResult": "prune",
    "apply_zeroing": "prune", "prune": "prune", "select": "prune",
    "Recipe": "recipe", "run_recipe": "recipe",
    "ArchiveLoadError": "safe_load", "UnsafeArchiveError": "safe_load", "load_program": "safe_load",
    "vet_archive": "safe_load",
    "IMPORTANCES": "spec", "JobSpec": "spec",
    "Target": "targets", "prune_to_target": "targets",
}

__all__ = [  # the names of _EXPORTS
    "ArchiveLoadError", "Counts", "Dataset", "DatasetError", "DependencyGraph", "Group", "IMPORTANCES", "JobSpec",
    "Member", "PruneConfig", "PruneError", "PrunePlan", "PruneResult", "Recipe", "Target", "UnsafeArchiveError",
    "apply_zeroing", "build_graph", "count", "load_dataset", "load_program", "prune", "prune_to_target",
    "run_recipe", "select", "vet_archive",
]

if TYPE_CHECKING:
    from .counting import Counts, count
    from .data import Dataset, DatasetError, load_dataset
    from .graph import DependencyGraph, Group, Member, build_graph
    from .prune import PruneConfig, PruneError, PrunePlan, PruneResult, apply_zeroing, prune, select
    from .recipe import Recipe, run_recipe
    from .safe_load import ArchiveLoadError, UnsafeArchiveError, load_program, vet_archive
    from .spec import IMPORTANCES, JobSpec
    from .targets import Target, prune_to_target


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # importing the submodule `prunery.core.prune` sets this package's attribute `prune` to that module; the
        # package's `prune` is the function (as when this file imported everything eagerly)
        if name in _EXPORTS and _EXPORTS[name] == name and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
