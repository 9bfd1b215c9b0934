"""Tests for prunery.core.safe_load: every archive is built in tmp_path."""

import io
import json
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prunery.core.safe_load import ArchiveLoadError, UnsafeArchiveError, load_program, vet_archive

Items = dict[str, bytes]


class _Net(torch.nn.Module):
    """conv + bn + linear, a persistent buffer, a non-persistent buffer and a tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)
        self.register_buffer("scale", torch.full((5,), 2.0))
        self.register_buffer("shift", torch.arange(5.0), persistent=False)
        self.const = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])  # lifted tensor constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        return self.fc(y) * self.scale + self.shift + self.const


class _DictNet(torch.nn.Module):
    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return d["a"] * 2


class _Touch:
    """Unpickling this creates ``path`` (stands in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, net: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.pt2"
    torch.export.save(torch.export.export(net, (_input(),)), path)
    return path


@pytest.fixture(scope="module")
def good_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good_dict") / "gooddict.pt2"
    torch.export.save(torch.export.export(_DictNet(), ({"a": torch.randn(3)},)), path)
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[Items, str], None]) -> Path:
    """Copy a zip member by member through ``edit(items, root)``."""
    with zipfile.ZipFile(src) as zin:
        items = {name: zin.read(name) for name in zin.namelist()}
    edit(items, next(iter(items)).split("/")[0])
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in items.items():
            zout.writestr(name, data)
    return dst


def _edit_json(items: Items, name: str, fn: Callable[[dict], None]) -> None:
    doc = json.loads(items[name])
    fn(doc)
    items[name] = json.dumps(doc).encode()


def _evil_torch_save(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Touch(marker), buffer)
    return buffer.getvalue()


# Each builder plants a payload that creates `marker` and returns the member load_program must name.


def _weights_use_pickle(items: Items, root: str, marker: Path) -> str:
    cfg = f"{root}/data/weights/model_weights_config.json"
    path_name = json.loads(items[cfg])["config"]["conv.weight"]["path_name"]
    _edit_json(items, cfg, lambda d: d["config"]["conv.weight"].update(use_pickle=True))
    items[f"{root}/data/weights/{path_name}"] = _evil_torch_save(marker)
    return f"{root}/data/weights/{path_name}"


def _constant_use_pickle(items: Items, root: str, marker: Path) -> str:
    cfg = f"{root}/data/constants/model_constants_config.json"
    path_name = json.loads(items[cfg])["config"]["const"]["path_name"]
    _edit_json(items, cfg, lambda d: d["config"]["const"].update(use_pickle=True))
    items[f"{root}/data/constants/{path_name}"] = _evil_torch_save(marker)
    return f"{root}/data/constants/{path_name}"


def _object_constant(prefix: str) -> Callable[[Items, str, Path], str]:
    def build(items: Items, root: str, marker: Path) -> str:
        entry = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        cfg = f"{root}/data/constants/model_constants_config.json"
        _edit_json(items, cfg, lambda d: d["config"].update(evil=entry))
        items[f"{root}/data/constants/{prefix}0"] = pickle.dumps(_Touch(marker), protocol=2)
        return f"{root}/data/constants/{prefix}0"

    return build


def _sample_inputs(items: Items, root: str, marker: Path) -> str:
    items[f"{root}/data/sample_inputs/model.pt"] = _evil_torch_save(marker)
    return f"{root}/data/sample_inputs/model.pt"


def _legacy_weights(items: Items, root: str, marker: Path) -> str:
    items[f"{root}/data/weights/model.pt"] = _evil_torch_save(marker)
    return f"{root}/data/weights/model.pt"


