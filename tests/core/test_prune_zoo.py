"""Every zoo model pruned at 0.3, 0.5 and 0.7: shapes kept, saves and reloads, cuts as expected, and the
zeroed-channel oracle holds wherever no normalisation spans the pruned dim."""

from __future__ import annotations

import pytest
import torch

from prunery.core import PruneConfig, apply_zeroing, count, load_program, prune
from tests import zoo

RATIOS = (0.3, 0.5, 0.7)


@pytest.fixture(scope="module")
def programs():
    cache: dict[str, torch.export.ExportedProgram] = {}

    def get(name: str) -> torch.export.ExportedProgram:
        if name not in cache:
            cache[name] = zoo.export(name)
        return cache[name]

    return get


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_prunes(name: str, ratio: float, programs, tmp_path) -> None:
    ep = programs(name)
    result = prune(ep, PruneConfig(ratio=ratio))
    report = result.report
    x = zoo.ZOO[name].example_inputs(3)  # not the traced batch size: the batch dim stayed dynamic
    with torch.no_grad():
        y_ref = ep.module()(*x)
        y = result.program.module()(*x)
    assert y.shape == y_ref.shape

    # about the expected cut: a conv between two pruned groups keeps (1-r)^2 of its weights; the
    # program's input and output layers keep one side, so the whole lies between (1-r)^2 and (1-r)
    kept_params = report["params_after"] / report["params_before"]
    kept_macs = report["macs_after"] / report["macs_before"]
    lo, hi = 0.6 * (1 - ratio) ** 2, (1 - ratio) + 0.1
    assert lo <= kept_params <= hi, kept_params
    assert lo <= kept_macs <= hi, kept_macs
    assert report["pruned_groups"] == report["num_groups"] > 0
    assert count(result.program).params == report["params_after"]

    # saves, and reloads through the safe intake with the same outputs
    path = tmp_path / "pruned.pt2"
    torch.export.save(result.program, path)
    reloaded = load_program(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module()(*x), y)
        x1 = zoo.ZOO[name].example_inputs(1)
        assert reloaded.module()(*x1).shape[0] == 1

    if not zoo.ZOO[name].normalised:
        with torch.no_grad():
            y_zeroed = apply_zeroing(ep, result.plan)(*x)
        torch.testing.assert_close(y, y_zeroed, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "densenet", "unet", "functional", "groupnorm"])
def test_core_aten_programs_prune_too(name: str, programs) -> None:
    """After run_decompositions() the graph holds convolution/addmm/view/native norms instead: same results."""
    ep = programs(name).run_decompositions()
    result = prune(ep, PruneConfig(ratio=0.5))
    assert result.report["frozen_ops"] == []
    assert result.report["params_after"] < 0.5 * result.report["params_before"]
    x = zoo.ZOO[name].example_inputs(3)
    with torch.no_grad():
        y = result.program.module()(*x)
        assert y.shape == ep.module()(*x).shape
        if not zoo.ZOO[name].normalised:
            torch.testing.assert_close(y, apply_zeroing(ep, result.plan)(*x), atol=1e-5, rtol=1e-4)


def test_a_graph_built_beforehand_gives_the_same_result_and_must_match(programs) -> None:
    from prunery.core import DependencyGraph, PruneError

    ep = programs("resnet_basic")
    config = PruneConfig(ratio=0.5, ignore=("fc.*",))
    graph = DependencyGraph(ep, ignore=config.ignore)
    with_graph, without = prune(ep, config, graph=graph), prune(ep, config)
    assert with_graph.report["params_after"] == without.report["params_after"]
    assert [layer["shape_after"] for layer in with_graph.report["layers"]] == \
        [layer["shape_after"] for layer in without.report["layers"]]
    assert with_graph.report["timings_s"]["graph"] == pytest.approx(graph.build_s, abs=1e-3)
    with pytest.raises(PruneError, match="other ignore patterns or attention mode"):
        prune(ep, PruneConfig(ratio=0.5), graph=graph)
    with pytest.raises(PruneError, match="another program"):
        prune(programs("vgg"), config, graph=graph)


def test_a_batch_dim_exported_without_bounds_stays_dynamic_and_unbounded() -> None:
    """torch's unbounded range (int_oo) is not `is_finite == False`: the re-export must not read it as a bound."""
    model = zoo.build("mlp")[0]
    ep = torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    result = prune(ep, PruneConfig(ratio=0.5))
    assert result.program.module()(torch.randn(5000, 64)).shape == (5000, 10)


def test_importance_is_one_callable_whatever_its_source(programs) -> None:
    """`prune(importance=...)` ranks with any `Importance` (a function of the graph and the program): the config's
    magnitude criterion by default, called once on the program being pruned, its time reported."""
    from prunery.core.importance import magnitude

    ep = programs("resnet_basic")
    config = PruneConfig(ratio=0.5, ignore=("fc.*",))
    calls: list[object] = []

    def inverse_l2(graph, program):  # keeps what L2 would remove
        calls.append(program)
        return {gid: -s for gid, s in magnitude("l2")(graph, program).items()}

    default, explicit = prune(ep, config), prune(ep, config, importance=magnitude("l2"))
    inverse = prune(ep, config, importance=inverse_l2)
    assert calls == [ep]
    assert (default.plan.pruned == explicit.plan.pruned).all()
    assert not (inverse.plan.pruned == default.plan.pruned).all()
    assert inverse.report["params_after"] == default.report["params_after"]  # the same counts go, other indices
    assert default.report["timings_s"]["importance"] >= 0
