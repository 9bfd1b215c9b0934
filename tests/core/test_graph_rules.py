"""Couplings the op rules must get right, on small hand-written models, checked group by group and
against the zeroed-channel oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunery.core import DependencyGraph, PruneConfig, apply_zeroing, build_graph, prune


def _export(model: nn.Module, *inputs: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    model.eval()
    ds = tuple({0: torch.export.Dim("batch", min=1, max=512)} for _ in inputs) if dynamic_batch else None
    return torch.export.export(model, inputs, dynamic_shapes=ds)


def _members(graph: DependencyGraph) -> list[set[tuple[str, int]]]:
    return [{(m.name, m.dim) for m in g.members if m.kind == "parameter"} for g in graph.groups]


def _group_with(graph: DependencyGraph, name: str, dim: int) -> set[tuple[str, int]]:
    for members in _members(graph):
        if (name, dim) in members:
            return members
    return set()


def _check_oracle(ep, ratio: float = 0.5, **kw) -> dict:
    result = prune(ep, PruneConfig(ratio=ratio, **kw))
    x = tuple(torch.randn(3, *t.shape[1:]) if t.is_floating_point() else t for t in ep.example_inputs[0])
    with torch.no_grad():
        y = result.program.module()(*x)
        y_zero = apply_zeroing(ep, result.plan)(*x)
        y_ref = ep.module()(*x)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_zero, atol=1e-5, rtol=1e-4)
    return result.report


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + F.relu(self.a(x))
        return self.head(self.b(x).mean((2, 3)))


def test_residual_couples_both_sides_of_the_add() -> None:
    g = DependencyGraph(_export(Residual(), torch.randn(2, 3, 8, 8)))
    members = _group_with(g, "stem.weight", 0)
    assert {("stem.weight", 0), ("stem.bias", 0), ("a.weight", 0), ("a.bias", 0), ("a.weight", 1),
            ("b.weight", 1)} <= members
    # the classifier's output dim is the program's output: never in any group
    assert not _group_with(g, "head.weight", 0)
    # the first conv's input dim is the program's input: never in any group
    assert not _group_with(g, "stem.weight", 1)


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.one = nn.Conv2d(12, 1, 1)  # one output channel: not depthwise
        self.pw2 = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        x = F.relu(self.pw(x))
        x = F.relu(self.dw(x))
        x = x * torch.sigmoid(self.one(x))
        return self.pw2(x)


def test_depthwise_couples_input_and_output_channels_and_rewrites_groups() -> None:
    ep = _export(Depthwise(), torch.randn(2, 3, 8, 8))
    g = DependencyGraph(ep)
    members = _group_with(g, "pw.weight", 0)
    assert {("dw.weight", 0), ("dw.bias", 0), ("one.weight", 1), ("pw2.weight", 1)} <= members
    assert not _group_with(g, "dw.weight", 1)  # the per-group input width (1) is never pruned
    assert not _group_with(g, "one.weight", 0)  # its single channel is broadcast: kept
    result = prune(ep, PruneConfig(ratio=0.5))
    convs = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert convs[1].args[6] == 6  # groups follow the channels
    _check_oracle(ep)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.c = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.c(F.relu(self.g(F.relu(self.a(x)))))


def test_grouped_conv_prunes_inside_every_group_and_keeps_the_group_count() -> None:
    ep = _export(Grouped(), torch.randn(2, 3, 8, 8))
    result = prune(ep, PruneConfig(ratio=0.5))
    sd = result.program.state_dict
    assert sd["a.weight"].shape[0] % 4 == 0 and sd["g.weight"].shape[0] % 4 == 0
    assert sd["g.weight"].shape[1] * 4 == sd["a.weight"].shape[0]
    conv = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.conv2d.default][1]
    assert conv.args[6] == 4
    _check_oracle(ep)


class ConcatFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.adaptive_avg_pool2d(y, 2)
        return self.fc(torch.flatten(y, 1))


def test_concat_offsets_and_flatten_blocks_map_into_the_linear_columns() -> None:
    ep = _export(ConcatFlatten(), torch.randn(2, 3, 8, 8))
    g = DependencyGraph(ep)
    assert ("fc.weight", 1) in _group_with(g, "a.weight", 0)
    assert ("fc.weight", 1) in _group_with(g, "b.weight", 0)
    result = prune(ep, PruneConfig(ratio=0.5))
    sd = result.program.state_dict
    assert sd["fc.weight"].shape[1] == (sd["a.weight"].shape[0] + sd["b.weight"].shape[0]) * 4
    _check_oracle(ep)


class FunctionalMid(nn.Module):
    """Functional linear, a matmul between activations, cat and split on dim 2, a slice on dim 2."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.w = nn.Parameter(torch.randn(8, 12))
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, N, 6)
        h = F.relu(self.inp(x))
        h = F.linear(h, self.w)  # (B, N, 8): contracts over 12
        attn = torch.softmax(h @ h.transpose(1, 2), dim=-1)  # (B, N, N): contracts over 8
        h = attn @ h
        h = torch.cat([h, h], dim=2)  # (B, N, 16)
        a, b = h.split(8, dim=2)
        h = (a + b)[:, :, 0:8]
        return self.out(h)


