"""The whole recipe, as `prunery prune` and a service job run it: data, sparse training, importance, pruning
to a ratio or a budget, recovery, evaluation.

    1. fit the dataset to the program (one tensor per input, by name; shapes, dtypes, token id ranges: see
       `core/data.py`) and split off a held-out part
    2. sparse training (`--sparse-steps`): the group regulariser of `core/regulariser.py` for that many steps;
       selection then ranks every group's indices together on the relative score (global pruning)
    3. importance: the config's magnitude criterion, or from data ("taylor", "fisher": `core/data_scores.py`),
       recomputed on the current program before each round when pruning to a target
    4. pruning: `core.prune` at the config's ratio, or `core.targets.prune_to_target` for a MACs, params or
       latency budget; then the batch norms' running statistics are recomputed on training batches (the
       kept channels' inputs changed)
    5. recovery (`--finetune-steps`): fine-tuning with warm-up then a cosine schedule, gradient clipping, batch
       norms in training mode, the best checkpoint on the held-out part kept; cross-entropy on the targets, or
       distillation from the unpruned program (`--distill`, or when the dataset has no targets) with a loss per
       output that fits it (`core/distill.py`: KL on logits, cosine on embeddings, MSE on hidden states)
    6. evaluation on the held-out part before and after (accuracy with targets; top-1 agreement and output
       cosine similarity with the original), and latency of both programs measured interleaved
       (`core/latency.py`)

Training defaults follow the architecture (`training_defaults`): AdamW at 6e-4 for programs with attention
(fine-tuning pretrained transformers), Adam at 1e-3 otherwise (CNNs, MLPs, RNNs), as the reference recipes do.
A training run whose loss does not go down is reported in `warnings` (the CLI prints them).

Progress goes to `on_progress(stage, fraction, message)`; the report gets `evaluation`, `latency_ms`,
`training` (loss curves), `warnings` and `device` sections beside what `core.prune` reports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from .data import Batch, Dataset, DatasetError, fit_to_program
from .data_scores import fisher_scores, taylor_scores
from .distill import output_kinds, shared_layer_outputs
from .evaluation import evaluate
from .graph import DependencyGraph
from .importance import Importance
from .latency import compare_latency, measure_ms
from .losses import make_loss
from .program_module import has_batch_norm
from .prune import PruneConfig, PruneError, PruneResult, example_inputs, prune
from .recovery import finetune, held_out_score, loss_trend, recalibrate_batchnorm
from .regulariser import sparse_train
from .spec import DATA_IMPORTANCES, TARGET_FIELDS, JobSpec, fields_of, first_problem
from .targets import Target, prune_to_target
from .trainable import default_device

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class Recipe:
    """What happens around the structural pruning: the job spec's data-driven options (`core/spec.py` says
    what each does; the defaults are its own), with the dataset itself, the target as a `Target`, and the
    engine's own settings. Steps of 0 skip a stage."""

    dataset: Dataset | None = None
    held_out: float = JobSpec.held_out
    batch_size: int = JobSpec.batch_size
    sparse_steps: int = JobSpec.sparse_steps
    reg: float = JobSpec.reg
    alpha: float = JobSpec.alpha
    lr: float | None = JobSpec.lr
    finetune_steps: int = JobSpec.finetune_steps
    finetune_epochs: float = JobSpec.finetune_epochs
    finetune_lr: float | None = JobSpec.finetune_lr
    optimizer: str | None = JobSpec.optimizer
    warmup: float = JobSpec.warmup
    clip_grad: float = JobSpec.clip_grad
    distill: bool = JobSpec.distill
    distill_loss: str | None = JobSpec.distill_loss
    teacher_weight: float = JobSpec.teacher_weight
    hidden_weight: float = JobSpec.hidden_weight
    target: Target | None = None
    target_steps: int = JobSpec.target_steps
    seed: int = JobSpec.seed
    # the engine's own (not job options)
    recalibrate_batches: int = 20  # batches the batch norms' statistics are recomputed on after pruning (0: not)
    score_batches: int = 8  # batches Taylor / Fisher scores are accumulated over
    latency_batch: int = 32  # the larger batch latency is measured at (and batch 1)
    device: str | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec, dataset: Dataset | None, device: str | None = None) -> Recipe | None:
        """The recipe of a spec, with its dataset loaded; None when the spec asks for nothing but pruning."""
        if not (spec.has_recipe() or dataset is not None):
            return None
        target = spec.target()
        options = {f.name: getattr(spec, f.name) for f in dataclasses.fields(cls) if f.name in _SPEC_FIELDS}
        return cls(dataset=dataset, target=Target(*target) if target else None, device=device, **options)

    def as_spec(self, config: PruneConfig) -> JobSpec:
        """The job spec this recipe and `config` make (the dataset marked as given, not named)."""
        target: dict[str, Any] = {} if self.target is None else {_TARGET_FIELD[self.target.metric]: self.target.value}
        return dataclasses.replace(
            config.as_spec(), **{name: getattr(self, name) for name in _SPEC_FIELDS if name != "seed"}, **target)

    def validate(self, config: PruneConfig) -> None:
        """PruneError with the first problem of the spec (`core/spec.py`) or of the engine's own settings."""
        if self.target is not None:
            self.target.validate()
        problems = self.as_spec(config).problems(data_given=self.dataset is not None)
        for name in ("score_batches", "latency_batch"):
            if getattr(self, name) < 1:
                problems.append((name, f"{name} must be at least 1, got {getattr(self, name)}"))
        if self.recalibrate_batches < 0:
            problems.append(("recalibrate_batches", f"recalibrate_batches must not be negative, got "
                                                    f"{self.recalibrate_batches}"))
        if problems:
            raise PruneError(first_problem(problems))


