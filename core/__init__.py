"""Prunery's DepGraph engine: safe intake, dependency graph, group pruning, re-export.

Imports torch and nothing else of ours.
"""

from .counting import Counts, count
from .data import Dataset, DatasetError, load_dataset
from .graph import DependencyGraph, Group, Member, build_graph
from .importance import IMPORTANCES
from .prune import PruneConfig, PruneError, PrunePlan, PruneResult, apply_zeroing, prune, select
from .recipe import Recipe, run_recipe
from .safe_load import ArchiveLoadError, UnsafeArchiveError, load_program, vet_archive
from .targets import Target, prune_to_target

__all__ = [
    "ArchiveLoadError", "Counts", "Dataset", "DatasetError", "DependencyGraph", "Group", "IMPORTANCES", "Member",
    "PruneConfig", "PruneError", "PrunePlan", "PruneResult", "Recipe", "Target", "UnsafeArchiveError", "apply_zeroing",
    "build_graph", "count", "load_dataset", "load_program", "prune", "prune_to_target", "run_recipe", "select",
    "vet_archive",
]
