"""What each output of a program is, and the distillation loss and held-out metric that fit it.

A program's outputs are read off its graph, walking back from each output through ops that only move data
(views, permutes, dtype casts, copies) to the op that made it:

- "logits": made by a projection (linear, matmul, a convolution whose output is (B, C)) with at least 2
  entries in its last dim: class scores, token logits. Distilled with KL divergence at a temperature; measured
  by top-1 agreement.
- "embedding": L2-normalised (a division by a vector norm, as `F.normalize` exports) or pooled (a mean or a
  sum over positions, a masked mean): sentence and image embeddings. Distilled with 1 - cosine similarity;
  measured by cosine similarity.
- "hidden": any other floating output with at least 2 entries in its last dim (hidden states, feature maps and
  dense per-pixel maps of a convolution, the output of a norm or a residual sum). Distilled with MSE; measured
  by cosine similarity.
- "values": a last dim of 1 or none (regression values, scores). Distilled with MSE; measured by the loss.

`--distill-loss kl|mse|cosine` overrides the choice for every output.

Intermediate layers (`HiddenDistillation`): where the pruned and the original programs share a layer's output
(the node ending a repeated layer, `encoder.layer.3`, under the same name and shape: transformer blocks on a
residual stream left whole), its hidden state is distilled too, with a normalised MSE.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.fx import Node

from .program_module import ProgramModule
from .spec import DISTILL_LOSSES

__all__ = ["DISTILL_LOSSES", "OUTPUT_KINDS", "HiddenDistillation", "distill_loss_for", "layer_outputs", "metric_for",
           "output_kinds", "shared_layer_outputs", "tree_distill"]

OUTPUT_KINDS = ("logits", "embedding", "hidden", "values")
LOSS_FOR_KIND = {"logits": "kl", "embedding": "cosine", "hidden": "mse", "values": "mse"}
METRIC_FOR_KIND = {"logits": "agreement", "embedding": "cosine", "hidden": "cosine", "values": "neg_loss"}

aten = torch.ops.aten


def _packets(*names: str) -> frozenset:
    """The overload packets of these aten op names that exist in this torch build."""
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


# ops that pass their first input's values through unchanged (rearranged, cast or copied)
_MOVES = _packets("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze", "clone",
                  "contiguous", "alias", "detach", "_to_copy", "to", "flatten", "expand", "lift_fresh_copy")
_PROJECTIONS = _packets("linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "einsum", "convolution",
                        "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                        "conv_transpose3d")
_CONVOLUTIONS = _packets("convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                         "conv_transpose2d", "conv_transpose3d")
_NORMS = _packets("linalg_vector_norm", "norm", "frobenius_norm")
_POOLS = _packets("mean", "sum", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                  "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
                  "amax", "max", "nansum")
_DIVS = _packets("div", "true_divide")
_NORM_DEPTH = 6  # how far back a divisor may be from the norm it comes from (clamp, expand, add eps, ...)


def _packet(node: object) -> object:
    return getattr(getattr(node, "target", None), "overloadpacket", None)


def _source(node: Node) -> Node:
    """The node that made `node`'s values: past the ops that only move or cast them."""
    while isinstance(node, Node) and node.op == "call_function" and _packet(node) in _MOVES and node.args \
            and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _from_norm(node: object, depth: int = _NORM_DEPTH) -> bool:
    """`node` is (a few elementwise steps from) a vector norm."""
    if not isinstance(node, Node) or depth < 0:
        return False
    if _packet(node) in _NORMS:
        return True
    return node.op == "call_function" and any(_from_norm(a, depth - 1) for a in node.args if isinstance(a, Node))


def _last_dim(node: Node) -> int | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    d = val.shape[-1]
    return d if isinstance(d, int) else 2  # a symbolic last dim (a sequence): more than one entry


def _is_float(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())


def _kind(out: Node) -> str | None:
    """The kind of one output node (None for non-float outputs, which are not distilled)."""
    if not _is_float(out):
        return None
    last = _last_dim(out)
    if last is None or last < 2:
        return "values"
    src = _source(out)
    if _packet(src) in _DIVS and len(src.args) > 1:
        if _from_norm(src.args[1]):
            return "embedding"
        num = src.args[0]
        if isinstance(num, Node) and _packet(_source(num)) in _POOLS:  # a masked mean: sum over positions / count
            return "embedding"
    if _packet(src) in _POOLS:
        return "embedding"
    if _packet(src) in _PROJECTIONS:
        # a convolution's (B, C, H, W) output has its channels in dim 1, not last: a dense map, not logits
        if _packet(src) in _CONVOLUTIONS and isinstance(out.meta.get("val"), torch.Tensor) \
                and out.meta["val"].dim() >= 3:
            return "hidden"
        return "logits"
    return "hidden"


