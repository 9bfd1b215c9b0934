"""The whole recipe, as `prunery prune` and a service job run it: data, sparse training, importance, pruning
to a ratio or a budget, recovery, evaluation.

    1. check the dataset against the program (row shape, dtype) and split off a held-out part
    2. sparse training (`--sparse-steps`): the group regulariser of `core/train.py` for that many steps;
       selection then ranks every group's indices together on the relative score (global pruning)
    3. importance: the config's magnitude criterion, or from data ("taylor", "fisher": `core/train.py`),
       recomputed on the current program before each round when pruning to a target
    4. pruning: `core.prune` at the config's ratio, or `core.targets.prune_to_target` for a MACs, params or
       latency budget
    5. recovery (`--finetune-steps`): fine-tuning with a cosine schedule, the best checkpoint on the held-out
       part kept; cross-entropy on the targets, or distillation from the unpruned program (`--distill`, or
       when the dataset has no targets)
    6. evaluation on the held-out part before and after (accuracy with targets; top-1 agreement and output
       cosine similarity with the original), and latency on the device at batch 1 and a larger batch

Progress goes to `on_progress(stage, fraction, message)`; the report gets `evaluation`, `latency_ms`,
`training` (loss curves) and `device` sections beside what `core.prune` reports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.export import ExportedProgram

from .data import Dataset, DatasetError, check_against_program, dynamic_input_dims
from .graph import DependencyGraph
from .importance import DATA_IMPORTANCES
from .prune import PruneConfig, PruneError, PruneResult, example_inputs, prune
from .targets import Target, prune_to_target
from .train import (
    default_device,
    evaluate,
    finetune,
    fisher_scores,
    latency_ms,
    make_loss,
    sparse_train,
    taylor_scores,
)

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class Recipe:
    """What happens around the structural pruning. Steps of 0 skip a stage."""

    dataset: Dataset | None = None
    held_out: float = 0.1  # fraction of the dataset kept aside for the best checkpoint and the evaluation
    batch_size: int = 64
    sparse_steps: int = 0
    reg: float = 1e-4  # the regulariser's weight (lambda)
    alpha: float = 4.0  # its strength for the least important index: up to 2 ** alpha
    lr: float = 1e-2  # sparse training's learning rate
    finetune_steps: int = 0
    finetune_epochs: float = 0.0  # instead of steps: passes over the training part
    finetune_lr: float = 1e-2
    distill: bool = False
    target: Target | None = None
    target_steps: int = 4
    score_batches: int = 8  # batches Taylor / Fisher scores are accumulated over
    latency_batch: int = 32  # the larger batch latency is measured at (and batch 1)
    device: str | None = None
    seed: int = 0

    def validate(self, config: PruneConfig) -> None:
        needs_data = [name for name, on in (
            ("sparse training", self.sparse_steps > 0),
            ("recovery fine-tuning", self.finetune_steps > 0 or self.finetune_epochs > 0),
            ("distillation", self.distill), (f"{config.importance} importance", config.importance in DATA_IMPORTANCES),
        ) if on]
        if needs_data and self.dataset is None:
            raise PruneError(f"{' and '.join(needs_data)} need a dataset (--dataset FILE)")
        if not 0.0 < self.held_out < 1.0:
            raise PruneError(f"held-out fraction must be in (0, 1), got {self.held_out}")
        for name in ("batch_size", "score_batches", "latency_batch", "target_steps"):
            if getattr(self, name) < 1:
                raise PruneError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("sparse_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise PruneError(f"{name.replace('_', ' ')} must not be negative, got {getattr(self, name)}")
        if self.finetune_steps and self.finetune_epochs:
            raise PruneError("give fine-tuning steps or epochs, not both")
        for name in ("reg", "lr", "finetune_lr", "finetune_epochs"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise PruneError(f"{name} must be a finite non-negative number, got {value}")
        if self.target is not None:
            self.target.validate()


class _Epochs:
    """Re-iterable batches of a dataset: a new shuffle every pass."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        self.epoch += 1
        return self.dataset.batches(self.batch_size, shuffle=self.shuffle, seed=self.seed + self.epoch)


def _first(batches: _Epochs, n: int) -> list:
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def _output_kind(ep: ExportedProgram, dataset: Dataset) -> str:
    """"logits" when the targets are class ids (or there are none and the output has a class dim)."""
    targets = dataset.targets
    if targets is not None:
        return "logits" if not targets.dtype.is_floating_point else "values"
    with torch.no_grad():
        out = ep.module()(dataset.inputs[:2])
    return "logits" if isinstance(out, torch.Tensor) and out.dim() >= 2 else "values"


def _latencies(program: ExportedProgram, rows: torch.Tensor, batch: int, device: str) -> dict[str, float]:
    out = {}
    for b in sorted({1, batch}):
        idx = torch.arange(b) % len(rows)
        out[str(b)] = round(latency_ms(program, rows[idx], device=device, repeats=10, warmup=2), 4)
    return out


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


