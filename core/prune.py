"""Selection and physical removal: from a dependency graph and a spec to a smaller ExportedProgram.

Removal works on the unlifted module of the program (`ep.module()`): parameters, buffers and
constants are replaced by their kept slices, shape literals in the graph are rewritten by the op
rules that own them, and the module is exported again with the program's own example inputs and
dynamic dims, so the result is a valid ExportedProgram by construction.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from .counting import Counts, count, count_macs, traced_size
from .errors import EngineError
from .graph import DependencyGraph
from .importance import Importance, group_scores, magnitude, relative
from .program_module import NodeCall, ProgramModule, call_specs, supported
from .spec import DATA_IMPORTANCES, JobSpec, first_problem
from .tensors import program_tensors, tied_names


class PruneError(EngineError):
    """The spec cannot be applied to this program (bad ratio, nothing to prune, re-export failed)."""


@dataclass(frozen=True)
class PruneConfig:
    """The structural options of a job spec (`core/spec.py` says what each does; the defaults are its own)."""

    ratio: float = 0.5  # with a target (`core/targets.py`), only where the search starts
    importance: str = JobSpec.importance
    global_pruning: bool = JobSpec.global_pruning
    round_to: int | None = JobSpec.round_to
    max_ratio: float = JobSpec.max_ratio
    ignore: tuple[str, ...] = ()
    seed: int = JobSpec.seed
    attention: str = JobSpec.attention
    prune_hidden: bool = JobSpec.prune_hidden

    @classmethod
    def from_spec(cls, spec: JobSpec) -> PruneConfig:
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls) if f.name != "ratio"},
                   ratio=spec.ratio if spec.ratio is not None else cls.ratio)

    def as_spec(self) -> JobSpec:
        return JobSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def validate(self) -> None:
        """PruneError with the spec's first problem (the data an importance needs is the recipe's to check)."""
        problems = self.as_spec().problems(data_given=True)
        if problems:
            raise PruneError(first_problem(problems))


@dataclass
class PrunePlan:
    """Which components (prunable indices) go; `pruned[label]` is True for a removed component."""

    graph: DependencyGraph
    pruned: np.ndarray
    per_group: dict[int, int] = field(default_factory=dict)

    def kept(self, slot: int) -> np.ndarray:
        return np.flatnonzero(~self.pruned[self.graph.slot_labels(slot)])

    def removed(self, slot: int) -> np.ndarray:
        return np.flatnonzero(self.pruned[self.graph.slot_labels(slot)])


def _n_to_prune(n: int, ratio: float) -> int:
    # keep int(n * (1 - ratio)) indices, as Torch-Pruning does, so equal ratios compare equal
    return n - int(n * (1.0 - ratio) + 1e-9)


def _cap(n: int, max_ratio: float) -> int:
    return min(int(math.floor(n * max_ratio + 1e-9)), n - 1)


def _round_keep(n: int, k: int, round_to: int | None) -> int:
    if not round_to or round_to <= 1 or n <= round_to:
        return k
    keep = n - k
    keep = min(n, int(math.ceil(keep / round_to) * round_to))
    return n - keep


def config_importance(config: PruneConfig) -> Importance:
    """The config's magnitude criterion as an `Importance`; PruneError for one that needs data."""
    if config.importance in DATA_IMPORTANCES:
        raise PruneError(f"{config.importance} importance is computed from data: give a dataset "
                         "(prunery prune --dataset FILE, or core.recipe.run_recipe)")
    return magnitude(config.importance, config.seed, config.prune_hidden)


