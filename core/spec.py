"""The job spec: every option of a pruning job, with its default, its help and its checks, written once.

`JobSpec` is what `prunery prune` runs locally, what `prunery submit` and `prunery.client` send, what the API
checks and stores, and what a worker runs. Everyone derives from it:

- the engine: `PruneConfig.from_spec` (`core/prune.py`) and `Recipe.from_spec` (`core/recipe.py`), whose
  defaults are the spec's;
- the command line: its options are generated from the fields' metadata (`prunery/cli.py`);
- the wire: `prunery/spec_proto.py` converts to and from `prunery.v1.PruneSpec`, field by field by name (a test
  checks that the two have the same fields);
- the database: `to_dict` / `from_dict`, one JSON dialect (the engine's names: "l2", "head-dim", "adamw"; null
  for an option left to the engine). `from_dict` also reads the specs stored before this module existed
  (proto enum names such as "L2", 0 or "" for "the default").

Adding an option: a field here (default, help), the same field in `protos/prunery/v1/prunery.proto`, and the
engine code that uses it. Nothing else.

This module imports nothing but the standard library: the API (which never imports torch) and the client use
it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IMPORTANCES = ("l1", "l2", "bn", "random")  # from the weights
DATA_IMPORTANCES = ("taylor", "fisher")  # from gradients on a dataset
ATTENTION_MODES = ("heads", "head-dim", "none")  # what attention dims may lose: whole heads, dims inside heads
OPTIMIZERS = ("sgd", "adam", "adamw")
DISTILL_LOSSES = ("kl", "mse", "cosine")
# the budget fields and the metric each names (core/targets.py)
TARGET_FIELDS = {"target_macs": "macs", "target_params": "params", "target_latency_ms": "latency_ms"}

PRUNE_GROUP, RECIPE_GROUP = "prune", "recipe"
Violation = tuple[str, str]  # (field, what is wrong with it)


def _option(default: Any, help: str, *, group: str = RECIPE_GROUP, flag: str | None = None,
            choices: tuple[str, ...] | None = None, metavar: str | None = None, zero_is_default: bool = False,
            cli: bool = True) -> Any:
    """A spec field. `zero_is_default`: on the wire and in stored specs, 0 (or "") stands for the default (a zero
    would be meaningless there); `flag`: the command-line option when it is not the field's name; `cli`: False
    for a field the command line takes otherwise (the model, a positional argument)."""
    metadata = {"help": help, "group": group, "flag": flag, "choices": choices, "metavar": metavar,
                "zero_is_default": zero_is_default, "cli": cli}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class JobSpec:
    """A pruning job. `model` and `dataset` are files for the command line, artifact names
    ("artifacts/{id}") for the service. None: chosen by the engine (a ratio when a target decides, learning
    rates and the optimizer from the architecture, no target)."""

    model: str = _option("", "the exported program (.pt2)", group=PRUNE_GROUP, cli=False)
    ratio: float | None = _option(None, "fraction of each group's channels to remove (or give a target)",
                                  group=PRUNE_GROUP, zero_is_default=True)
    importance: str = _option("l2", "magnitude criteria, or from data (with --dataset): first-order Taylor, Fisher",
                              group=PRUNE_GROUP, choices=IMPORTANCES + DATA_IMPORTANCES)
    global_pruning: bool = _option(False, "one threshold across groups on the relative score", group=PRUNE_GROUP,
                                   flag="--global")
    round_to: int | None = _option(None, "keep channel counts multiples of N", group=PRUNE_GROUP,
                                   zero_is_default=True, metavar="N")
    max_ratio: float = _option(1.0, "never remove more than this from a group", group=PRUNE_GROUP,
                               zero_is_default=True)
    ignore: tuple[str, ...] = _option((), "parameter-name globs to leave untouched", group=PRUNE_GROUP,
                                      metavar="GLOB")
    seed: int = _option(0, "seed for --importance random", group=PRUNE_GROUP)
    attention: str = _option("heads", "what attention may lose: whole heads (Q/K/V rows and output-projection "
                                      "columns together), the same dims inside every head, or nothing",
                             group=PRUNE_GROUP, choices=ATTENTION_MODES)
    prune_hidden: bool = _option(False, "also prune the residual stream width (hidden size) of transformers; left "
                                        "whole by default", group=PRUNE_GROUP)
    dataset: str = _option("", ".safetensors or .npz: a tensor per program input, named after it (or 'inputs', "
                               "'inputs.0', ...), and optional 'targets'", metavar="FILE")
    held_out: float = _option(0.1, "fraction kept aside for checkpoints and evaluation", zero_is_default=True)
    batch_size: int = _option(64, "training and scoring batches", zero_is_default=True)
    sparse_steps: int = _option(0, "steps of group-regularised sparse training first")
    reg: float = _option(1e-4, "the regulariser's weight (lambda)", zero_is_default=True)
    alpha: float = _option(4.0, "regularisation up to 2**alpha for the weakest indices", zero_is_default=True)
    lr: float | None = _option(None, "sparse training's learning rate (default: 6e-4 for models with attention, "
                                     "1e-3 otherwise)", zero_is_default=True)
    finetune_steps: int = _option(0, "steps of recovery fine-tuning after pruning")
    finetune_epochs: float = _option(0.0, "or recover for this many passes over the data")
    finetune_lr: float | None = _option(None, "recovery's peak learning rate (default as --lr)",
                                        zero_is_default=True)
    optimizer: str | None = _option(None, "for sparse training and recovery (default: adamw for models with "
                                          "attention, adam otherwise)",
                                    choices=OPTIMIZERS, zero_is_default=True)
    warmup: float = _option(0.05, "share of training steps with a rising learning rate")
    clip_grad: float = _option(1.0, "clip the gradient's L2 norm to this (0: off)")
    distill: bool = _option(False, "recover by distillation from the unpruned model (the default without "
                                   "targets)")
    distill_loss: str | None = _option(None, "distillation loss for every output (default: per output: KL on "
                                             "logits, cosine on embeddings, MSE on hidden states)",
                                       choices=DISTILL_LOSSES,
                                       zero_is_default=True)
    teacher_weight: float = _option(0.5, "with class-id targets: the share of distillation from the unpruned "
                                         "model in the loss beside cross-entropy (0: the targets alone)")
    hidden_weight: float = _option(1.0, "distillation: weight of the hidden states at the layer outputs the "
                                        "pruned and original models share (transformer blocks on a residual "
                                        "stream left whole; 0: off)")
    target_macs: float | None = _option(None, "prune to this many MACs (a fraction in (0, 1), or a count)",
                                        zero_is_default=True)
    target_params: float | None = _option(None, "prune to this many parameters (fraction or count)",
                                          zero_is_default=True)
    target_latency_ms: float | None = _option(None, "prune to this latency on --device", flag="--target-latency",
                                              metavar="MS", zero_is_default=True)
    target_steps: int = _option(4, "rounds toward a target, scores recomputed between", zero_is_default=True)

    # -- what the options ask for -------------------------------------------------------------------------

    def targets(self) -> list[str]:
        """The budget fields that are set (at most one is valid)."""
        return [name for name in TARGET_FIELDS if getattr(self, name) is not None]

    def target(self) -> tuple[str, float] | None:
        """(metric, value) of the budget, if one is set."""
        names = self.targets()
        return (TARGET_FIELDS[names[0]], float(getattr(self, names[0]))) if names else None

    def needs_data(self) -> list[str]:
        """The options set that need a dataset."""
        return [name for name, on in (
            ("sparse_steps", self.sparse_steps > 0), ("finetune_steps", self.finetune_steps > 0),
            ("finetune_epochs", self.finetune_epochs > 0), ("distill", self.distill),
            ("importance", self.importance in DATA_IMPORTANCES)) if on]

    def has_recipe(self) -> bool:
        """Whether the job asks for more than structural pruning (data, a target, training)."""
        return bool(self.dataset or self.targets() or self.needs_data())

    # -- checks ---------------------------------------------------------------------------------------------

    def problems(self, *, data_given: bool | None = None) -> list[Violation]:
        """What is wrong with the values, as (field, message); empty when the spec can run. The model and
        dataset are only checked to be given where needed (the API checks they exist, the engine reads them);
        `data_given`: whether a dataset comes with the spec (default: whether `dataset` is set)."""
        v: list[Violation] = []
        targets = self.targets()
        if self.ratio is None:
            if not targets:
                v.append(("ratio", "ratio is required unless a target is set (target_macs, target_params or "
                                   "target_latency_ms)"))
        elif not 0.0 < self.ratio < 1.0:
            v.append(("ratio", f"ratio must be in (0, 1), both excluded; got {self.ratio}"))
        for name, names in (("importance", IMPORTANCES + DATA_IMPORTANCES), ("attention", ATTENTION_MODES),
                            ("optimizer", OPTIMIZERS), ("distill_loss", DISTILL_LOSSES)):
            value = getattr(self, name)
            if value is not None and value not in names:
                v.append((name, f"{name} must be one of {', '.join(names)}; got {value!r}"))
        if self.round_to is not None and self.round_to < 1:
            v.append(("round_to", f"round_to must be a positive integer (or unset); got {self.round_to}"))
        if not 0.0 < self.max_ratio <= 1.0:
            v.append(("max_ratio", f"max_ratio must be in (0, 1]; got {self.max_ratio}"))
        v += [(f"ignore[{i}]", f"ignore globs are 1-512 characters; got {len(glob)}")
              for i, glob in enumerate(self.ignore) if not glob or len(glob) > 512]
        if not 0.0 < self.held_out < 1.0:
            v.append(("held_out", f"held_out must be a fraction in (0, 1); got {self.held_out}"))
        for name, limit in (("batch_size", 1 << 16), ("target_steps", 100)):
            if not 1 <= getattr(self, name) <= limit:
                v.append((name, f"{name} must be between 1 and {limit}; got {getattr(self, name)}"))
        for name in ("sparse_steps", "finetune_steps"):
            if not 0 <= getattr(self, name) <= 1_000_000:
                v.append((name, f"{name} must be between 0 and 1000000; got {getattr(self, name)}"))
        for name in ("reg", "alpha", "lr", "finetune_lr", "finetune_epochs", "clip_grad", "hidden_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                v.append((name, f"{name} must be a finite number >= 0; got {value}"))
        if self.finetune_steps and self.finetune_epochs:
            v.append(("finetune_epochs", "finetune_epochs: give finetune_steps or finetune_epochs, not both"))
        if not 0.0 <= self.warmup < 1.0:
            v.append(("warmup", f"warmup must be a share of the training steps in [0, 1); got {self.warmup}"))
        if not 0.0 <= self.teacher_weight <= 1.0:
            v.append(("teacher_weight", f"teacher_weight must be a share in [0, 1]; got {self.teacher_weight}"))
        for name in targets:
            value = getattr(self, name)
            if name == "target_latency_ms":
                if not (math.isfinite(value) and value > 0):
                    v.append((name, f"{name} must be a positive number of milliseconds; got {value}"))
            elif not (math.isfinite(value) and value > 0) or value == 1:
                v.append((name, f"{name} must be a fraction in (0, 1) or a count above 1; got {value}"))
        if len(targets) > 1:
            v.append((targets[1], f"one target at a time: {', '.join(targets)} are all set"))
        needs = self.needs_data()
        if needs and not (self.dataset if data_given is None else data_given):
            v.append(("dataset", f"dataset is required by {', '.join(needs)}"))
        return v

    # -- the stored form ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a job row stores (null: chosen by the engine)."""
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        """A spec from its stored form, including the forms stored before this one: proto enum names ("L2",
        "OPTIMIZER_ADAM"), 0 or "" for the default of a `zero_is_default` field, `global` for global_pruning.
        Unknown keys are ignored; values of the wrong type raise ValueError or TypeError."""
        values: dict[str, Any] = {}
        if "global" in d and "global_pruning" not in d:
            values["global_pruning"] = bool(d["global"])
        for f in dataclasses.fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            value = d[f.name]
            if f.metadata["zero_is_default"] and (value == 0 or value == "") and not isinstance(value, bool):
                continue
            values[f.name] = _typed(f, value)
        return cls(**values)

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)


