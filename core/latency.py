"""Latency you can compare: several programs timed on the same inputs, interleaved, on a fixed thread count.

Timing "before" fully and then "after" lets whatever the machine does meanwhile (another
job, a frequency change, a thermal throttle) land on one side only: a loaded machine then reports a pruned
program as slower. `compare_latency` instead

- runs every program as it is deployed (`ep.module()` on the device; an `nn.Module` as given), under
  `torch.inference_mode()`, with a fixed number of intra-op threads (restored afterwards, also on errors),
  the device synchronised around every timing on CUDA and the garbage collector paused while timing;
- warms every program up at every batch size before anything is timed, and calibrates there, once per
  program and batch size, how many calls a timing repeats so that it lasts at least `min_time_s`
  (a single call of a small model is shorter than the timer's and the scheduler's noise); when load comes
  or goes later, so that a timing lasts over twice or under half of `min_time_s`, the count is set again
  from that timing for the next round, and a timing stops early, averaging the calls done, once it has
  lasted 3 x `min_time_s` (a loaded machine would otherwise stretch a report many times over);
- then times in `rounds` rounds; a round times every program once per batch size, the programs' order
  alternating between rounds (A B, B A, A B, ...: ABBA), so slow drift and bursts of load hit them alike;
- reports per program and batch the median over the rounds of the per-call mean, the minimum, the
  quartiles and the relative spread (p75 - p25) / median: how much to trust the median.

For programs named "before" and "after" it adds the speedup per batch (before / after, medians) and
`slower`: the batch sizes at which "after" is slower than "before" beyond the measured noise, that is
after's p25 above before's p75 (their interquartile ranges do not overlap) and its median at least
`SLOWER_MIN_RATIO` times before's (a difference of a percent is not worth flagging however steady).

Threads: on a machine shared with other jobs, as many threads as cores is the least trustworthy setting
(threads wait at every parallel region for a peer the scheduler has put aside: a 0.4 ms call of a small CNN
measured ~100 ms with 2 threads on 2 busy cores, 0.5 ms with 1 thread); pass `threads` below the cores free.

Inputs per batch size: a tensor, a tuple (or list) of positional tensors, a dict of keyword tensors, or an
object with `.args` and `.kwargs` (called as `module(*x.args, **x.kwargs)`); tensors are moved to the device
once, before timing.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from .errors import EngineError
from .trainable import _device, _on_device, _to

__all__ = ["LatencyError", "SLOWER_MIN_RATIO", "compare_latency", "measure_ms"]

SLOWER_MIN_RATIO = 1.02  # "after" must also be at least 2% slower (median) to be listed in `slower`
_CALIBRATE_FRACTION = 0.2  # the calibration block lasts about this share of min_time_s
_MAX_BLOCK = 3.0  # a timing stops after this many times min_time_s (the mean over the calls done so far)
_MAX_CALLS = 100_000  # repeat count ceiling (a no-op program would otherwise ask for millions)

Program = ExportedProgram | nn.Module


class LatencyError(EngineError):
    """Latency cannot be measured as asked (no programs or inputs, a bad count or duration)."""


def _args(x: Any) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of one program input."""
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    if isinstance(x, Mapping):
        return (), dict(x)
    if hasattr(x, "args") and hasattr(x, "kwargs"):
        return tuple(x.args), dict(x.kwargs or {})
    return (x,), {}


def _deployed(program: Program, dev: torch.device) -> Callable:
    return _on_device(program, dev).module() if isinstance(program, ExportedProgram) else program


