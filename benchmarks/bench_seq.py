"""Prunery vs Torch-Pruning on the transformer models of ``tests.zoo_seq`` (issue 4), same weights both sides.

Models: every ``SEQ_ZOO`` entry with attention (``vit``, ``gpt``, ``encoder_manual``, ``llama``, ``swin_block``
and the ``hf_*`` entries where ``transformers`` is installed). Each is built once with seed 0: a deep copy goes
to Torch-Pruning (TP), the module itself is exported for Prunery as ``zoo_seq.export`` does (non-strict,
dynamic batch, and dynamic sequence where the entry allows it; batch 2). Both remove whole attention heads and
MLP widths at the same ratio with L2 magnitude importance, local (per group) selection, and leave the residual
stream (hidden size) whole:

* ours   ``prune(ep, PruneConfig(ratio=r, attention="heads"))`` (``prune_hidden=False``, the default)
* TP     ``tp.pruner.MetaPruner(model, inputs, importance=GroupMagnitudeImportance(p=2), pruning_ratio=r,
         global_pruning=False, num_heads={q/k/v or fused qkv Linear: heads}, prune_num_heads=True,
         prune_head_dims=False, head_pruning_ratio=r, ignored_layers=[...])`` then ``step()``, traced at batch 1.
         ``ignored_layers`` = every norm module (class name ending in "Norm": LayerNorm, RMSNorm, LlamaRMSNorm,
         T5LayerNorm, ...), every ``nn.Embedding`` and the output layer (the last Linear/Conv1D to run): TP drops
         a whole group when one of its output-pruned layers is ignored, so this keeps the residual stream (and
         the logits) whole, as ours does. ``num_heads`` is read per attention class (``TP_ATTENTION``); after
         ``step()`` the attention modules' head-count attributes are set from ``pruner.num_heads`` as TP's
         examples do (e.g. ``attn.heads``, HF ``num_attention_heads`` / ``num_key_value_groups``). Nothing else
         is changed (no forward is rewritten): a TP result that raises or gives another output shape than the
         original model's is a failure, reported with the error's first line.

Timings (one warm-up, then ``--repeat`` runs, minimum; export time is excluded on both sides):

* ours     ``report["timings_s"]["graph"] + ["importance"] + ["select_and_remove"]`` (dependency graph,
           importance, selection, pruned module in memory); the re-export that follows (``["reexport"]``) is
           printed separately.
* TP       ``MetaPruner(...)`` construction (traces the model, builds TP's DependencyGraph) + ``step()``, on a
           fresh deep copy each run (copying is not timed).

Status per side: ``ok`` (something was removed and the pruned model called at batch 3 gives the original
model's output shape), ``ok, no-op`` (runs, nothing removed), ``FAILED (prune)`` (the prune call raised, or TP
did not finish within ``--tp-timeout``), ``FAILED (run)`` (the result raised), ``FAILED (shape)`` (another output
shape); the notes give each error's first line, what TP was told, and the parameters whose shapes differ between
the two results. Params are counted on the program (ours, ``report["params_after"]``) and on the module (TP,
unique parameters); "ours/TP" is params after ours / params after TP. The time geomean is over the models both
could prune (both prune calls completed and removed something, whether or not the result runs), and is also
printed over those whose results both run.

Then a GPT-style model of about 100M parameters (``zoo_seq.GPT`` with 12 layers, width 768, 12 heads, MLP 3072,
vocab 16000, context 128, tied embeddings, random weights; inputs (2, 128)) is pruned once by each side, each in
its own child process (multiprocessing spawn), after a warm-up prune of the small ``gpt`` entry in that process.
Memory is the peak growth of VmRSS (sampled every 10 ms in a thread, as ``bench_service.RssSampler`` does) over
its value just before the call: ours ``prune(ep, cfg)`` whole (graph, select, removal, re-export; the program is
exported before the measurement), TP construction + ``step()``. The model's size is its parameter bytes.

    python benchmarks/bench_seq.py [--ratio 0.5] [--models a,b] [--skip-large]

(also ``--repeat N`` (3), ``--tp-timeout S`` (30), ``--json OUT``.)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: `tests` (the zoo)
from bench_cnn import _best, _classifier, _err, _fmt, _layer_diff, _module_params, _out_shape, _runs, _time_limit  # noqa: E402

from prunery.core import PruneConfig, prune  # noqa: E402
from tests import zoo_seq  # noqa: E402

CNN_GEOMEAN = 0.440  # README, bench_cnn.py (latest run): time ours/TP geomean over the CNN zoo
EXPORT_BATCH = 2
TP_BATCH = 1
RUN_BATCH = 3
IN_REPO_ATTENTION = ("vit", "gpt", "encoder_manual", "llama", "swin_block")

LARGE = dict(vocab=16000, ctx=128, dim=768, depth=12, heads=12, hidden=3072)
LARGE_INPUT = (2, 128)
LARGE_TIME_TARGET = 2.0  # ours graph + prune < 2x TP's build + step
LARGE_MEM_TARGET = 2.0  # ours peak RSS growth < 2x the model's parameter bytes


# --------------------------------------------------------------------------------------------------
# what Torch-Pruning must be told, per attention class
# --------------------------------------------------------------------------------------------------

HeadsOf = Callable[[nn.Module], dict[str, int]]  # attention module -> {projection attribute: its head count}
Fixup = Callable[[nn.Module, Callable[[str], int]], dict[str, int]]  # (attention, heads after of attr) -> set


def _set(attn: nn.Module, **attrs: int) -> dict[str, int]:
    for k, v in attrs.items():
        setattr(attn, k, v)
    return attrs


def _qkv(*names: str, attr: str) -> HeadsOf:
    return lambda a: {n: int(getattr(a, attr)) for n in names}


def _llama_heads(a: nn.Module) -> dict[str, int]:
    n, kv = a.config.num_attention_heads, a.config.num_key_value_heads
    return {"q_proj": n, "k_proj": kv, "v_proj": kv}


# class name -> (num_heads entries, attributes to set after step()). TP's examples set the head counts the
# forward reads (HF: ``num_attention_heads`` etc.; LLaMA: ``num_key_value_groups``); hand-written modules here
# keep theirs in ``heads`` / ``kv_heads``.
TP_ATTENTION: dict[str, tuple[HeadsOf, Fixup]] = {
    "FusedQKVAttention": (_qkv("qkv", attr="heads"), lambda a, h: _set(a, heads=h("qkv"))),
    "WindowAttention": (_qkv("qkv", attr="heads"), lambda a, h: _set(a, heads=h("qkv"))),
    "CausalSelfAttention": (_qkv("q", "k", "v", attr="heads"), lambda a, h: _set(a, heads=h("q"))),
    "ManualAttention": (_qkv("q", "k", "v", attr="heads"), lambda a, h: _set(a, heads=h("q"))),
    "GQAttention": (
        lambda a: {"q_proj": a.heads, "k_proj": a.kv_heads, "v_proj": a.kv_heads},
        lambda a, h: _set(a, heads=h("q_proj"), kv_heads=h("k_proj")),
    ),
    "BertSelfAttention": (
        _qkv("query", "key", "value", attr="num_attention_heads"),
        lambda a, h: _set(a, num_attention_heads=h("query"), all_head_size=a.query.out_features),
    ),
    "ViTAttention": (
        _qkv("q_proj", "k_proj", "v_proj", attr="num_attention_heads"),
        lambda a, h: _set(a, num_attention_heads=h("q_proj")),
    ),
    "DistilBertSelfAttention": (
        _qkv("q_lin", "k_lin", "v_lin", attr="n_heads"), lambda a, h: _set(a, n_heads=h("q_lin"))
    ),
    "GPT2Attention": (
        _qkv("c_attn", attr="num_heads"),
        lambda a, h: _set(a, num_heads=h("c_attn"), split_size=a.c_attn.weight.shape[1] // 3),
    ),
    "T5Attention": (
        _qkv("q", "k", "v", attr="n_heads"), lambda a, h: _set(a, n_heads=h("q"), inner_dim=a.q.out_features)
    ),
    **{
        cls: (_llama_heads, lambda a, h: _set(a, num_key_value_groups=h("q_proj") // h("k_proj")))
        for cls in ("LlamaAttention", "Qwen2Attention", "MistralAttention")
    },
}


def _is_norm(m: nn.Module) -> bool:
    return type(m).__name__.lower().endswith("norm")


def _output_layer(model: nn.Module, inputs: tuple) -> list[str]:
    """The last Linear (or ``transformers`` Conv1D) to run: the output layer, whose outputs TP must keep."""
    return _classifier(model, inputs, lambda m: isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")


def tp_setup(model: nn.Module, inputs: tuple) -> dict[str, Any]:
    """Module names only (each timed run maps them onto its own deep copy): the attention modules with their
    ``num_heads`` entries, and the ignored layers."""
    attention = {}
    for name, m in model.named_modules():
        spec = TP_ATTENTION.get(type(m).__name__)
        if spec is not None:
            attention[name] = spec[0](m)
    norms = [n for n, m in model.named_modules() if n and _is_norm(m)]
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    output = _output_layer(model, inputs)
    return {"attention": attention, "ignored": sorted({*norms, *embeddings, *output}), "norms": norms,
            "embeddings": embeddings, "output": output}


def tp_describe(setup: dict[str, Any], model: nn.Module) -> str:
    """What TP had to be told for this model, in one line."""
    att = setup["attention"]
    classes = sorted({type(model.get_submodule(n)).__name__ for n in att})
    counts = sorted({f"{p}={h}" for d in att.values() for p, h in d.items()})
    return (
        f"num_heads for {len(att)} attention modules ({', '.join(classes) or 'none found'}: "
        f"{', '.join(counts)}); ignored {len(setup['norms'])} norms, {len(setup['embeddings'])} embeddings, "
        f"output layer {setup['output']}"
    )


def tp_prune(model: nn.Module, inputs: tuple, ratio: float, setup: dict[str, Any]) -> tuple[nn.Module, Any]:
    import torch_pruning as tp

    num_heads = {}
    for attn_name, projs in setup["attention"].items():
        attn = model.get_submodule(attn_name)
        for proj, heads in projs.items():
            num_heads[getattr(attn, proj)] = heads
    pruner = tp.pruner.MetaPruner(
        model,
        inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[model.get_submodule(n) for n in setup["ignored"]],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        in_channel_groups={},  # fresh dicts: MetaPruner's defaults are shared mutable ones it writes into
        out_channel_groups={},
    )
    pruner.step()
    return model, pruner


def tp_fixup(model: nn.Module, pruner: Any, setup: dict[str, Any]) -> str:
    """Set the attention modules' head counts from ``pruner.num_heads`` (as TP's transformer examples do); returns
    what was set, for the first attention module (e.g. ``heads=2``)."""
    first: dict[str, int] = {}
    for attn_name in setup["attention"]:
        attn = model.get_submodule(attn_name)
        done = TP_ATTENTION[type(attn).__name__][1](attn, lambda proj, a=attn: pruner.num_heads[getattr(a, proj)])
        first = first or {f"{attn_name}.{k}": v for k, v in done.items()}
    return ", ".join(f"{k}={v}" for k, v in first.items())


def _hidden_changed(before: nn.Module, after: nn.Module, setup: dict[str, Any]) -> list[str]:
    """Norm and embedding parameters whose shape TP changed (should be none: the hidden size stays whole)."""
    shapes = {k: tuple(v.shape) for k, v in after.named_parameters()}
    out = []
    for n in [*setup["norms"], *setup["embeddings"]]:
        for pn, p in before.get_submodule(n).named_parameters(prefix=n):
            if pn in shapes and shapes[pn] != tuple(p.shape):
                out.append(f"{pn} {tuple(p.shape)} -> {shapes[pn]}")
    return out


# --------------------------------------------------------------------------------------------------
# one model, both sides
# --------------------------------------------------------------------------------------------------


def _status(pruned: bool, runs: bool, err: str, removed: bool) -> str:
    """ok / FAILED (prune): the prune call raised / FAILED (run): the result raised / FAILED (shape): another
    output shape; "ok, no-op" when the result runs but nothing was removed."""
    if not pruned:
        return "FAILED (prune)"
    if not runs:
        return "FAILED (shape)" if err.startswith("output shape") else "FAILED (run)"
    return "ok" if removed else "ok, no-op"


def bench_model(name: str, ratio: float, repeat: int, tp_timeout: float) -> dict[str, Any]:
    entry = zoo_seq.SEQ_ZOO[name]
    model, x_export = zoo_seq.build(name, seed=0)
    x_tp, x_run = entry.example_inputs(TP_BATCH), entry.example_inputs(RUN_BATCH)
    assert x_export[0].shape[0] == EXPORT_BATCH
    with torch.no_grad():
        expected = _out_shape(model(*x_run))
    tp_model0 = copy.deepcopy(model)  # TP's copy of the very same weights
    row: dict[str, Any] = {"model": name, "ratio": ratio, "params_module": _module_params(model)}

    # --- ours --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ep = torch.export.export(model, x_export, dynamic_shapes=zoo_seq.dynamic_shapes(name), strict=False)
    row["export_s"] = time.perf_counter() - t0
    cfg = PruneConfig(ratio=ratio, attention="heads")
    ours_shapes: dict[str, tuple[int, ...]] = {}
    try:
        best, best_re, res = math.inf, math.inf, None
        for i in range(repeat + 1):  # the first is the warm-up
            gc.collect()
            gc.disable()
            try:
                res = prune(ep, cfg)
            finally:
                gc.enable()
            t = res.report["timings_s"]
            if i:
                best = min(best, t["graph"] + t["importance"] + t["select_and_remove"])
                best_re = min(best_re, t["reexport"])
        assert res is not None
        rep = res.report
        row.update(ours_pruned=True, ours_error="", ours_s=best, reexport_s=best_re,
                   params_before=rep["params_before"], ours_params=rep["params_after"],
                   ours_pruned_groups=rep["pruned_groups"], ours_groups=rep["num_groups"])
        row["ours_runs"], row["ours_run_err"] = _runs(res.program.module(), x_run, expected)
        ours_shapes = {k: tuple(v.shape) for k, v in res.program.state_dict.items()}
    except Exception as e:  # noqa: BLE001 - a failure is a result
        row.update(ours_pruned=False, ours_error=_err(e), ours_s=None, reexport_s=None, params_before=None,
                   ours_params=None, ours_runs=False, ours_run_err="")
    if row["params_before"] is None:
        row["params_before"] = row["params_module"]
    row["ours_removed"] = row["ours_pruned"] and row["ours_params"] < row["params_before"]
    row["ours"] = _status(row["ours_pruned"], row["ours_runs"], row["ours_run_err"], row["ours_removed"])

    # --- Torch-Pruning -----------------------------------------------------------------------------
    setup = tp_setup(tp_model0, x_tp)
    row["tp_setup"] = tp_describe(setup, tp_model0)
    tp_model: nn.Module | None = None

    def run_tp(m: nn.Module) -> tuple[nn.Module, Any]:
        with _time_limit(tp_timeout):
            return tp_prune(m, x_tp, ratio, setup)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["tp_s"], (tp_model, pruner) = _best(run_tp, repeat, lambda: copy.deepcopy(tp_model0))
        row.update(tp_pruned=True, tp_error="")
    except Exception as e:  # noqa: BLE001 - a TP failure is a result
        row.update(tp_pruned=False, tp_s=None, tp_error=_err(e), tp_params=None, tp_runs=False, tp_run_err="")
    if tp_model is not None:
        row["tp_params"] = _module_params(tp_model)
        try:
            row["tp_set"] = tp_fixup(tp_model, pruner, setup)
            row["tp_runs"], row["tp_run_err"] = _runs(tp_model, x_run, expected)
        except Exception as e:  # noqa: BLE001
            row["tp_runs"], row["tp_run_err"] = False, f"setting head counts: {_err(e)}"
        row["tp_hidden_changed"] = _hidden_changed(tp_model0, tp_model, setup)
    row["tp_removed"] = row["tp_pruned"] and row["tp_params"] < row["params_module"]
    row["tp"] = _status(row["tp_pruned"], row["tp_runs"], row["tp_run_err"], row["tp_removed"])

    # --- comparison ----------------------------------------------------------------------------------
    po, pt = row["ours_params"], row.get("tp_params")
    row["params_ratio"] = po / pt if po is not None and pt else None
    row["time_ratio"] = row["ours_s"] / row["tp_s"] if row["ours_s"] is not None and row["tp_s"] else None
    row["layer_diff"] = _layer_diff(tp_model0, ours_shapes, tp_model) if ours_shapes else []
    return row


COLUMNS = [
    ("model", 14), ("ours", 14), ("TP", 14), ("params before", 13), ("params ours", 12), ("params TP", 12),
    ("ours/TP", 7), ("ours s", 7), ("TP s", 7), ("time o/TP", 9), ("reexport s", 10),
]


def _line(cells: list[str]) -> str:
    return " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True)))


def _table_row(r: dict[str, Any]) -> str:
    return _line([
        r["model"], r["ours"], r["tp"], _fmt(r["params_before"], ","), _fmt(r["ours_params"], ","),
        _fmt(r.get("tp_params"), ","), _fmt(r["params_ratio"], ".3f"), _fmt(r["ours_s"], ".4f"),
        _fmt(r["tp_s"], ".4f"), _fmt(r["time_ratio"], ".3f"), _fmt(r["reexport_s"], ".3f"),
    ])


def _notes(r: dict[str, Any]) -> list[str]:
    m = r["model"]
    out = [f"  {m}: TP settings: {r['tp_setup']}" + (f"; after step() set {r['tp_set']}" if r.get("tp_set") else "")]
    for key in ("ours_error", "ours_run_err", "tp_error", "tp_run_err"):
        if r.get(key):
            out.append(f"  {m}: {key}: {r[key]}")
    if r.get("tp_hidden_changed"):
        out.append(f"  {m}: TP changed ignored layers: {r['tp_hidden_changed'][:4]}")
    if r["params_module"] != r["params_before"]:
        out.append(f"  {m}: module params {r['params_module']:,} != program params {r['params_before']:,}")
    diff = r.get("layer_diff") or []
    if diff:
        out.append(f"  {m}: {len(diff)} parameters shaped differently (before: ours vs TP):")
        out += [f"      {d['name']}: {d['before']}: {d['ours']} vs {d['tp']}" for d in diff[:8]]
        if len(diff) > 8:
            out.append(f"      ... {len(diff) - 8} more (see --json)")
    return out


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


# --------------------------------------------------------------------------------------------------
# the ~100M GPT: memory and time, one child process per side
# --------------------------------------------------------------------------------------------------


def _vmrss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise KeyError("VmRSS")


class RssSampler:
    """This process's VmRSS sampled every ``period_s`` in a thread while in the ``with`` block (the approach of
    ``benchmarks/bench_service.py``): ``growth_bytes`` = peak - value on entry."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.before_kib = self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _vmrss_kib())
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self.before_kib = self.peak_kib = _vmrss_kib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _vmrss_kib())

    @property
    def growth_bytes(self) -> int:
        return (self.peak_kib - self.before_kib) * 1024


