"""Tests for prunery.core.data: every dataset file is written in tmp_path; nothing touches the network."""

import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from prunery.core.data import (
    Dataset,
    DatasetError,
    check_against_program,
    dynamic_input_dims,
    load_dataset,
    save_dataset,
)

FORMATS = ["safetensors", "npz"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _st_bytes(**tensors: torch.Tensor) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def _raw(fmt: str, **tensors: torch.Tensor) -> bytes:
    """Bytes of a dataset file in ``fmt`` holding exactly ``tensors`` (no validation)."""
    if fmt == "npz":
        return _npz_bytes(**{k: v.numpy() for k, v in tensors.items()})
    return _st_bytes(**tensors)


def _refused(path: Path, match: str, **kwargs: int) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(path, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_targets", [True, False])
def test_round_trip(tmp_path: Path, fmt: str, with_targets: bool) -> None:
    inputs = torch.randn(10, 3, 4)
    targets = torch.randint(0, 5, (10,)) if with_targets else None
    path = save_dataset(tmp_path / f"d.{fmt}", inputs, targets, format=fmt)
    ds = load_dataset(path)
    assert len(ds) == 10
    torch.testing.assert_close(ds.inputs, inputs, rtol=0, atol=0)
    if with_targets:
        assert ds.targets is not None and ds.targets.dtype == torch.int64
        assert torch.equal(ds.targets, targets)
    else:
        assert ds.targets is None
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file behind


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_kept_or_widened(tmp_path: Path, fmt: str) -> None:
    tokens = torch.randint(0, 1000, (6, 8), dtype=torch.int32)
    soft = torch.rand(6, 3, dtype=torch.float64)
    ds = load_dataset(save_dataset(tmp_path / "a", tokens, soft, format=fmt))
    assert ds.inputs.dtype == torch.int32 and torch.equal(ds.inputs, tokens)
    assert ds.targets is not None and ds.targets.dtype == torch.float64 and torch.equal(ds.targets, soft)

    ids = torch.tensor([0, 3, 1], dtype=torch.int32)
    ds = load_dataset(save_dataset(tmp_path / "b", torch.randn(3, 2), ids, format=fmt))
    assert ds.targets is not None and ds.targets.dtype == torch.int64 and ds.targets.tolist() == [0, 3, 1]

    wide = np.array([[1, 2], [65535, 0]], dtype=np.uint16)
    ds = load_dataset(save_dataset(tmp_path / "c", wide, format=fmt))
    assert ds.inputs.dtype == torch.int64 and ds.inputs.tolist() == [[1, 2], [65535, 0]]


def test_bfloat16_safetensors_and_npz_refuses_it(tmp_path: Path) -> None:
    x = torch.randn(4, 2).to(torch.bfloat16)
    ds = load_dataset(save_dataset(tmp_path / "bf.safetensors", x))
    assert ds.inputs.dtype == torch.bfloat16 and torch.equal(ds.inputs, x)
    with pytest.raises(ValueError, match="bfloat16"):
        save_dataset(tmp_path / "bf.npz", x, format="npz")


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_dataset(path, torch.zeros(2, 1))
    save_dataset(path, torch.ones(3, 1))
    assert load_dataset(path).inputs.tolist() == [[1.0], [1.0], [1.0]]
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_format_by_content_not_name(tmp_path: Path) -> None:
    npz_named_st = _write(tmp_path / "x.safetensors", _npz_bytes(inputs=np.arange(6.0).reshape(3, 2)))
    assert load_dataset(npz_named_st).inputs.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    st_named_npz = _write(tmp_path / "x.npz", _st_bytes(inputs=torch.ones(2, 2)))
    assert load_dataset(st_named_npz).inputs.shape == (2, 2)
    noise = _write(tmp_path / "noise.safetensors", np.random.default_rng(0).bytes(4096))
    _refused(noise, r"^unrecognized dataset format \(first bytes [0-9a-f ]+\): expected a \.safetensors file")
    _refused(_write(tmp_path / "empty.npz", b""), r"^dataset file is empty")


# ------------------------------------------------------------------------------------------- split / batches


def _indexed(n: int) -> Dataset:
    """Row i of inputs is [i, i] and target i is i, so rows can be traced through splits and batches."""
    rows = torch.arange(n)
    return Dataset(rows.float()[:, None].repeat(1, 2), rows.clone())


def test_split_deterministic_disjoint_covering() -> None:
    ds = _indexed(100)
    kept, held = ds.split(0.2, seed=7)
    assert (len(kept), len(held)) == (80, 20)
    kept_ids, held_ids = kept.targets.tolist(), held.targets.tolist()
    assert not set(kept_ids) & set(held_ids)
    assert sorted(kept_ids + held_ids) == list(range(100))
    assert kept_ids == sorted(kept_ids) and held_ids == sorted(held_ids)  # original order kept
    assert torch.equal(kept.inputs[:, 0].long(), kept.targets)  # inputs and targets stay aligned
    again_kept, again_held = ds.split(0.2, seed=7)
    assert torch.equal(again_kept.inputs, kept.inputs) and torch.equal(again_held.targets, held.targets)
    assert ds.split(0.2, seed=8)[1].targets.tolist() != held_ids


@pytest.mark.parametrize("held_out", [0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_split_refuses_bad_fraction(held_out: float) -> None:
    with pytest.raises(DatasetError, match="held_out must be a fraction strictly between 0 and 1"):
        _indexed(10).split(held_out, seed=0)


def test_split_refuses_an_empty_side() -> None:
    with pytest.raises(DatasetError, match=r"cannot hold out 0\.1 of 3 rows: .* each side needs at least 1 row"):
        _indexed(3).split(0.1, seed=0)
    with pytest.raises(DatasetError, match="each side needs at least 1 row"):
        _indexed(1).split(0.5, seed=0)


def test_batches_in_order_are_views() -> None:
    ds = _indexed(10)
    batches = list(ds.batches(4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    x0 = batches[0][0]
    assert x0.untyped_storage().data_ptr() == ds.inputs.untyped_storage().data_ptr()
    assert [len(x) for x, _ in ds.batches(4, drop_last=True)] == [4, 4]


def test_batches_shuffled_cover_every_row_once() -> None:
    ds = _indexed(23)
    epoch = list(ds.batches(5, shuffle=True, seed=1))
    order = torch.cat([y for _, y in epoch]).tolist()
    assert sorted(order) == list(range(23)) and order != list(range(23))
    for x, y in epoch:
        assert torch.equal(x[:, 0].long(), y)
    assert torch.cat([y for _, y in ds.batches(5, shuffle=True, seed=1)]).tolist() == order
    assert torch.cat([y for _, y in ds.batches(5, shuffle=True, seed=2)]).tolist() != order
    dropped = torch.cat([y for _, y in ds.batches(5, shuffle=True, seed=1, drop_last=True)]).tolist()
    assert dropped == order[:20]


def test_batches_without_targets_and_bad_size() -> None:
    ds = Dataset(torch.randn(5, 2), None)
    assert all(y is None for _, y in ds.batches(2, shuffle=True, seed=0))
    assert sum(len(x) for x, _ in ds.batches(2, shuffle=True, seed=0)) == 5
    for bad in (0, -1, 2.0, True):
        with pytest.raises(DatasetError, match="batch_size must be a positive integer"):
            ds.batches(bad)


def test_to_device() -> None:
    ds = _indexed(4).to("meta")
    assert ds.inputs.device.type == "meta" and ds.targets.device.type == "meta" and len(ds) == 4


def test_dataset_constructor_checks_rows() -> None:
    with pytest.raises(DatasetError, match="^inputs has 3 rows but targets has 2: they must have the same length$"):
        Dataset(torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(DatasetError, match="inputs is a scalar"):
        Dataset(torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_refused(tmp_path: Path, fmt: str) -> None:
    x = torch.randn(5, 3)
    x[0, 0], x[2, 1], x[4, 2] = float("nan"), float("inf"), -float("inf")
    path = _write(tmp_path / "a", _raw(fmt, inputs=x))
    _refused(path, r"^inputs contains NaN or inf at 3 positions \(1 NaN, 2 inf\)$")
    y = torch.zeros(5)
    y[1] = float("nan")
    path = _write(tmp_path / "b", _raw(fmt, inputs=torch.zeros(5, 3), targets=y))
    _refused(path, r"^targets contains NaN or inf at 1 positions")


@pytest.mark.parametrize("fmt", FORMATS)
def test_mismatched_lengths(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / "d", _raw(fmt, inputs=torch.zeros(1000, 2), targets=torch.zeros(999, dtype=torch.int64)))
    _refused(path, "^inputs has 1000 rows but targets has 999: they must have the same length$")


@pytest.mark.parametrize("fmt", FORMATS)
def test_names(tmp_path: Path, fmt: str) -> None:
    # any names are input tensors now (they are matched to the program's inputs by fit_to_program)
    ds = load_dataset(_write(tmp_path / "a", _raw(fmt, x=torch.zeros(2, 1), y=torch.ones(2, 3))))
    assert sorted(ds.features) == ["x", "y"] and ds.targets is None and len(ds) == 2
    assert ds.features["y"].tolist() == [[1.0] * 3] * 2
    path = _write(tmp_path / "b", _raw(fmt, targets=torch.zeros(2)))
    _refused(path, r"^no input tensor \(found: targets\): expected 'inputs', 'inputs\.0', ")
    extra = _raw(fmt, inputs=torch.zeros(2, 1), targets=torch.zeros(2), labels=torch.zeros(2))
    ds = load_dataset(_write(tmp_path / "c", extra))
    assert sorted(ds.features) == ["inputs", "labels"] and ds.targets is not None


@pytest.mark.parametrize("fmt", FORMATS)
def test_name_limits(tmp_path: Path, fmt: str) -> None:
    many = {f"x{i}": torch.zeros(2, 1) for i in range(65)}
    _refused(_write(tmp_path / "a", _raw(fmt, **many)), "^dataset holds 65 input tensors, over the limit of 64")
    del many["x64"]
    assert len(load_dataset(_write(tmp_path / "b", _raw(fmt, **many))).features) == 64
    long = {"n" * 201: torch.zeros(2, 1)}
    _refused(_write(tmp_path / "c", _raw(fmt, **long)), "^input tensor name 'n+.*' is 201 characters, over the limit")
    odd = {"mask\x1b[2J": torch.zeros(2, 1)}
    err = _refused(_write(tmp_path / "d", _raw(fmt, **odd)), r"^input tensor name 'mask\\x1b\[2J' holds unprintable")
    assert "\x1b" not in str(err)


def test_empty_npz_and_non_npy_member(tmp_path: Path) -> None:
    _refused(_write(tmp_path / "a", _npz_bytes()), r"^no input tensor \(found: nothing\): expected 'inputs'")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inputs.npy", _npy(np.zeros((2, 2), np.float32)))
        zf.writestr("notes.txt", b"hello")
    _refused(_write(tmp_path / "b", buf.getvalue()), r"^npz entry 'notes\.txt' is not a \.npy array")


class _Mkdir:
    """Unpickling this creates the directory ``marker``: evidence that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pickled_object_array_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "evil.npz"
    np.savez(path, inputs=np.array([_Mkdir(marker)], dtype=object))
    _refused(path, r"^npz entry 'inputs' holds Python objects \(dtype object\), which would need unpickling")
    assert not marker.exists()
    np.savez(tmp_path / "plain.npz", inputs=np.array([object()], dtype=object))
    _refused(tmp_path / "plain.npz", "holds Python objects")
    # control: the payload is live, so the check above is meaningful
    np.load(path, allow_pickle=True)["inputs"]
    assert marker.is_dir()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_npz_entry_shorter_than_its_header(tmp_path: Path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 4)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inputs.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(64))
    _refused(_write(tmp_path / "short.npz", buf.getvalue()), r"^npz entry 'inputs' is truncated: its header declares")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_corrupt(tmp_path: Path, fmt: str) -> None:
    data = _raw(fmt, inputs=torch.randn(50, 4), targets=torch.randint(0, 3, (50,)))
    _refused(_write(tmp_path / "cut", data[: len(data) - 100]), "truncated|corrupt")
    _refused(_write(tmp_path / "tiny", data[:20]), "truncated|corrupt")


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    body = b'{"inputs": [not json'
    corrupt = r"^corrupt safetensors file \(.*\): expected a complete safetensors file$"
    _refused(_write(tmp_path / "a", struct.pack("<Q", len(body)) + body), corrupt)
    body = b'{"inputs":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}'
    _refused(_write(tmp_path / "b", struct.pack("<Q", len(body)) + body + bytes(16)), corrupt)
    _refused(_write(tmp_path / "c", struct.pack("<Q", 10**6) + b"{}"), r"^safetensors header claims 1000000 bytes")


def test_corrupt_npz_data(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inputs.npy", _npy(np.random.default_rng(0).standard_normal((64, 64))))
    data = bytearray(buf.getvalue())
    data[200:260] = bytes(60)  # inside the deflate stream
    _refused(_write(tmp_path / "a", bytes(data)), "^npz entry 'inputs' is corrupt: |^corrupt or truncated npz file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_bytes(tmp_path: Path, fmt: str) -> None:
    path = save_dataset(tmp_path / "d", torch.zeros(100, 10), format=fmt)
    size = path.stat().st_size
    _refused(path, f"^dataset file is {size} bytes, over the limit of {size - 1} bytes$", max_bytes=size - 1)
    assert len(load_dataset(path, max_bytes=size)) == 100


def test_max_bytes_caps_decompressed_npz(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, inputs=np.zeros((1000, 1000), np.float32))
    assert path.stat().st_size < 100_000
    _refused(path, "^dataset tensors decode to 4000000 bytes, over the limit of 100000 bytes$", max_bytes=100_000)


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_rows(tmp_path: Path, fmt: str) -> None:
    path = save_dataset(tmp_path / "d", torch.zeros(100, 2), format=fmt)
    _refused(path, "^inputs has 100 rows, over the limit of 99 rows$", max_rows=99)
    assert len(load_dataset(path, max_rows=100)) == 100


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_dtypes_and_shapes(tmp_path: Path, fmt: str) -> None:
    def refused(match: str, **tensors: torch.Tensor) -> None:
        _refused(_write(tmp_path / "d", _raw(fmt, **tensors)), match)

    x = torch.zeros(3, 2)
    refused(
        r"^targets must be integer class ids \(int64\) or float tensors; got complex64 \(allowed: ",
        inputs=x, targets=torch.zeros(3, dtype=torch.complex64),
    )
    refused(r"got int8 \(allowed: ", inputs=x, targets=torch.zeros(3, dtype=torch.int8))
    refused(r"^targets has 2 negative class ids: class ids must be >= 0$", inputs=x, targets=torch.tensor([0, -1, -5]))
    refused(
        r"^inputs must be a float .*, integer \(token ids\) or bool \(mask\) tensor; got complex64$",
        inputs=torch.zeros(3, dtype=torch.complex64),
    )
    refused(r"^mask must be a float .* got complex64$", x=x, mask=torch.zeros(3, 2, dtype=torch.complex64))
    refused(r"^inputs is a scalar", inputs=torch.tensor(1.0))
    refused(r"^inputs has 0 rows \(shape \(0, 4\)\): expected at least 1$", inputs=torch.zeros(0, 4))
    refused(r"^targets is a scalar", inputs=x, targets=torch.tensor(1))
    big = torch.tensor([[1], [2**63 + 5]], dtype=torch.uint64) if fmt == "safetensors" else None
    if big is not None:
        refused(r"^inputs has 1 uint64 values above 2\*\*63 - 1", inputs=big)


def test_uint64_npz(tmp_path: Path) -> None:
    path = _write(tmp_path / "a", _npz_bytes(inputs=np.array([[1], [2**63 + 5]], dtype=np.uint64)))
    _refused(path, r"^inputs has 1 uint64 values above 2\*\*63 - 1")
    path = _write(tmp_path / "b", _npz_bytes(inputs=np.array([[1], [7]], dtype=np.uint64)))
    ds = load_dataset(path)
    assert ds.inputs.dtype == torch.int64 and ds.inputs.tolist() == [[1], [7]]


def test_big_endian_npz(tmp_path: Path) -> None:
    path = _write(tmp_path / "a", _npz_bytes(inputs=np.arange(6, dtype=">f4").reshape(3, 2)))
    assert load_dataset(path).inputs.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.npz", "^dataset file not found: ")
    _refused(tmp_path, "is not a regular file$")


# -------------------------------------------------------------------------------------------------- programs


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


@pytest.fixture(scope="module")
def linear_program() -> torch.export.ExportedProgram:
    return torch.export.export(nn.Linear(4, 2), (torch.randn(2, 4),))


@pytest.fixture(scope="module")
def token_program() -> torch.export.ExportedProgram:
    tokens = torch.randint(0, 10, (2, 5))
    return torch.export.export(_Tokens(), (tokens,), dynamic_shapes=({1: torch.export.Dim("T", min=2, max=64)},))


def test_check_against_linear(linear_program: torch.export.ExportedProgram) -> None:
    example = linear_program.example_inputs[0]
    assert dynamic_input_dims(linear_program) == set()
    check_against_program(Dataset(torch.randn(7, 4)), example)
    with pytest.raises(DatasetError, match=r"^dataset rows are \(5,\) but the model takes \(4,\) per example$"):
        check_against_program(Dataset(torch.randn(7, 5)), example)
    with pytest.raises(DatasetError, match=r"^dataset rows are \(2, 2\) but the model takes \(4,\) per example$"):
        check_against_program(Dataset(torch.randn(7, 2, 2)), example)
    with pytest.raises(DatasetError, match=r"^dataset inputs are int64 \(integer\) but the model takes float32 "):
        check_against_program(Dataset(torch.zeros(7, 4, dtype=torch.int64)), example)
    check_against_program(Dataset(torch.randn(7, 4, dtype=torch.float64)), example)  # same kind


def test_check_against_dynamic_tokens(token_program: torch.export.ExportedProgram) -> None:
    example = token_program.example_inputs[0]
    dyn = dynamic_input_dims(token_program)
    assert dyn == {1}
    check_against_program(Dataset(torch.randint(0, 10, (3, 17))), example, dyn)
    check_against_program(Dataset(torch.randint(0, 10, (3, 5), dtype=torch.int32)), example, dyn)
    with pytest.raises(DatasetError, match=r"^dataset rows are \(17,\) but the model takes \(5,\) per example$"):
        check_against_program(Dataset(torch.randint(0, 10, (3, 17))), example)
    with pytest.raises(DatasetError, match=r"^dataset rows are \(5, 2\) but the model takes \(\*,\) per example \("):
        check_against_program(Dataset(torch.randint(0, 10, (3, 5, 2))), example, dyn)
    with pytest.raises(DatasetError, match=r"^dataset inputs are float32 \(float\) but the model takes int64 "):
        check_against_program(Dataset(torch.randn(3, 5)), example, dyn)
    with pytest.raises(ValueError, match="dynamic_dims"):
        check_against_program(Dataset(torch.randint(0, 10, (3, 5))), example, {0})


def test_loaded_dataset_against_program(tmp_path: Path, linear_program: torch.export.ExportedProgram) -> None:
    path = save_dataset(tmp_path / "cifar.safetensors", torch.randn(4, 3, 28, 28), torch.arange(4))
    with pytest.raises(DatasetError, match=r"^dataset rows are \(3, 28, 28\) but the model takes \(4,\) per example$"):
        check_against_program(load_dataset(path), linear_program.example_inputs[0])
