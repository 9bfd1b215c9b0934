"""Tests for datasets of several named inputs and prunery.core.data.fit_to_program (files written in tmp_path)."""

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim, export

from prunery.core.data import (
    CallInputs,
    Dataset,
    DatasetError,
    check_against_program,
    fit_to_program,
    load_dataset,
    save_dataset,
)

FORMATS = ["safetensors", "npz"]
VOCAB = 10


def _refused(match: str, fn, *args, **kwargs) -> str:
    """Call ``fn``; it must raise a one-line DatasetError matching ``match``; returns the message."""
    with pytest.raises(DatasetError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ programs


class _IdsMask(nn.Module):
    """Token ids into an embedding, masked mean over the sequence, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.fc(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32))


class _Keyword(nn.Module):
    """A positional input and keyword-only ones; ``x`` is (batch, *, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.fc(x * mask.unsqueeze(-1) + bias[:, None, :])


@pytest.fixture(scope="module")
def ids_mask() -> tuple[nn.Module, torch.export.ExportedProgram]:
    torch.manual_seed(0)
    model = _IdsMask().eval()
    ids = torch.randint(0, VOCAB, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    batch, seq = Dim("batch"), Dim("seq", min=2, max=64)
    ep = export(model, (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    return model, ep


@pytest.fixture(scope="module")
def keyword() -> tuple[nn.Module, torch.export.ExportedProgram]:
    torch.manual_seed(1)
    model = _Keyword().eval()
    x, mask, bias = torch.randn(3, 4, 8), torch.ones(3, 4), torch.randn(3, 8)
    batch, steps = Dim("batch"), Dim("steps")
    ep = export(model, (x,), {"mask": mask, "bias": bias},
                dynamic_shapes={"x": {0: batch, 1: steps}, "mask": {0: batch, 1: steps}, "bias": {0: batch}})
    return model, ep


def _ids_mask_data(n: int = 11, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * 100 + seq)
    ids = torch.randint(0, VOCAB, (n, seq), generator=gen)
    mask = torch.rand(n, seq, generator=gen) > 0.3
    mask[:, 0] = True
    return ids, mask


# --------------------------------------------------------------------------------------------- file format


@pytest.mark.parametrize("fmt", FORMATS)
def test_multi_input_round_trip(tmp_path: Path, fmt: str) -> None:
    ids, mask = _ids_mask_data()
    pixels = torch.randn(11, 3, 4, 4)
    targets = torch.randint(0, 3, (11,))
    inputs = {"input_ids": ids.to(torch.int32), "attention_mask": mask, "pixel_values": pixels}
    ds = load_dataset(save_dataset(tmp_path / "d", inputs, targets, format=fmt))
    assert sorted(ds.features) == ["attention_mask", "input_ids", "pixel_values"]
    assert ds.features["input_ids"].dtype == torch.int32 and torch.equal(ds.features["input_ids"], ids.int())
    assert ds.features["attention_mask"].dtype == torch.bool and torch.equal(ds.features["attention_mask"], mask)
    assert torch.equal(ds.features["pixel_values"], pixels)
    assert ds.targets is not None and torch.equal(ds.targets, targets) and len(ds) == 11
    assert not ds.fitted and ds.fixed_batch is None
    _refused(r"^the dataset has 3 input tensors \(attention_mask, input_ids, pixel_values\): read \.features",
             lambda: ds.inputs)
    # a single-tensor dict is the original format
    one = load_dataset(save_dataset(tmp_path / "e", {"inputs": pixels}, format=fmt))
    assert torch.equal(one.inputs, pixels)


@pytest.mark.parametrize("fmt", FORMATS)
def test_indexed_names_round_trip(tmp_path: Path, fmt: str) -> None:
    ids, mask = _ids_mask_data()
    ds = load_dataset(save_dataset(tmp_path / "d", {"inputs.0": ids, "inputs.1": mask}, format=fmt))
    assert sorted(ds.features) == ["inputs.0", "inputs.1"]
    assert torch.equal(ds.features["inputs.1"], mask)


def test_save_refuses_bad_names(tmp_path: Path) -> None:
    _refused("^'targets' is reserved for the targets", save_dataset, tmp_path / "a", {"targets": torch.zeros(2, 1)})
    _refused("^inputs is an empty dict", save_dataset, tmp_path / "b", {})
    _refused("^input tensor name 'n+.*' is 201 characters", save_dataset, tmp_path / "c", {"n" * 201: torch.zeros(1)})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_refuses_mismatched_lengths(tmp_path: Path, fmt: str) -> None:
    ids, mask = _ids_mask_data(100)
    path = save_dataset(tmp_path / "a", {"input_ids": ids, "attention_mask": mask[:99]}, format=fmt)
    message = _refused(r"^(attention_mask has 99 rows but input_ids has 100|input_ids has 100 rows but "
                       r"attention_mask has 99): every input tensor must have one row per example$", load_dataset, path)
    # with three tensors, the odd one out is the one named first
    three = {"input_ids": ids, "token_type_ids": ids.clone(), "attention_mask": mask[:99]}
    path = save_dataset(tmp_path / "b", three, format=fmt)
    _refused(r"^attention_mask has 99 rows but (input_ids|token_type_ids) has 100: ", load_dataset, path)
    path = save_dataset(tmp_path / "c", {"input_ids": ids, "attention_mask": mask}, torch.zeros(98), format=fmt)
    _refused(r"^(input_ids|attention_mask) has 100 rows but targets has 98: they must have the same length$",
             load_dataset, path)
    assert "attention_mask" in message and "input_ids" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_vets_every_input(tmp_path: Path, fmt: str) -> None:
    ids, mask = _ids_mask_data(100)
    pixels = torch.randn(100, 4)
    pixels[3, 1] = float("nan")
    path = save_dataset(tmp_path / "a", {"input_ids": ids, "pixel_values": pixels}, format=fmt)
    _refused(r"^pixel_values contains NaN or inf at 1 positions \(1 NaN, 0 inf\)$", load_dataset, path)
    path = save_dataset(tmp_path / "b", {"input_ids": ids, "attention_mask": mask}, format=fmt)
    _refused("^(input_ids|attention_mask) has 100 rows, over the limit of 99 rows$", load_dataset, path, max_rows=99)
    path = save_dataset(tmp_path / "c", {"input_ids": ids, "attention_mask": mask[:, None, 0]}, format=fmt)
    assert load_dataset(path).features["attention_mask"].shape == (100, 1)
    path = save_dataset(tmp_path / "d", {"input_ids": ids, "scalar": torch.tensor(1.0)}, format=fmt)
    _refused("^scalar is a scalar: expected a tensor with one row per example along dim 0$", load_dataset, path)


def test_bool_bytes_other_than_0_1_refused(tmp_path: Path) -> None:
    raw = np.array([[0, 1], [2, 1]], dtype=np.uint8).view(np.bool_)
    buf = io.BytesIO()
    np.savez(buf, input_ids=np.zeros((2, 2), np.int64), attention_mask=raw)
    path = tmp_path / "a.npz"
    path.write_bytes(buf.getvalue())
    _refused("^attention_mask has 1 bool values stored as bytes other than 0 or 1$", load_dataset, path)
    ok = np.array([[0, 1], [1, 1]], dtype=np.uint8).view(np.bool_)
    buf = io.BytesIO()
    np.savez(buf, input_ids=np.zeros((2, 2), np.int64), attention_mask=ok)
    path.write_bytes(buf.getvalue())
    assert load_dataset(path).features["attention_mask"].tolist() == [[False, True], [True, True]]


# ------------------------------------------------------------------------------------------ Dataset, unfitted


def test_unfitted_multi_dataset_batches_split_to_rows() -> None:
    ids, mask = _ids_mask_data(10)
    ds = Dataset({"input_ids": ids, "attention_mask": mask}, torch.arange(10))
    batches = list(ds.batches(4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x0, _ = batches[0]
    assert isinstance(x0, dict) and torch.equal(x0["input_ids"], ids[:4])
    assert torch.equal(x0["attention_mask"], mask[:4])
    for x, y in ds.batches(3, shuffle=True, seed=5):
        assert torch.equal(x["input_ids"], ids[y]) and torch.equal(x["attention_mask"], mask[y])
    kept, held = ds.split(0.3, seed=2)
    assert (len(kept), len(held)) == (7, 3)
    assert torch.equal(held.features["input_ids"], ids[held.targets])
    assert torch.equal(kept.features["attention_mask"], mask[kept.targets])
    meta = ds.to("meta")
    assert {t.device.type for t in meta.features.values()} == {"meta"} and len(meta) == 10
    rows = ds.rows(torch.tensor([9, 0]))
    assert isinstance(rows, dict) and torch.equal(rows["input_ids"], ids[[9, 0]])
    assert torch.equal(Dataset(ids).rows([1, 2]), ids[1:3])  # single input: the bare tensor


def test_dataset_constructor_checks_every_input() -> None:
    ids, mask = _ids_mask_data(100)
    _refused(r"^attention_mask has 99 rows but input_ids has 100: every input tensor must have one row per example$",
             Dataset, {"input_ids": ids, "attention_mask": mask[:99]})
    _refused("^input_ids has 100 rows but targets has 3: ", Dataset, {"input_ids": ids}, torch.zeros(3))
    _refused("^mask must be a torch.Tensor; got list$", Dataset, {"input_ids": ids, "mask": [1, 2]})
    _refused("^'targets' is reserved", Dataset, {"input_ids": ids, "targets": ids})
    _refused("^the dataset has no input tensors", Dataset, {})


def test_rows_refuses_bad_indices() -> None:
    ds = Dataset(torch.randn(10, 2))
    _refused("^row index 10 is out of range for a dataset of 10 rows$", ds.rows, torch.tensor([0, 10]))
    _refused("^row index -1 is out of range for a dataset of 10 rows$", ds.rows, [-1])
    _refused("^row indices must be integers; got a bool tensor$", ds.rows, torch.ones(10, dtype=torch.bool))
    _refused(r"^row indices must be 1-D; got shape \(2, 1\)$", ds.rows, torch.zeros(2, 1, dtype=torch.int64))


def test_check_against_program_refuses_multi_input_datasets(keyword) -> None:
    _, ep = keyword
    ds = Dataset({"x": torch.randn(2, 4, 8), "mask": torch.ones(2, 4)})
    _refused(r"^the dataset has 2 input tensors \(mask, x\): read \.features, or fit_to_program",
             check_against_program, ds, (torch.randn(2, 4, 8),))


# ------------------------------------------------------------------------------------------- fit_to_program


def test_fit_two_input_program_matches_direct_calls(ids_mask) -> None:
    model, ep = ids_mask
    ids, mask = _ids_mask_data(11, 7)
    ds = Dataset({"attention_mask": mask, "input_ids": ids.to(torch.int32)}, torch.arange(11))
    fitted = fit_to_program(ds, ep)
    assert fitted.fitted and fitted.fixed_batch is None and len(fitted) == 11
    assert list(fitted.features) == ["input_ids", "attention_mask"]  # the program's order
    assert fitted.features["input_ids"].dtype == torch.int64  # converted to the program's dtype
    module = ep.module()
    with torch.no_grad():
        expected = model(ids, mask)
        for x, y in fitted.batches(4, shuffle=True, seed=3):
            assert isinstance(x, CallInputs) and not isinstance(x, tuple) and x.kwargs == {}
            assert len(x.args) == 2 and x.args[0].dtype == torch.int64 and x.args[1].dtype == torch.bool
            out = module(*x.args, **x.kwargs)
            torch.testing.assert_close(out, expected[y])
        rows = fitted.rows(torch.tensor([10, 2, 2]))
        torch.testing.assert_close(module(*rows.args, **rows.kwargs), expected[[10, 2, 2]])
        torch.testing.assert_close(rows.call(module), expected[[10, 2, 2]])
    kept, held = fitted.split(0.25, seed=1)
    assert held.fitted and isinstance(next(held.batches(2))[0], CallInputs)


def test_call_inputs_is_a_pytree_node(ids_mask) -> None:
    _, ep = ids_mask
    ids, mask = _ids_mask_data(4)
    x = fit_to_program(Dataset({"input_ids": ids, "attention_mask": mask}), ep).rows([0, 1])
    moved = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), x)
    assert isinstance(moved, CallInputs) and [t.device.type for t in moved.args] == ["meta", "meta"]
    assert len(pytree.tree_leaves(x)) == 2
    kw = CallInputs((torch.zeros(1),), {"mask": torch.ones(1)})
    doubled = pytree.tree_map_only(torch.Tensor, lambda t: t + 1, kw)
    assert doubled.args[0].tolist() == [1.0] and doubled.kwargs["mask"].tolist() == [2.0]


def test_fit_keyword_program(keyword) -> None:
    model, ep = keyword
    gen = torch.Generator().manual_seed(0)
    x, mask, bias = torch.randn(6, 9, 8, generator=gen), (torch.rand(6, 9, generator=gen) > 0.5).float(), torch.randn(
        6, 8, generator=gen)
    ds = Dataset({"bias": bias.double(), "mask": mask, "x": x})  # any order; float64 becomes float32
    fitted = fit_to_program(ds, ep)
    batch, _ = next(fitted.batches(6))
    assert isinstance(batch, CallInputs) and len(batch.args) == 1
    assert list(batch.kwargs) == ["mask", "bias"]  # the in_spec's order, not the dataset's
    assert batch.kwargs["bias"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*batch.args, **batch.kwargs), model(x, mask=mask, bias=bias))
    # inputs.0 feeds the positional x; the keyword inputs need their names
    fitted = fit_to_program(Dataset({"inputs.0": x, "mask": mask, "bias": bias}), ep)
    assert torch.equal(fitted.rows([0]).args[0], x[:1])
    _refused(r"^no tensor for the program's input bias: the program takes x and keyword mask, bias; name the "
             r"tensors after them, or 'inputs\.0' by position$", fit_to_program, Dataset({"x": x, "mask": mask}), ep)
    _refused(r"^inputs\.1 names positional input 1, but the program takes 1 positional input: x and keyword mask, "
             r"bias$", fit_to_program, Dataset({"x": x, "inputs.1": mask, "bias": bias}), ep)


def test_fit_indexed_names(ids_mask) -> None:
    model, ep = ids_mask
    ids, mask = _ids_mask_data(5)
    fitted = fit_to_program(Dataset({"inputs.1": mask, "inputs.0": ids}), ep)
    x = fitted.rows(torch.arange(5))
    assert torch.equal(x.args[0], ids) and torch.equal(x.args[1], mask)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*x.args), model(ids, mask))
    _refused(r"^input_ids and inputs\.0 both feed the program's input input_ids: keep one$",
             fit_to_program, Dataset({"inputs.0": ids, "input_ids": ids, "attention_mask": mask}), ep)


def test_fit_single_input_program_yields_bare_tensors() -> None:
    model = nn.Linear(4, 2)
    ep = export(model, (torch.randn(3, 4),), dynamic_shapes=({0: Dim("batch")},))
    data = torch.randn(7, 4, dtype=torch.float64)
    for ds in (Dataset(data), Dataset({"inputs.0": data}), Dataset({"input": data})):
        fitted = fit_to_program(ds, ep)
        x, _ = next(fitted.batches(3))
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 4)
        assert fitted.inputs.dtype == torch.float32 and fitted.fixed_batch is None
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(fitted.rows([6])), model(data[6:].float()))


