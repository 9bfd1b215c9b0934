"""Interleaved latency comparison (core/latency.py): work is measured as work, threads are fixed and restored,
programs alternate ABBA, exported programs run at several batch sizes, a genuinely slower "after" is flagged.
Short timings (min_time_s of 5-20 ms) except the one run at the defaults: a few seconds in all."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunery.core import PruneConfig, prune
from prunery.core.latency import LatencyError, compare_latency, measure_ms

FAST = {"rounds": 5, "min_time_s": 0.005, "warmup": 2, "device": "cpu", "threads": 1}


class MatMuls(nn.Module):
    """`k` chained 256x256 matmuls: k=4 is four times k=1's work."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, 256) / 16)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.k):
            x = torch.tanh(x @ self.w)
        return x


class Recorder(nn.Module):
    """Appends (name, batch size) to `log` on every call."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, x.shape[0]))
        return x


class Sleeper(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x + 1


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def cnn_programs() -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
    """A small CNN exported with a dynamic batch, and that program pruned by half."""
    torch.manual_seed(0)
    model = CNN().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 3, 32, 32),), dynamic_shapes=({0: batch},))
    return ep, prune(ep, PruneConfig(ratio=0.5)).program


def test_more_work_is_slower() -> None:
    torch.manual_seed(0)
    small, big = MatMuls(1), MatMuls(4)
    big.w = small.w
    res = compare_latency({"before": big, "after": small}, {64: torch.randn(64, 256)},
                          **{**FAST, "min_time_s": 0.01})
    assert res["before"]["64"]["median_ms"] > res["after"]["64"]["median_ms"]
    assert res["speedup"]["64"] > 1.5
    assert res["slower"] == []
    assert measure_ms(big, torch.randn(64, 256), **FAST) > measure_ms(small, torch.randn(64, 256), **FAST)


def test_result_structure() -> None:
    x = torch.randn(2, 256)
    res = compare_latency({"before": MatMuls(1), "after": MatMuls(1)}, {1: x[:1], 2: x}, **FAST)
    assert set(res) == {"before", "after", "threads", "device", "rounds", "speedup", "slower"}
    assert (res["threads"], res["device"], res["rounds"]) == (1, "cpu", 5)
    for name in ("before", "after"):
        assert set(res[name]) == {"1", "2"}
        for stats in res[name].values():
            assert set(stats) == {"median_ms", "min_ms", "p25_ms", "p75_ms", "spread", "rounds", "calls"}
            assert 0 < stats["min_ms"] <= stats["p25_ms"] <= stats["median_ms"] <= stats["p75_ms"]
            assert stats["spread"] == pytest.approx((stats["p75_ms"] - stats["p25_ms"]) / stats["median_ms"],
                                                    abs=0.01)
            assert stats["rounds"] == 5 and stats["calls"] >= 1
    assert set(res["speedup"]) == {"1", "2"}
    # no before/after pair: no speedup; names clashing with the result's keys are refused
    other = compare_latency({"a": MatMuls(1)}, {1: x[:1]}, **FAST)
    assert set(other) == {"a", "threads", "device", "rounds"}
    with pytest.raises(LatencyError, match="clash"):
        compare_latency({"device": MatMuls(1)}, {1: x[:1]}, **FAST)
    with pytest.raises(LatencyError, match="rounds"):
        compare_latency({"a": MatMuls(1)}, {1: x[:1]}, **{**FAST, "rounds": 0})


def test_input_forms() -> None:
    class TwoArgs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            assert y is not None
            return x + y

    x = torch.randn(2, 3)
    forms = {1: (x, x), 2: {"x": x, "y": x}, 3: SimpleNamespace(args=(x,), kwargs={"y": x})}
    res = compare_latency({"p": TwoArgs()}, forms, **FAST)
    assert set(res["p"]) == {"1", "2", "3"}


def test_threads_fixed_during_and_restored_after() -> None:
    seen: list[int] = []

    class ThreadSpy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    before = torch.get_num_threads()
    outside = 2 if before != 2 else 3
    torch.set_num_threads(outside)
    try:
        res = compare_latency({"spy": ThreadSpy()}, {1: torch.ones(1)}, **{**FAST, "threads": 1})
        assert res["threads"] == 1 and seen and set(seen) == {1}
        assert torch.get_num_threads() == outside
        with pytest.raises(RuntimeError, match="boom"):
            compare_latency({"spy": ThreadSpy(), "boom": Boom()}, {1: torch.ones(1)}, **{**FAST, "threads": 1})
        assert torch.get_num_threads() == outside
        with pytest.raises(RuntimeError, match="boom"):
            measure_ms(Boom(), torch.ones(1), **{**FAST, "threads": 1})
        assert torch.get_num_threads() == outside
        # default: the thread count at call time
        assert compare_latency({"spy": ThreadSpy()}, {1: torch.ones(1)}, **{**FAST, "threads": None})["threads"] \
            == outside
    finally:
        torch.set_num_threads(before)


def test_programs_alternate_abba() -> None:
    log: list[tuple[str, int]] = []
    x = torch.ones(2, 1)
    compare_latency({"a": Recorder("a", log), "b": Recorder("b", log)}, {1: x[:1], 2: x},
                    rounds=4, min_time_s=0.0, warmup=2, device="cpu", threads=1)
    warm = [("a", 1), ("a", 1), ("a", 2), ("a", 2), ("b", 1), ("b", 1), ("b", 2), ("b", 2)]
    calibrate = [("a", 1), ("a", 2), ("b", 1), ("b", 2)]  # min_time_s=0: one call each, one call per timing
    ab = [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    ba = [("b", 1), ("a", 1), ("b", 2), ("a", 2)]
    assert log == warm + calibrate + ab + ba + ab + ba


def test_exported_program_dynamic_batch(cnn_programs) -> None:
    ep, pruned = cnn_programs
    x = torch.randn(8, 3, 32, 32)
    res = compare_latency({"before": ep, "after": pruned}, {1: x[:1], 8: x}, **{**FAST, "min_time_s": 0.01})
    for name in ("before", "after"):
        assert res[name]["8"]["median_ms"] > res[name]["1"]["median_ms"] > 0
    assert set(res["speedup"]) == {"1", "8"} and res["speedup"]["8"] > 1.0
    assert 0 < measure_ms(ep, x, **FAST) < 1000


def test_defaults_fast_enough_for_a_report(cnn_programs) -> None:
    ep, pruned = cnn_programs
    x = torch.randn(32, 3, 32, 32)
    t0 = time.perf_counter()
    # the default rounds, min_time_s and warm-up; one thread: with as many threads as the 2 shared cores, a
    # loaded machine stretches a 0.4 ms call to ~100 ms (threads wait at every barrier for a descheduled peer)
    res = compare_latency({"before": ep, "after": pruned}, {1: x[:1], 32: x}, device="cpu", threads=1)
    elapsed = time.perf_counter() - t0
    assert res["rounds"] == 7 and res["before"]["32"]["rounds"] == 7
    assert res["speedup"]["32"] > 1.0 and res["slower"] == []
    assert elapsed < 3.0, elapsed


def test_slower_after_is_flagged() -> None:
    x = torch.ones(4, 3)
    res = compare_latency({"before": nn.Identity(), "after": Sleeper(0.002)}, {1: x[:1], 4: x}, **FAST)
    assert res["slower"] == [1, 4]
    assert res["speedup"]["1"] < 0.5 and res["after"]["1"]["median_ms"] >= 2.0
    # the other way round nothing is flagged
    res = compare_latency({"before": Sleeper(0.002), "after": nn.Identity()}, {1: x[:1]}, **FAST)
    assert res["slower"] == [] and res["speedup"]["1"] > 2