def test_functional_linear_and_matmul_contract_instead_of_acting_elementwise() -> None:
    ep = _export(FunctionalMid(), torch.randn(2, 5, 6))
    g = DependencyGraph(ep)
    assert ("w", 1) in _group_with(g, "inp.weight", 0)
    assert ("out.weight", 1) in _group_with(g, "w", 0)
    _check_oracle(ep)


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.flip(self.a(x), dims=[1])  # no rule for flip: its dims must freeze
        return self.c(F.relu(self.b(y)))


def test_op_without_rule_freezes_its_dims_and_is_reported() -> None:
    ep = _export(UnknownOp(), torch.randn(2, 3, 4, 4))
    result = prune(ep, PruneConfig(ratio=0.5))
    assert "flip.default" in result.report["frozen_ops"]
    sd = result.program.state_dict
    assert sd["a.weight"].shape[0] == 8 and sd["b.weight"].shape[1] == 8
    assert sd["b.weight"].shape[0] == 4  # the rest still prunes


def test_ignored_layers_keep_both_sides() -> None:
    ep = _export(Residual(), torch.randn(2, 3, 8, 8))
    result = prune(ep, PruneConfig(ratio=0.5, ignore=("b.*",)))
    sd = result.program.state_dict
    assert sd["b.weight"].shape == (8, 16, 1, 1)
    assert sd["stem.weight"].shape[0] == 16  # coupled to b's input side: kept too


def test_frozen_parameters_and_no_grad_tracing_still_prune() -> None:
    model = Residual()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        ep = _export(model, torch.randn(2, 3, 8, 8))
    result = prune(ep, PruneConfig(ratio=0.5))
    assert result.program.state_dict["stem.weight"].shape[0] == 8
    assert not result.program.state_dict["stem.weight"].requires_grad


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 2)

    def forward(self, x):
        h = self.a(x)
        h = h + self.gamma * F.gelu(self.b(h))
        return self.c(h)


def test_layer_scale_parameter_joins_the_residual_group() -> None:
    ep = _export(LayerScale(), torch.randn(2, 4))
    g = DependencyGraph(ep)
    assert ("gamma", 0) in _group_with(g, "a.weight", 0)
    _check_oracle(ep)


def test_dynamic_batch_survives_and_static_programs_stay_static() -> None:
    ep = _export(Residual(), torch.randn(2, 3, 8, 8))
    out = prune(ep, PruneConfig(ratio=0.3)).program
    assert out.module()(torch.randn(7, 3, 8, 8)).shape == (7, 4)
    static = prune(_export(Residual(), torch.randn(2, 3, 8, 8), dynamic_batch=False), PruneConfig(ratio=0.3))
    with pytest.raises(AssertionError, match="size"):
        static.program.module()(torch.randn(7, 3, 8, 8))


def test_global_round_to_and_max_ratio() -> None:
    ep = _export(Residual(), torch.randn(2, 3, 8, 8))
    r = prune(ep, PruneConfig(ratio=0.5, global_pruning=True, round_to=4, max_ratio=0.6))
    for layer in r.report["layers"]:
        if layer["name"] in ("stem.weight", "b.weight"):
            assert layer["shape_after"][0] % 4 == 0
    for g in r.report["groups"]:
        assert g["pruned"] <= int(0.6 * g["size"])
    total = sum(g["size"] for g in r.report["groups"])
    pruned = sum(g["pruned"] for g in r.report["groups"])
    assert 0 < pruned <= total // 2 + len(r.report["groups"])


def test_l2_importance_removes_the_weakest_coupled_channels() -> None:
    model = Residual().eval()
    with torch.no_grad():
        model.stem.weight[[1, 5, 9]] *= 1e-3  # make three channels of the residual group tiny everywhere
        model.stem.bias[[1, 5, 9]] = 0
        model.a.weight[[1, 5, 9]] *= 1e-3
        model.a.bias[[1, 5, 9]] = 0
        model.a.weight[:, [1, 5, 9]] *= 1e-3
        model.b.weight[:, [1, 5, 9]] *= 1e-3
    ep = _export(model, torch.randn(2, 3, 8, 8))
    for imp in ("l1", "l2"):
        r = prune(ep, PruneConfig(ratio=3 / 16, importance=imp))
        kept = r.plan.kept(r.plan.graph.params["stem.weight"].slots[0])
        assert not {1, 5, 9} & set(kept.tolist())
        assert len(kept) == 13


