"""Probe the pruning engine on every entry of ``tests.zoo_seq.SEQ_ZOO`` (no engine change; findings only).

For each entry: export it (dynamic batch, and dynamic sequence where the entry declares it), list the
aten ops of the graph that the engine has no rule for, run ``prune(ep, PruneConfig(ratio=...))`` and
record: the exception if it raises, ``report["frozen_ops"]`` (with counts, from the dependency graph),
params before/after, groups, which parameters changed shape, whether the pruned program runs at the
traced inputs, at another batch size and at other sequence lengths with the original output shape, and
(for entries with no normalisation) whether the zeroed-channel oracle holds. ``--decomposed`` probes
``ep.run_decompositions()`` (core aten) instead.

    python benchmarks/probe_zoo_seq.py [--ratio 0.3] [--models a,b] [--decomposed] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from prunery.core import PruneConfig, apply_zeroing, prune
from prunery.core.graph import DependencyGraph
from prunery.core.rules import RULES, _is_pointwise, _op_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `tests` (the zoo) is importable
from tests import zoo_seq  # noqa: E402


def _targets(ep: torch.export.ExportedProgram) -> Counter[str]:
    return Counter(_op_name(n.target) for n in ep.graph.nodes if n.op == "call_function")


def _no_rule(ep: torch.export.ExportedProgram) -> list[str]:
    """call_function targets with neither a rule nor the pointwise tag (ignoring sym_size and asserts,
    which produce no tensor)."""
    out = set()
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        if not isinstance(n.meta.get("val"), torch.Tensor | list | tuple):
            continue
        t = n.target
        if RULES.get(t) or RULES.get(getattr(t, "overloadpacket", None)) or _is_pointwise(t):
            continue
        out.add(_op_name(t))
    return sorted(out)


def _param_dependent(ep: torch.export.ExportedProgram) -> set[str]:
    """Names of the nodes that have a parameter or buffer among their ancestors."""
    lifted = set(ep.graph_signature.inputs_to_parameters) | set(ep.graph_signature.inputs_to_buffers)
    dep: set[str] = set()
    for n in ep.graph.nodes:
        if n.name in lifted or any(a.name in dep for a in n.all_input_nodes):
            dep.add(n.name)
    return dep


def _frozen_nodes(ep: torch.export.ExportedProgram, frozen: set[str]) -> dict[str, list[str]]:
    """Frozen op name -> "node (param-dependent)" / "node" for each of its nodes: an op whose inputs come
    from no parameter or buffer sits on a position/mask path and costs nothing; one that does may block
    pruning of the dims it touches."""
    dep = _param_dependent(ep)
    out: dict[str, list[str]] = {}
    for n in ep.graph.nodes:
        if n.op == "call_function" and _op_name(n.target) in frozen:
            blocked = any(a.name in dep for a in n.all_input_nodes)
            out.setdefault(_op_name(n.target), []).append(n.name + (" (param-dependent)" if blocked else ""))
    return out


def _norm_params(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the parameters of normalisation modules (LayerNorm, any *Norm class)."""
    names = []
    for mname, m in model.named_modules():
        if type(m).__name__.lower().endswith("norm"):
            names += [f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)]
    return tuple(names)