def _large_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = zoo_seq.GPT(**LARGE).eval()
    g = torch.Generator().manual_seed(1234)
    return model, (torch.randint(0, LARGE["vocab"], LARGE_INPUT, generator=g, dtype=torch.int64),)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # unique parameters (tied counted once)


def large_child(side: str, ratio: float) -> dict[str, Any]:
    """Runs in a spawned process: warm up on the small ``gpt`` entry, then prune the ~100M GPT once."""
    warnings.simplefilter("ignore")
    cfg = PruneConfig(ratio=ratio, attention="heads")
    model, x = _large_model()
    out: dict[str, Any] = {"side": side, "params": _module_params(model), "param_bytes": _param_bytes(model)}
    with torch.no_grad():
        expected = _out_shape(model(*x))
    x_run = (x[0][:1, :64],)  # another batch and sequence length
    with torch.no_grad():
        expected_run = _out_shape(model(*x_run))
    if side == "ours":
        prune(zoo_seq.export("gpt"), cfg)  # warm-up
        batch = torch.export.Dim("batch", min=1, max=zoo_seq.BATCH_MAX)
        seq = torch.export.Dim("seq", min=1, max=LARGE["ctx"])
        t0 = time.perf_counter()
        ep = torch.export.export(model, x, dynamic_shapes=({0: batch, 1: seq},), strict=False)
        out["export_s"] = time.perf_counter() - t0
        gc.collect()
        try:
            with RssSampler() as rss:
                res = prune(ep, cfg)
            t = res.report["timings_s"]
            out.update(ok=True, prune_s=t["graph"] + t["importance"] + t["select_and_remove"], graph_s=t["graph"],
                       reexport_s=t["reexport"], params_after=res.report["params_after"])
            out["runs"], out["run_err"] = _runs(res.program.module(), x_run, expected_run)
        except Exception as e:  # noqa: BLE001
            out.update(ok=False, error=_err(e))
            return out
    else:
        small, xs = zoo_seq.build("gpt")
        tp_prune(small, zoo_seq.SEQ_ZOO["gpt"].example_inputs(TP_BATCH), ratio, tp_setup(small, xs))  # warm-up
        x_tp = (x[0][:TP_BATCH],)
        setup = tp_setup(model, x_tp)
        gc.collect()
        try:
            with RssSampler() as rss:
                t0 = time.perf_counter()
                model, pruner = tp_prune(model, x_tp, ratio, setup)
                out["prune_s"] = time.perf_counter() - t0
            out.update(ok=True, params_after=_module_params(model))
            tp_fixup(model, pruner, setup)
            out["runs"], out["run_err"] = _runs(model, x_run, expected_run)
        except Exception as e:  # noqa: BLE001
            out.update(ok=False, error=_err(e))
            return out
    out["rss_before"], out["rss_growth"] = rss.before_kib * 1024, rss.growth_bytes
    out["expected"] = expected
    return out


