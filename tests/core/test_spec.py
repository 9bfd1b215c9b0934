"""The job spec (`core/spec.py`): one definition that the proto, the stored form, the command line and the engine
all follow."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from prunery.core.spec import ATTENTION_MODES, DISTILL_LOSSES, IMPORTANCES, OPTIMIZERS, JobSpec, fields_of
from prunery.spec_proto import enum_value, spec_from_proto, spec_to_proto
from prunery.v1 import prunery_pb2 as pb


def test_the_proto_and_the_spec_have_the_same_fields() -> None:
    assert {f.name for f in pb.PruneSpec.DESCRIPTOR.fields} == {f.name for f in dataclasses.fields(JobSpec)}


def test_every_engine_name_has_its_enum_value_and_back() -> None:
    for field_, names in (("importance", IMPORTANCES + ("taylor", "fisher")), ("attention", ATTENTION_MODES),
                          ("optimizer", OPTIMIZERS), ("distill_loss", DISTILL_LOSSES)):
        numbers = [enum_value(name, field_) for name in names]
        assert len(set(numbers)) == len(names) and 0 not in numbers, field_
        enum = pb.PruneSpec.DESCRIPTOR.fields_by_name[field_].enum_type
        assert {v.number for v in enum.values} - {0} == set(numbers), field_  # every proto value has a name
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose one of sgd, adam, adamw"):
        enum_value("lion", "optimizer")


FULL = JobSpec(model="artifacts/m", ratio=0.3, importance="taylor", global_pruning=True, round_to=8, max_ratio=0.9,
               ignore=("fc.*", "head"), seed=7, attention="head-dim", prune_hidden=True, dataset="artifacts/d",
               held_out=0.2, batch_size=16, sparse_steps=5, reg=1e-3, alpha=2.0, lr=1e-3, finetune_steps=9,
               finetune_epochs=0.0, finetune_lr=3e-4, optimizer="adamw", warmup=0.0, clip_grad=0.0, distill=True,
               distill_loss="cosine", teacher_weight=0.0, hidden_weight=0.0, target_macs=0.4, target_params=None,
               target_latency_ms=None, target_steps=3)


@pytest.mark.parametrize("spec", [JobSpec(model="artifacts/m", ratio=0.5), FULL], ids=["defaults", "everything set"])
def test_wire_and_stored_forms_give_the_spec_back(spec: JobSpec) -> None:
    """Presence fields keep their zeros (warm-up 0 is a value); None survives as 0 on the wire."""
    back, unreadable = spec_from_proto(pb.PruneSpec.FromString(spec_to_proto(spec).SerializeToString()))
    assert (back, unreadable) == (spec, [])
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_wire_zeros_mean_the_defaults() -> None:
    spec, unreadable = spec_from_proto(pb.PruneSpec(model="artifacts/m", ratio=0.5))
    assert unreadable == [] and spec == JobSpec(model="artifacts/m", ratio=0.5)
    assert (spec.held_out, spec.batch_size, spec.max_ratio, spec.round_to, spec.lr, spec.optimizer) == (
        0.1, 64, 1.0, None, None, None)
    assert (spec.warmup, spec.clip_grad, spec.teacher_weight, spec.hidden_weight) == (0.05, 1.0, 0.5, 1.0)
    spec, unreadable = spec_from_proto(pb.PruneSpec(model="artifacts/m", ratio=0.5, importance=42, optimizer=9))
    assert [f for f, _ in unreadable] == ["importance", "optimizer"] and spec.importance == "l2"


def test_specs_stored_before_the_spec_module_still_load() -> None:
    """The API stored proto enum names beside engine names, and 0 or "" for the engine's choice."""
    stored = {"model": "artifacts/m", "ratio": 0.0, "importance": "TAYLOR", "global_pruning": False, "round_to": 0,
              "max_ratio": 1.0, "ignore": ["fc.*"], "seed": 0, "attention": "head-dim", "prune_hidden": False,
              "held_out": 0.1, "batch_size": 64, "sparse_steps": 0, "reg": 0.0001, "alpha": 4.0, "lr": 0.0,
              "finetune_steps": 20, "finetune_epochs": 0.0, "finetune_lr": 0.0, "distill": False,
              "target_macs": 0.5, "target_params": 0.0, "target_latency_ms": 0.0, "target_steps": 4,
              "dataset": "artifacts/d", "optimizer": "", "distill_loss": "", "warmup": 0.0, "clip_grad": 1.0,
              "teacher_weight": 0.5, "hidden_weight": 1.0}
    spec = JobSpec.from_dict(stored)
    assert spec == JobSpec(model="artifacts/m", ratio=None, importance="taylor", ignore=("fc.*",),
                           attention="head-dim", finetune_steps=20, target_macs=0.5, dataset="artifacts/d", warmup=0.0)
    assert spec.problems() == []
    # the oldest rows: a few fields, `global` for global_pruning
    old = JobSpec.from_dict({"model": "artifacts/m", "ratio": 0.25, "importance": "L1", "global": True})
    assert (old.importance, old.global_pruning, old.attention) == ("l1", True, "heads")
    with pytest.raises(ValueError, match="ignore must be a list of strings"):
        JobSpec.from_dict({"model": "artifacts/m", "ratio": 0.5, "ignore": "fc.*"})


