"""Tests for the in-repo model zoo (tests.zoo)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from tests import zoo

EXPECTED_ZOO = {
    "vgg",
    "resnet_basic",
    "resnet_bottleneck",
    "densenet",
    "inception",
    "mobilenetv2",
    "shufflenetv2",
    "squeezenet",
    "unet",
    "se_resnet",
    "conv1d",
    "conv3d",
    "grouped",
    "groupnorm",
    "functional",
    "mlp",
    "embedding_mlp",
}

NORMALISED = {"groupnorm", "mlp"}


def _expected_output_shape(name: str, batch: int) -> tuple[int, ...]:
    if name == "unet":
        return (batch, 2, 32, 32)
    return (batch, 10)


@functools.cache
def _exported(name: str) -> torch.export.ExportedProgram:
    return zoo.export(name, seed=0)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_zoo_contents():
    assert set(zoo.ZOO) == EXPECTED_ZOO
    assert set(zoo.BENCH_ZOO) == {"resnet50", "densenet121"}
    for name, entry in {**zoo.ZOO, **zoo.BENCH_ZOO}.items():
        assert entry.name == name
        assert entry.description
        assert entry.normalised == (name in NORMALISED)


def test_unknown_name():
    with pytest.raises(KeyError):
        zoo.build("no_such_model")


@pytest.mark.parametrize("name", sorted(EXPECTED_ZOO))
def test_build_deterministic(name):
    m1, x1 = zoo.build(name, seed=0)
    m2, x2 = zoo.build(name, seed=0)
    m3, _ = zoo.build(name, seed=1)
    assert not m1.training and all(not m.training for m in m1.modules())
    assert _same_state(m1, m2)
    assert not _same_state(m1, m3)
    assert len(x1) == len(x2) and all(torch.equal(a, b) for a, b in zip(x1, x2, strict=True))
    assert all(x.shape[0] == 2 for x in x1)
    with torch.no_grad():
        torch.testing.assert_close(m1(*x1), m2(*x2), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EXPECTED_ZOO))
def test_norms_not_identity(name):
    model, _ = zoo.build(name)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
        if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
            weight = getattr(m, "weight", None)
            if weight is not None:
                assert not torch.allclose(weight, torch.ones_like(weight))


@pytest.mark.parametrize("name", sorted(EXPECTED_ZOO))
def test_export_dynamic_batch_matches_eager(name):
    model, _ = zoo.build(name, seed=0)
    ep = _exported(name)
    exported = ep.module()
    entry = zoo.ZOO[name]
    with torch.no_grad():
        for batch in (3, 1):
            inputs = entry.example_inputs(batch)
            expected = model(*inputs)
            got = exported(*inputs)
            assert got.shape == _expected_output_shape(name, batch)
            assert expected.shape == got.shape
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("name", sorted(EXPECTED_ZOO))
def test_export_batch_is_symbolic(name):
    ep = _exported(name)
    placeholders = [
        n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    ]
    assert placeholders
    for node in placeholders:
        dim0 = node.meta["val"].shape[0]
        assert isinstance(dim0, torch.SymInt), f"{name}: batch dim specialised to {dim0}"


def test_embedding_inputs():
    (tokens,) = zoo.ZOO["embedding_mlp"].example_inputs(5)
    assert tokens.dtype == torch.int64 and tokens.shape == (5, 12)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 100


def test_input_shapes():
    shapes = {name: tuple(zoo.ZOO[name].example_inputs(2)[0].shape) for name in zoo.ZOO}
    assert shapes["conv1d"] == (2, 4, 64)
    assert shapes["conv3d"] == (2, 2, 8, 16, 16)
    assert shapes["vgg"] == (2, 3, 32, 32)
    assert shapes["mlp"] == (2, 64)


def test_static_export():
    ep = zoo.export("vgg", dynamic_batch=False)
    (x,) = zoo.ZOO["vgg"].example_inputs(2)
    model, _ = zoo.build("vgg")
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), model(x), atol=1e-5)


@pytest.mark.parametrize(("name", "expected"), [("resnet50", 25.56e6), ("densenet121", 7.98e6)])
def test_bench_param_counts(name, expected):
    model = zoo.BENCH_ZOO[name].build()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.05, n
    assert not model.training
    (x,) = zoo.BENCH_ZOO[name].example_inputs(1)
    assert x.shape == (1, 3, 224, 224)