def bench_large(ratio: float) -> dict[str, dict[str, Any]]:
    out = {}
    for side in ("ours", "tp"):
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            try:
                out[side] = pool.submit(large_child, side, ratio).result()
            except Exception as e:  # noqa: BLE001 - a crashed child (e.g. killed for memory) is a result
                out[side] = {"side": side, "ok": False, "error": _err(e)}
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _large_lines(res: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for side, label in (("ours", "ours"), ("tp", "TP")):
        r = res[side]
        if not r.get("ok"):
            lines.append(f"  {label}: FAILED: {r.get('error')}")
            continue
        size = r["param_bytes"]
        extra = (f"graph {r['graph_s']:.3f}s + importance, select_and_remove {r['prune_s'] - r['graph_s']:.3f}s; "
                 f"re-export {r['reexport_s']:.2f}s (export before it {r['export_s']:.2f}s)"
                 if side == "ours" else "MetaPruner construction + step()")
        lines.append(
            f"  {label}: {r['prune_s']:.3f}s ({extra}); params {r['params']:,} -> {r['params_after']:,}; "
            f"peak RSS growth {_mb(r['rss_growth'])} = {r['rss_growth'] / size:.2f}x the model's "
            f"{_mb(size)} (RSS before {_mb(r['rss_before'])}); runs: "
            f"{'yes' if r['runs'] else 'NO: ' + r['run_err']}"
        )
    return lines


def _target(label: str, met: bool) -> str:
    return f"target: {label}: {'MET' if met else 'MISSED'}"


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="", help="comma-separated SEQ_ZOO names (default: every one with attention)")
    ap.add_argument("--skip-large", action="store_true", help="skip the ~100M GPT memory/time check")
    ap.add_argument("--tp-timeout", type=float, default=30.0, help="seconds per Torch-Pruning run (a longer run "
                    "is a failure)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    default = [n for n in zoo_seq.SEQ_ZOO if n in IN_REPO_ATTENTION or n.startswith("hf_")]
    names = [n for n in args.models.split(",") if n] or default
    unknown = [n for n in names if n not in zoo_seq.SEQ_ZOO]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {list(zoo_seq.SEQ_ZOO)}")
    skipped = [n for n in names if not zoo_seq.available(n)]
    names = [n for n in names if n not in skipped]

    print(
        f"ratio {args.ratio} (heads and MLP widths; hidden size kept), L2 magnitude, local; repeat {args.repeat} "
        f"(min) after 1 warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}; 'ours s' = graph + importance + select_and_remove, 'TP s' = MetaPruner() + step()"
        + (f"; skipped (not installed): {skipped}" if skipped else "")
    )
    print()
    print(_line([h for h, _ in COLUMNS]))
    rows, notes = [], []
    t_start = time.perf_counter()
    for name in names:
        r = bench_model(name, args.ratio, args.repeat, args.tp_timeout)
        rows.append(r)
        print(_table_row(r), flush=True)
        notes += _notes(r)
    print("\nnotes:")
    print("\n".join(notes))

    # "both could prune": both prune calls completed and removed something (the results may not run)
    both = [r for r in rows if r["time_ratio"] is not None and r["ours_removed"] and r["tp_removed"]]
    both_ok = [r for r in both if r["ours_runs"] and r["tp_runs"]]
    geo = _geomean([r["time_ratio"] for r in both])
    geo_ok = _geomean([r["time_ratio"] for r in both_ok])
    ours_ok = [r["model"] for r in rows if r["ours"] == "ok"]
    tp_ok = [r["model"] for r in rows if r["tp"] == "ok"]
    print(
        f"\nsummary: time ours/TP geomean {geo:.3f} over the {len(both)} models both could prune "
        f"({geo_ok:.3f} over the {len(both_ok)} whose results both run); CNN geomean (README) {CNN_GEOMEAN:.3f}; "
        f"ours ok {len(ours_ok)}/{len(rows)}, TP ok {len(tp_ok)}/{len(rows)}; "
        f"wall {time.perf_counter() - t_start:.1f}s, load average {os.getloadavg()[0]:.2f}"
    )

    large = None
    if not args.skip_large:
        n = _module_params(zoo_seq.GPT(**LARGE))
        print(f"\ngpt_100m: zoo_seq.GPT({', '.join(f'{k}={v}' for k, v in LARGE.items())}), {n:,} params, "
              f"inputs {LARGE_INPUT}; one prune per side, each in its own spawned process")
        t0 = time.perf_counter()
        large = bench_large(args.ratio)
        print("\n".join(_large_lines(large)))
        print(f"  wall {time.perf_counter() - t0:.1f}s")

    print()
    failed = [r["model"] for r in rows if r["ours"] != "ok"]
    print(_target(f"every model prunes with ours ({len(ours_ok)}/{len(rows)} ok"
                  + (f"; failed: {failed})" if failed else ")"), not failed))
    print(_target(f"time ratio no worse than on CNNs (seq geomean {geo:.3f} vs CNN geomean {CNN_GEOMEAN:.3f})",
                  bool(both) and geo <= CNN_GEOMEAN))
    if large is not None:
        o, t = large["ours"], large["tp"]
        if o.get("ok") and t.get("ok"):
            ratio = o["prune_s"] / t["prune_s"]
            print(_target(f"gpt_100m ours graph+prune under {LARGE_TIME_TARGET:g}x TP's time (ours "
                          f"{o['prune_s']:.3f}s / TP {t['prune_s']:.3f}s = {ratio:.3f})", ratio < LARGE_TIME_TARGET))
        else:
            print(_target(f"gpt_100m ours graph+prune under {LARGE_TIME_TARGET:g}x TP's time (a side failed)",
                          False))
        if o.get("ok"):
            mem = o["rss_growth"] / o["param_bytes"]
            print(_target(f"gpt_100m ours extra memory within {LARGE_MEM_TARGET:g}x the model's size "
                          f"({_mb(o['rss_growth'])} / {_mb(o['param_bytes'])} = {mem:.2f}x)",
                          mem <= LARGE_MEM_TARGET))
        else:
            print(_target(f"gpt_100m ours extra memory within {LARGE_MEM_TARGET:g}x the model's size (failed)",
                          False))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "large": large}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