def test_fit_static_batch_sets_fixed_batch() -> None:
    ep = export(nn.Linear(4, 2), (torch.randn(2, 4),))  # batch 2 is baked in
    fitted = fit_to_program(Dataset(torch.randn(5, 4)), ep)
    assert fitted.fixed_batch == 2
    assert [len(x) for x, _ in fitted.batches(2, drop_last=True)] == [2, 2]
    assert fitted.split(0.4, seed=0)[1].fixed_batch == 2
    _refused(r"^the program takes batches of exactly 2 rows \(dataset tensor 'inputs' \(for the program's input "
             r"'input'\) has a static "
             r"dim 0\) but the dataset has 1$", fit_to_program, Dataset(torch.randn(1, 4)), ep)


# ---------------------------------------------------------------------------------------------- refusals


def test_fit_refuses_missing_input(ids_mask) -> None:
    _, ep = ids_mask
    ids, _ = _ids_mask_data()
    message = _refused(r"^no tensor for the program's input attention_mask: the program takes input_ids, "
                       r"attention_mask; name the tensors after them, or 'inputs\.0'\.\.'inputs\.1' by position$",
                       fit_to_program, Dataset({"input_ids": ids}), ep)
    assert "inputs.1" in message
    _refused(r"^inputs feeds a program of one input, but this program takes 2: input_ids, attention_mask; ",
             fit_to_program, Dataset(ids), ep)