def _typed(f: dataclasses.Field, value: Any) -> Any:
    """A stored value as the field's type; enum-like names lower-cased without their proto prefix."""
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if f.metadata["choices"]:
        return enum_name(str(value), f.metadata["choices"])
    if isinstance(default, tuple):
        if isinstance(value, str) or not all(isinstance(g, str) for g in value):
            raise ValueError(f"{f.name} must be a list of strings")
        return tuple(value)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, str):
        return str(value)
    if f.type in ("int", "int | None") or isinstance(default, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{f.name} must be an integer; got {value}")
        return int(value)
    return float(value)


def enum_name(value: str, names: tuple[str, ...]) -> str:
    """The engine's name for `value` given in any case or as a proto enum name ("L2", "ATTENTION_HEAD_DIM",
    "OPTIMIZER_ADAMW"); unchanged when it matches none (the checks then say so)."""
    wanted = value.strip().lower().replace("_", "-")
    for name in names:
        if wanted == name or wanted.endswith("-" + name) or wanted.replace("-", "_") == name.replace("-", "_"):
            return name
    return value


def fields_of(group: str | None = None) -> list[dataclasses.Field]:
    """The spec's fields, in order (of one group: PRUNE_GROUP or RECIPE_GROUP)."""
    return [f for f in dataclasses.fields(JobSpec) if group is None or f.metadata["group"] == group]


def first_problem(problems: list[Violation]) -> str:
    """One line for a person: the first problem's message, and how many more there are."""
    field_, message = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{message}{more}"