def select(graph: DependencyGraph, config: PruneConfig, tensors: dict[str, torch.Tensor],
           scores: dict[int, np.ndarray] | None = None) -> PrunePlan:
    """Choose the components to remove. The ratio applies to every part of every group (each
    producer's channels, in a concat), so a cheap branch is not emptied to spare an expensive one;
    global selection ranks all parts together on the relative score (importance over the part's mean).
    `scores` (per group id, aligned with its components) replace the config's importance criterion."""
    config.validate()
    groups = [g for g in graph.groups if config.prune_hidden or not g.hidden]
    if scores is None:
        if config.importance in DATA_IMPORTANCES:
            raise PruneError(f"{config.importance} importance is computed from data: give a dataset "
                             "(prunery prune --dataset FILE, or core.recipe.run_recipe)")
        scores = group_scores(graph, tensors, config.importance, config.seed, groups)
    pruned = np.zeros(int(graph.labels.max()) + 1, dtype=bool)
    plan = PrunePlan(graph, pruned)
    parts = [(g, part) for g in groups for part in g.parts]
    chosen: list[np.ndarray] = []
    if config.global_pruning:
        rel = [relative(scores[g.id][part]) for g, part in parts]
        caps = [_cap(len(part), config.max_ratio) for _, part in parts]
        # one count over all parts (as Torch-Pruning pools it): a small ratio may remove nothing, rather than
        # at least one index of every part
        total = sum(len(part) for _, part in parts)
        target = _n_to_prune(total, config.ratio)
        owner: np.ndarray | list[int] = (np.concatenate([np.full(len(part), i) for i, (_, part) in enumerate(parts)])
                                         if parts else [])
        order: np.ndarray | list[int] = np.argsort(np.concatenate(rel), kind="stable") if parts else []
        taken = [0] * len(parts)
        done = 0
        for o in order:
            if done >= target:
                break
            i = int(owner[o])
            if taken[i] < caps[i]:
                taken[i] += 1
                done += 1
        for i, (_, part) in enumerate(parts):
            k = _round_keep(len(part), taken[i], config.round_to)
            chosen.append(part[np.argsort(rel[i], kind="stable")[:k]])
    else:
        for g, part in parts:
            k = min(_n_to_prune(len(part), config.ratio), _cap(len(part), config.max_ratio))
            k = _round_keep(len(part), k, config.round_to)
            chosen.append(part[np.argsort(scores[g.id][part], kind="stable")[:k]])
    for (g, _), idx in zip(parts, chosen, strict=True):
        pruned[g.components[idx]] = True
        plan.per_group[g.id] = plan.per_group.get(g.id, 0) + int(len(idx))
    _keep_every_slot_nonempty(plan, scores)
    return plan


def plan_counts(ep: ExportedProgram, plan: PrunePlan) -> Counts:
    """Params and MACs the program would have after `plan`, counted on the original graph with every prunable
    dim at its kept size: what `count(prune(...).program)` gives, without building the program."""
    graph = plan.graph

    def size(node: torch.fx.Node, dim: int) -> int:
        slots = graph.node_slots.get(node.name)
        if isinstance(slots, list) and slots and not isinstance(slots[0], list):
            slot = slots[dim]
            if not graph.builder.slot_symbolic[slot]:
                return len(plan.kept(slot))
        return traced_size(node, dim)

    tied = tied_names({name: t for name, t in program_tensors(ep).items() if name in graph.params})
    params = sum(math.prod(len(plan.kept(s)) for s in info.slots) for name, info in graph.params.items()
                 if info.kind == "parameter" and name not in tied)
    return Counts(params=params, macs=count_macs(ep, size))


def _keep_every_slot_nonempty(plan: PrunePlan, scores: dict[int, np.ndarray]) -> None:
    """A slot whose every index would go (a chunk of a split, say) keeps its most important one."""
    g = plan.graph
    comp_score = np.zeros(len(plan.pruned))
    comp_group = np.full(len(plan.pruned), -1)
    for grp in g.groups:
        if grp.id in scores:
            comp_score[grp.components] = scores[grp.id]
        comp_group[grp.components] = grp.id
    # the slots whose every element is pruned (elements lie contiguously per slot)
    sized = np.flatnonzero(g.slot_size > 0)
    emptied = sized[np.logical_and.reduceat(plan.pruned[g.labels], g.slot_off[sized])] if len(sized) else sized
    for s in emptied:
        lab = g.slot_labels(int(s))
        if plan.pruned[lab].all():
            best = lab[np.argmax(comp_score[lab])]
            plan.pruned[best] = False
            gid = int(comp_group[best])
            if gid >= 0:
                plan.per_group[gid] -= 1


def _set_tensor(root: torch.nn.Module, fqn: str, value: torch.Tensor) -> None:
    prefix, _, name = fqn.rpartition(".")
    mod = root.get_submodule(prefix) if prefix else root
    old = getattr(mod, name)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, name, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def _sliced(t: torch.Tensor, plan: PrunePlan, slots: Sequence[int]) -> torch.Tensor | None:
    out = t
    changed = False
    for d, s in enumerate(slots):
        kept = plan.kept(s)
        if len(kept) != t.shape[d]:
            out = out.index_select(d, torch.as_tensor(kept, device=t.device))
            changed = True
    return out.detach().clone() if changed else None