def test_fit_refuses_mismatched_length(ids_mask) -> None:
    _, ep = ids_mask
    ids, mask = _ids_mask_data(100)
    # a Dataset cannot even be built with mismatched rows, so a fitted one never has them
    _refused("^attention_mask has 99 rows but input_ids has 100: ", Dataset,
             {"input_ids": ids, "attention_mask": mask[:99]})
    _refused("^attention_mask has size 6 at dim 1 but input_ids has 5 at dim 1: the program takes the same size for "
             "both$", fit_to_program, Dataset({"input_ids": ids[:, :5], "attention_mask": mask[:, :6]}), ep)


def test_fit_refuses_float_token_ids(ids_mask) -> None:
    _, ep = ids_mask
    ids, mask = _ids_mask_data()
    _refused("^input_ids is float32 but the program takes int64 token ids$",
             fit_to_program, Dataset({"input_ids": ids.float(), "attention_mask": mask}), ep)
    _refused(r"^dataset tensor 'inputs\.0' \(for the program's input 'input_ids'\) is float64 but the program "
             r"takes int64 token ids$",
             fit_to_program, Dataset({"inputs.0": ids.double(), "attention_mask": mask}), ep)
    _refused("^attention_mask is float32 but the program takes bool masks$",
             fit_to_program, Dataset({"input_ids": ids, "attention_mask": mask.float()}), ep)


