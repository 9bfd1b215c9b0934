"""Prunery's DepGraph engine: safe intake, dependency graph, group pruning, re-export.

Imports torch and nothing else of ours.
"""

from .counting import Counts, count
from .graph import DependencyGraph, Group, Member, build_graph
from .importance import IMPORTANCES
from .prune import PruneConfig, PruneError, PrunePlan, PruneResult, apply_zeroing, prune, select
from .safe_load import ArchiveLoadError, UnsafeArchiveError, load_program, vet_archive

__all__ = [
    "ArchiveLoadError", "Counts", "DependencyGraph", "Group", "IMPORTANCES", "Member", "PruneConfig", "PruneError",
    "PrunePlan", "PruneResult", "UnsafeArchiveError", "apply_zeroing", "build_graph", "count", "load_program", "prune",
    "select", "vet_archive",
]
