"""Accuracy after pruning to a MACs budget, measured on the command users run (issue 5): ``prunery prune`` as a
subprocess, side by side with Torch-Pruning's (TP) GroupNormPruner recipe on the same data, model, step budgets
and seeds.

Target: Digits CNN, 5 seeds, ``--sparse-steps 300 --reg 1e-3 --finetune-steps 300`` and the CLI's defaults
otherwise: our mean test accuracy at least TP's mean at 1/4, 1/10 and 1/20 of the dense MACs.

Reproduce (3 to 4 minutes per seed on 2 shared CPU cores, most of it in ``prunery prune``; ``--quick``, about
a minute, for a smoke test):

    python benchmarks/bench_accuracy.py [--seeds 0,1,2,3,4] [--budgets 4,10,20] [--quick] [--threads 2]
                                        [--json FILE] [--keep DIR]

Data: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797 8x8 images, 10 classes, shipped
inside the package, nothing downloaded), pixels scaled to [0, 1], shape (N, 1, 8, 8), targets int64 class ids.
Per seed S a stratified split (``train_test_split(..., test_size=0.2, stratify=y, random_state=S)``): 80% training
rows, 20% test rows. Every accuracy printed is on the test rows, which neither side sees.

Model (``DigitsCNN``): conv(1->32, 3x3, pad 1)-BN-ReLU, conv(32->64)-BN-ReLU, conv(64->64)-BN-ReLU, global mean
pool, Linear(64->10); 3.56M MACs per sample, all of them in the three convolutions but 640. The output layer's
10 classes stay whole on both sides (ours never narrows a program output; TP is told ``ignored_layers=[fc]``).

Per seed S:

1. Dense training on all the training rows: Adam (lr 1e-3), 300 steps of batch 64 (epochs reshuffled), BatchNorm
   in training mode (99-100% test accuracy). The model is exported in eval mode with a dynamic batch
   (``torch.export.export(model.eval(), (x[:2],), dynamic_shapes=({0: Dim("batch")},))``) and written with
   ``torch.export.save`` to ``base.pt2``; the training rows are written with
   ``prunery.core.data.save_dataset("train.npz", x, y, format="npz")``. TP gets a deep copy of the same module.

2. Ours, for F = 1/budget (0.25, 0.1, 0.05), exactly this command line, run as a subprocess (``prunery`` from PATH):

       prunery prune base.pt2 -o out.pt2 --dataset train.npz --target-macs F --sparse-steps 300 --reg 1e-3 \
           --finetune-steps 300 --seed S --report r.json

   Everything else is the CLI's default (importance l2, --held-out 0.1, --batch-size 64, --alpha 4, --lr,
   --finetune-lr, --target-steps 4, the device). The recipe holds out 10% of the file's rows itself (its
   ``Dataset.split(0.1, seed=S)``) for its best recovery checkpoint and trains on the other 90%. ``out.pt2`` is
   loaded with ``prunery.core.load_program`` and scored on the test rows; its MACs are read from the report
   (``macs_after / macs_before``) and recounted by ``prunery.core.count``. The wall time of each command is
   recorded (process start to exit: sparse training, pruning, recovery, the report's evaluation and latency).

3. TP (torch-pruning, its GroupNormPruner recipe as in its README and ``benchmarks/main.py``), same model, same
   training rows: the file ``train.npz`` is read back and split exactly as the recipe does
   (``Dataset.split(0.1, seed=S)``), so TP trains on the very rows ours trains on and keeps its best fine-tuning
   checkpoint on the very rows ours keeps its on. Batches of 64 as the recipe draws them (epochs of the training
   part, each reshuffled with seed S + epoch, the short last batch dropped as TP's ``DataLoader(shuffle=True,
   drop_last=True)`` does too; recovery starts at a fresh epoch).
   - ``pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
     reg=1e-3, alpha=4, global_pruning=True, iterative_steps=4, ignored_layers=[model.fc])``, built in eval mode.
   - Sparse training: 300 steps of Adam (lr 1e-3), ``model.train()``, cross-entropy, and
     ``loss.backward(); pruner.regularize(model); optimizer.step()`` as TP's examples do (TP 1.6.0's
     ``regularize(model, alpha=2**4)``: gamma in [1, 2**4], our ``--alpha 4``; TP recomputes gamma every step).
     No checkpoint is picked during sparse training (ours keeps none either).
   - Pruning, ``model.eval()``: TP has no MACs target, so its ``pruning_ratio`` is searched: each candidate is a
     fresh pruner on a deep copy of the sparse-trained model, stepped ``iterative_steps`` = 4 times (TP's linear
     schedule; our --target-steps 4), its MACs counted by forward hooks on Conv2d/Linear (the formula of our
     ``count``, checked equal on the dense model). The MACs do not fall with the ratio all the way: where the
     global threshold would take every channel of a layer, TP (``DG.check_pruning_group``) prunes nothing from
     that layer in that round, so after sparse training ratio 0.99 can leave more MACs than 0.8. So a scan over
     0.05, 0.10, ..., 0.95, 0.99 finds the smallest ratio reaching the budget, then a bisection between it and the
     scan's previous ratio (down to a 1e-4 interval); of every candidate tried, the one whose MACs lie closest to
     the budget is kept. (TP's benchmarks instead step a 400-step pruner until the speed-up is reached; the search
     hits the budget as closely with the same 4 rounds as ours.) Sparse training does not depend on the budget,
     so it runs once per seed and its result is pruned to every budget.
   - Recovery: 300 steps of Adam (lr 1e-3, cosine schedule set before each step), ``model.train()``; the held-out
     accuracy (eval mode) before training, every 300 // 10 steps and at the end; the best checkpoint (the first on
     ties; BatchNorm statistics included) is kept, as ours does.
   TP's MACs after pruning are recounted by our ``count`` on its export, so both sides are counted alike.

4. Printed per seed and as mean ± std per budget: test accuracy dense / ours / TP, the MACs each reached, who
   wins, wall times, and PASS/FAIL of the target (our mean >= TP's mean at every budget). ``--json FILE`` writes
   every figure (with the command lines and each report's target, evaluation and training sections).

``--quick``: one seed (unless --seeds is given), 60 sparse-training + 60 recovery steps on both sides (a smoke
test, not a result). OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set, also for the
subprocess, which gets ``OMP_NUM_THREADS=--threads``): on a shared 2-core machine spinning threads made a training
step ~30x slower whenever another process held a core.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

# Before torch loads OpenMP: its threads otherwise spin while they wait, and when another process holds one of the
# two cores a 2-thread step takes ~30x longer (420 ms instead of 15 ms per training step, measured here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from prunery.core import count, load_program  # noqa: E402
from prunery.core.counting import traced_size  # noqa: E402
from prunery.core.data import Dataset, load_dataset, save_dataset  # noqa: E402
from prunery.core.evaluation import evaluate  # noqa: E402

EXPORT_BATCH = 2  # the smallest example batch that keeps the exported batch dim dynamic
MISS = 0.02  # a side whose MACs miss the budget by more than this (relative) is flagged


@dataclass(frozen=True)
class Settings:
    dense_steps: int = 300  # Adam, lr 1e-3, BatchNorm in training mode, all the training rows
    dense_lr: float = 1e-3
    batch: int = 64  # the CLI's --batch-size default; TP's batch
    sparse_steps: int = 300  # --sparse-steps; TP's sparse-training steps
    reg: float = 1e-3  # --reg; TP's reg
    ft_steps: int = 300  # --finetune-steps; TP's recovery steps
    alpha: float = 4.0  # the CLI's --alpha default; TP's alpha (gamma base 2**4)
    tp_lr: float = 1e-3  # TP's Adam, sparse training and recovery
    held_out: float = 0.1  # the CLI's --held-out default; TP's checkpoint rows
    prune_steps: int = 4  # the CLI's --target-steps default; TP's iterative_steps


QUICK = Settings(sparse_steps=60, ft_steps=60)


# --- data and model ---------------------------------------------------------------------------------------------


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    return x, torch.from_numpy(digits.target).long()


def split(y: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) row indices, 80/20."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=0.2, stratify=y.numpy(), random_state=seed)
    return np.sort(train), np.sort(test)


class DigitsCNN(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 64), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def train_dense(x: torch.Tensor, y: torch.Tensor, s: Settings, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=s.dense_lr)
    rng = np.random.default_rng(seed + 10_000)
    model.train()
    done = 0
    while done < s.dense_steps:
        perm = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(perm) - s.batch + 1, s.batch):
            idx = perm[i: i + s.batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == s.dense_steps:
                break
    return model.eval()


def export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(copy.deepcopy(model).eval(), (example[:EXPORT_BATCH],), dynamic_shapes=({0: batch},))


def program_macs(program: torch.export.ExportedProgram) -> float:
    """MACs per sample by our `count` (counted at the program's traced example batch)."""
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name not in
                       program.graph_signature.inputs_to_parameters and n.name not in
                       program.graph_signature.inputs_to_buffers)
    return count(program).macs / traced_size(placeholder, 0)