def run_recipe(ep: ExportedProgram, config: PruneConfig, recipe: Recipe,
               on_progress: Progress | None = None) -> PruneResult:
    """Prune `ep` as `config` and `recipe` say; see the module docstring."""
    config.validate()
    recipe.validate(config)
    progress = on_progress or (lambda stage, fraction, message: None)
    t0 = time.perf_counter()
    device = recipe.device or default_device()
    dataset = recipe.dataset
    report_extra: dict = {"device": device, "training": {}}
    if dataset is not None:
        args, _ = example_inputs(ep)
        if len(args) != 1:
            raise DatasetError(f"the program takes {len(args)} positional inputs; datasets feed programs of one input")
        check_against_program(dataset, args, dynamic_input_dims(ep))
        train_set, held_set = dataset.split(recipe.held_out, seed=recipe.seed)
        train = _Epochs(train_set, recipe.batch_size, recipe.seed)
        held = list(held_set.batches(recipe.batch_size))
        loss = make_loss(dataset.targets is not None, recipe.distill, _output_kind(ep, dataset))
        teacher = ep
        report_extra["dataset"] = {"rows": len(dataset), "train_rows": len(train_set), "held_out_rows": len(held_set),
                                   "targets": dataset.targets is not None, "loss": loss.kind}
        report_extra["evaluation"] = {"before": _rounded(evaluate(ep, held, teacher=teacher, device=device))}
    else:
        train = held = loss = teacher = None

    program = ep
    if recipe.sparse_steps:
        graph = DependencyGraph(program, ignore=config.ignore, attention=config.attention)
        steps = recipe.sparse_steps

        def sparse_step(step: int, value: float) -> None:
            if step == 1 or step % max(1, steps // 20) == 0 or step == steps:
                progress("sparse", step / steps, f"sparse training step {step}/{steps}: loss {value:.4f}")

        program, losses = sparse_train(program, graph, train, steps=steps, lr=recipe.lr, reg=recipe.reg,
                                       alpha=recipe.alpha, loss=loss, teacher=teacher if recipe.distill else None,
                                       on_step=sparse_step, include_hidden=config.prune_hidden, device=device)
        report_extra["training"]["sparse"] = {"steps": steps, "reg": recipe.reg, "alpha": recipe.alpha,
                                              "lr": recipe.lr, "loss_curve": _curve(losses)}
        config = dataclasses.replace(config, global_pruning=True)  # the paper: then prune by the relative score

    scores = None
    if config.importance in DATA_IMPORTANCES:
        score_fn = taylor_scores if config.importance == "taylor" else fisher_scores

        def scores(graph: DependencyGraph, current: ExportedProgram) -> dict[int, np.ndarray]:
            progress("prune", 0.0, f"{config.importance} importance on {recipe.score_batches} batches")
            return score_fn(graph, current, _first(train, recipe.score_batches), loss,
                            teacher=teacher if recipe.distill else None, device=device)

    progress("prune", 0.0, "pruning")
    if recipe.target is not None:
        measure = None
        if recipe.target.metric == "latency_ms":
            rows = dataset.inputs if dataset is not None else example_inputs(ep)[0][0]

            def measure(p: ExportedProgram) -> float:
                return latency_ms(p, rows[torch.arange(recipe.latency_batch) % len(rows)], device=device)

        result = prune_to_target(program, config, recipe.target, steps=recipe.target_steps, latency=measure,
                                 scores=scores, on_step=lambda i, r: progress(
                                     "prune", (i + 1) / recipe.target_steps,
                                     f"round {r['round']}: {recipe.target.metric} {r['reached']:.6g} "
                                     f"(aiming at {r['aim']:.6g})"))
    else:
        graph = DependencyGraph(program, ignore=config.ignore, attention=config.attention)
        result = prune(program, config, graph=graph, scores=scores(graph, program) if scores else None)
    pruned = result.program

    if dataset is not None:
        report_extra["evaluation"]["after_pruning"] = _rounded(evaluate(pruned, held, teacher=teacher, device=device))
    if recipe.finetune_steps or recipe.finetune_epochs:
        steps = recipe.finetune_steps or max(1, math.ceil(recipe.finetune_epochs * len(train_set)
                                                          / recipe.batch_size))

        def finetune_step(step: int, value: float) -> None:
            if step == 1 or step % max(1, steps // 20) == 0 or step == steps:
                progress("finetune", step / steps, f"fine-tuning step {step}/{steps}: loss {value:.4f}")

        pruned, curve = finetune(pruned, train, held, steps=steps, lr=recipe.finetune_lr, loss=loss,
                                 teacher=teacher, on_step=finetune_step, device=device)
        report_extra["training"]["finetune"] = {"steps": steps, "epochs": round(steps * recipe.batch_size
                                                                                / len(train_set), 3),
                                                "lr": recipe.finetune_lr, "schedule": "cosine",
                                                "curve": [_rounded(c) for c in curve]}
    if dataset is not None:
        report_extra["evaluation"]["after"] = _rounded(evaluate(pruned, held, teacher=teacher, device=device))
    progress("evaluate", 0.0, "measuring latency")
    rows = dataset.inputs if dataset is not None else example_inputs(ep)[0][0]
    if isinstance(rows, torch.Tensor):
        report_extra["latency_ms"] = {"before": _latencies(ep, rows, recipe.latency_batch, device),
                                      "after": _latencies(pruned, rows, recipe.latency_batch, device)}
    report = dict(result.report)
    report.update(report_extra)
    report["duration_s"] = round(time.perf_counter() - t0, 4)
    return PruneResult(pruned, report, result.plan)


def _curve(losses: list[float], points: int = 100) -> list[dict]:
    """At most `points` (step, loss) pairs, evenly spread, the last one included."""
    if not losses:
        return []
    idx = sorted({int(i) for i in np.linspace(0, len(losses) - 1, min(points, len(losses)))})
    return [{"step": i + 1, "loss": round(float(losses[i]), 6)} for i in idx]
