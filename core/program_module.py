"""A runnable nn.Module over an ExportedProgram's own graph, with replacement tensors and literals.

`ep.module()` copies the graph, inserts guards and generates Python code: tens of milliseconds on
a small network and most of the cost of pruning it in memory. `ProgramModule` instead runs the
program's graph with an FX interpreter, reading parameters, buffers and constants from its own
registered attributes (so they can be sliced, trained and exported) and taking the arguments of
some nodes from an override table (the rewritten shape literals). Nothing is copied and no code
is generated; exporting it (non-strict) traces the same aten ops and yields a standalone program.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


class NodeCall:
    """What a rewrite may change about a call node: its target, args and kwargs."""

    def __init__(self, node: torch.fx.Node) -> None:
        self.name = node.name
        self.target: Any = node.target  # an op: NodeCall stands for call_function nodes only
        self.args = node.args
        self.kwargs = node.kwargs
        self.op = node.op


def supported(ep: ExportedProgram) -> bool:
    """Programs whose outputs are all user outputs (no buffer or input mutation to write back)."""
    sig = ep.graph_signature
    return all(o.kind == OutputKind.USER_OUTPUT for o in sig.output_specs) and all(
        i.kind in LIFTED or i.kind == InputKind.USER_INPUT for i in sig.input_specs
    )


def _positional_names(ep: ExportedProgram, spec: pytree.TreeSpec | None) -> list[str] | None:
    """Argument names of a program called with positional arguments only, else None."""
    if spec is None or spec.num_children != 2 or spec.child(1).num_children:
        return None
    n_args = spec.child(0).num_children
    mcg = ep.module_call_graph
    names = list(mcg[0].signature.forward_arg_names or []) if mcg and mcg[0].signature else []
    if len(names) != n_args or not all(isinstance(x, str) and x.isidentifier() for x in names):
        return None
    return names


@functools.lru_cache(maxsize=256)
def _named_class(names: tuple[str, ...]) -> type[ProgramModule]:
    """A ProgramModule subclass whose forward's signature names the program's arguments (one per set of
    names, so pruning many programs does not create a class each time)."""
    signature = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return ProgramModule.forward(self, *args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # inspect.signature reads a function's __signature__; typeshed's function type does not declare it
    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *signature.parameters.values()])
    return type(ProgramModule.__name__, (ProgramModule,), {"forward": forward, "_signature": signature})


def call_specs(ep: ExportedProgram) -> tuple[pytree.TreeSpec | None, pytree.TreeSpec | None]:
    """The program's input and output tree specs (`ep.call_spec` builds a NamedTuple class on every access)."""
    mcg = ep.module_call_graph
    if not mcg or mcg[0].signature is None:
        return None, None
    return mcg[0].signature.in_spec, mcg[0].signature.out_spec


_aten = torch.ops.aten
# Inference-mode batch norm as programs traced in eval mode call it, and the index of its `training` flag.
_BATCH_NORM_TRAINING_ARG = {_aten.batch_norm.default: 5, _aten.native_batch_norm.default: 5}


def _batch_norm_in_training(target: Any, args: tuple, kwargs: dict, momentum: float | None) -> Any:
    """The training-mode call of an inference batch norm node: batch statistics, running statistics updated in
    place (the buffers passed are the module's own) with `momentum` (None: the node's own), same outputs."""
    if target is _aten._native_batch_norm_legit_no_training.default:
        x, weight, bias, mean, var, node_momentum, eps = args
        return _aten._native_batch_norm_legit.default(x, weight, bias, mean, var, True,
                                                      _momentum(node_momentum, momentum), eps)
    i = _BATCH_NORM_TRAINING_ARG[target]
    call = list(args)
    call[i] = True
    call[i + 1] = _momentum(call[i + 1], momentum)
    return target(*call, **kwargs)


def _momentum(node_momentum: float | None, override: float | None) -> float:
    """The override, else the node's momentum; a batch norm built with `momentum=None` (a cumulative average
    over `num_batches_tracked`) exports as momentum 0, which would never update: nn.BatchNorm's default 0.1."""
    if override is not None:
        return override
    return node_momentum if node_momentum else 0.1


BATCH_NORM_OPS = (*_BATCH_NORM_TRAINING_ARG, _aten._native_batch_norm_legit_no_training.default)


def has_batch_norm(ep: ExportedProgram) -> bool:
    """The program calls an inference batch norm (one that can train, `ProgramModule.batchnorm_training`)."""
    return any(n.op == "call_function" and n.target in BATCH_NORM_OPS for n in ep.graph.nodes)