def module_macs(model: nn.Module) -> int:
    """MACs per sample of Conv2d and Linear layers (forward hooks at batch 1): what our `count` counts."""
    total = 0

    def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        else:
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, 8, 8))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def eval_batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i: i + 512], y[i: i + 512]) for i in range(0, len(y), 512)]


def accuracy(program_or_module, batches: list) -> float:
    if isinstance(program_or_module, nn.Module):
        program_or_module.eval()
    return float(evaluate(program_or_module, batches, device="cpu")["accuracy"])


# --- ours: the command line ---------------------------------------------------------------------------------------


def prunery_exe() -> list[str]:
    exe = shutil.which("prunery")
    if exe is None:
        raise SystemExit("`prunery` is not on PATH: install the package (pip install -e .) first")
    return [exe]


def sci(value: float) -> str:
    """1e-3 as "1e-3" (the command line as the docstring writes it), 1.5e-4 as "1.5e-4"."""
    mantissa, exp = f"{value:.12e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def ours_command(base: Path, out: Path, data: Path, fraction: float, seed: int, report: Path,
                 s: Settings) -> list[str]:
    return ["prunery", "prune", str(base), "-o", str(out), "--dataset", str(data), "--target-macs", f"{fraction:g}",
            "--sparse-steps", str(s.sparse_steps), "--reg", sci(s.reg), "--finetune-steps", str(s.ft_steps),
            "--seed", str(seed), "--report", str(report)]


