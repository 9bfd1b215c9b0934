"""Training on an exported program: DepGraph's group-sparse training, recovery fine-tuning after pruning,
batch norm recalibration, evaluation, and data-driven (Taylor / Fisher) group importance.

Everything runs on a *program module*: a `ProgramModule` over the program's own graph whose parameters are
fresh copies of the program's (so the program passed in, often the teacher, is never modified), registered
under the program's fully qualified names. An exported program traced in eval mode calls batch norm with its
running statistics and dropout with `train=False`. Training runs its batch norms as a module in training mode
does (batch statistics, the copies' running statistics updated; `batchnorm="frozen"` keeps the traced
behaviour), so that a pruned network whose channel statistics changed can adapt; evaluation (`eval()`) uses the
running statistics again, as the exported result will. Dropout stays as traced (off). A program traced in
training mode keeps its traced behaviour (batch statistics; running statistics updated on the copies); one
whose signature lists buffer or input mutations runs through `ep.module()` instead.
`updated_program` writes the trained weights back into a copy of the program (same graph, new state dict).

Data: any iterable of `(inputs, targets_or_None)` batches; `inputs` is a tensor, a tuple of positional
tensors, a dict of keyword tensors or a `data.CallInputs` (positional and keyword); `targets` is a tensor or
None. Iterables that can be iterated again (lists, data loaders) are re-iterated when exhausted; one-shot
iterators are cached on their first pass.

Group regulariser (DepGraph, "group-level sparsity"). For every group g selected (by default every group
not `hidden`, the residual stream being pruned only when asked) and every prunable index k of g (a
component, `g.components[k]`), let

    S[g,k] = sum over parameter members m of g of ||w_m[k-slice]||_2^2

where the k-slice of member m is every index i along `m.dim` whose component label is k (usually one
index; several for a flatten into a Linear or a grouped conv). Then

    I[g,k]     = S[g,k] / C[g,k]                  (C[g,k]: number of members carrying k; = importance.py's l2)
    gamma[g,k] = 2 ** (alpha * (max_k I[g,k] - I[g,k]) / (max_k I[g,k] - min_k I[g,k] + 1e-12))
    R          = reg * sum_g sum_k gamma[g,k] * sqrt(S[g,k] + eps)        (eps = 1e-8)

so the strongest index of a group has gamma = 1 and the weakest gamma = 2 ** alpha (alpha = 4 by default).
gamma is a constant (not differentiated) recomputed every `refresh` steps; R is a group lasso on the
group's L2 norm at each index, dR/dw_m[k-slice] = reg * gamma[g,k] * w_m[k-slice] / sqrt(S[g,k] + eps).

Data-driven importance (same format as `importance.group_scores`: {group id: scores aligned with
`group.components`}), with g_b = dL_b/dw the gradient of batch b's (mean) loss, summed over batches b:

    taylor[g,k] = sum_b | sum_m sum_{i in k-slice of m} w_m[i] * g_b,m[i] |        (first order: |dL| estimate)
    fisher[g,k] = sum_b sum_m sum_{i in k-slice of m} (w_m[i] * g_b,m[i])^2 / 2  (OBD saliency, Fisher diagonal)

Neither is divided by the number of carriers (removing index k removes every member's slice at once).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.export import ExportedProgram

from .distill import OUTPUT_KINDS, HiddenDistillation, distill_loss_for, metric_for, single_loss, tree_distill
from .errors import EngineError
from .graph import DependencyGraph, Group
from .program_module import BATCH_NORM_OPS, ProgramModule, has_batch_norm, supported
from .spec import OPTIMIZERS
from .tensors import program_tensors, tied_names

__all__ = [
    "GroupRegulariser", "LOSS_KINDS", "Loss", "TrainError", "default_device", "evaluate", "finetune",
    "fisher_scores", "loss_fn", "make_loss", "sparse_train", "taylor_scores", "trainable_module",
    "updated_program",
]

LOSS_KINDS = ("ce", "kl", "mse", "cosine")
SCHEDULES = ("cosine", "linear", "constant")
BATCHNORM_MODES = ("train", "frozen")
METRICS = ("accuracy", "agreement", "cosine", "neg_loss")
LOGIT_KINDS = ("logits", "classes")  # output kinds with a class dim (the last one)
IGNORE_INDEX = -100  # targets F.cross_entropy ignores; accuracy ignores them too

Batches = Iterable[tuple[Any, torch.Tensor | None]]


class TrainError(EngineError):
    """Training cannot run as asked (no batches, missing targets or teacher, a loss that is not finite)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else default_device())


# --- program <-> module ---------------------------------------------------------------------------------