class _Runner(torch.fx.Interpreter):
    def __init__(self, owner: ProgramModule) -> None:
        super().__init__(owner._holder, graph=owner._graph, garbage_collect_values=True)
        self.owner = owner
        self.bn_training = owner.training and owner.batchnorm_training

    def run_node(self, n: torch.fx.Node) -> Any:
        out = self._run_node(n)
        if n.name in self.owner.taps:
            self.owner.tapped[n.name] = out
        return out

    def _run_node(self, n: torch.fx.Node) -> Any:
        call = self.owner._overrides.get(n.name)
        if call is None:
            if self.bn_training and n.op == "call_function" and n.target in BATCH_NORM_OPS:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                return _batch_norm_in_training(n.target, args, kwargs, self.owner.batchnorm_momentum)
            return super().run_node(n)
        # a NodeCall has the args and kwargs this reads of a Node
        args, kwargs = self.fetch_args_kwargs_from_env(call)  # type: ignore[arg-type]
        if self.bn_training and call.target in BATCH_NORM_OPS:
            return _batch_norm_in_training(call.target, args, kwargs, self.owner.batchnorm_momentum)
        return call.target(*args, **kwargs)


class ProgramModule(torch.nn.Module):
    """Runs `ep`'s graph with `tensors` (by fully qualified name) and node overrides.

    The graph fixes how batch norm behaves (a program traced in eval mode normalises with its running
    statistics). With `batchnorm_training` set and the module in training mode (`train()`), its inference batch
    norms run as in training instead: batch statistics, the module's running-statistics buffers updated in place.
    Off by default, so a module made to run a program behaves as the program does. `batchnorm_momentum`
    replaces the nodes' momentum then (recalibration averages batches with 1 / (i + 1))."""

    batchnorm_training: bool = False
    batchnorm_momentum: float | None = None
    taps: frozenset[str] = frozenset()  # nodes whose values each forward keeps in `tapped` (hidden distillation)
    _signature: inspect.Signature  # the program's argument names, on the classes `_named_class` makes

    def __init__(self, ep: ExportedProgram, tensors: Mapping[str, torch.Tensor],
                 overrides: Mapping[str, NodeCall] | None = None) -> None:
        super().__init__()
        if not supported(ep):
            raise ValueError("program mutates buffers or inputs; use ep.module()")
        sig = ep.graph_signature
        self._graph = ep.graph
        self._in_spec, self._out_spec = call_specs(ep)
        self._overrides = dict(overrides or {})
        self._lifted: list[str] = []
        self._holder = torch.nn.Module()  # empty: get_attr never happens on the lifted graph
        self.tapped: dict[str, Any] = {}
        self.arg_names = _positional_names(ep, self._in_spec)
        if self.arg_names is not None:
            # the program's own argument names, so that export names its inputs as the original did
            self.__class__ = _named_class(tuple(self.arg_names))
        for spec in sig.input_specs:
            if spec.kind not in LIFTED:
                continue
            self._lifted.append(spec.target)
            t = tensors[spec.target]
            prefix, _, name = spec.target.rpartition(".")
            mod: torch.nn.Module = self
            for part in prefix.split(".") if prefix else []:
                if part not in mod._modules:
                    mod.add_module(part, torch.nn.Module())
                sub = mod._modules[part]
                assert sub is not None  # added just above when missing
                mod = sub
            if spec.kind == InputKind.PARAMETER:
                mod.register_parameter(name, t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t))
            elif spec.kind == InputKind.BUFFER:
                mod.register_buffer(name, t, persistent=bool(spec.persistent))
            else:
                setattr(mod, name, t)

    def _tensor(self, fqn: str) -> torch.Tensor:
        prefix, _, name = fqn.rpartition(".")
        return getattr(self.get_submodule(prefix) if prefix else self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.arg_names is not None and kwargs:
            bound = self._signature.bind(*args, **kwargs)
            args, kwargs = tuple(bound.arguments[n] for n in self.arg_names), {}
        flat, _ = pytree.tree_flatten((args, kwargs))
        lifted = [self._tensor(f) for f in self._lifted]
        out = _Runner(self).run(*lifted, *flat, enable_io_processing=False)
        assert self._out_spec is not None, "an exported program has a call signature"
        return pytree.tree_unflatten(list(out), self._out_spec)
