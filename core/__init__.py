"""Prunery's DepGraph engine: safe intake, dependency graph, group pruning, re-export.

Imports torch and nothing else of ours.
"""