def _aotinductor(items: Items, root: str, marker: Path) -> str:
    items[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 60
    return f"{root}/data/aotinductor/model/model.so"


def _sympy_expr(items: Items, root: str, marker: Path) -> str:
    def edit(doc: dict) -> None:
        values = doc["graph_module"]["graph"]["tensor_values"]
        expr = {"expr_str": f"open('{marker}', 'w')", "hint": {"as_int": 2}}
        next(iter(values.values()))["sizes"][0] = {"as_expr": expr}

    _edit_json(items, f"{root}/models/model.json", edit)
    return f"{root}/models/model.json"


def _guards_code(items: Items, root: str, marker: Path) -> str:
    guard = f"open('{marker}', 'w').close() is None"
    _edit_json(items, f"{root}/models/model.json", lambda d: d.update(guards_code=[guard]))
    return f"{root}/models/model.json"


def _treespec_enum(items: Items, root: str, marker: Path) -> str:
    def edit(doc: dict) -> None:
        sig = doc["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(sig["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps(
            [{"__enum__": True, "fqn": "this:x", "name": "y"}]
        )
        sig["in_spec"] = json.dumps(spec)

    _edit_json(items, f"{root}/models/model.json", edit)
    return f"{root}/models/model.json"


def _forward_arg_names(items: Items, root: str, marker: Path) -> str:
    def edit(doc: dict) -> None:
        doc["graph_module"]["module_call_graph"][0]["signature"]["forward_arg_names"] = [
            f"x: open('{marker}', 'w')"
        ]

    _edit_json(items, f"{root}/models/model.json", edit)
    return f"{root}/models/model.json"


def _node_target(items: Items, root: str, marker: Path) -> str:
    def edit(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.export.custom_ops.os.system"

    _edit_json(items, f"{root}/models/model.json", edit)
    return f"{root}/models/model.json"


def _sample_input_key(items: Items, root: str, marker: Path) -> str:
    """A weights-only-clean pickle whose dict key torch pastes into generated guard code."""
    key = f"+ (open('{marker}', 'w').close() or '') +"
    buffer = io.BytesIO()
    torch.save((({key: torch.randn(3)},), {}), buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # really is weights-only
    items[f"{root}/data/sample_inputs/model.pt"] = buffer.getvalue()
    return f"{root}/data/sample_inputs/model.pt"


# name -> (builder, base archive, how plain torch triggers it: "load", "call", or None if not shown)
CASES: dict[str, tuple[Callable[[Items, str, Path], str], str, str | None]] = {
    "weights_use_pickle": (_weights_use_pickle, "good", "load"),
    "constant_use_pickle": (_constant_use_pickle, "good", "load"),
    "opaque_object_constant": (_object_constant("opaque_obj_"), "good", "load"),
    "torchbind_object_constant": (_object_constant("custom_obj_"), "good", None),
    "sample_inputs_pickle": (_sample_inputs, "good", "load"),
    "legacy_weights_pickle": (_legacy_weights, "good", "load"),
    "aotinductor_member": (_aotinductor, "good", None),
    "sympy_expr_str": (_sympy_expr, "good", "load"),
    "guards_code": (_guards_code, "good", "call"),
    "treespec_enum_import": (_treespec_enum, "good", None),
    "forward_arg_names": (_forward_arg_names, "good", None),
    "node_target": (_node_target, "good", None),
    "sample_input_dict_key": (_sample_input_key, "good_dict", "call"),
}


def _build(case: str, bases: dict[str, Path], out_dir: Path) -> tuple[Path, str, Path]:
    builder, base, _ = CASES[case]
    marker = out_dir / f"{case}.marker"
    member: list[str] = []
    archive = _rewrite(
        bases[base], out_dir / f"{case}.pt2", lambda i, r: member.append(builder(i, r, marker))
    )
    return archive, member[0], marker


@pytest.fixture(scope="module")
def bases(good: Path, good_dict: Path) -> dict[str, Path]:
    return {"good": good, "good_dict": good_dict}


def _refusal(path: Path, **kwargs: int) -> UnsafeArchiveError:
    with pytest.raises(UnsafeArchiveError) as info:
        load_program(path, **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert "\n" not in str(err) and str(err).startswith("refused ")
    return err


# ----------------------------------------------------------------------------- the good archive


def test_real_archive_layout(good: Path) -> None:
    """What torch.export.save really writes: raw tensor files, no pickle except the sample inputs."""
    with zipfile.ZipFile(good) as zf:
        rels = {name.split("/", 1)[1] for name in zf.namelist()}
        weights = json.loads(zf.read("good/data/weights/model_weights_config.json"))["config"]
        consts = json.loads(zf.read("good/data/constants/model_constants_config.json"))["config"]
        sample = zf.read("good/data/sample_inputs/model.pt")
    expected = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
    expected |= {"models/model.json", "data/sample_inputs/model.pt"}
    expected |= {"data/weights/model_weights_config.json", "data/constants/model_constants_config.json"}
    assert expected <= rels
    assert all(re.fullmatch(r"data/(weights/weight|constants/tensor)_\d+", r) for r in rels - expected)
    assert {"scale", "bn.running_mean", "bn.num_batches_tracked", "conv.weight"} <= set(weights)
    assert set(consts) == {"const", "shift"}  # tensor attribute + non-persistent buffer
    assert not any(meta["use_pickle"] for meta in [*weights.values(), *consts.values()])
    assert sample[:4] == b"PK\x03\x04"  # a nested torch.save zip


def test_good_model_loads_and_matches(good: Path, net: torch.nn.Module) -> None:
    vet_archive(good)
    vet_archive(str(good))
    loaded = load_program(good)
    assert isinstance(loaded, torch.export.ExportedProgram)
    x = _input()
    original = torch.export.export(net, (x,)).module()(x)
    with torch.no_grad():
        out = loaded.module()(x)
        assert torch.equal(out, original)
        assert torch.allclose(out, net(x), atol=1e-6)
    assert torch.equal(loaded.constants["const"], net.const)


# ----------------------------------------------------------------------------- malicious archives


@pytest.mark.parametrize("case", sorted(CASES))
def test_malicious_archive_is_refused(case: str, bases: dict[str, Path], tmp_path: Path) -> None:
    archive, member, marker = _build(case, bases, tmp_path)
    err = _refusal(archive)
    assert err.member == member, str(err)
    assert str(err).startswith(f"refused {member}: ")
    with pytest.raises(UnsafeArchiveError):
        vet_archive(archive)
    assert not marker.exists()


def test_use_pickle_message(bases: dict[str, Path], tmp_path: Path) -> None:
    archive, member, _ = _build("weights_use_pickle", bases, tmp_path)
    assert str(_refusal(archive)) == f"refused {member}: weights config asks for pickle (use_pickle)"


def test_plain_torch_load_runs_the_payloads(bases: dict[str, Path], tmp_path: Path) -> None:
    """The crafted archives are real: unvetted torch.export.load (or running its result) runs them."""
    shown = {case: how for case, (_, _, how) in CASES.items() if how}
    jobs = []
    for case, how in shown.items():
        archive, _, marker = _build(case, bases, tmp_path)
        jobs.append((str(archive), how, "dict" if CASES[case][1] == "good_dict" else "net", str(marker)))
    script = (
        "import json, sys, torch\n"
        "for path, how, kind, _ in json.loads(sys.argv[1]):\n"
        "    x = {'a': torch.randn(3)} if kind == 'dict' else torch.randn(2, 3, 8, 8)\n"
        "    try:\n"
        "        ep = torch.export.load(path)\n"
        "        if how == 'call':\n"
        "            ep.module()(x)\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, timeout=120)
    created = {case for case, job in zip(shown, jobs, strict=True) if Path(job[3]).exists()}
    assert created == set(shown)


def test_sample_inputs_protocol4_stack_global(good: Path, tmp_path: Path) -> None:
    def edit(items: Items, root: str) -> None:
        buffer = io.BytesIO()
        torch.save(_Touch(tmp_path / "p4.marker"), buffer, pickle_protocol=4)
        items[f"{root}/data/sample_inputs/model.pt"] = buffer.getvalue()

    err = _refusal(_rewrite(good, tmp_path / "p4.pt2", edit))
    assert err.member == "good/data/sample_inputs/model.pt" and "io.open" in err.reason
    assert not (tmp_path / "p4.marker").exists()


def test_sample_inputs_must_load_weights_only(good: Path, tmp_path: Path) -> None:
    """Only allowed globals (passes the static scan) but torch's weights-only load still fails."""
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01\x85R.")
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")

    def edit(items: Items, root: str) -> None:
        items[f"{root}/data/sample_inputs/model.pt"] = nested.getvalue()

    err = _refusal(_rewrite(good, tmp_path / "wo.pt2", edit))
    assert err.member == "good/data/sample_inputs/model.pt"
    assert "do not load weights-only" in err.reason


# ----------------------------------------------------------------------------- malformed files


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt2"
    path.write_bytes(b"")
    err = _refusal(path)
    assert err.member is None and err.reason == "empty file"
    assert str(err) == f"refused {path}: empty file"


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "text.pt2"
    path.write_text("this is not an archive\n" * 20)
    assert _refusal(path).reason == "not a zip archive"


@pytest.mark.parametrize("name", ["notes.txt", "folder/notes.txt"])
def test_zip_that_is_not_pt2(tmp_path: Path, name: str) -> None:
    path = tmp_path / "notes.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, "just some text")
    assert "not a .pt2" in _refusal(path).reason


def test_empty_zip(tmp_path: Path) -> None:
    path = tmp_path / "empty_zip.pt2"
    zipfile.ZipFile(path, "w").close()
    assert "not a .pt2" in _refusal(path).reason


def test_truncated_archive(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    path = tmp_path / "half.pt2"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _refusal(path).reason


def test_corrupt_member_fails_crc(good: Path, tmp_path: Path) -> None:
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("good/data/weights/weight_0")
    name_len, extra_len = struct.unpack_from("<2H", data, info.header_offset + 26)  # local header
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 3] ^= 0xFF
    path = tmp_path / "crc.pt2"
    path.write_bytes(bytes(data))
    err = _refusal(path)
    assert err.member == "good/data/weights/weight_0" and "CRC" in err.reason


def test_prepended_bytes(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "prefixed.pt2"
    path.write_bytes(b"#!/bin/sh\n" + good.read_bytes())
    assert _refusal(path).reason == "not a zip archive"


def test_oversized_archive(good: Path) -> None:
    err = _refusal(good, max_uncompressed_bytes=1000)
    assert err.member is None and "over the limit of 1000 bytes" in err.reason


def test_zip_bomb_ratio(good: Path, tmp_path: Path) -> None:
    zeros = b"\0" * (4 << 20)
    archive = _rewrite(good, tmp_path / "bomb.pt2", lambda items, root: None)
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good/extra/zeros.txt", zeros)
    assert len(zlib.compress(zeros)) * 100 < len(zeros)
    err = _refusal(archive)
    assert err.member == "good/extra/zeros.txt" and "zip bomb" in err.reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("good/../evil.txt", "path traversal"),
        ("/etc/evil.txt", "absolute"),
        ("good\\..\\evil.txt", "absolute or non-portable"),
        ("good/data/executorch/program.pte", "not a member torch.export.save writes"),
        ("good/archive_format", "duplicate member name"),
    ],
)
def test_bad_member_names(good: Path, tmp_path: Path, name: str, reason: str) -> None:
    archive = _rewrite(good, tmp_path / "names.pt2", lambda items, root: None)
    with warnings.catch_warnings(), zipfile.ZipFile(archive, "a") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        zf.writestr(name, "pt2")
    err = _refusal(archive)
    assert err.member == name and reason in err.reason


def test_torch_failure_after_vetting_is_wrapped(good: Path, tmp_path: Path) -> None:
    def edit(items: Items, root: str) -> None:
        _edit_json(items, f"{root}/models/model.json", lambda d: d.update(schema_version={"major": 999}))

    archive = _rewrite(good, tmp_path / "future.pt2", edit)
    vet_archive(archive)
    with pytest.raises(ArchiveLoadError) as info:
        load_program(archive)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"could not load {archive}: ") and "\n" not in str(info.value)


def test_errors_pickle_round_trip() -> None:
    err = pickle.loads(pickle.dumps(UnsafeArchiveError("m/x", "bad\nthing", "/p.pt2")))
    assert (err.member, err.reason, err.path) == ("m/x", "bad\nthing", "/p.pt2")
    assert str(err) == "refused m/x: bad\\nthing"
    load_err = pickle.loads(pickle.dumps(ArchiveLoadError("/p.pt2", "boom")))
    assert str(load_err) == "could not load /p.pt2: boom"