def test_fit_refuses_ids_out_of_range(ids_mask) -> None:
    _, ep = ids_mask
    ids, mask = _ids_mask_data()
    bad = ids.clone()
    bad[3, 2] = VOCAB
    _refused(rf"^input_ids has 1 ids outside \[0, {VOCAB}\) \(min 0, max {VOCAB}\): the program's embedding "
             rf"emb\.weight has {VOCAB} rows$", fit_to_program, Dataset({"input_ids": bad, "attention_mask": mask}), ep)
    bad[3, 2] = -1
    _refused(rf"^input_ids has 1 ids outside \[0, {VOCAB}\) \(min -1, ", fit_to_program,
             Dataset({"input_ids": bad, "attention_mask": mask}), ep)
    wide = ids.to(torch.int64) + 2**40
    _refused(rf"^input_ids has \d+ ids outside \[0, {VOCAB}\)", fit_to_program,
             Dataset({"input_ids": wide, "attention_mask": mask}), ep)


def test_fit_refuses_unknown_name(ids_mask) -> None:
    _, ep = ids_mask
    ids, mask = _ids_mask_data()
    _refused(r"^unknown tensor token_type_ids: the program takes input_ids, attention_mask; name the tensors after "
             r"them, or 'inputs\.0'\.\.'inputs\.1' by position \(targets go in 'targets'\)$",
             fit_to_program, Dataset({"input_ids": ids, "attention_mask": mask, "token_type_ids": ids}), ep)
    _refused(r"^inputs\.2 names positional input 2, but the program takes 2 positional inputs: ",
             fit_to_program, Dataset({"input_ids": ids, "attention_mask": mask, "inputs.2": ids}), ep)