def apply_zeroing(ep: ExportedProgram, plan: PrunePlan) -> torch.nn.Module:
    """The oracle's model: the unpruned program with every removed slice set to zero."""
    tensors = program_tensors(ep)
    zeroed = {}
    for info in plan.graph.params.values():
        t = tensors[info.name].detach().clone()
        for d, s in enumerate(info.slots):
            rem = plan.removed(s)
            if len(rem):
                t.index_fill_(d, torch.as_tensor(rem, device=t.device), 0)
        zeroed[info.name] = t
    if supported(ep):
        return ProgramModule(ep, {**tensors, **zeroed})
    gm = ep.module()
    for name, t in zeroed.items():
        _set_tensor(gm, name, t)
    return gm


def pruned_module(ep: ExportedProgram, plan: PrunePlan) -> torch.nn.Module:
    """The program as a module with the plan's slices removed and its shape literals rewritten."""
    tensors = program_tensors(ep)
    new_tensors = dict(tensors)
    for info in plan.graph.params.values():
        new = _sliced(tensors[info.name], plan, info.slots)
        if new is not None:
            old = tensors[info.name]
            new_tensors[info.name] = (torch.nn.Parameter(new, requires_grad=old.requires_grad)
                                      if isinstance(old, torch.nn.Parameter) else new)
    for name, canonical in tied_names(tensors).items():  # tied names share slots: one tensor again
        new_tensors[name] = new_tensors[canonical]
    rewrites = plan.graph.builder.rewrites
    if supported(ep):
        overrides = {}
        for node in ep.graph.nodes:
            rw = rewrites.get(node.name)
            if rw is not None and node.op == "call_function":
                call = NodeCall(node)
                rw(call, plan.kept)
                overrides[node.name] = call
        return ProgramModule(ep, new_tensors, overrides)
    gm = ep.module()
    for name, t in new_tensors.items():
        if t is not tensors[name]:
            _set_tensor(gm, name, t.detach())
    for node in gm.graph.nodes:
        rw = rewrites.get(node.name)
        if rw is not None and node.op == "call_function":
            rw(node, plan.kept)
    gm.recompile()
    return gm


def _user_input_values(ep: ExportedProgram) -> list:
    """The traced value (a fake tensor, or a constant) of each user input, in calling order."""
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [by_name[spec.arg.name].meta.get("val") for spec in ep.graph_signature.input_specs
            if spec.kind == InputKind.USER_INPUT]


def example_inputs(ep: ExportedProgram) -> tuple[tuple, dict]:
    """The program's saved example inputs, or inputs made from its placeholders' shapes."""
    if ep.example_inputs is not None:
        return ep.example_inputs
    leaves: list[Any] = []
    for v in _user_input_values(ep):
        if isinstance(v, torch.Tensor):
            shape = [int(s.node.hint) if not isinstance(s, int) else s for s in v.shape]
            if v.dtype.is_floating_point:
                leaves.append(torch.randn(shape, dtype=v.dtype))
            else:
                leaves.append(torch.zeros(shape, dtype=v.dtype))
        else:
            leaves.append(v)
    in_spec, _ = call_specs(ep)
    assert in_spec is not None, "an exported program has a call signature"
    return pytree.tree_unflatten(leaves, in_spec)


def _finite_int(bound: object) -> int | None:
    """A range bound as an int, None when infinite (sympy's oo, or torch's int_oo, whose `is_finite` is not
    False)."""
    try:
        value = int(bound)  # type: ignore[call-overload]
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return value if abs(value) < 2**62 else None


def dynamic_shapes(ep: ExportedProgram, args: tuple, kwargs: dict):
    """The program's dynamic input dims as named Dims with their original bounds."""
    dims: dict[str, Dim] = {}
    bounds = {str(k): v for k, v in ep.range_constraints.items()}
    leaves: list[dict[int, Any] | None] = []
    for v in _user_input_values(ep):
        if not isinstance(v, torch.Tensor):
            leaves.append(None)
            continue
        spec_d: dict[int, Any] = {}
        for i, s in enumerate(v.shape):
            if isinstance(s, int):
                continue
            name = str(s.node.expr)
            if name not in dims:
                vr = bounds.get(name)
                lo = _finite_int(vr.lower) if vr is not None else None
                hi = _finite_int(vr.upper) if vr is not None else None
                kw = {}
                if lo is not None:
                    kw["min"] = max(lo, 0)
                if hi is not None:
                    kw["max"] = hi
                dims[name] = Dim("d_" + name.replace(" ", "_"), **kw) if name.isidentifier() else Dim.AUTO
            spec_d[i] = dims[name]
        leaves.append(spec_d or None)
    if not dims:
        return None
    in_spec, _ = call_specs(ep)
    assert in_spec is not None, "an exported program has a call signature"
    a_ds, k_ds = pytree.tree_unflatten(leaves, in_spec)
    if not kwargs:
        return tuple(a_ds)
    return {**{f"_arg{i}": d for i, d in enumerate(a_ds)}, **k_ds}


