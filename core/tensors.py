"""The program's own tensors (parameters, buffers, constants) by fully qualified name, and which are tied.

`torch.export` lifts a tied tensor (a language model's input embedding reused as its output projection) under
every name it has, as one tensor; the graph reads it through one placeholder and the others go unused. The
engine treats tied names as one tensor: their dims share slots, they are counted once, and the pruned program
keeps them tied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.export import ExportedProgram


def program_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters, buffers and constants of the program by fully qualified name."""
    out = dict(ep.state_dict)
    out.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def _key(t: torch.Tensor) -> tuple:
    """Two names hold the same tensor: the same storage, offset, shape, strides and dtype."""
    if t.device.type == "meta" or t.untyped_storage().data_ptr() == 0:
        return ("object", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def tied_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """name -> the first name (in `tensors`' order) holding the same tensor, for every name that shares one."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in tensors.items():
        canonical = first.setdefault(_key(t), name)
        if canonical != name:
            tied[name] = canonical
    return tied