# the job options a recipe carries as they are (the dataset and the target it holds as objects)
_SPEC_FIELDS = {f.name for f in fields_of()} & {f.name for f in dataclasses.fields(Recipe)} - {"dataset"}
_TARGET_FIELD = {metric: name for name, metric in TARGET_FIELDS.items()}


# (optimizer, learning rate) by architecture. Transformers: AdamW as the reference fine-tuning recipes; the rate
# measured on the recovery of a pruned pretrained MiniLM in 300 steps (held-out cosine 0.947 / 0.960 / 0.963 at
# 1e-4 / 3e-4 / 6e-4; benchmarks/bench_encoder.py), with warm-up, a cosine schedule and clipping around it.
ATTENTION_DEFAULTS = ("adamw", 6e-4)
OTHER_DEFAULTS = ("adam", 1e-3)  # CNNs, MLPs, RNNs (Torch-Pruning's recipes use Adam at 1e-3)
_aten = torch.ops.aten
_ATTENTION_OPS = {getattr(_aten, n) for n in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                                             "_scaled_dot_product_efficient_attention",
                                             "_scaled_dot_product_flash_attention_for_cpu") if hasattr(_aten, n)}
_SOFTMAX = {_aten.softmax, _aten._softmax, _aten._safe_softmax}
_PRODUCTS = {_aten.matmul, _aten.bmm, _aten.einsum, _aten.mm, _aten.baddbmm}


def has_attention(ep: ExportedProgram) -> bool:
    """The program computes attention: an SDPA op, or a softmax whose result (through casts, dropout and
    views) multiplies another tensor."""
    for node in ep.graph.nodes:
        packet = getattr(node.target, "overloadpacket", None)
        if packet in _ATTENTION_OPS:
            return True
        if packet in _SOFTMAX:
            frontier, seen = list(node.users), 0
            while frontier and seen < 16:
                user = frontier.pop()
                seen += 1
                up = getattr(user.target, "overloadpacket", None)
                if up in _PRODUCTS:
                    return True
                if len(user.users) <= 2:
                    frontier.extend(user.users)
    return False


def training_defaults(ep: ExportedProgram) -> tuple[str, float]:
    """(optimizer, learning rate) for training `ep`: AdamW at 6e-4 for a transformer (attention, and no batch
    norm), else Adam at 1e-3 (a convolutional net with an attention-like product is trained as a CNN)."""
    return ATTENTION_DEFAULTS if has_attention(ep) and not has_batch_norm(ep) else OTHER_DEFAULTS


class _Epochs:
    """Re-iterable batches of a dataset: a new shuffle every pass (a short last batch dropped when there are
    full ones: batch statistics of one or two rows are noise)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.batch_size = min(batch_size, len(dataset))
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        self.epoch += 1
        return self.dataset.batches(self.batch_size, shuffle=self.shuffle, seed=self.seed + self.epoch,
                                    drop_last=True)


def _first(batches: _Epochs, n: int) -> list:
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def _loss(ep: ExportedProgram, dataset: Dataset, recipe: Recipe):
    """Cross-entropy on class-id targets, MSE on float targets; else (or with `distill`) distillation with a
    loss per output that fits it (`core/distill.py`), or `recipe.distill_loss` for all."""
    targets = dataset.targets
    kind = "logits" if targets is not None and not targets.dtype.is_floating_point else "values"
    return make_loss(targets is not None, recipe.distill, kind, kinds=output_kinds(ep),
                     distill_loss=recipe.distill_loss, teacher_weight=recipe.teacher_weight)


def _headline_metric(dataset: Dataset, loss) -> str:
    """The held-out metric that fits the task: accuracy with class ids, else the distillation loss's own."""
    targets = dataset.targets
    if targets is not None and not targets.dtype.is_floating_point:
        return "accuracy"
    return loss.metric or "loss"