def reexport(ep: ExportedProgram, module: torch.nn.Module) -> ExportedProgram:
    args, kwargs = example_inputs(ep)
    ds = dynamic_shapes(ep, args, kwargs)
    if ds is not None and isinstance(module, ProgramModule) and module.arg_names is None:
        ds = {"args": ds} if isinstance(ds, tuple) else ds  # forward(*args, **kwargs)
    try:
        return torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=ds, strict=False)
    except Exception as e:  # the pruned graph failed to trace: report it, one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PruneError(f"re-export of the pruned program failed: {msg}") from e


@dataclass
class PruneResult:
    program: ExportedProgram
    report: dict
    plan: PrunePlan


def build_report(config: PruneConfig, before_ep: ExportedProgram, after_ep: ExportedProgram, graph: DependencyGraph,
                 plan: PrunePlan, timings: dict[str, float]) -> dict:
    """The JSON report of a pruning from `before_ep` to `after_ep` (`graph` and `plan`: of its last step)."""
    before, after = count(before_ep), count(after_ep)
    tensors, new_tensors = program_tensors(before_ep), program_tensors(after_ep)
    layers = [
        {
            "name": info.name,
            "kind": info.kind,
            "shape_before": list(tensors[info.name].shape) if info.name in tensors else None,
            "shape_after": list(new_tensors[info.name].shape) if info.name in new_tensors else None,
        }
        for info in graph.params.values()
        if info.kind == "parameter"
    ]
    return {
        "spec": {
            "ratio": config.ratio,
            "importance": config.importance,
            "global": config.global_pruning,
            "round_to": config.round_to,
            "max_ratio": config.max_ratio,
            "ignore": list(config.ignore),
            "attention": config.attention,
            "prune_hidden": config.prune_hidden,
        },
        "params_before": before.params,
        "params_after": after.params,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "num_groups": len(graph.groups),
        "pruned_groups": sum(1 for k in plan.per_group.values() if k > 0),
        "frozen_ops": sorted(graph.frozen_ops),
        "duration_s": round(sum(timings.values()), 4),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "groups": [
            {"id": g.id, "size": g.size, "pruned": plan.per_group.get(g.id, 0),
             "members": [f"{m.name}:{m.dim}" for m in g.members]}
            for g in graph.groups
        ],
        "layers": layers,
    }


def prune(
    model: ExportedProgram | torch.nn.Module,
    config: PruneConfig,
    example_args: tuple | None = None,
    *,
    graph: DependencyGraph | None = None,
    importance: Importance | None = None,
) -> PruneResult:
    """Prune a program (or a module, exported first with `example_args`) and report what changed.

    `graph`: the program's dependency graph, built beforehand with the config's `ignore` (the worker builds
    it as a stage of its own, to report progress and honour a cancel in between). `importance`: how indices are
    ranked (default: the config's magnitude criterion, `config_importance`); from data (Taylor, Fisher) it comes
    from `core/recipe.py`."""
    config.validate()
    t0 = time.perf_counter()
    if graph is not None:
        if graph.ep is not model:
            raise PruneError("the dependency graph given was built for another program")
        if graph.ignore != tuple(config.ignore) or graph.attention != config.attention:
            raise PruneError("the dependency graph given was built with other ignore patterns or attention mode "
                             "than the config's")
        t0 -= graph.build_s
    ep = model if isinstance(model, ExportedProgram) else torch.export.export(model, tuple(example_args or ()))
    graph = graph or DependencyGraph(ep, ignore=config.ignore, attention=config.attention)
    t_graph = t0 + graph.build_s
    scores = (importance or config_importance(config))(graph, ep)
    t_scores = time.perf_counter()
    plan = select(graph, config, program_tensors(ep), scores)
    module = pruned_module(ep, plan)
    t_removed = time.perf_counter()
    new_ep = reexport(ep, module)
    t_end = time.perf_counter()
    report = build_report(config, ep, new_ep, graph, plan, {
        "graph": t_graph - t0, "importance": t_scores - t_graph, "select_and_remove": t_removed - t_scores,
        "reexport": t_end - t_removed})
    return PruneResult(new_ep, report, plan)