def _on_device(ep: ExportedProgram, device: torch.device) -> ExportedProgram:
    """`ep` itself when its tensors are on `device`, else a moved copy (device literals in the graph too)."""
    tensors = program_tensors(ep)

    def there(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    if all(there(t) for t in tensors.values()):
        return ep
    from torch.export.passes import move_to_device_pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        moved = move_to_device_pass(copy.deepcopy(ep), device)
    for name, canonical in tied_names(tensors).items():  # the move copies each name: tie them again
        if name in moved.state_dict and canonical in moved.state_dict:
            moved._state_dict[name] = moved._state_dict[canonical]
    return moved


def _get(module: nn.Module, fqn: str) -> torch.Tensor:
    prefix, _, name = fqn.rpartition(".")
    return getattr(module.get_submodule(prefix) if prefix else module, name)


def _set(module: nn.Module, fqn: str, value: torch.Tensor) -> None:
    prefix, _, name = fqn.rpartition(".")
    mod = module.get_submodule(prefix) if prefix else module
    if isinstance(value, nn.Parameter):
        mod._parameters.pop(name, None)
        mod.register_parameter(name, value)
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def trainable_module(ep: ExportedProgram, device: str | torch.device | None = None,
                     batchnorm: str = "train") -> nn.Module:
    """A module running `ep`'s graph on copies of its tensors; floating parameters require grad and are
    registered under the program's names (tied names share one parameter). The program is not modified.
    `batchnorm="train"`: in training mode (`train()`, as returned) the program's batch norms use batch
    statistics and update the copies' running statistics, as a module in training mode does; in `eval()` mode
    and with "frozen" they normalise with the running statistics, as the program traced in eval mode does."""
    if batchnorm not in BATCHNORM_MODES:
        raise TrainError(f"unknown batch norm mode {batchnorm!r}; choose one of {', '.join(BATCHNORM_MODES)}")
    dev = _device(device)
    ep_dev = _on_device(ep, dev)
    source = program_tensors(ep_dev)
    tied = tied_names(source)
    param_names = set(ep.graph_signature.parameters)
    copies: dict[str, torch.Tensor] = {}
    for name, t in source.items():
        if name in tied:
            continue
        c = t.detach().to(dev).clone()
        if name in param_names:
            c = nn.Parameter(c, requires_grad=c.is_floating_point() or c.is_complex())
        copies[name] = c
    for name, canonical in tied.items():
        copies[name] = copies[canonical]
    if supported(ep_dev):
        module = ProgramModule(ep_dev, copies)
        module.batchnorm_training = batchnorm == "train"
        module.train()  # batch norm as `batchnorm` says; dropout stays as traced
        return module
    gm = ep_dev.module()  # mutates buffers as traced; its train()/eval() raise, so its mode is left alone
    for name, c in copies.items():
        _set(gm, name, c)
    return gm


def _state_names(ep: ExportedProgram) -> list[str]:
    return list(ep.state_dict)


def updated_program(ep: ExportedProgram, module: nn.Module) -> ExportedProgram:
    """`ep` with the module's current parameters and buffers (by the program's names; shapes unchanged):
    a new program over `ep`'s graph, its tensors on the devices of `ep`'s. Saves, loads and runs."""
    state: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # tied names: one tensor again
    for name, old in ep.state_dict.items():
        t = _get(module, name)
        if tuple(t.shape) != tuple(old.shape):
            raise TrainError(f"{name}: the module's shape {tuple(t.shape)} is not the program's {tuple(old.shape)}")
        new = done.get(id(t))
        if new is None:
            v = t.detach().to(device=old.device, dtype=old.dtype).clone()
            new = nn.Parameter(v, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else v
            done[id(t)] = new
        state[name] = new
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deep-copies its own tree specs
        # the graph is shared, not copied: nothing mutates it, and a copy renames placeholders whose names
        # shadow Python builtins (`input` -> `input_1`), which the program's signature would no longer match
        return ep._update(ep.graph_module, ep.graph_signature, state_dict=state)


def _as_module(program: ExportedProgram | nn.Module, device: torch.device) -> nn.Module:
    """A module to run `program` with (inference only; the program's own tensors, on `device`)."""
    if not isinstance(program, ExportedProgram):
        return program
    ep = _on_device(program, device)
    if supported(ep):
        return ProgramModule(ep, program_tensors(ep))
    return ep.module()


# --- batches ----------------------------------------------------------------------------------------------


def _to(x: Any, device: torch.device) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), x)


