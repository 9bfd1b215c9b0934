"""The job spec on the wire: `prunery.core.spec.JobSpec` to and from `prunery.v1.PruneSpec`, field by field by
name (the two have the same fields; tests/core/test_spec.py checks it). Torch-free: the API and the client use it.

Conventions of the wire form, read off the proto's field descriptors rather than listed here:
- enums carry the engine's names: `Importance.L2` is "l2", `AttentionPruning.ATTENTION_HEAD_DIM` is "head-dim",
  `Optimizer.OPTIMIZER_ADAMW` is "adamw"; the UNSPECIFIED value is the spec's default;
- a field the spec marks `zero_is_default` reads 0 (or "") as its default, and a None (the engine chooses) is
  sent as 0;
- a field with presence (`optional` in the proto: 0 is a value there) reads "unset" as its default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prunery.core.spec import JobSpec, Violation, enum_name
from prunery.v1 import prunery_pb2 as pb

__all__ = ["enum_value", "spec_from_proto", "spec_to_proto"]

_DESCRIPTOR = pb.PruneSpec.DESCRIPTOR


def enum_value(name: str, field: str) -> int:
    """The proto enum number of the engine's `name` for spec field `field`; ValueError naming the choices."""
    enum = _DESCRIPTOR.fields_by_name[field].enum_type
    for value in enum.values:
        if value.number and enum_name(value.name, (name,)) == name:
            return value.number
    choices = [enum_name(v.name, _spec_choices(field)) for v in enum.values if v.number]
    raise ValueError(f"unknown {field} {name!r}; choose one of {', '.join(choices)}")


def _spec_choices(field: str) -> tuple[str, ...]:
    return JobSpec.__dataclass_fields__[field].metadata["choices"]


def spec_to_proto(spec: JobSpec) -> pb.PruneSpec:
    """The wire form of `spec` (its values unchecked; an enum name the proto does not know: ValueError)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if value is None:
            continue  # 0 on the wire: the engine chooses
        if _DESCRIPTOR.fields_by_name[f.name].enum_type is not None:
            value = enum_value(value, f.name)
        elif isinstance(value, tuple):
            value = list(value)
        values[f.name] = value
    return pb.PruneSpec(**values)


def spec_from_proto(msg: pb.PruneSpec) -> tuple[JobSpec, list[Violation]]:
    """The spec a request carries, and what cannot even be read from it (an enum number this server does not
    know): those fields keep their default, and the caller reports the violations with the spec's own."""
    values: dict[str, Any] = {}
    unreadable: list[Violation] = []
    for f in dataclasses.fields(JobSpec):
        descriptor = _DESCRIPTOR.fields_by_name[f.name]
        if descriptor.has_presence and descriptor.message_type is None and not msg.HasField(f.name):
            continue
        value = getattr(msg, f.name)
        if descriptor.enum_type is not None:
            if value == 0:
                continue
            known = descriptor.enum_type.values_by_number.get(value)
            if known is None:
                names = ", ".join(v.name for v in descriptor.enum_type.values if v.number)
                unreadable.append((f.name, f"unknown {f.name} {value}; use {names}"))
                continue
            value = enum_name(known.name, f.metadata["choices"])
        elif descriptor.is_repeated:
            value = tuple(value)
        elif f.metadata["zero_is_default"] and not value:
            continue
        values[f.name] = value
    return JobSpec(**values), unreadable