@pytest.mark.parametrize(("changes", "field_", "words"), [
    ({"ratio": None}, "ratio", "required unless a target"),
    ({"ratio": 1.0}, "ratio", "ratio must be in (0, 1)"),
    ({"ratio": math.nan}, "ratio", "ratio must be in (0, 1)"),
    ({"importance": "l3"}, "importance", "importance must be one of l1, l2, bn, random, taylor, fisher"),
    ({"attention": "all"}, "attention", "attention must be one of heads, head-dim, none"),
    ({"round_to": 0}, "round_to", "round_to must be a positive integer"),
    ({"max_ratio": 0.0}, "max_ratio", "max_ratio must be in (0, 1]"),
    ({"ignore": ("",)}, "ignore[0]", "1-512 characters"),
    ({"held_out": 1.0}, "held_out", "held_out must be a fraction in (0, 1)"),
    ({"batch_size": 0}, "batch_size", "batch_size must be between 1 and 65536"),
    ({"sparse_steps": -1}, "sparse_steps", "between 0 and 1000000"),
    ({"lr": -1.0}, "lr", "lr must be a finite number >= 0"),
    ({"clip_grad": math.inf}, "clip_grad", "clip_grad must be a finite number >= 0"),
    ({"finetune_steps": 3, "finetune_epochs": 1.0, "dataset": "d"}, "finetune_epochs", "not both"),
    ({"warmup": 1.0}, "warmup", "warmup must be a share"),
    ({"teacher_weight": 1.5}, "teacher_weight", "teacher_weight must be a share in [0, 1]"),
    ({"optimizer": "lion"}, "optimizer", "optimizer must be one of sgd, adam, adamw"),
    ({"distill_loss": "l1"}, "distill_loss", "distill_loss must be one of kl, mse, cosine"),
    ({"target_macs": 1.0}, "target_macs", "a fraction in (0, 1) or a count above 1"),
    ({"target_latency_ms": -2.0}, "target_latency_ms", "a positive number of milliseconds"),
    ({"target_macs": 0.5, "target_params": 0.5}, "target_params", "one target at a time"),
    ({"sparse_steps": 10}, "dataset", "dataset is required by sparse_steps"),
    ({"importance": "fisher"}, "dataset", "dataset is required by importance"),
])
def test_each_problem_names_its_field(changes: dict, field_: str, words: str) -> None:
    problems = JobSpec(model="m", ratio=0.5).replace(**changes).problems()
    assert [f for f, _ in problems] == [field_], problems
    assert words in problems[0][1]
    assert field_.split("[")[0] in problems[0][1] or field_ == "dataset" and "dataset" in problems[0][1]


def test_a_target_makes_the_ratio_optional_and_the_data_can_come_aside() -> None:
    assert JobSpec(model="m", target_params=0.3).problems() == []
    assert JobSpec(model="m", ratio=0.5, sparse_steps=5).problems(data_given=True) == []


def test_the_command_line_options_are_the_spec_fields() -> None:
    """`prunery prune --help` lists a flag for every spec field but the model (a positional argument), with the
    spec's help; `prunery submit` the same (no --device: its worker's device)."""
    for command in ("prune", "submit"):
        out = subprocess.run([sys.executable, "-m", "prunery.cli", command, "--help"], capture_output=True,
                             text=True, timeout=120, env={"COLUMNS": "400", "PATH": ""}).stdout
        for f in fields_of():
            if f.metadata["cli"]:
                flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
                assert f"{flag} " in out or f"{flag}\n" in out, (command, flag)
                assert f.metadata["help"].split("(")[0][:30] in out, (command, f.name)
        assert ("--device DEVICE" in out) == (command == "prune")


def test_the_spec_module_and_the_wire_form_import_no_torch() -> None:
    code = ("import sys; import prunery.core.spec, prunery.spec_proto, prunery.client; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
