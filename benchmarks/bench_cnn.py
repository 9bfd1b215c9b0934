"""Prunery vs Torch-Pruning, side by side, in one process, on the in-repo model zoo.

For every model of ``tests.zoo.ZOO`` plus ``BENCH_ZOO`` (resnet50, densenet121) the module is built
once (same weights for both sides): a deep copy goes to Torch-Pruning, the module itself is exported
(dynamic batch) for Prunery. Both prune at the same ratio with L2 magnitude importance, local (not
global) pruning, and are then compared on time, parameters, MACs and whether the result still runs.

Timings (each: one warm-up, then ``--repeat`` runs, minimum reported):

* ours build   ``DependencyGraph(ep)``
* ours prune   ``select(...)`` + ``pruned_module(ep, plan)`` (in memory, no re-export)
* ours total   build + prune; this is what is compared with TP
* TP total     ``tp.pruner.BasePruner(...)`` construction (traces the model, builds TP's
  DependencyGraph) + ``pruner.step()``, on a fresh deep copy each run (copying is not timed)
* export       ``torch.export.export`` of the original module (ours needs an ExportedProgram; not
  counted in ours total)
* file-to-file ``torch.export.load`` of the saved input program + ``prunery.core.prune.prune`` (graph,
  select, removal, re-export) + ``torch.export.save`` of the result (the input is saved once, untimed)

Inputs: the exported program needs batch >= 2 to keep the batch dim dynamic (a batch-1 example
specialises it), so ours is exported at batch 2; Torch-Pruning traces at batch 1. MACs are reported
per sample: our ``count()`` divided by the export batch, and for Torch-Pruning both its own
``tp.utils.count_ops_and_params`` (batch 1) and our ``count()`` on ``torch.export.export`` of TP's
pruned model (batch 2, divided by 2); the latter is the comparison figure (same counter both sides).
"Runs" means the pruned model's forward at batch 3 gives the original output shape.

    python benchmarks/bench_cnn.py [--ratio 0.5] [--repeat 3] [--models a,b] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunery.core.counting import count
from prunery.core.graph import DependencyGraph
from prunery.core.prune import PruneConfig, program_tensors, prune, pruned_module, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `tests` (the zoo) is importable
from tests import zoo  # noqa: E402

EXPORT_BATCH = 2  # smallest batch that keeps the batch dim dynamic in torch.export
TP_BATCH = 1
RUN_BATCH = 3


class TimeLimit(Exception):
    """A Torch-Pruning run exceeded ``--tp-timeout``."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimit in the main thread after ``seconds`` (SIGALRM; interrupts pure-Python loops)."""

    def handler(_signum: int, _frame: Any) -> None:
        raise TimeLimit(f"did not finish within {seconds:g}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _best(
    fn: Callable[[Any], Any], repeat: int, setup: Callable[[], Any] = lambda: None
) -> tuple[float, Any]:
    """Warm up once, then time ``fn(setup())`` ``repeat`` times (setup untimed); min seconds, last result.

    As ``timeit`` does, the garbage collector is off during a timed call (and run before it)."""
    out = fn(setup())
    best = math.inf
    for _ in range(repeat):
        arg = setup()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = fn(arg)
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best, out


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


def _out_shape(y: Any) -> Any:
    if isinstance(y, torch.Tensor):
        return tuple(y.shape)
    if isinstance(y, list | tuple):
        return [_out_shape(v) for v in y]
    return type(y).__name__


def _runs(model: Callable, inputs: tuple, expected: Any) -> tuple[bool, str]:
    try:
        with torch.no_grad():
            got = _out_shape(model(*inputs))
    except Exception as e:  # a broken pruned model is a result, not a crash
        return False, _err(e)
    return got == expected, "" if got == expected else f"output shape {got} != {expected}"


def _is_conv_or_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd | nn.Linear)