def _collapse(names: list[str]) -> list[str]:
    """Parameter names with layer indices folded: ``blocks.0.attn.q.weight`` -> ``blocks.*.attn.q.weight``."""
    return sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def _runs(module: torch.nn.Module, ref: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    try:
        with torch.no_grad():
            y, y_ref = module(*inputs), ref(*inputs)
    except Exception as e:  # recorded, not raised: this is a probe
        return "ERROR " + _first_line(e)[:200]
    return "ok" if y.shape == y_ref.shape else f"shape {tuple(y.shape)} != {tuple(y_ref.shape)}"


def probe(name: str, ratio: float, decomposed: bool) -> dict[str, Any]:
    entry = zoo_seq.SEQ_ZOO[name]
    row: dict[str, Any] = {"model": name, "dynamic_seq": entry.dynamic_seq, "normalised": entry.normalised}
    t0 = time.perf_counter()
    try:
        ep = zoo_seq.export(name)
        if decomposed:
            ep = ep.run_decompositions()
    except Exception as e:  # recorded: an export (or decomposition) failure is a finding too
        row["error"] = "export: " + _first_line(e)
        return row
    row["export_s"] = round(time.perf_counter() - t0, 2)
    row["ops"] = dict(sorted(_targets(ep).items()))
    row["no_rule_ops"] = _no_rule(ep)
    try:
        graph = DependencyGraph(ep)
        row["frozen_op_counts"] = dict(sorted(graph.frozen_ops.items()))
        row["frozen_nodes"] = _frozen_nodes(ep, set(graph.frozen_ops))
        row["graph_groups"] = len(graph.groups)
    except Exception as e:
        row["graph_error"] = _first_line(e)
    t0 = time.perf_counter()
    try:
        res = prune(ep, PruneConfig(ratio=ratio))
    except Exception as e:
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row["error"] = _first_line(e)
        row["error_cause"] = _first_line(e.__cause__) if e.__cause__ is not None else None
        row["traceback_tail"] = traceback.format_exception(e)[-1].strip()[:1000]
        return row
    row["prune_s"] = round(time.perf_counter() - t0, 2)
    rep = res.report
    row["frozen_ops"] = rep["frozen_ops"]
    row["params_before"], row["params_after"] = rep["params_before"], rep["params_after"]
    row["num_groups"], row["pruned_groups"] = rep["num_groups"], rep["pruned_groups"]
    changed = [lay["name"] for lay in rep["layers"] if lay["shape_before"] != lay["shape_after"]]
    kept = [lay["name"] for lay in rep["layers"] if lay["shape_before"] == lay["shape_after"]]
    row["changed_params"] = _collapse(changed)
    row["unchanged_params"] = _collapse(kept)
    row["groups"] = [
        {"size": g["size"], "pruned": g["pruned"], "members": _collapse(g["members"])} for g in rep["groups"]
    ]
    pruned_mod, ref = res.program.module(), ep.module()
    row["run_traced"] = _runs(pruned_mod, ref, entry.example_inputs(2))
    row["run_batch3"] = _runs(pruned_mod, ref, entry.example_inputs(3))
    if entry.dynamic_seq:
        assert entry.seq_max is not None
        row["run_other_seq"] = {
            str(s): _runs(pruned_mod, ref, entry.make_inputs(2, s)) for s in (entry.seq_min, 9, entry.seq_max)
        }
        placeholders = [n for n in res.program.graph.nodes
                        if n.op == "placeholder" and n.name in res.program.graph_signature.user_inputs]
        row["seq_symbolic_after"] = all(isinstance(n.meta["val"].shape[1], torch.SymInt) for n in placeholders)
    row["oracle"] = _oracle(ep, res, entry) if not entry.normalised else "n/a (normalised)"
    # the groups that no normalisation spans (MLP hidden widths, attention inner dims): freeze every norm
    # parameter, which freezes the normalised residual stream, and check the zeroed-channel oracle there
    model, _ = zoo_seq.build(name)
    ignore = _norm_params(model)
    if ignore:
        try:
            inner = prune(ep, PruneConfig(ratio=ratio, ignore=ignore))
            row["inner_params_after"] = inner.report["params_after"]
            row["inner_oracle"] = _oracle(ep, inner, entry)
        except Exception as e:
            row["inner_oracle"] = "ERROR " + _first_line(e)[:200]
    return row


def _oracle(ep: torch.export.ExportedProgram, res: Any, entry: zoo_seq.SeqZooModel) -> str:
    x = entry.example_inputs(3)
    with torch.no_grad():
        try:
            y, y0 = res.program.module()(*x), apply_zeroing(ep, res.plan)(*x)
            torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-4)
            return "holds"
        except Exception as e:
            return "FAILS " + _first_line(e)[:200]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--models", default="", help="comma-separated names (default: every available entry)")
    p.add_argument("--decomposed", action="store_true", help="probe ep.run_decompositions() instead")
    p.add_argument("--json", default="", help="write the rows to this file")
    args = p.parse_args()
    names = [n for n in args.models.split(",") if n] or [n for n in zoo_seq.SEQ_ZOO if zoo_seq.available(n)]
    warnings.filterwarnings("ignore")
    rows = []
    for name in names:
        row = probe(name, args.ratio, args.decomposed)
        rows.append(row)
        status = row.get("error") or f"ok {row['params_before']:,} -> {row['params_after']:,}"
        print(f"{name:16s} {status[:160]}  frozen={row.get('frozen_op_counts', {})}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