def _call(module: nn.Module | Callable, inputs: Any) -> Any:
    if hasattr(inputs, "args") and hasattr(inputs, "kwargs"):  # data.CallInputs: positional and keyword inputs
        return module(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(inputs)


def _primary(out: Any) -> torch.Tensor:
    """The output a loss reads: the output itself, or the first tensor of a tuple/dict of outputs."""
    if isinstance(out, torch.Tensor):
        return out
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise TrainError("the program returned no tensor")


def _reiterable(batches: Batches) -> Iterable:
    return list(batches) if iter(batches) is batches else batches


def _cycle(batches: Batches) -> Iterator:
    """Batches forever: the iterable again when exhausted (a one-shot iterator is cached on its first pass)."""
    batches = _reiterable(batches)
    while True:
        n = 0
        for b in batches:
            n += 1
            yield b
        if n == 0:
            raise TrainError("no batches to train on")


def _is_class_ids(t: torch.Tensor | None) -> TypeGuard[torch.Tensor]:
    return t is not None and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


# --- losses -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """loss(output, target): `target` is the batch's targets, or the teacher's outputs when `distill`.
    `fn` reads the primary outputs (the first tensor of each), or the whole output trees with `tree`.
    `metric`: the held-out metric that fits it (None: chosen from the held-out targets)."""

    kind: str
    fn: Callable[[Any, Any], torch.Tensor]
    distill: bool = False
    tree: bool = False
    metric: str | None = None
    with_labels: bool = False  # with `distill`: the target is (targets, teacher outputs)

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if self.with_labels:
            labels, teacher = target
            return self.fn(_primary(output), (labels, _primary(teacher)))
        if self.tree:
            return self.fn(output, target)
        return self.fn(_primary(output), _primary(target))


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with integer targets; (..., C) logits with (...) targets are flattened (sequences),
    other layouts go to F.cross_entropy as they are ((B, C, H, W) with (B, H, W))."""
    target = target.long()
    if logits.dim() == target.dim() + 1 and logits.shape[:-1] == target.shape:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    return F.cross_entropy(logits.float(), target)


def loss_fn(kind: str, *, temperature: float = 2.0, distill: bool | None = None) -> Loss:
    """"ce" (integer targets), "kl" (distillation at `temperature`), "mse" (float targets, or the teacher's raw
    outputs with `distill=True`) or "cosine" (1 - cosine similarity over the last dim). `distill` defaults to
    True for "kl", False otherwise. Each reads the primary output (`make_loss` distils every output)."""
    if kind not in LOSS_KINDS:
        raise TrainError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if kind == "ce":
        if distill:
            raise TrainError("cross-entropy needs class-id targets, not a teacher")
        return Loss("ce", _ce, False)
    if kind == "kl":
        if distill is False:
            raise TrainError("KL divergence is a distillation loss: it needs a teacher")
        if temperature <= 0:
            raise TrainError(f"temperature must be positive, got {temperature}")
        return Loss("kl", single_loss("kl", temperature), True)
    return Loss(kind, single_loss(kind), bool(distill))


def make_loss(dataset_has_targets: bool, distill: bool, output_kind: str = "logits", *,
              temperature: float = 2.0, kinds: Sequence[str | None] | None = None,
              distill_loss: str | None = None, teacher_weight: float = 0.0) -> Loss:
    """The loss for a task: with targets and no distillation, cross-entropy ("logits" / "classes" outputs,
    class dim last) or MSE (any other output kind: regression) — for class ids with `teacher_weight` > 0, mixed
    with KL from the teacher's logits (Hinton's knowledge distillation: (1 - w) CE + w KL at `temperature`);
    else distillation from the teacher over every float output, each with the loss that fits its kind (`kinds`,
    from `distill.output_kinds`; default [`output_kind`]): KL on logits, 1 - cosine on embeddings, MSE on
    hidden states and values, or `distill_loss` for all of them."""
    logits = output_kind in LOGIT_KINDS
    if dataset_has_targets and not distill:
        if logits and teacher_weight > 0:
            return _ce_with_teacher(teacher_weight, temperature)
        return loss_fn("ce") if logits else loss_fn("mse")
    kinds = list(kinds) if kinds is not None else ["logits" if logits else output_kind]
    kinds = [k if k in OUTPUT_KINDS or k is None else "hidden" for k in kinds]
    try:
        losses = distill_loss_for(kinds, distill_loss)
    except ValueError as e:
        raise TrainError(str(e)) from None
    primary = next((i for i, k in enumerate(kinds) if k is not None), None)
    if primary is None:
        raise TrainError("the program has no floating-point output to distil from")
    name = "+".join(dict.fromkeys(x for x in losses if x))  # the primary output's loss when all share one
    return Loss(name, tree_distill(losses, temperature), True, tree=True,
                metric=metric_for(kinds[primary], losses[primary]))


def _ce_with_teacher(weight: float, temperature: float) -> Loss:
    if not 0 < weight <= 1:
        raise TrainError(f"the teacher's weight must be in (0, 1], got {weight}")
    kl = single_loss("kl", temperature)

    def fn(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, teacher = target
        return (1 - weight) * _ce(logits, labels) + weight * kl(logits, teacher)

    return Loss("ce+kl", fn, distill=True, with_labels=True)


def _as_loss(loss: str | Loss | Callable) -> Loss:
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return loss_fn(loss)
    if callable(loss):
        return Loss("custom", loss, False)
    raise TrainError(f"not a loss: {loss!r}")


def _teacher_module(teacher: ExportedProgram | nn.Module | None, device: torch.device) -> nn.Module | None:
    return None if teacher is None else _as_module(teacher, device)


def _target(loss: Loss, targets: Any, teacher: nn.Module | None, inputs: Any, device: torch.device) -> Any:
    if loss.distill:
        if teacher is None:
            raise TrainError(f"the {loss.kind} loss distils from a teacher, and none was given")
        with torch.no_grad():
            out = _call(teacher, inputs)
        if loss.with_labels:
            if targets is None:
                raise TrainError(f"the {loss.kind} loss needs targets, and a batch has none")
            return _to(targets, device), out
        return out
    if targets is None:
        raise TrainError(f"the {loss.kind} loss needs targets, and a batch has none (distil from a teacher?)")
    return _to(targets, device)


def _optimizer(kind: str, params: list[nn.Parameter], lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise TrainError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainError("the program has no trainable parameters")
    return params


# --- group layout (shared by the regulariser and the data-driven scores) ----------------------------------


class _Layout:
    """The selected groups' indices laid end to end (position = group offset + index in `components`), and
    for every parameter member its tensor, its dim and the position of each index of that dim (indices
    outside the selection, frozen ones, go to a spare last position)."""

    def __init__(self, graph: DependencyGraph, module: nn.Module, groups: Sequence[Group]) -> None:
        self.groups = list(groups)
        sizes = [g.size for g in self.groups]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = total = int(self.offsets[-1])
        pos = np.full(int(graph.labels.max()) + 1, total, dtype=np.int64)
        group_of = np.zeros(total, dtype=np.int64)
        carriers = np.zeros(total + 1, dtype=np.float64)
        self.terms: list[tuple[str, torch.Tensor, int, torch.Tensor]] = []
        for i, g in enumerate(self.groups):
            pos[g.components] = self.offsets[i] + np.arange(g.size)
            group_of[self.offsets[i]: self.offsets[i + 1]] = i
        for g in self.groups:
            for m in g.members:
                if m.kind != "parameter":  # running statistics are not weights
                    continue
                p = _get(module, m.name)
                labels = graph.slot_labels(m.slot)
                if p.dim() <= m.dim or p.shape[m.dim] != len(labels):
                    raise TrainError(f"the dependency graph does not match the module at {m.name}:{m.dim}")
                carriers[pos[graph.slot_comps[m.slot]]] += 1
                self.terms.append((m.name, p, m.dim, torch.as_tensor(pos[labels], device=p.device)))
        self.device = self.terms[0][1].device if self.terms else torch.device("cpu")
        self.group_of = torch.as_tensor(group_of, device=self.device)
        self.carriers = torch.as_tensor(np.maximum(carriers[:total], 1.0), device=self.device)

    def per_index(self, values: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
                  grads: dict[int, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum over members of `values(w, grad)` (elementwise) summed over each index's slice, per position."""
        acc = torch.zeros(self.total + 1, dtype=dtype, device=self.device)
        cache: dict[int, torch.Tensor | None] = {}
        for _, p, dim, idx in self.terms:
            key = id(p)
            if key not in cache:
                cache[key] = values(p, None if grads is None else grads.get(key))
            v = cache[key]
            if v is None:
                continue
            dims = [d for d in range(v.dim()) if d != dim]
            v = v.sum(dim=dims) if dims else v
            acc = acc.index_add(0, idx, v.to(dtype))
        return acc[: self.total]

    def split(self, values: torch.Tensor) -> dict[int, np.ndarray]:
        flat = values.detach().cpu().double().numpy()
        return {g.id: flat[self.offsets[i]: self.offsets[i + 1]].copy() for i, g in enumerate(self.groups)}


def _select_groups(graph: DependencyGraph, groups: Iterable[Group] | None, include_hidden: bool) -> list[Group]:
    if groups is not None:
        return list(groups)
    return [g for g in graph.groups if include_hidden or not g.hidden]


# --- the regulariser ----------------------------------------------------------------------------------------


class GroupRegulariser:
    """R = reg * sum_g sum_k gamma[g,k] * sqrt(S[g,k] + eps) over the module's parameters (see the module
    docstring); `penalty()` is differentiable, `refresh()` recomputes gamma from the current weights."""

    def __init__(self, graph: DependencyGraph, module: nn.Module, reg: float, alpha: float = 4.0, *,
                 groups: Iterable[Group] | None = None, include_hidden: bool = False, eps: float = 1e-8) -> None:
        if reg < 0:
            raise TrainError(f"reg must be non-negative, got {reg}")
        self.reg = float(reg)
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.layout = _Layout(graph, module, _select_groups(graph, groups, include_hidden))
        self.gamma = torch.ones(self.layout.total, device=self.layout.device)
        self.refresh()

    def _squares(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """S per position: the squared L2 norm of every member's slice, summed over the group's members."""
        return self.layout.per_index(lambda w, _: w.float().pow(2), dtype=dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        lay = self.layout
        if lay.total == 0:
            return
        imp = self._squares(torch.float64) / lay.carriers
        n = len(lay.groups)
        hi = torch.full((n,), -math.inf, dtype=imp.dtype, device=imp.device).scatter_reduce(
            0, lay.group_of, imp, "amax")
        lo = torch.full((n,), math.inf, dtype=imp.dtype, device=imp.device).scatter_reduce(
            0, lay.group_of, imp, "amin")
        hi, lo = hi[lay.group_of], lo[lay.group_of]
        self.gamma = torch.pow(2.0, self.alpha * (hi - imp) / (hi - lo + 1e-12)).float()

    def penalty(self) -> torch.Tensor:
        if self.layout.total == 0:
            return torch.zeros((), device=self.layout.device)
        return self.reg * (self.gamma * torch.sqrt(self._squares() + self.eps)).sum()

    def importance(self) -> dict[int, np.ndarray]:
        """I[g,k] = S[g,k] / C[g,k] by group id (importance.py's l2), from the current weights."""
        with torch.no_grad():
            return self.layout.split(self._squares(torch.float64) / self.layout.carriers)

    def norms(self) -> dict[int, np.ndarray]:
        """sqrt(S[g,k]) by group id: the group's L2 norm at each index."""
        with torch.no_grad():
            return self.layout.split(self._squares(torch.float64).sqrt())

    def gammas(self) -> dict[int, np.ndarray]:
        return self.layout.split(self.gamma)


# --- training -----------------------------------------------------------------------------------------------


def _check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise TrainError(f"the loss is not finite at step {step} ({value}); lower the learning rate or reg")


def _optimise(module: nn.Module, opt: torch.optim.Optimizer, loss: Loss, inputs: Any, targets: Any,
              teacher: nn.Module | None, device: torch.device, step: int,
              penalty: Callable[[], torch.Tensor] | None = None, clip_grad: float = 0.0) -> float:
    """One optimiser step on a batch: the task loss (plus `penalty()`, the regulariser), refused when not finite,
    the gradient's global L2 norm clipped to `clip_grad` (0: not clipped). Returns the loss."""
    inputs = _to(inputs, device)
    total = loss(_call(module, inputs), _target(loss, targets, teacher, inputs, device))
    if penalty is not None:
        total = total + penalty()
    opt.zero_grad(set_to_none=True)
    total.backward()
    value = float(total.detach())
    _check_finite(value, step)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip_grad)
    opt.step()
    return value


def sparse_train(
    ep: ExportedProgram,
    graph: DependencyGraph,
    dataset_batches: Batches,
    *,
    steps: int,
    lr: float,
    reg: float,
    alpha: float = 4.0,
    loss: str | Loss | Callable,
    teacher: ExportedProgram | nn.Module | None = None,
    on_step: Callable[[int, float], Any] | None = None,
    refresh: int = 10,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    groups: Iterable[Group] | None = None,
    include_hidden: bool = False,
    device: str | torch.device | None = None,
    warmup: int = 0,
    clip_grad: float = 0.0,
    batchnorm: str = "train",
) -> tuple[ExportedProgram, list[float]]:
    """DepGraph's sparse training: `steps` steps of SGD (momentum 0.9; `optimizer="adam"`/`"adamw"` for Adam)
    on the task loss + the group regulariser, cycling over the batches, at a constant `lr` after `warmup` steps
    of linear warm-up, the gradient clipped to `clip_grad` (0: not); gamma is refreshed every `refresh` steps.
    Batch norms train as in a module in training mode (`batchnorm="train"`) or stay on their running statistics
    ("frozen"). `graph` is the program's dependency graph. `on_step(step, loss)` follows each step (step counts
    from 1; loss is the step's objective, task + penalty). Returns the trained program and the per-step
    objectives; prune it afterwards (the weak indices' norms are near zero, so the L2 importance ranks them last)."""
    if steps < 0 or refresh < 1 or warmup < 0:
        raise TrainError(f"steps and warmup must be >= 0 and refresh >= 1, got {steps}, {warmup} and {refresh}")
    dev = _device(device)
    loss_ = _as_loss(loss)
    module = trainable_module(ep, dev, batchnorm)
    teacher_m = _teacher_module(teacher, dev) if loss_.distill else None
    regulariser = GroupRegulariser(graph, module, reg, alpha, groups=groups, include_hidden=include_hidden)
    opt = _optimizer(optimizer, _trainable(module), lr, momentum, weight_decay)
    losses: list[float] = []
    for step, (inputs, targets) in zip(range(steps), _cycle(dataset_batches), strict=False):
        if step and step % refresh == 0:
            regulariser.refresh()
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor("constant", step, steps, warmup)
        value = _optimise(module, opt, loss_, inputs, targets, teacher_m, dev, step + 1, regulariser.penalty,
                          clip_grad)
        losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
    return updated_program(ep, module), losses


def _lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def _choose_metric(metric: str | None, loss: Loss, held_out: Iterable, has_teacher: bool) -> str:
    if metric is not None:
        if metric not in METRICS:
            raise TrainError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        return metric
    first = next(iter(held_out), None)
    if first is None:
        raise TrainError("the held-out split is empty")
    if _is_class_ids(first[1]) and loss.kind != "mse":
        return "accuracy"
    if has_teacher and loss.metric is not None:
        return loss.metric
    if has_teacher and loss.kind in ("kl", "ce"):
        return "agreement"
    return "neg_loss"


def finetune(
    ep: ExportedProgram,
    train_batches: Batches,
    held_out: Batches,
    *,
    steps: int,
    lr: float,
    loss: str | Loss | Callable,
    teacher: ExportedProgram | nn.Module | None = None,
    schedule: str = "cosine",
    warmup: int = 0,
    eval_every: int | None = None,
    on_step: Callable[[int, float], Any] | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    metric: str | None = None,
    device: str | torch.device | None = None,
    clip_grad: float = 0.0,
    batchnorm: str = "train",
    hidden_layers: Sequence[str] = (),
    hidden_weight: float = 0.0,
) -> tuple[ExportedProgram, list[dict]]:
    """Recovery training (after pruning): SGD with momentum (or Adam, AdamW) under a `schedule` ("cosine",
    "linear" or "constant", after `warmup` steps of linear warm-up), the gradient clipped to `clip_grad` (0: not),
    batch norms in training mode (`batchnorm="train"`: batch statistics, running statistics updated; "frozen":
    running statistics), evaluated (batch norms on their running statistics) on `held_out` before training and
    every `eval_every` steps (default steps // 10) and at the end. The held-out metric: `metric`, else "accuracy"
    when the held-out targets are class ids, else the loss's own (`Loss.metric`: "agreement" for logits,
    "cosine" for embeddings), else "agreement" (top-1 with the teacher) for logits, else "neg_loss".
    With a distillation loss, `hidden_weight` > 0 adds hidden-state distillation at `hidden_layers` (node names
    both programs share: `distill.shared_layer_outputs`), `distill.HiddenDistillation`.
    Returns the checkpoint with the best held-out metric (on ties the lower held-out loss, then the first;
    possibly the program as given) and the curve: one dict per evaluation with step, loss (mean training loss since the
    previous evaluation, None at step 0), held_out (the metric), metric (its name) and lr."""
    if schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if steps < 0 or warmup < 0:
        raise TrainError(f"steps and warmup must be >= 0, got {steps} and {warmup}")
    eval_every = eval_every or max(1, steps // 10)
    dev = _device(device)
    loss_ = _as_loss(loss)
    held = _reiterable(held_out)
    module = trainable_module(ep, dev, batchnorm)
    teacher_m = _teacher_module(teacher, dev)
    name = _choose_metric(metric, loss_, held, teacher_m is not None)
    teacher_outs = _teacher_outputs(teacher_m, held, dev)
    opt = _optimizer(optimizer, _trainable(module), lr, momentum, weight_decay)
    names = _state_names(ep)
    penalty = None
    if hidden_weight > 0 and hidden_layers and loss_.distill and isinstance(module, ProgramModule) \
            and isinstance(teacher_m, ProgramModule):
        penalty = HiddenDistillation(module, teacher_m, hidden_layers, hidden_weight).penalty

    def measure() -> tuple[float, float]:
        module.eval()
        try:
            res = _evaluate(module, held, teacher_outs, loss_, dev)
        finally:
            module.train()
        if name != "neg_loss" and name not in res:
            raise TrainError(f"the held-out metric {name!r} cannot be computed on this split")
        return held_out_score(res, name)

    curve: list[dict] = []
    best = measure()
    best_state = {n: _get(module, n).detach().clone() for n in names}
    curve.append({"step": 0, "loss": None, "held_out": best[0], "metric": name, "lr": lr * _lr_factor(
        schedule, 0, steps, warmup)})
    since: list[float] = []
    for step, (inputs, targets) in zip(range(steps), _cycle(train_batches), strict=False):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(schedule, step, steps, warmup)
        value = _optimise(module, opt, loss_, inputs, targets, teacher_m, dev, step + 1, penalty, clip_grad)
        since.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        done = step + 1
        if done % eval_every == 0 or done == steps:
            score = measure()
            curve.append({"step": done, "loss": float(np.mean(since)), "held_out": score[0], "metric": name,
                          "lr": opt.param_groups[0]["lr"]})
            since = []
            if score > best:
                best = score
                best_state = {n: _get(module, n).detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            _get(module, n).copy_(best_state[n])
    return updated_program(ep, module), curve


@torch.no_grad()
def recalibrate_batchnorm(ep: ExportedProgram, batches: Batches, *, max_batches: int = 20,
                          device: str | torch.device | None = None) -> ExportedProgram:
    """`ep` with the running statistics of its batch norms recomputed on `batches` (at most `max_batches`):
    the exact average of the batches' means and variances, as after pruning, where the kept channels' inputs
    have changed and the old statistics no longer fit. `ep` itself when it has no batch norm (or runs through
    `ep.module()`, whose batch norms already track their batches)."""
    if not has_batch_norm(ep):
        return ep
    dev = _device(device)
    module = trainable_module(ep, dev, "train")
    if not isinstance(module, ProgramModule):
        return ep
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target in BATCH_NORM_OPS:  # zero the statistics the average replaces
            mean, var = n.args[3], n.args[4]
            names = ep.graph_signature.inputs_to_buffers
            if isinstance(mean, torch.fx.Node) and isinstance(var, torch.fx.Node) \
                    and mean.name in names and var.name in names:
                _get(module, names[mean.name]).zero_()
                _get(module, names[var.name]).fill_(1.0)
    seen = 0
    for inputs, _ in batches:
        if seen >= max_batches:
            break
        module.batchnorm_momentum = 1.0 / (seen + 1)  # running = mean of the batches seen so far
        _call(module, _to(inputs, dev))
        seen += 1
    if seen == 0:
        raise TrainError("no batches to recalibrate batch norm on")
    return updated_program(ep, module)


def held_out_score(metrics: dict, metric: str) -> tuple[float, float]:
    """Higher is better: (the metric, or minus the loss for "loss"/"neg_loss"; minus the loss), so that a tie on
    a coarse metric (top-1 agreement of a model that almost always agrees) goes to the lower loss."""
    neg_loss = -metrics.get("loss", math.inf)
    value = neg_loss if metric in ("loss", "neg_loss") else metrics.get(metric, -math.inf)
    return value, neg_loss


def loss_trend(losses: Sequence[float]) -> dict:
    """Whether a loss curve went down: the mean of its first tenth (at least 1, at most 20 steps) against the
    mean of its last tenth; `improved` when the last is at least 1% lower."""
    if not losses:
        return {"first": None, "last": None, "improved": False}
    k = min(20, max(1, len(losses) // 10))
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return {"first": round(first, 6), "last": round(last, 6), "improved": last < first - 0.01 * abs(first)}


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module | None, batches: Iterable, device: torch.device) -> list | None:
    if teacher is None:
        return None
    return [_primary(_call(teacher, _to(inputs, device))) for inputs, _ in batches]


def _class_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    if logits.dim() == target.dim() + 1 and logits.shape[:-1] == target.shape:
        pred = logits.argmax(-1)
    elif logits.dim() == target.dim() + 1 and logits.shape[0] == target.shape[0] \
            and logits.shape[2:] == target.shape[1:]:
        pred = logits.argmax(1)  # (B, C, ...) with (B, ...)
    else:
        raise TrainError(f"outputs {tuple(logits.shape)} do not match class-id targets {tuple(target.shape)}")
    keep = target != IGNORE_INDEX
    return int((pred[keep] == target[keep]).sum()), int(keep.sum())


@torch.no_grad()
def _evaluate(module: nn.Module, batches: Iterable, teacher_outs: list | None, loss: Loss | None,
              device: torch.device) -> dict:
    correct = total = agree = positions = 0
    cos_sum = 0.0
    cos_n = 0
    loss_sum = 0.0
    samples = 0
    batches_seen = 0
    for i, (inputs, targets) in enumerate(batches):
        out = _primary(_call(module, _to(inputs, device)))
        t_out = teacher_outs[i] if teacher_outs is not None else None
        targets = _to(targets, device) if targets is not None else None
        n = int(out.shape[0]) if out.dim() else 1
        batches_seen += 1
        if _is_class_ids(targets):
            c, k = _class_correct(out, targets)
            correct += c
            total += k
        if t_out is not None:
            agree += int((out.argmax(-1) == t_out.argmax(-1)).sum())
            positions += int(out.argmax(-1).numel())
            cos_sum += float(F.cosine_similarity(out.reshape(n, -1).float(), t_out.reshape(n, -1).float(),
                                                 dim=1).sum())
            cos_n += n
        batch_loss = _eval_loss(loss, out, targets, t_out)
        if batch_loss is not None:
            loss_sum += batch_loss * n
            samples += n
    res: dict = {"batches": batches_seen}
    if total:
        res["accuracy"] = correct / total
    if positions:
        res["agreement"] = agree / positions
        res["cosine"] = cos_sum / max(1, cos_n)
    if samples:
        res["loss"] = loss_sum / samples
    return res


def _eval_loss(loss: Loss | None, out: torch.Tensor, targets: torch.Tensor | None,
               t_out: torch.Tensor | None) -> float | None:
    if loss is None:  # a default: CE on class ids, MSE on float targets, KL with the teacher's logits
        if _is_class_ids(targets):
            loss = loss_fn("ce")
        elif targets is not None:
            loss = loss_fn("mse")
        elif t_out is not None:
            loss = loss_fn("kl")
        else:
            return None
    target: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = t_out if loss.distill else targets
    if loss.with_labels:
        target = None if targets is None or t_out is None else (targets, t_out)
    if target is None:
        return None
    return float(loss(out, target))


def evaluate(program: ExportedProgram | nn.Module, batches: Batches, *,
             teacher: ExportedProgram | nn.Module | None = None, loss: str | Loss | Callable | None = None,
             device: str | torch.device | None = None) -> dict:
    """Metrics of `program` on `batches`: "accuracy" (when targets are class ids; targets of -100 ignored),
    "agreement" (top-1 agreement with the teacher's argmax over the last dim, per position) and "cosine" (mean
    cosine similarity of each sample's flattened outputs with the teacher's) when a teacher is given, "loss"
    (mean per sample; `loss`, else CE on class ids, MSE on float targets, KL against the teacher's logits) and
    "batches"."""
    dev = _device(device)
    batches = _reiterable(batches)
    module = _as_module(program, dev)
    teacher_outs = _teacher_outputs(_teacher_module(teacher, dev), batches, dev)
    return _evaluate(module, batches, teacher_outs, None if loss is None else _as_loss(loss), dev)


# --- data-driven importance ---------------------------------------------------------------------------------


def _saliency(kind: str, graph: DependencyGraph, module: ExportedProgram | nn.Module, batches: Batches,
              loss: str | Loss | Callable, groups: Iterable[Group] | None,
              teacher: ExportedProgram | nn.Module | None, device: str | torch.device | None) -> dict[int, np.ndarray]:
    if isinstance(module, ExportedProgram):
        module = trainable_module(module, device)
    layout = _Layout(graph, module, list(graph.groups if groups is None else groups))
    dev = layout.device
    loss_ = _as_loss(loss)
    teacher_m = _teacher_module(teacher, dev) if loss_.distill else None
    params = list({id(p): p for _, p, _, _ in layout.terms if p.requires_grad}.values())
    acc = torch.zeros(layout.total, dtype=torch.float64, device=dev)
    n = 0
    for inputs, targets in batches:
        inputs = _to(inputs, dev)
        target = _target(loss_, targets, teacher_m, inputs, dev)
        value = loss_(_call(module, inputs), target)
        grads = torch.autograd.grad(value, params, allow_unused=True) if params else ()
        gmap = {id(p): g for p, g in zip(params, grads, strict=True) if g is not None}

        def wg(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor | None:
            if g is None:
                return None
            v = w.detach().double() * g.double()
            return v if kind == "taylor" else v.pow(2) / 2

        per = layout.per_index(wg, gmap, dtype=torch.float64)
        acc += per.abs() if kind == "taylor" else per
        n += 1
    if n == 0:
        raise TrainError("no batches to score on")
    return layout.split(acc)


def taylor_scores(graph: DependencyGraph, module: ExportedProgram | nn.Module, batches: Batches,
                  loss: str | Loss | Callable, groups: Iterable[Group] | None = None, *,
                  teacher: ExportedProgram | nn.Module | None = None,
                  device: str | torch.device | None = None) -> dict[int, np.ndarray]:
    """First-order Taylor importance, {group id: scores aligned with group.components} for `groups` (default
    all): I[g,k] = sum over batches b of |sum over parameter members m and the k-slice of m of w * dL_b/dw|.
    `module`: a program module (`trainable_module(ep)`) or the program itself."""
    return _saliency("taylor", graph, module, batches, loss, groups, teacher, device)


def fisher_scores(graph: DependencyGraph, module: ExportedProgram | nn.Module, batches: Batches,
                  loss: str | Loss | Callable, groups: Iterable[Group] | None = None, *,
                  teacher: ExportedProgram | nn.Module | None = None,
                  device: str | torch.device | None = None) -> dict[int, np.ndarray]:
    """Second-order (OBD with the empirical Fisher as Hessian diagonal) importance, same format:
    I[g,k] = sum over batches b, parameter members m and the k-slice of m of (w * dL_b/dw)^2 / 2."""
    return _saliency("fisher", graph, module, batches, loss, groups, teacher, device)
