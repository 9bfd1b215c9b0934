"""Pruning to a budget instead of a ratio: MACs, parameters, or latency on the device that will serve the model.

`prune_to_target` removes in `steps` rounds, the scores recomputed on the smaller program each round (a
magnitude criterion on its weights, or the caller's `scores` from data), so that what goes in a late round
is judged after the early ones. Each round aims at a geometric share of the way down (round i of n keeps
`(goal / now) ** (1 / (n - i))` of the current metric) and picks, by bisection over the global ratio, the
plan whose exact count (`plan_counts`: counted on the graph at the kept sizes, nothing built) lies closest
to its aim; the last round aims at the goal itself. Selection is global (the relative score ranks every
group's indices together), so the budget lands where it costs the least importance.

Latency has no exact count: each round measures the current program (`latency`, the caller's timing on
its device), assumes latency scales with MACs from there, and aims the MACs accordingly; the result is
measured again. For every metric, more rounds follow (up to `steps` extra) while the result is still
above the goal by more than the tolerance. A result below the goal by more than the tolerance (the last
index removed was coarse: a whole attention head of a small model) is returned with `met: false` in the
report's `target` section.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch.export import ExportedProgram

from .counting import Counts, count
from .graph import DependencyGraph
from .importance import Importance
from .prune import (
    PruneConfig,
    PruneError,
    PrunePlan,
    PruneResult,
    build_report,
    config_importance,
    plan_counts,
    pruned_module,
    reexport,
    select,
)
from .tensors import program_tensors

METRICS = ("macs", "params", "latency_ms")


@dataclass(frozen=True)
class Target:
    """`metric` "macs" or "params": `value` in (0, 1) is a fraction of the original, above 1 an absolute
    count; "latency_ms": `value` is milliseconds."""

    metric: str
    value: float

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise PruneError(f"target metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.value > 0 or (self.metric != "latency_ms" and self.value == 1):
            raise PruneError(f"target {self.metric} must be a fraction in (0, 1) or a count above 1, "
                             f"got {self.value}")

    def goal(self, original: float) -> float:
        if self.metric != "latency_ms" and self.value < 1:
            return self.value * original
        return float(self.value)


def _metric(counts: Counts, metric: str) -> float:
    return float(counts.macs if metric in ("macs", "latency_ms") else counts.params)


def _closest_plan(ep: ExportedProgram, graph: DependencyGraph, config: PruneConfig, aim: float, metric: str,
                  scores: dict[int, np.ndarray] | None, tolerance: float) -> tuple[PrunePlan, float]:
    """The global-ratio plan whose `metric` after pruning lies closest to `aim` (bisection: the metric falls as
    the ratio grows)."""
    tensors = program_tensors(ep)
    cache: dict[float, tuple[PrunePlan, float]] = {}

    def at(ratio: float) -> tuple[PrunePlan, float]:
        if ratio not in cache:
            plan = select(graph, dataclasses.replace(config, ratio=ratio, global_pruning=True), tensors, scores)
            cache[ratio] = (plan, _metric(plan_counts(ep, plan), metric))
        return cache[ratio]

    lo, hi = 1e-6, config.max_ratio if config.max_ratio < 1 else 0.999
    if at(hi)[1] > aim:  # even the most this model allows stays above the aim
        return at(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        if at(mid)[1] > aim:
            lo = mid
        else:
            hi = mid
        if abs(at(hi)[1] - aim) <= tolerance * aim / 4 or hi - lo < 1e-6:
            break
    return min((at(lo), at(hi)), key=lambda pm: abs(pm[1] - aim))


def prune_to_target(ep: ExportedProgram, config: PruneConfig, target: Target, *, steps: int = 4,
                    tolerance: float = 0.02, latency: Callable[[ExportedProgram], float] | None = None,
                    importance: Importance | None = None,
                    on_step: Callable[[int, dict], None] | None = None) -> PruneResult:
    """Prune `ep` until `target` is met within `tolerance` (relative); see the module docstring. The config's
    ratio is ignored (the target sets how much goes); its importance, ignore globs, attention mode,
    prune_hidden, max_ratio and round_to apply; `importance` ranks the indices, recomputed on the smaller program
    every round (default: the config's magnitude criterion). `on_step(i, record)` follows each round. Raises
    PruneError when the model cannot get that small (everything prunable is gone first) or already is."""
    target.validate()
    importance = importance or config_importance(config)
    if steps < 1:
        raise PruneError(f"steps must be at least 1, got {steps}")
    if target.metric == "latency_ms" and latency is None:
        raise PruneError("a latency target needs a way to measure latency on the serving device")
    t0 = time.perf_counter()
    measure: Callable[[ExportedProgram], float]
    if target.metric == "latency_ms" and latency is not None:  # (a latency target without one is refused above)
        measure = latency
    else:
        measure = lambda p: _metric(count(p), target.metric)
    start = measure(ep)
    goal = target.goal(start)
    if goal >= start:
        raise PruneError(f"the model already meets the target: {target.metric} is {start:.6g}, the target "
                         f"{goal:.6g}")
    current, value = ep, start
    rounds: list[dict] = []
    graph = plan = None
    max_rounds = 2 * steps  # rounds past `steps` aim at the goal itself, until it is met or nothing more goes
    for i in range(max_rounds):
        remaining = max(steps - i, 1)
        aim_value = value * (goal / value) ** (1.0 / remaining)
        if target.metric == "latency_ms":  # steer MACs by the measured latency per MAC
            macs = float(count(current).macs)
            aim, metric = macs * aim_value / value, "macs"
        else:
            aim, metric = aim_value, target.metric
        graph = DependencyGraph(current, ignore=config.ignore, attention=config.attention)
        plan, _ = _closest_plan(current, graph, config, aim, metric,
                                importance(graph, current), tolerance)
        if not plan.pruned.any():
            break
        current = reexport(current, pruned_module(current, plan))
        value = measure(current)
        rounds.append({"round": i + 1, "aim": aim_value, "reached": value})
        if on_step is not None:
            on_step(i, rounds[-1])
        if i >= steps - 1 and (abs(value - goal) <= tolerance * goal or value < goal):
            break
    if graph is None or plan is None or current is ep:
        raise PruneError(f"nothing can be pruned toward the {target.metric} target (every group is frozen or "
                         "ignored)")
    report = build_report(config, ep, current, graph, plan, {"total": time.perf_counter() - t0})
    within = abs(value - goal) / goal
    report["target"] = {"metric": target.metric, "value": target.value, "goal": goal, "start": start,
                        "reached": value, "within": within, "met": within <= tolerance, "rounds": rounds}
    if not report["target"]["met"] and value > goal:
        raise PruneError(f"cannot reach {target.metric} {goal:.6g}: the smallest this model allows is {value:.6g} "
                         f"({value / start:.1%} of the original; frozen or ignored parts stay whole)")
    return PruneResult(current, report, plan)