def run_ours(cmd: list[str], log_path: Path, threads: int) -> tuple[float, str | None]:
    """Run the command (`prunery` resolved on PATH); returns its wall time and, when it failed, the tail of its
    output. Its output goes to `log_path`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(prunery_exe() + cmd[1:], stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-12:])
        return wall, f"exited with {proc.returncode}:\n{tail}"
    return wall, None


def ours_one(cmd: list[str], out: Path, rep: Path, lg: Path, threads: int, dense_macs: float, test: list,
             log: Callable[[str], None], name: str) -> dict:
    """One `prunery prune` run and what it produced. A failed run is recorded (accuracy and MACs NaN: the
    budget's target fails) and the benchmark goes on."""
    wall, error = run_ours(cmd, lg, threads)
    nan = float("nan")
    if error is not None:
        log(f"    {name} ours: FAILED after {wall:.1f}s: `{shlex.join(cmd)}` {error}")
        return {"command": shlex.join(cmd), "wall_s": wall, "error": error, "acc": nan, "macs": nan,
                "macs_fraction": nan}
    report = json.loads(rep.read_text())
    program = load_program(out)
    recount = program_macs(program)
    fraction = report["macs_after"] / report["macs_before"]
    if abs(recount / dense_macs - fraction) > 1e-6:
        log(f"    WARNING {name} ours: the report says {fraction:.4%} of the MACs, recounted "
            f"{recount / dense_macs:.4%}")
    training = report.get("training") or {}
    for stage in training.values():
        if isinstance(stage, dict):
            stage.pop("loss_curve", None)  # the recovery's held-out curve stays
    evaluation = report.get("evaluation") or {}
    res = {"command": shlex.join(cmd), "wall_s": wall, "acc": accuracy(program, test), "macs": recount,
           "macs_fraction_report": fraction, "macs_fraction": recount / dense_macs,
           "held_out_after_pruning": evaluation.get("after_pruning", {}).get("accuracy"),
           "held_out_after": evaluation.get("after", {}).get("accuracy"),
           "report": {k: report.get(k) for k in ("target", "evaluation", "training", "dataset", "device",
                                                 "duration_s", "macs_before", "macs_after")}}
    log(f"    {name} ours: {100 * res['acc']:.2f}% test, {recount / dense_macs:.2%} of the MACs, {wall:.1f}s")
    return res


# --- Torch-Pruning's recipe -----------------------------------------------------------------------------------------


def epochs(ds: Dataset, batch: int, seed: int, first_epoch: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches forever, as the recipe draws them: epoch e reshuffled with seed `seed + e`, the short last batch
    dropped (as TP's benchmarks' DataLoader(shuffle=True, drop_last=True) does too)."""
    epoch = first_epoch
    while True:
        yield from ds.batches(batch, shuffle=True, seed=seed + epoch, drop_last=True)
        epoch += 1


def tp_pruner(model: nn.Module, ratio: float, s: Settings):
    import torch_pruning as tp

    model.eval()  # TP traces the model with a forward: in train mode it would move the BatchNorm statistics
    return tp.pruner.GroupNormPruner(
        model, torch.zeros(1, 1, 8, 8), importance=tp.importance.GroupMagnitudeImportance(p=2), reg=s.reg,
        alpha=s.alpha, global_pruning=True, pruning_ratio=ratio, iterative_steps=s.prune_steps,
        ignored_layers=[model.fc])


def tp_sparse_train(model: nn.Module, batches: Iterator, s: Settings) -> nn.Module:
    """TP's sparse training: Adam, model.train(), `pruner.regularize(model)` between backward and step."""
    model = copy.deepcopy(model)
    pruner = tp_pruner(model, 0.5, s)
    base = inspect.signature(pruner.regularize).parameters["alpha"].default
    if base != 2 ** s.alpha:
        raise RuntimeError(f"this torch-pruning's regularize() uses gamma base {base}, not 2**{s.alpha:g}")
    opt = torch.optim.Adam(model.parameters(), lr=s.tp_lr)
    model.train()
    for step in range(s.sparse_steps):
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"TP sparse training: the loss is not finite at step {step + 1} ({float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pruner.regularize(model)
        opt.step()
    return model.eval()


def tp_prune_to(model: nn.Module, goal_macs: float, s: Settings) -> tuple[nn.Module, float]:
    """TP's GroupNormPruner (iterative_steps rounds) at the global pruning ratio whose MACs lie closest to
    `goal_macs`: a scan then a bisection over the ratio, each candidate pruned afresh from a copy. Returns
    (model, ratio)."""
    cache: dict[float, tuple[nn.Module, int]] = {}

    def at(ratio: float) -> tuple[nn.Module, int]:
        if ratio not in cache:
            m = copy.deepcopy(model).eval()
            pruner = tp_pruner(m, ratio, s)
            for _ in range(s.prune_steps):
                pruner.step()
            cache[ratio] = (m, module_macs(m))
        return cache[ratio]

    # MACs fall with the ratio only up to a point: where TP's global threshold would empty a layer, TP leaves that
    # layer alone in that round, so a larger ratio can leave more MACs. A coarse scan finds the first ratio that
    # reaches the goal; the bisection then runs between it and the scan's previous ratio.
    grid = [round(0.05 * i, 2) for i in range(1, 20)] + [0.99]
    hi = next((r for r in grid if at(r)[1] <= goal_macs), None)
    if hi is None:
        closest = min(cache.values(), key=lambda c: c[1])[1]
        raise RuntimeError(f"TP cannot reach {goal_macs:.0f} MACs at any pruning ratio: {closest} at best")
    lo = grid[grid.index(hi) - 1] if grid.index(hi) else 0.0
    while hi - lo >= 1e-4:
        mid = (lo + hi) / 2
        if at(mid)[1] > goal_macs:
            lo = mid
        else:
            hi = mid
    best = min(cache, key=lambda r: (abs(cache[r][1] - goal_macs), r))
    return cache[best][0], best


def tp_finetune(model: nn.Module, batches: Iterator, held: list, s: Settings) -> tuple[nn.Module, list[float]]:
    """Recovery: Adam, cosine lr, model.train(); the held-out accuracy before training, every steps // 10 steps
    and at the end, the first best checkpoint kept. Returns (model, held-out curve)."""
    model = copy.deepcopy(model)
    steps = s.ft_steps
    every = max(1, steps // 10)
    opt = torch.optim.Adam(model.parameters(), lr=s.tp_lr)
    best = accuracy(model, held)
    curve = [best]
    best_state = copy.deepcopy(model.state_dict())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = s.tp_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
        xb, yb = next(batches)
        model.train()
        loss = F.cross_entropy(model(xb), yb)
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"TP recovery: the loss is not finite at step {step + 1} ({float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % every == 0 or done == steps:
            score = accuracy(model, held)
            curve.append(score)
            if score > best:
                best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), curve


# --- one seed ---------------------------------------------------------------------------------------------------


def run_seed(x: torch.Tensor, y: torch.Tensor, seed: int, s: Settings, budgets: list[float], workdir: Path,
             threads: int, log: Callable[[str], None] = print) -> dict:
    """Everything measured for one seed (JSON-ready)."""
    workdir.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = split(y, seed)
    xtr, ytr = x[train_idx], y[train_idx]
    test = eval_batches(x[test_idx], y[test_idx])

    t0 = time.perf_counter()
    model = train_dense(xtr, ytr, s, seed)
    dense_acc = accuracy(model, test)
    ep = export(model, xtr)
    base, data = workdir / "base.pt2", workdir / "train.npz"
    torch.export.save(ep, base)
    save_dataset(data, xtr, ytr, format="npz")
    dense_macs = program_macs(load_program(base))
    if module_macs(model) != dense_macs:
        raise RuntimeError(f"MAC counters disagree on the dense model: {module_macs(model)} vs {dense_macs}")
    log(f"  seed {seed}: dense {100 * dense_acc:.2f}% test accuracy, {dense_macs:,.0f} MACs per sample "
        f"({time.perf_counter() - t0:.1f}s)")
    result: dict = {"seed": seed, "train_rows": len(ytr), "test_rows": len(test_idx), "dense_acc": dense_acc,
                    "dense_macs": dense_macs, "budgets": {}}

    # ours: the command line, once per budget
    ours: dict[float, dict] = {}
    for b in budgets:
        tag = f"{b:g}x"
        out, rep, lg = workdir / f"out-{tag}.pt2", workdir / f"report-{tag}.json", workdir / f"prune-{tag}.log"
        cmd = ours_command(base, out, data, 1.0 / b, seed, rep, s)
        ours[b] = ours_one(cmd, out, rep, lg, threads, dense_macs, test, log, f"seed {seed} {tag}")

    # TP: the same rows, split as the recipe splits them
    full = load_dataset(data)
    tp_train, tp_held = full.split(s.held_out, seed=seed)
    held = list(tp_held.batches(s.batch))
    rep_ds = next((o["report"].get("dataset") or {} for o in ours.values() if "report" in o), {})
    if rep_ds and (rep_ds.get("train_rows"), rep_ds.get("held_out_rows")) != (len(tp_train), len(tp_held)):
        log(f"    WARNING seed {seed}: the recipe split {rep_ds.get('train_rows')}/{rep_ds.get('held_out_rows')} "
            f"rows, TP {len(tp_train)}/{len(tp_held)}")
    per_epoch = len(tp_train) // s.batch
    ft_first_epoch = math.ceil(s.sparse_steps / per_epoch) + 1  # the recipe's recovery starts at a fresh epoch
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = tp_sparse_train(model, epochs(tp_train, s.batch, seed), s)
    tp_sparse_s = time.perf_counter() - t0
    log(f"    seed {seed} TP sparse training: {tp_sparse_s:.1f}s")
    tp: dict[float, dict] = {}
    for b in budgets:
        tag = f"{b:g}x"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, ratio = tp_prune_to(sparse, dense_macs / b, s)
        prune_s = time.perf_counter() - t0
        macs = program_macs(export(pruned, xtr))  # the same counter as ours
        held_pruned = accuracy(pruned, held)
        t0 = time.perf_counter()
        tuned, curve = tp_finetune(pruned, epochs(tp_train, s.batch, seed, ft_first_epoch), held, s)
        ft_s = time.perf_counter() - t0
        tp[b] = {"acc": accuracy(tuned, test), "macs": macs, "macs_fraction": macs / dense_macs,
                 "pruning_ratio": ratio, "held_out_after_pruning": held_pruned, "held_out_after": max(curve),
                 "held_out_curve": curve, "sparse_s": tp_sparse_s, "prune_s": prune_s, "finetune_s": ft_s,
                 "wall_s": tp_sparse_s + prune_s + ft_s}
        log(f"    seed {seed} {tag} TP: {100 * tp[b]['acc']:.2f}% test, {macs / dense_macs:.2%} of the MACs "
            f"(pruning_ratio {ratio:.4f}), prune {prune_s:.1f}s + recovery {ft_s:.1f}s")

    for b in budgets:
        result["budgets"][f"{b:g}"] = {"ours": ours[b], "tp": tp[b]}
    return result


# --- summary ------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def pct(values: list[float]) -> str:
    m, sd = mean_std(values)
    return f"{100 * m:6.2f} ± {100 * sd:5.2f}"


def summarise(seeds: list[dict], budgets: list[float]) -> dict:
    out: dict = {"dense_acc": mean_std([r["dense_acc"] for r in seeds]), "budgets": {}}
    for b in budgets:
        rows = [r["budgets"][f"{b:g}"] for r in seeds]
        o = {k: [row["ours"][k] for row in rows] for k in ("acc", "macs_fraction", "wall_s")}
        t = {k: [row["tp"][k] for row in rows] for k in ("acc", "macs_fraction", "wall_s")}
        ours_m, tp_m = float(np.mean(o["acc"])), float(np.mean(t["acc"]))
        out["budgets"][f"{b:g}"] = {
            "ours_acc": mean_std(o["acc"]), "tp_acc": mean_std(t["acc"]),
            "ours_macs_fraction": mean_std(o["macs_fraction"]), "tp_macs_fraction": mean_std(t["macs_fraction"]),
            "ours_wall_s": mean_std(o["wall_s"]), "tp_wall_s": mean_std(t["wall_s"]),
            "per_seed_diff_pp": [100 * (a - c) for a, c in zip(o["acc"], t["acc"], strict=True)],
            "failed_runs": sum("error" in row["ours"] for row in rows),
            "winner": ("ours failed" if math.isnan(ours_m) else "ours" if ours_m > tp_m else "TP" if tp_m > ours_m
                       else "tie"),
            "pass": bool(ours_m >= tp_m),  # False when a run failed (NaN)
        }
    out["pass"] = all(v["pass"] for v in out["budgets"].values())
    return out


def print_summary(seeds: list[dict], budgets: list[float], summary: dict, s: Settings) -> None:
    n = len(seeds)
    print()
    print(f"dense: {pct([r['dense_acc'] for r in seeds])} % test accuracy, {seeds[0]['dense_macs']:,.0f} MACs per "
          f"sample (mean ± std over {n} seed{'s' if n > 1 else ''})")
    header = (f"{'budget':>6} | {'ours test acc (%)':>17} | {'TP test acc (%)':>17} | {'ours-TP pp':>10} | "
              f"{'MACs ours / TP':>15} | {'wall ours / TP (s)':>18} | winner")
    print(header)
    print("-" * len(header))
    for b in budgets:
        rows = [r["budgets"][f"{b:g}"] for r in seeds]
        v = summary["budgets"][f"{b:g}"]
        diff = 100 * (v["ours_acc"][0] - v["tp_acc"][0])
        macs = f"{v['ours_macs_fraction'][0]:.1%} / {v['tp_macs_fraction'][0]:.1%}"
        wall = f"{v['ours_wall_s'][0]:.0f} / {v['tp_wall_s'][0]:.0f}"
        print(f"{f'1/{b:g}':>6} | {pct([r['ours']['acc'] for r in rows]):>17} | "
              f"{pct([r['tp']['acc'] for r in rows]):>17} | {diff:+10.2f} | {macs:>15} | {wall:>18} | {v['winner']}")
    print("(wall: ours = the whole `prunery prune` process; TP = its sparse training, shared by the budgets and "
          "counted in each, + bisection pruning + recovery)")
    print()
    for b in budgets:
        v = summary["budgets"][f"{b:g}"]
        print(f"target 1/{b:g} of the MACs: ours >= TP: {'PASS' if v['pass'] else 'FAIL'} "
              f"({100 * v['ours_acc'][0]:.2f}% vs {100 * v['tp_acc'][0]:.2f}%; per seed "
              f"{', '.join(f'{d:+.2f}' for d in v['per_seed_diff_pp'])} pp)")
    misses = [f"seed {r['seed']} 1/{b:g} {side}: {row['macs_fraction']:.2%} of the dense MACs"
              for r in seeds for b in budgets for side, row in r["budgets"][f"{b:g}"].items()
              if abs(row["macs_fraction"] * b - 1) > MISS]
    if misses:
        print(f"budget misses (more than {MISS:.0%} off; kept in the table as they are):")
        for m in misses:
            print(f"  {m}")
    failed = [f"seed {r['seed']} 1/{b:g}: {r['budgets'][f'{b:g}']['ours']['error'].splitlines()[-1]}"
              for r in seeds for b in budgets if "error" in r["budgets"][f"{b:g}"]["ours"]]
    if failed:
        print("failed `prunery prune` runs (counted as FAIL):")
        for f in failed:
            print(f"  {f}")
    quick = " (--quick: a smoke test, not a result)" if s != Settings() else ""
    print(f"overall: {'PASS' if summary['pass'] else 'FAIL'}{quick}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    ap.add_argument("--budgets", default="4,10,20", help="MACs reductions: prune to 1/B of the dense MACs")
    ap.add_argument("--quick", action="store_true", help="one seed, 60 + 60 steps on both sides (smoke test)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, here and in the subprocess (default 2)")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--keep", metavar="DIR", help="keep the files (base.pt2, train.npz, out-*.pt2, reports, logs) "
                                                  "under DIR/seed-S instead of a temporary directory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    s = QUICK if args.quick else Settings()
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    if args.quick and args.seeds == ap.get_default("seeds"):
        seeds = [0]
    budgets = [float(v) for v in args.budgets.split(",") if v.strip()]
    if not budgets or any(b <= 1 for b in budgets):
        raise SystemExit("--budgets: reductions greater than 1, e.g. 4,10,20")
    prunery_exe()
    x, y = load_data()
    print(f"digits: {len(y)} images 8x8, 10 classes; per seed 80% training rows (the dataset file), 20% test; "
          f"seeds {seeds}; budgets {', '.join(f'1/{b:g}' for b in budgets)} of the MACs; threads {args.threads}")
    print(f"settings: {s}")
    print(f"ours: prunery prune base.pt2 -o out.pt2 --dataset train.npz --target-macs F --sparse-steps "
          f"{s.sparse_steps} --reg {sci(s.reg)} --finetune-steps {s.ft_steps} --seed S --report r.json "
          f"(F = {', '.join(f'{1 / b:g}' for b in budgets)})")
    print(f"TP: GroupNormPruner(GroupMagnitudeImportance(p=2), reg={s.reg:g}, alpha={s.alpha:g}, global, "
          f"iterative_steps={s.prune_steps}, ignored fc); {s.sparse_steps} sparse + {s.ft_steps} recovery Adam steps "
          f"(lr {s.tp_lr:g}, batch {s.batch}, train mode), best recovery checkpoint on the recipe's held-out rows")

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_accuracy.") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_seed(x, y, seed, s, budgets, root / f"seed-{seed}", args.threads)
            results.append(r)
            per = "; ".join(f"1/{b:g} ours {100 * r['budgets'][f'{b:g}']['ours']['acc']:.2f} "
                            f"TP {100 * r['budgets'][f'{b:g}']['tp']['acc']:.2f}" for b in budgets)
            print(f"  seed {seed}: dense {100 * r['dense_acc']:.2f}; {per}  ({time.perf_counter() - t0:.0f}s)")
    summary = summarise(results, budgets)
    print_summary(results, budgets, summary, s)
    wall = time.perf_counter() - t_start
    print(f"wall time: {wall:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(_plain({
            "settings": asdict(s), "quick": args.quick, "seeds": seeds, "budgets": budgets, "threads": args.threads,
            "python": sys.version.split()[0], "torch": torch.__version__, "torch_pruning": _tp_version(),
            "results": results, "summary": summary, "wall_s": wall}), indent=2) + "\n")
        print(f"wrote {args.json}")


def _plain(value):
    """`value` for strict JSON: NaN (a failed run) as null, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