def output_kinds(ep: ExportedProgram) -> list[str | None]:
    """The kind of each of the program's user outputs, in the order of its flattened outputs (None for
    outputs that are not floating tensors)."""
    out_node = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    outs = list(pytree.tree_leaves(out_node.args[0]))
    user = {spec.arg.name for spec in ep.graph_signature.output_specs
            if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT and hasattr(spec.arg, "name")}
    return [_kind(o) if isinstance(o, Node) and o.name in user else None for o in outs
            if not isinstance(o, Node) or o.name in user]


def distill_loss_for(kinds: Sequence[str | None], override: str | None = None) -> list[str | None]:
    """The distillation loss of each output: `override` for every float output, else the kind's own."""
    if override is not None and override not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {override!r}; choose one of {', '.join(DISTILL_LOSSES)}")
    return [None if k is None else (override or LOSS_FOR_KIND[k]) for k in kinds]


def metric_for(kind: str | None, loss: str | None) -> str:
    """The held-out metric of a primary output of `kind` distilled with `loss`."""
    if loss == "kl" or (loss is None and kind == "logits"):
        return "agreement"
    if kind == "values":
        return "neg_loss"
    return "cosine"


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2 over the last (class) dim, mean over positions."""
    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, c).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over the last dim, mean over every other position."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8).mean()


def _mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def single_loss(kind: str, temperature: float = 2.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(student, teacher) for one output."""
    if kind == "kl":
        return lambda s, t: _kl(s, t, temperature)
    if kind == "cosine":
        return _cosine
    if kind == "mse":
        return _mse
    raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(DISTILL_LOSSES)}")


def tree_distill(losses: Sequence[str | None], temperature: float = 2.0) -> Callable[[object, object], torch.Tensor]:
    """loss(student_outputs, teacher_outputs) over whole output trees: each float output with its own loss
    (`losses`, aligned with the flattened outputs; None: not distilled), averaged."""
    fns = [None if k is None else single_loss(k, temperature) for k in losses]

    def loss(student: object, teacher: object) -> torch.Tensor:
        s_leaves, t_leaves = pytree.tree_leaves(student), pytree.tree_leaves(teacher)
        if len(s_leaves) != len(t_leaves):
            raise ValueError(f"the student returns {len(s_leaves)} outputs and the teacher {len(t_leaves)}")
        # the whole outputs, or (an evaluation of the primary outputs alone) every leaf with the first loss
        per_leaf = fns if len(fns) == len(s_leaves) else [next(f for f in fns if f is not None)] * len(s_leaves)
        terms = [fn(s, t) for fn, s, t in zip(per_leaf, s_leaves, t_leaves, strict=True)
                 if fn is not None and isinstance(s, torch.Tensor)]
        if not terms:
            raise ValueError("the program has no floating-point output to distil")
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

    return loss


# --- intermediate layers -----------------------------------------------------------------------------------------

_LAYER_PATH = re.compile(r".*\.\d+")  # a child of a ModuleList / Sequential: a repeated layer (blocks, stages)


def layer_outputs(ep: ExportedProgram) -> list[str]:
    """Names of the nodes that end each repeated layer of `ep` (a transformer block, a ResNet stage's block):
    for every module path ending in an index (`encoder.layer.3`), the last node recorded under it."""
    last: dict[str, str] = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            if isinstance(path, str) and _LAYER_PATH.fullmatch(path):
                last[path] = node.name
    return list(dict.fromkeys(last.values()))


def shared_layer_outputs(teacher: ExportedProgram, student: ExportedProgram) -> list[str]:
    """The teacher's layer outputs the student has under the same node name with the same rank (a pruned
    program keeps its original's node names; shapes that changed are skipped when the values are compared)."""
    def ranks(ep: ExportedProgram) -> dict[str, int]:
        return {n.name: n.meta["val"].dim() for n in ep.graph.nodes
                if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()}

    t, s = ranks(teacher), ranks(student)
    return [name for name in layer_outputs(teacher) if name in s and t.get(name) == s[name]]


class HiddenDistillation:
    """weight * mean over shared layer outputs of MSE(student, teacher) / mean(teacher^2): hidden-state
    distillation at the ends of the layers the pruned and original programs share (both `ProgramModule`s,
    their values tapped by node name during the forward passes of a step). A layer whose shape changed
    (its width was pruned) is left out. `penalty()` reads the values of the last forward passes."""

    def __init__(self, student: ProgramModule, teacher: ProgramModule, names: Sequence[str],
                 weight: float) -> None:
        self.student, self.teacher, self.weight = student, teacher, float(weight)
        self.names = frozenset(names)
        student.taps = self.names
        teacher.taps = self.names

    def penalty(self) -> torch.Tensor:
        terms = []
        for name in self.names:
            s, t = self.student.tapped.get(name), self.teacher.tapped.get(name)
            if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.shape == t.shape:
                t = t.detach().float()
                terms.append(F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-12))
        self.student.tapped.clear()
        self.teacher.tapped.clear()
        if not terms:
            return torch.zeros(())
        return self.weight * torch.stack(terms).mean()