def test_bn_importance_uses_the_norm_scales() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.01, 1.0, 1.0, 0.02, 1.0, 1.0, 1.0]))
        model[0].weight[[1, 4]] *= 100  # large weights, small scale: bn must still pick them
    ep = _export(model, torch.randn(2, 3, 8, 8))
    r = prune(ep, PruneConfig(ratio=0.25, importance="bn"))
    kept = r.plan.kept(r.plan.graph.params["0.weight"].slots[0]).tolist()
    assert 1 not in kept and 4 not in kept


def test_module_input_is_exported_first() -> None:
    g = build_graph(Residual().eval(), (torch.randn(2, 3, 8, 8),))
    assert len(g.groups) >= 2
    r = prune(Residual().eval(), PruneConfig(ratio=0.5), (torch.randn(2, 3, 8, 8),))
    assert r.report["params_after"] < r.report["params_before"]
    with pytest.raises(ValueError):
        build_graph(Residual())


@pytest.mark.parametrize("bad", [{"ratio": 0.0}, {"ratio": 1.0}, {"ratio": -1}, {"importance": "taylor"},
                                 {"max_ratio": 0}, {"round_to": 0}])
def test_bad_specs_are_refused(bad: dict) -> None:
    ep = _export(Residual(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError):
        prune(ep, PruneConfig(**{"ratio": 0.5, **bad}))


class C2f(nn.Module):
    """YOLOv8-style C2f: chunk on channels, a chain of bottlenecks, cat of every partial result."""

    def __init__(self, c: int = 16, n: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.cv1 = nn.Conv2d(c, c, 1)
        self.m = nn.ModuleList(nn.Conv2d(c // 2, c // 2, 3, padding=1) for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * c // 2, 8, 1)

    def forward(self, x):
        y = list(F.silu(self.cv1(F.silu(self.stem(x)))).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + F.silu(m(y[-1])))
        return self.cv2(torch.cat(y, 1))


def test_c2f_chunk_and_concat_prune_consistently() -> None:
    ep = _export(C2f(), torch.randn(2, 3, 8, 8))
    g = DependencyGraph(ep)
    members = _group_with(g, "cv1.weight", 0)
    assert ("cv2.weight", 1) in members and ("m.0.weight", 1) in members
    report = _check_oracle(ep)
    shapes = {layer["name"]: layer["shape_after"] for layer in report["layers"]}
    # cat(first half, second half, m0 out, m1 out): the second half and the m outputs share a group
    assert shapes["cv2.weight"][1] == shapes["cv1.weight"][0] + 2 * shapes["m.0.weight"][0]
    assert report["params_after"] < 0.85 * report["params_before"]


class NonChannelCat(nn.Module):
    """Cat and split on dim 2 of a 3-D tensor and a reshape of a 3-D tensor, between linears."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 12)
        self.b = nn.Linear(4, 12)
        self.c = nn.Linear(6, 5)

    def forward(self, x):  # (B, N, 4)
        y = torch.cat([self.a(x), self.b(x)], dim=2)  # (B, N, 24)
        y = y.reshape(y.shape[0], y.shape[1], 4, 6).sum(2)  # (B, N, 6): a 4-D view of a 3-D tensor
        return self.c(F.relu(y))


def test_cat_on_dim2_and_reshape_of_3d_tensors() -> None:
    ep = _export(NonChannelCat(), torch.randn(2, 7, 4))
    g = DependencyGraph(ep)
    assert ("c.weight", 1) in _group_with(g, "a.weight", 0)
    _check_oracle(ep)


def test_bn_importance_falls_back_to_magnitude_without_a_norm_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight[[6, 7]] *= 1e-3
        model[0].bias[[6, 7]] = 0
    ep = _export(model, torch.randn(2, 4))
    r = prune(ep, PruneConfig(ratio=0.25, importance="bn"))
    assert r.plan.kept(r.plan.graph.params["0.weight"].slots[0]).tolist() == [0, 1, 2, 3, 4, 5]


def test_program_without_saved_example_inputs_reexports_from_its_shapes() -> None:
    ep = _export(Residual(), torch.randn(2, 3, 8, 8))
    ep.example_inputs = None
    out = prune(ep, PruneConfig(ratio=0.5)).program
    assert out.module()(torch.randn(5, 3, 8, 8)).shape == (5, 4)


def test_small_graph_components_match_scipy() -> None:
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from prunery.core.graph import _components_small

    rng = np.random.default_rng(0)
    cases = [(np.arange(499), np.arange(1, 500), 500), (np.arange(1, 500), np.arange(499), 500)]  # chains
    for _ in range(100):
        n, m = int(rng.integers(1, 300)), int(rng.integers(0, 400))
        cases.append((rng.integers(0, n, m), rng.integers(0, n, m), n))
    for a, b, n in cases:
        labels = _components_small(a, b, n)
        _, ref = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
        pairs = set(zip(labels.tolist(), ref.tolist(), strict=True))
        assert len(pairs) == len(set(labels.tolist())) == len(set(ref.tolist()))