def test_fit_refuses_wrong_static_dim(keyword) -> None:
    _, ep = keyword
    x, mask, bias = torch.randn(4, 3, 5), torch.ones(4, 3), torch.randn(4, 8)
    _refused(r"^x rows are \(3, 5\) but the program takes \(\*, 8\) per example \(\* = any size\)$",
             fit_to_program, Dataset({"x": x, "mask": mask, "bias": bias}), ep)
    _refused(r"^bias rows are \(8, 1\) but the program takes \(8,\) per example$",
             fit_to_program, Dataset({"x": torch.randn(4, 3, 8), "mask": mask, "bias": bias[:, :, None]}), ep)


def test_fit_refuses_dynamic_dim_out_of_range(ids_mask) -> None:
    _, ep = ids_mask
    ids, mask = _ids_mask_data(3, 65)
    _refused(r"^input_ids rows have size 65 at dim 1 but the program takes sizes 2\.\.64 there$",
             fit_to_program, Dataset({"input_ids": ids, "attention_mask": mask}), ep)
    ids, mask = _ids_mask_data(3, 64)
    assert len(fit_to_program(Dataset({"input_ids": ids, "attention_mask": mask}), ep)) == 3


def test_fit_bool_and_integer_masks() -> None:
    class IntMask(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return x * mask

    class BoolMask(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return x.masked_fill(mask, 0.0)

    x = torch.randn(4, 3)
    int_ep = export(IntMask(), (x, torch.ones(4, 3, dtype=torch.int64)))
    bool_mask = torch.rand(4, 3) > 0.5
    fitted = fit_to_program(Dataset({"x": x, "mask": bool_mask}), int_ep)
    assert fitted.features["mask"].dtype == torch.int64 and torch.equal(fitted.features["mask"], bool_mask.long())
    bool_ep = export(BoolMask(), (x, bool_mask))
    fitted = fit_to_program(Dataset({"x": x, "mask": bool_mask.to(torch.uint8)}), bool_ep)
    assert fitted.features["mask"].dtype == torch.bool and torch.equal(fitted.features["mask"], bool_mask)
    _refused("^mask has 4 values other than 0 and 1 but the program takes a bool mask$", fit_to_program,
             Dataset({"x": x, "mask": torch.tensor([[0, 1, 2]] * 4)}), bool_ep)


def test_fit_integer_width_conversion_checks_range() -> None:
    class Add(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return ids + 1

    ep = export(Add(), (torch.zeros(2, 3, dtype=torch.int32),))
    fitted = fit_to_program(Dataset(torch.full((2, 3), 7, dtype=torch.int64)), ep)
    assert fitted.inputs.dtype == torch.int32 and fitted.inputs.tolist() == [[7] * 3] * 2
    _refused(r"^dataset tensor 'inputs' \(for the program's input 'ids'\) has 1 values outside int32's range ",
             fit_to_program,
             Dataset(torch.tensor([[0, 0, 2**40], [0, 0, 0]])), ep)


def test_fit_float_overflow_refused() -> None:
    ep = export(nn.Identity(), (torch.zeros(2, 3, dtype=torch.float16),))
    _refused(r"^dataset tensor 'inputs' \(for the program's input 'input'\) has 1 values too large for float16",
             fit_to_program,
             Dataset(torch.tensor([[1e6, 0.0, 0.0], [0.0, 0.0, 0.0]])), ep)
    assert fit_to_program(Dataset(torch.ones(2, 3)), ep).inputs.dtype == torch.float16


def test_fit_refuses_non_tensor_inputs() -> None:
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
            return x * n

    ep = export(Scaled(), (torch.randn(2, 3), 3))
    _refused("^the program's input n is the int 3, not a tensor: datasets feed only tensor inputs$",
             fit_to_program, Dataset({"x": torch.randn(2, 3)}), ep)

    class Pair(nn.Module):
        def forward(self, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return xy[0] + xy[1]

    class Constant(nn.Module):
        def forward(self) -> torch.Tensor:
            return torch.zeros(2)

    _refused("^the program takes no inputs: ", fit_to_program, Dataset(torch.randn(2, 3)), export(Constant(), ()))

    ep = export(Pair(), ((torch.randn(2, 3), torch.randn(2, 3)),))
    _refused("^the program's input xy is a tuple of values: datasets feed only inputs that are single tensors$",
             fit_to_program, Dataset({"xy": torch.randn(2, 3)}), ep)


def test_every_refusal_names_a_tensor_in_one_line(ids_mask) -> None:
    """The messages above are single lines; spot-check that a refusal mentions the offending tensor by name."""
    _, ep = ids_mask
    ids, mask = _ids_mask_data()
    message = _refused(".", fit_to_program, Dataset({"input_ids": ids, "attention_mask": mask, "labels": ids}), ep)
    assert re.search(r"\blabels\b", message)


def test_fit_leaves_the_program_dynamic(ids_mask) -> None:
    """Vetting must never compare the program's symbolic sizes (that would specialize them to the data's)."""
    _, ep = ids_mask
    ids, mask = _ids_mask_data(4, 5)  # the sizes the program was exported with
    fit_to_program(Dataset({"input_ids": ids, "attention_mask": mask}), ep)
    names = ("input_ids", "attention_mask")
    vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]
    assert len(vals) == 2 and all(str(v.shape[1]).startswith("s") for v in vals), [v.shape for v in vals]
    ids, mask = _ids_mask_data(2, 3)
    assert len(fit_to_program(Dataset({"input_ids": ids, "attention_mask": mask}), ep)) == 2
    with torch.no_grad():
        assert ep.module()(ids, mask).shape == (2, 3)