def _warn_flat(report: dict, stage: str, losses: list[float], progress: Progress) -> dict:
    """The loss curve's trend; a curve that did not go down becomes a warning."""
    trend = loss_trend(losses)
    if losses and not trend["improved"]:
        message = (f"the {stage} loss did not go down ({trend['first']:.4g} over the first steps, "
                   f"{trend['last']:.4g} over the last): try another --lr or --optimizer, or more steps")
        report.setdefault("warnings", []).append(message)
        progress(stage, 1.0, "warning: " + message)
    return trend


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
    optimizer, default_lr = training_defaults(ep)
    optimizer = recipe.optimizer or optimizer
    dataset = recipe.dataset
    report_extra: dict = {"device": device, "training": {}}
    if dataset is not None:
        dataset = fit_to_program(dataset, ep)
        train_set, held_set = dataset.split(recipe.held_out, seed=recipe.seed)
        # a program exported with a static batch takes batches of exactly that size
        batch = dataset.fixed_batch or recipe.batch_size
        train = _Epochs(train_set, batch, recipe.seed)
        held = list(held_set.batches(batch, drop_last=dataset.fixed_batch is not None))
        if not held:
            raise DatasetError(f"the held-out part has {len(held_set)} rows, fewer than the program's fixed batch "
                               f"of {batch}: give a larger --held-out or more rows")
        loss = _loss(ep, dataset, recipe)
        teacher = ep
        report_extra["dataset"] = {"rows": len(dataset), "train_rows": len(train_set), "held_out_rows": len(held_set),
                                   "targets": dataset.targets is not None, "loss": loss.kind,
                                   "metric": _headline_metric(dataset, loss)}
        report_extra["evaluation"] = {"before": _rounded(evaluate(ep, held, teacher=teacher, device=device))}
    else:  # read only by the stages that need a dataset (Recipe.validate refuses them without one)
        train = held = loss = teacher = None  # type: ignore[assignment]

    def training_settings(steps: int, lr: float | None) -> dict:
        return {"optimizer": optimizer, "lr": default_lr if lr is None else lr,
                "warmup_steps": int(recipe.warmup * steps), "clip_grad": recipe.clip_grad}

    program = ep
    if recipe.sparse_steps:
        graph = DependencyGraph(program, ignore=config.ignore, attention=config.attention)
        steps = recipe.sparse_steps
        settings = training_settings(steps, recipe.lr)

        def sparse_step(step: int, value: float) -> None:
            if step == 1 or step % max(1, steps // 20) == 0 or step == steps:
                progress("sparse", step / steps, f"sparse training step {step}/{steps}: loss {value:.4f}")

        program, losses = sparse_train(program, graph, train, steps=steps, lr=settings["lr"], reg=recipe.reg,
                                       alpha=recipe.alpha, loss=loss, teacher=teacher if loss.distill else None,
                                       on_step=sparse_step, include_hidden=config.prune_hidden, device=device,
                                       optimizer=optimizer, warmup=settings["warmup_steps"],
                                       clip_grad=recipe.clip_grad)
        report_extra["training"]["sparse"] = {"steps": steps, "reg": recipe.reg, "alpha": recipe.alpha, **settings,
                                              "loss_curve": _curve(losses),
                                              "trend": _warn_flat(report_extra, "sparse", losses, progress)}
        config = dataclasses.replace(config, global_pruning=True)  # the paper: then prune by the relative score

    importance: Importance | None = None  # the config's magnitude criterion
    if config.importance in DATA_IMPORTANCES:
        score_fn = taylor_scores if config.importance == "taylor" else fisher_scores

        def importance(graph: DependencyGraph, current: ExportedProgram) -> dict[int, np.ndarray]:
            progress("prune", 0.0, f"{config.importance} importance on {recipe.score_batches} batches")
            return score_fn(graph, current, _first(train, recipe.score_batches), loss,
                            teacher=teacher if loss.distill else None, device=device)

    progress("prune", 0.0, "pruning")
    if (target := recipe.target) is not None:
        measure = None
        if target.metric == "latency_ms":
            batch = _latency_inputs(ep, dataset, recipe.latency_batch)

            def measure(p: ExportedProgram) -> float:
                return measure_ms(p, batch, device=device, threads=_latency_threads(device))

        result = prune_to_target(program, config, target, steps=recipe.target_steps, latency=measure,
                                 importance=importance, on_step=lambda i, r: progress(
                                     "prune", (i + 1) / recipe.target_steps,
                                     f"round {r['round']}: {target.metric} {r['reached']:.6g} "
                                     f"(aiming at {r['aim']:.6g})"))
    else:
        graph = DependencyGraph(program, ignore=config.ignore, attention=config.attention)
        result = prune(program, config, graph=graph, importance=importance)
    pruned = result.program

    if dataset is not None:
        evaluation = report_extra["evaluation"]
        evaluation["after_pruning"] = _rounded(evaluate(pruned, held, teacher=teacher, device=device))
        if recipe.recalibrate_batches:
            recalibrated = recalibrate_batchnorm(pruned, train, max_batches=recipe.recalibrate_batches, device=device)
            if recalibrated is not pruned:
                evaluation["after_recalibration"] = _rounded(evaluate(recalibrated, held, teacher=teacher,
                                                                      device=device))
                # kept unless it scores worse on the held-out part (data unlike what the statistics came from)
                metric = report_extra["dataset"]["metric"]
                if held_out_score(evaluation["after_recalibration"], metric) \
                        >= held_out_score(evaluation["after_pruning"], metric):
                    pruned = recalibrated
                else:
                    evaluation["after_recalibration"]["kept"] = False
    if recipe.finetune_steps or recipe.finetune_epochs:
        steps = recipe.finetune_steps or max(1, math.ceil(recipe.finetune_epochs * len(train_set)
                                                          / train.batch_size))
        settings = training_settings(steps, recipe.finetune_lr)

        finetune_losses: list[float] = []

        def finetune_step(step: int, value: float) -> None:
            finetune_losses.append(value)
            if step == 1 or step % max(1, steps // 20) == 0 or step == steps:
                progress("finetune", step / steps, f"fine-tuning step {step}/{steps}: loss {value:.4f}")

        layers = shared_layer_outputs(ep, pruned) if recipe.hidden_weight > 0 and loss.distill else []
        pruned, curve = finetune(pruned, train, held, steps=steps, lr=settings["lr"], loss=loss, teacher=teacher,
                                 on_step=finetune_step,
                                 device=device, optimizer=optimizer, warmup=settings["warmup_steps"],
                                 clip_grad=recipe.clip_grad, hidden_layers=layers, hidden_weight=recipe.hidden_weight)
        settings["hidden_layers"] = len(layers)
        report_extra["training"]["finetune"] = {
            "steps": steps, "epochs": round(steps * train.batch_size / len(train_set), 3), **settings,
            "schedule": "cosine", "loss": loss.kind, "curve": [_rounded(c) for c in curve],
            "trend": _warn_flat(report_extra, "finetune", finetune_losses, progress)}
    if dataset is not None:
        report_extra["evaluation"]["after"] = _rounded(evaluate(pruned, held, teacher=teacher, device=device))
    progress("evaluate", 0.0, "measuring latency")
    report_extra["latency_ms"] = _compare_latency(ep, pruned, dataset, recipe, device)
    for b in report_extra["latency_ms"].get("slower", []):
        report_extra.setdefault("warnings", []).append(
            f"the pruned program is slower than the original at batch {b} "
            f"({report_extra['latency_ms']['before'][str(b)]['median_ms']} -> "
            f"{report_extra['latency_ms']['after'][str(b)]['median_ms']} ms median)")
    report = dict(result.report)
    report.update(report_extra)
    report["duration_s"] = round(time.perf_counter() - t0, 4)
    return PruneResult(pruned, report, result.plan)


def _latency_inputs(ep: ExportedProgram, dataset: Dataset | None, batch: int):
    """A batch of `batch` rows of the dataset (cycled), else of the program's example inputs."""
    if dataset is not None:
        return dataset.rows(torch.arange(batch) % len(dataset))
    args, kwargs = example_inputs(ep)
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    rows = args[0]
    return rows[torch.arange(batch) % len(rows)]


def _compare_latency(ep: ExportedProgram, pruned: ExportedProgram, dataset: Dataset | None, recipe: Recipe,
                     device: str) -> dict:
    sizes = {dataset.fixed_batch} if dataset is not None and dataset.fixed_batch else {1, recipe.latency_batch}
    batches = {b: _latency_inputs(ep, dataset, b) for b in sorted(sizes)}
    if any(v is None for v in batches.values()):
        return {}
    return compare_latency({"before": ep, "after": pruned}, batches, device=device, threads=_latency_threads(device))


def _latency_threads(device: str) -> int | None:
    """One thread on CPU: a multi-threaded timing on a shared machine measures the neighbours (calls of 0.4 ms
    took 100 ms with 2 threads under load); speedups at one thread hold. A GPU keeps torch's count."""
    return 1 if torch.device(device).type == "cpu" else None


def _curve(losses: list[float], points: int = 100) -> list[dict]:
    """At most `points` (step, loss) pairs, evenly spread, the last one included."""
    if not losses:
        return []
    idx = sorted({int(i) for i in np.linspace(0, len(losses) - 1, min(points, len(losses)))})
    return [{"step": i + 1, "loss": round(float(losses[i]), 6)} for i in idx]
