"""Training's machinery on an exported program: the program module the training runs on, batches, the
optimizer and the learning-rate schedule (one optimisation step on a loss is `losses._optimise`).

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
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeGuard

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import ExportedProgram

from .errors import EngineError
from .program_module import ProgramModule, supported
from .spec import OPTIMIZERS
from .tensors import program_tensors, tied_names

BATCHNORM_MODES = ("train", "frozen")
SCHEDULES = ("cosine", "linear", "constant")
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


def _lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0