def _repeats(min_time_s: float, per_call: float) -> int:
    """Calls a timing repeats to last at least `min_time_s` at `per_call` seconds a call."""
    return max(1, min(_MAX_CALLS, math.ceil(min_time_s / max(per_call, 1e-9))))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _check(rounds: int, min_time_s: float, warmup: int, threads: int | None) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise LatencyError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not (isinstance(min_time_s, (int, float)) and math.isfinite(min_time_s) and min_time_s >= 0):
        raise LatencyError(f"min_time_s must be a finite number >= 0, got {min_time_s!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise LatencyError(f"warmup must be an integer >= 0, got {warmup!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise LatencyError(f"threads must be an integer >= 1, got {threads!r}")


def _timings(programs: Mapping[str, Program], inputs: Mapping[int, Any], dev: torch.device, threads: int,
             rounds: int, min_time_s: float, warmup: int) -> tuple[dict[str, dict[int, list[float]]],
                                                                   dict[str, dict[int, list[int]]]]:
    """Per program and input key: the per-call seconds of every round, and the calls each round's timing
    repeated (one more entry: the count the next round would use)."""
    names = list(programs)
    keys = list(inputs)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def block(fn: Callable, args: tuple, kwargs: dict, n: int) -> float:
        """Mean seconds per call over `n` back-to-back calls, or over those done when the block has lasted
        `_MAX_BLOCK` times `min_time_s` (load arriving after the calibration would stretch it unbounded)."""
        sync()
        t0 = time.perf_counter()
        deadline = t0 + _MAX_BLOCK * min_time_s
        done = 0
        while done < n:
            fn(*args, **kwargs)
            done += 1
            if time.perf_counter() > deadline:
                break
        sync()
        return (time.perf_counter() - t0) / done

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        modules = {name: _deployed(programs[name], dev) for name in names}
        call_args = {k: tuple(_to(a, dev) for a in _args(inputs[k])) for k in keys}
        calls: dict[str, dict[int, list[int]]] = {name: {} for name in names}
        times: dict[str, dict[int, list[float]]] = {name: {k: [] for k in keys} for name in names}
        with torch.inference_mode():
            # warm-up of everything first, then calibration (the warm-up's first calls are the slow ones)
            for name in names:
                for k in keys:
                    args, kwargs = call_args[k]
                    for _ in range(warmup):
                        block(modules[name], args, kwargs, 1)
            for name in names:
                for k in keys:
                    args, kwargs = call_args[k]
                    target = min_time_s * _CALIBRATE_FRACTION
                    n, per_call = 1, block(modules[name], args, kwargs, 1)
                    while n * per_call < target and n < _MAX_CALLS:  # grow the block until it is measurable
                        n = min(_MAX_CALLS, max(2 * n, math.ceil(target / max(per_call, 1e-9))))
                        per_call = block(modules[name], args, kwargs, n)
                    calls[name][k] = [_repeats(min_time_s, per_call)]
            gc.collect()
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                for r in range(rounds):
                    order = names if r % 2 == 0 else names[::-1]
                    for k in keys:
                        args, kwargs = call_args[k]
                        for name in order:
                            n = calls[name][k][-1]
                            per_call = block(modules[name], args, kwargs, n)
                            times[name][k].append(per_call)
                            if (n > 1 and n * per_call > 2 * min_time_s) or n * per_call < min_time_s / 2:
                                n = _repeats(min_time_s, per_call)  # the load changed: keep timings bounded
                            calls[name][k].append(n)
            finally:
                if was_enabled:
                    gc.enable()
    finally:
        torch.set_num_threads(previous)
    return times, calls


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (a 0.0123 ms program keeps its precision, a 58.12 ms one no noise)."""
    return float(f"{x:.{digits}g}")


def _summary(seconds: list[float], calls: list[int]) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in seconds)
    median = statistics.median(ms)
    p25, p75 = _percentile(ms, 0.25), _percentile(ms, 0.75)
    return {"median_ms": _sig(median), "min_ms": _sig(ms[0]), "p25_ms": _sig(p25), "p75_ms": _sig(p75),
            "spread": round((p75 - p25) / median, 3) if median > 0 else 0.0, "rounds": len(ms),
            "calls": round(statistics.median(calls[:len(ms)]))}


def compare_latency(programs: Mapping[str, Program], inputs: Mapping[int, Any], *,
                    device: str | torch.device | None = None, threads: int | None = None, rounds: int = 7,
                    min_time_s: float = 0.05, warmup: int = 3) -> dict[str, Any]:
    """Latency of every program in `programs` ({name: program}) at every batch size in `inputs`
    ({batch size: the program's inputs at that batch}), measured interleaved (see the module docstring).

    Returns {name: {str(batch): {"median_ms", "min_ms", "p25_ms", "p75_ms", "spread", "rounds", "calls"}}}
    ("calls": the median over the rounds of the calls one timing averages) and "threads", "device",
    "rounds"; with programs named "before" and "after" also "speedup" ({str(batch): before median / after
    median}) and "slower" (the batch sizes, ascending, at which "after" is slower than "before" beyond the
    noise). `threads` defaults to `torch.get_num_threads()`; `device` to "cuda" when available, else "cpu".
    Program names must not be one of the top-level keys."""
    _check(rounds, min_time_s, warmup, threads)
    if not programs:
        raise LatencyError("no programs to measure")
    if not inputs:
        raise LatencyError("no inputs to measure on")
    reserved = {"threads", "device", "rounds", "speedup", "slower"} & set(programs)
    if reserved:
        raise LatencyError(f"program names {sorted(reserved)} clash with the result's own keys")
    dev = _device(device)
    n_threads = threads if threads is not None else torch.get_num_threads()
    times, calls = _timings(programs, inputs, dev, n_threads, rounds, min_time_s, warmup)

    result: dict[str, Any] = {name: {str(b): _summary(times[name][b], calls[name][b]) for b in inputs}
                              for name in programs}
    result.update({"threads": n_threads, "device": str(dev), "rounds": rounds})
    if "before" in programs and "after" in programs:
        before, after = result["before"], result["after"]
        result["speedup"] = {
            str(b): _sig(before[str(b)]["median_ms"] / after[str(b)]["median_ms"])
            if after[str(b)]["median_ms"] > 0 else math.inf for b in inputs}
        result["slower"] = sorted(
            b for b in inputs
            if after[str(b)]["p25_ms"] > before[str(b)]["p75_ms"]
            and after[str(b)]["median_ms"] >= SLOWER_MIN_RATIO * before[str(b)]["median_ms"])
    return result


def measure_ms(program: Program, inputs: Any, *, device: str | torch.device | None = None,
               threads: int | None = None, rounds: int = 7, min_time_s: float = 0.05, warmup: int = 3) -> float:
    """Median wall time (ms) of one call of `program` on `inputs` (one batch: a tensor, a tuple of positional
    tensors, a dict of keyword tensors or an object with .args/.kwargs), measured as `compare_latency` does:
    deployed module, inference mode, fixed threads, warm-up, calibrated repeats, median over `rounds`."""
    _check(rounds, min_time_s, warmup, threads)
    dev = _device(device)
    n_threads = threads if threads is not None else torch.get_num_threads()
    times, _ = _timings({"program": program}, {0: inputs}, dev, n_threads, rounds, min_time_s, warmup)
    return statistics.median(times["program"][0]) * 1e3