def _classifier(model: nn.Module, inputs: tuple, is_layer: Callable[[nn.Module], bool] = _is_conv_or_linear
                ) -> list[str]:
    """The last layer (`is_layer`: Conv/Linear) to run: the layer whose output is the model output (the class
    logits / segmentation head). Torch-Pruning must be told not to prune its outputs."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n))
        for name, m in model.named_modules()
        if is_layer(m)
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def _module_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes_ours(ep: torch.export.ExportedProgram) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in ep.state_dict.items()}


def _layer_diff(
    before: nn.Module, ours: dict[str, tuple[int, ...]], tp_model: nn.Module | None
) -> list[dict[str, Any]]:
    """Parameters whose shape after pruning differs between the two sides."""
    if tp_model is None:
        return []
    tp_shapes = {k: tuple(v.shape) for k, v in tp_model.named_parameters()}
    diff = []
    for name, p in before.named_parameters():
        a, b = ours.get(name), tp_shapes.get(name)
        if a != b:
            diff.append({"name": name, "before": list(p.shape), "ours": a and list(a), "tp": b and list(b)})
    return diff


def bench_model(name: str, ratio: float, repeat: int, workdir: str, tp_timeout: float) -> dict[str, Any]:
    import torch_pruning as tp

    entry = zoo.BENCH_ZOO.get(name) or zoo.ZOO[name]
    torch.manual_seed(0)
    model = entry.build().eval()
    x_export, x_tp, x_run = (entry.example_inputs(b) for b in (EXPORT_BATCH, TP_BATCH, RUN_BATCH))
    with torch.no_grad():
        expected = _out_shape(model(*x_run))
    row: dict[str, Any] = {"model": name, "ratio": ratio}

    # --- export (once; not part of ours' pruning time) -------------------------------------------
    tp_model0 = copy.deepcopy(model)  # TP's copy of the very same weights, taken before export
    batch = torch.export.Dim("batch", min=1, max=1024)
    t0 = time.perf_counter()
    ep = torch.export.export(model, x_export, dynamic_shapes=tuple({0: batch} for _ in x_export))
    row["export_s"] = time.perf_counter() - t0
    before = count(ep)
    row["params_before"] = before.params
    row["macs_before"] = before.macs // EXPORT_BATCH
    cfg = PruneConfig(ratio=ratio, importance="l2", global_pruning=False)

    # --- ours, in memory ---------------------------------------------------------------------------
    row["ours_build_s"], graph = _best(lambda _: DependencyGraph(ep), repeat)
    row["ours_prune_s"], _gm = _best(
        lambda g: pruned_module(ep, select(g, cfg, program_tensors(ep))), repeat, lambda: DependencyGraph(ep)
    )
    row["ours_s"] = row["ours_build_s"] + row["ours_prune_s"]
    row["groups"] = len(graph.groups)

    # --- ours, file to file --------------------------------------------------------------------------
    src, dst = os.path.join(workdir, f"{name}.pt2"), os.path.join(workdir, f"{name}.pruned.pt2")
    torch.export.save(ep, src)
    parts: dict[str, float] = {}

    def file_to_file(_: None) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = torch.export.load(src)
        t1 = time.perf_counter()
        res = prune(loaded, cfg)
        t2 = time.perf_counter()
        torch.export.save(res.program, dst)
        t3 = time.perf_counter()
        parts.update(load=t1 - t0, prune=t2 - t1, save=t3 - t2, **res.report["timings_s"])
        return res.report

    try:
        row["f2f_s"], report = _best(file_to_file, repeat)
        row["f2f_parts_s"] = {k: round(v, 4) for k, v in parts.items()}
        ours_ep = torch.export.load(dst)
        after = count(ours_ep)
        row["ours_params"], row["ours_macs"] = after.params, after.macs // EXPORT_BATCH
        row["ours_pruned_groups"] = report["pruned_groups"]
        row["ours_runs"], row["ours_run_err"] = _runs(ours_ep.module(), x_run, expected)
        ours_shapes = _shapes_ours(ours_ep)
        row["ours_error"] = ""
    except Exception as e:  # noqa: BLE001 - record and go on
        row.update(f2f_s=None, ours_params=None, ours_macs=None, ours_runs=False, ours_error=_err(e))
        ours_shapes = {}

    # --- Torch-Pruning -----------------------------------------------------------------------------
    ignored = _classifier(tp_model0, x_tp)
    row["tp_ignored"] = ignored
    tp_model: nn.Module | None = None

    def tp_prune(m: nn.Module) -> nn.Module:
        with _time_limit(tp_timeout):
            pruner = tp.pruner.BasePruner(
                m,
                x_tp,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=ratio,
                global_pruning=False,
                ignored_layers=[m.get_submodule(n) for n in ignored],
            )
            pruner.step()
        return m

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["tp_s"], tp_model = _best(tp_prune, repeat, lambda: copy.deepcopy(tp_model0))
        row["tp_error"] = ""
    except Exception as e:  # noqa: BLE001 - a TP failure is a result
        row.update(tp_s=None, tp_error=f"TP failed: {_err(e)}")
    if tp_model is not None:
        row["tp_params"] = _module_params(tp_model)
        row["tp_runs"], row["tp_run_err"] = _runs(tp_model, x_run, expected)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["tp_macs_tpcounter"] = int(tp.utils.count_ops_and_params(tp_model, x_tp)[0])
        except Exception as e:  # noqa: BLE001
            row["tp_macs_tpcounter"], row["tp_macs_tpcounter_err"] = None, _err(e)
        try:
            row["tp_macs"] = count(torch.export.export(tp_model, x_export)).macs // EXPORT_BATCH
        except Exception as e:  # noqa: BLE001
            row["tp_macs"], row["tp_macs_err"] = None, _err(e)
    else:
        row.update(tp_params=None, tp_runs=False, tp_macs=None, tp_macs_tpcounter=None)

    # --- comparison ----------------------------------------------------------------------------------
    p0 = row["params_before"]
    row["ours_params_red"] = None if row["ours_params"] is None else 1 - row["ours_params"] / p0
    row["tp_params_red"] = None if row["tp_params"] is None else 1 - row["tp_params"] / p0
    row["time_ratio"] = row["ours_s"] / row["tp_s"] if row["tp_s"] else None
    ro, rt = row["ours_params_red"], row["tp_params_red"]
    row["red_ratio"] = ro / rt if ro is not None and rt else None
    row["layer_diff"] = _layer_diff(tp_model0, ours_shapes, tp_model) if ours_shapes else []
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _yn(ok: Any) -> str:
    return "yes" if ok else "NO"


COLUMNS = [
    ("model", 18), ("export s", 8), ("build s", 8), ("prune s", 8), ("ours s", 8), ("TP s", 8),
    ("ours/TP", 8), ("params ours", 12), ("params TP", 12), ("red ours/TP", 11), ("MACs ours", 13),
    ("MACs TP", 13), ("runs o/TP", 9), ("f2f s", 7),
]


def _table_row(r: dict[str, Any]) -> str:
    cells = [
        r["model"], _fmt(r["export_s"], ".3f"),
        _fmt(r["ours_build_s"], ".4f"), _fmt(r["ours_prune_s"], ".4f"),
        _fmt(r["ours_s"], ".4f"), _fmt(r["tp_s"], ".4f"), _fmt(r["time_ratio"], ".3f"),
        _fmt(r["ours_params"], ","), _fmt(r["tp_params"], ","), _fmt(r["red_ratio"], ".3f"),
        _fmt(r["ours_macs"], ","), _fmt(r["tp_macs"], ","), f"{_yn(r['ours_runs'])}/{_yn(r['tp_runs'])}",
        _fmt(r["f2f_s"], ".3f"),
    ]
    widths = [w for _, w in COLUMNS]
    return " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def _header() -> str:
    return " ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(COLUMNS))


def _notes(r: dict[str, Any]) -> list[str]:
    out = []
    keys = ("ours_error", "tp_error", "ours_run_err", "tp_run_err", "tp_macs_err", "tp_macs_tpcounter_err")
    for key in keys:
        if r.get(key):
            out.append(f"  {r['model']}: {key}: {r[key]}")
    if r.get("red_ratio") is not None and r["red_ratio"] < 1 - 1e-9:
        out.append(
            f"  {r['model']}: our params reduction {r['ours_params_red']:.2%} < TP's {r['tp_params_red']:.2%}"
        )
    if r.get("layer_diff"):
        n = len(r["layer_diff"])
        out.append(f"  {r['model']}: {n} parameters shaped differently (before: ours vs TP):")
        for d in r["layer_diff"][:12]:
            out.append(f"      {d['name']}: {d['before']}: {d['ours']} vs {d['tp']}")
        if len(r["layer_diff"]) > 12:
            out.append(f"      ... {len(r['layer_diff']) - 12} more (see --json)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: ZOO + BENCH_ZOO)")
    ap.add_argument("--tp-timeout", type=float, default=60.0, help="seconds per Torch-Pruning run")
    ap.add_argument("--json", dest="json_out", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n] or [*zoo.ZOO, *zoo.BENCH_ZOO]
    unknown = [n for n in names if n not in zoo.ZOO and n not in zoo.BENCH_ZOO]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {[*zoo.ZOO, *zoo.BENCH_ZOO]}")

    print(
        f"ratio {args.ratio}, L2 magnitude, local; repeat {args.repeat} (min) after 1 warm-up; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} (timings are sensitive to other work on the machine)"
    )
    print("MACs per sample; 'MACs TP' = our counter on torch.export of TP's pruned model\n")
    print(_header())
    rows, notes = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            r = bench_model(name, args.ratio, args.repeat, workdir, args.tp_timeout)
            rows.append(r)
            print(_table_row(r), flush=True)
            notes += _notes(r)

    if notes:
        print("\nnotes:")
        print("\n".join(notes))
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"]]
    reds = [(r["red_ratio"], r["model"]) for r in rows if r["red_ratio"] is not None]
    tp_failed = [r["model"] for r in rows if r["tp_error"]]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else float("nan")
    worst = max((r["time_ratio"], r["model"]) for r in rows if r["time_ratio"]) if ratios else (math.nan, "-")
    least = min(reds) if reds else (math.nan, "-")
    print(
        f"\nsummary: time ours/TP geomean {geo:.3f} over {len(ratios)} models, "
        f"max {worst[0]:.3f} ({worst[1]}); "
        f"min params reduction ours/TP {least[0]:.3f} ({least[1]}); "
        f"ours runs {sum(bool(r['ours_runs']) for r in rows)}/{len(rows)}, "
        f"TP runs {sum(bool(r['tp_runs']) for r in rows)}/{len(rows)}; TP failed: {tp_failed or 'none'}; "
        f"wall {time.perf_counter() - t_start:.1f}s, load average {os.getloadavg()[0]:.2f}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
