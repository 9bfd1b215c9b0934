"""The service's performance targets (issue 3, "Performance"), measured on loopback.

1. getjob    GetJob with 32 concurrent clients against an API server (`build_server`, a fresh temporary
             Postgres database migrated to head, so with the job cache that LISTEN/NOTIFY keeps fresh, a
             folder store, a no-op enqueue) running in its own process. The 32 clients run as 1 process x
             32 threads (one `prunery.client.Client` each), 2 x 16 and 4 x 8, since one Python process's
             GIL may cap what its threads can send, and as 1 x 32 and 2 x 16 asyncio tasks (a grpc.aio
             channel each). Each layout hammers GetJob on one QUEUED job for --seconds; calls/s and
             p50/p99 latency of the calls that completed inside the window. Target: >= 2000 calls/s,
             p99 < 20 ms.
             Then the same with 500 WatchJob streams held open by another tenant (a process of its own,
             one grpc.aio channel): the asyncio layouts again, and the API process's RSS growth from
             before the streams opened to its peak while they were open. Targets (issue 10): >= 1500
             calls/s, p99 < 30 ms, RSS growth < 100 MB.
             The API runs with PRUNERY_TENANT_RATE=0: these figures are the server's capacity, which
             a tenant's own call-rate limit (2000/s, bursts of 4000, by default) would otherwise cap; the
             last line of the section runs the default limit and prints what it answered and refused.
             Several API processes on one port (grpc.so_reuseport) are NOT measured: `build_server`
             binds with `grpc.so_reuseport=0`, so a second process cannot share the port without a code
             change.
2. transfer  Upload and download of a --size-mib artifact (default 1 GiB, random bytes streamed to a temp
             file) through the client, against `prunery serve` in a subprocess (temporary Postgres, folder
             store). MB/s (10^6 bytes) each way, end to end as a user sees it (the client hashes the file
             as it sends it; the server hashes it and has it on disk, fsynced, before it answers); the API
             process's RSS growth over its RSS before the transfer, from /proc/PID/status (VmRSS sampled
             every 10 ms, and VmHWM). Targets: >= 200 MB/s each way, RSS growth < 100 MB.
3. overhead  A `resnet_basic` job through the embedded stack (`prunery up --port 0`, SQLite, one worker)
             against the same prune run locally: local is load_program + prune + torch.export.save in this
             process (one warm-up, median of 3); service is upload + create + wait + download of the
             pruned model (one warm-up job, median of 3). Target: difference < 1 s. The service time is
             broken down with the job's create/start/end times and its WatchJob events.

Everything started here (servers, workers, temporary databases and files) is stopped and removed on the
way out, on failure and on SIGTERM too.

    python benchmarks/bench_service.py [--only getjob|transfer|overhead] [--seconds 10] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunery.client import Client, PruneryError, spec_from_options
from prunery.v1 import prunery_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `tests` (the zoo) is importable

MiB = 1 << 20
GETJOB_CALLS_S, GETJOB_P99_MS = 2000.0, 20.0
STREAMS, STREAMS_CALLS_S, STREAMS_P99_MS, STREAMS_RSS_MB = 500, 1500.0, 30.0, 100.0
TRANSFER_MB_S, TRANSFER_RSS_MB = 200.0, 100.0
OVERHEAD_S = 1.0
# (client processes, clients each, kind): 32 clients in all. "threads": one `Client` per thread; "asyncio": one
# grpc.aio channel per task in one event loop (no GIL hand-offs between 32 threads on the client side)
LAYOUTS = ((1, 32, "threads"), (2, 16, "threads"), (4, 8, "threads"), (1, 32, "asyncio"), (2, 16, "asyncio"))


@dataclass
class Outcome:
    section: str
    line: str
    ok: bool


RESULTS: list[Outcome] = []


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def report(section: str, line: str, ok: bool) -> None:
    line = f"{line}: {verdict(ok)}"
    RESULTS.append(Outcome(section, line, ok))
    print(line, flush=True)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------------------------------------------
# Processes we start: always stopped on the way out
# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def managed_popen(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """A subprocess in its own session; SIGTERM on exit (it stops what it started), then SIGKILL to its
    process group if it (or a child of it) lingers."""
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this one group only (its pgid is its pid)


@contextlib.contextmanager
def managed_mp(process: mp.process.BaseProcess) -> Iterator[mp.process.BaseProcess]:
    """A child process, joined on the way out (given 15 s to finish), or terminated at once on an error."""
    process.start()
    clean = False
    try:
        yield process
        clean = True
    finally:
        if clean and process.is_alive():
            process.join(15)
        if process.is_alive():
            process.terminate()
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


@contextlib.contextmanager
def migrated_postgres() -> Iterator[str]:
    from prunery.service.store import db
    from prunery.service.store.testing import temporary_postgres_database

    with temporary_postgres_database(prefix="prunery_bench") as url:
        db.upgrade(url)
        yield url


def wait_for_line(path: Path, pattern: re.Pattern[str], proc: subprocess.Popen, timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = pattern.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with code {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args} printed nothing matching {pattern.pattern!r} within {timeout_s:.0f}s")


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------
# 1. GetJob throughput and latency
# ---------------------------------------------------------------------------------------------------------

def _noop_enqueue(job_id: str, queue: str) -> None:
    """The injected enqueue: jobs stay QUEUED; no broker is involved."""


def _api_server_process(db_url: str, data_dir: str, ready: Any, stop: Any, tenant_rate: float | None = None
                        ) -> None:
    """Child process: the API from `build_server` on a free loopback port until `stop` is set; settings from
    the environment as `prunery serve` reads them (the call-rate limit overridden when given)."""
    from prunery.service.api.server import build_server
    from prunery.service.api.settings import Settings

    overrides: dict[str, Any] = {} if tenant_rate is None else {"tenant_rate": tenant_rate}
    settings = Settings.from_env(data_dir=Path(data_dir), database_url=db_url,
                                 store_url=(Path(data_dir) / "objects").as_uri(), listen_address="127.0.0.1:0",
                                 metrics_port=None, **overrides)
    server = build_server(settings, enqueue=_noop_enqueue)
    server.start()
    ready.put((os.getpid(), server.port))
    stop.wait()
    server.stop(1).wait(10)


def _getjob_client_process(address: str, token: str, job: str, threads: int, ready: Any, go: Any,
                           window: Any, results: Any) -> None:
    """Child process: `threads` clients, each warmed up, then calling GetJob back to back in the window the
    parent sets; sends back the latencies (s) of the calls that completed inside it, and error count."""
    barrier = threading.Barrier(threads + 1)
    start = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    failures: list[str] = []

    def run(i: int) -> None:
        try:
            with Client(address, token, timeout=10.0) as client:
                for _ in range(20):
                    client.get_job(job)
                barrier.wait()
                start.wait()
                t_start, t_end = window[0], window[1]
                while time.monotonic() < t_start:
                    time.sleep(0.0005)
                mine = latencies[i]
                while True:
                    t0 = time.monotonic()
                    try:
                        client.get_job(job)
                    except PruneryError:
                        errors[i] += 1
                    t1 = time.monotonic()
                    if t1 > t_end:
                        break
                    mine.append(t1 - t0)
        except Exception as e:  # reported to the parent, never swallowed
            failures.append(f"{type(e).__name__}: {e}")
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        ready.put(f"client warm-up failed: {failures[:3]}")
        return
    ready.put(os.getpid())
    go.wait()
    start.set()
    for t in pool:
        t.join()
    results.put(([x for lst in latencies for x in lst], sum(errors), failures))


def _getjob_aio_client_process(address: str, token: str, job: str, tasks: int, ready: Any, go: Any,
                               window: Any, results: Any) -> None:
    """Child process: `tasks` asyncio clients (a grpc.aio channel each), otherwise as `_getjob_client_process`."""
    import asyncio
    import gc

    import grpc

    from prunery.v1 import prunery_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {token}"),)
    request = pb.GetJobRequest(name=job)

    async def main() -> None:
        channels = [grpc.aio.insecure_channel(address) for _ in range(tasks)]
        stubs = [pb_grpc.JobServiceStub(ch) for ch in channels]
        errors = 0
        try:
            for stub in stubs:
                for _ in range(20):
                    await stub.GetJob(request, timeout=10.0, metadata=metadata)
        except Exception as e:
            ready.put(f"client warm-up failed: {type(e).__name__}: {e}")
            return
        gc.collect()
        gc.freeze()  # the load generator's own collector pauses are not the server's latency
        ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        t_start, t_end = window[0], window[1]
        await asyncio.sleep(max(0.0, t_start - time.monotonic()))

        async def run(stub: Any, mine: list[float]) -> None:
            nonlocal errors
            while True:
                t0 = time.monotonic()
                try:
                    await stub.GetJob(request, timeout=10.0, metadata=metadata)
                except grpc.aio.AioRpcError:
                    errors += 1
                t1 = time.monotonic()
                if t1 > t_end:
                    return
                mine.append(t1 - t0)

        latencies: list[list[float]] = [[] for _ in stubs]
        await asyncio.gather(*(run(stub, mine) for stub, mine in zip(stubs, latencies, strict=True)))
        for ch in channels:
            await ch.close()
        results.put(([x for lst in latencies for x in lst], errors, []))

    asyncio.run(main())


def _hold_streams_process(address: str, token: str, job: str, n: int, ready: Any, stop: Any) -> None:
    """Child process: `n` WatchJob streams on one QUEUED job, held open (each has had its first event) until
    `stop` is set."""
    import asyncio

    import grpc

    from prunery.v1 import prunery_pb2_grpc as pb_grpc

    async def main() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.JobServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            calls = [stub.WatchJob(pb.WatchJobRequest(name=job), metadata=metadata) for _ in range(n)]
            try:
                for call in calls:
                    await call.read()
            except Exception as e:
                ready.put(f"streams failed: {type(e).__name__}: {e}")
                return
            ready.put(os.getpid())
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            for call in calls:
                call.cancel()

    asyncio.run(main())


def _run_layouts(ctx: Any, address: str, token: str, job: str, server_pid: int, seconds: float,
                 layouts: tuple[tuple[int, int, str], ...]) -> list[tuple[str, float, float, float, int]]:
    """GetJob from each client layout for `seconds`: (label, calls/s, p50 ms, p99 ms, errors) per layout."""
    out = []
    for n_proc, n_clients, kind in layouts:
        label = f"{n_proc} process{'es' if n_proc > 1 else ''} x {n_clients} {kind}"
        target = _getjob_client_process if kind == "threads" else _getjob_aio_client_process
        c_ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
        window = ctx.Array("d", 2, lock=False)
        with contextlib.ExitStack() as clients:
            procs = [clients.enter_context(managed_mp(ctx.Process(
                target=target, args=(address, token, job, n_clients, c_ready, go, window, results), daemon=True)))
                for _ in range(n_proc)]
            for _ in procs:
                msg = c_ready.get(timeout=120)
                if isinstance(msg, str):
                    raise RuntimeError(msg)
            t0 = time.monotonic() + 0.2
            window[0], window[1] = t0, t0 + seconds
            go.set()
            time.sleep(max(0.0, t0 - time.monotonic()))
            cpu0 = proc_cpu_s(server_pid)
            time.sleep(seconds)
            cpu1 = proc_cpu_s(server_pid)
            latencies: list[float] = []
            errors, failures = 0, []
            for _ in procs:
                lat, err, fail = results.get(timeout=120)
                latencies.extend(lat)
                errors += err
                failures.extend(fail)
        if failures:
            raise RuntimeError(f"GetJob clients ({label}) failed: {failures[:3]}")
        latencies.sort()
        rate = (len(latencies) - errors) / seconds
        p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
        print(f"  [{label}] {len(latencies)} calls, {errors} errors; API process CPU "
              f"{(cpu1 - cpu0) / seconds:.0%} of one core (2 cores shared with the clients)", flush=True)
        out.append((label, rate, p50, p99, errors))
    return out


@contextlib.contextmanager
def _api(ctx: Any, url: str, tmp: Path, tenant_rate: float | None) -> Iterator[tuple[int, str]]:
    ready, stop = ctx.Queue(), ctx.Event()
    api = ctx.Process(target=_api_server_process, args=(url, str(tmp), ready, stop, tenant_rate), daemon=True)
    with managed_mp(api):
        try:
            server_pid, port = ready.get(timeout=60)
            yield server_pid, f"127.0.0.1:{port}"
        finally:
            stop.set()


def _queued_job(address: str, token: str, tmp: Path) -> str:
    model = tmp / "model.pt2"
    model.write_bytes(os.urandom(4096))  # the API never opens the file; a worker would
    with Client(address, token) as client:
        artifact = client.upload(model)
        return client.create_job(spec_from_options(artifact.name, 0.5)).name


def bench_getjob(args: argparse.Namespace) -> None:
    print(f"\n== 1. GetJob, 32 concurrent clients, {args.seconds:.0f} s per layout ==", flush=True)
    from prunery.service.store import tokens

    ctx = mp.get_context("spawn")  # never fork a process that holds gRPC state
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(migrated_postgres())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prunery-bench-getjob-")))
        token = tokens.create(url, "bench", "bench_service getjob")
        flooder = tokens.create(url, "flooder", "bench_service getjob: holds the streams")
        server_pid, address = stack.enter_context(_api(ctx, url, tmp, tenant_rate=0))
        job = _queued_job(address, token, tmp)
        flooded_job = _queued_job(address, flooder, tmp)
        print(f"API server pid {server_pid} at {address} (build_server: grpc.aio, Postgres, no-op enqueue, "
              f"PRUNERY_TENANT_RATE=0); polling {job}", flush=True)

        best: tuple[str, float, float, float, int] | None = None
        for label, rate, p50, p99, _errors in _run_layouts(ctx, address, token, job, server_pid, args.seconds,
                                                          LAYOUTS):
            ok = rate >= GETJOB_CALLS_S and p99 < GETJOB_P99_MS
            report("getjob", f"GetJob [1 API process; clients: {label}]: {rate:.0f} calls/s (target >= "
                   f"{GETJOB_CALLS_S:.0f}), p50 {p50:.1f} ms, p99 {p99:.1f} ms (target < {GETJOB_P99_MS:.0f} ms)",
                   ok)
            if best is None or rate > best[1]:
                best = (label, rate, p50, p99, _errors)
        assert best is not None
        print(f"best layout: {best[0]} ({best[1]:.0f} calls/s)", flush=True)

        # the same with another tenant's 500 open WatchJob streams
        s_ready, s_stop = ctx.Queue(), ctx.Event()
        holder = ctx.Process(target=_hold_streams_process,
                             args=(address, flooder, flooded_job, STREAMS, s_ready, s_stop), daemon=True)
        with RssSampler(server_pid) as rss, managed_mp(holder):
            try:
                msg = s_ready.get(timeout=120)
                if isinstance(msg, str):
                    raise RuntimeError(msg)
                streamed = _run_layouts(ctx, address, token, job, server_pid, args.seconds,
                                        tuple(layout for layout in LAYOUTS if layout[2] == "asyncio"))
            finally:
                s_stop.set()
        for label, rate, p50, p99, _errors in streamed:
            ok = rate >= STREAMS_CALLS_S and p99 < STREAMS_P99_MS
            report("getjob", f"GetJob with {STREAMS} open WatchJob streams of another tenant [clients: {label}]: "
                   f"{rate:.0f} calls/s (target >= {STREAMS_CALLS_S:.0f}), p50 {p50:.1f} ms, p99 {p99:.1f} ms "
                   f"(target < {STREAMS_P99_MS:.0f} ms)", ok)
        report("getjob", f"API RSS growth with {STREAMS} open streams and the GetJob load: {rss.growth_mb:.1f} MB "
               f"(target < {STREAMS_RSS_MB:.0f} MB; {rss.describe()})", rss.growth_mb < STREAMS_RSS_MB)

    # the default call-rate limit holds one tenant's flat-out polling at its rate, without errors elsewhere
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(migrated_postgres())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prunery-bench-getjob-")))
        token = tokens.create(url, "bench", "bench_service getjob")
        server_pid, address = stack.enter_context(_api(ctx, url, tmp, tenant_rate=None))
        job = _queued_job(address, token, tmp)
        [(label, rate, _p50, _p99, errors)] = _run_layouts(ctx, address, token, job, server_pid, args.seconds,
                                                           ((1, 32, "asyncio"),))
        from prunery.service.api.settings import Settings

        limit = Settings.from_env().tenant_rate
        print(f"with the default limit ({limit:.0f} calls/s per tenant): {rate:.0f} calls/s answered, "
              f"{errors / args.seconds:.0f}/s refused with RESOURCE_EXHAUSTED TENANT_RATE_LIMIT [{label}]", flush=True)


# ---------------------------------------------------------------------------------------------------------
# 2. Large upload and download
# ---------------------------------------------------------------------------------------------------------

class RssSampler:
    """Samples a process's VmRSS every `period_s` in a thread while in its `with` block."""

    def __init__(self, pid: int, period_s: float = 0.01) -> None:
        self.pid, self.period_s = pid, period_s
        self.before_kib = self.peak_kib = self.hwm_before_kib = self.hwm_after_kib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self.before_kib = self.peak_kib = proc_status_kib(self.pid, "VmRSS")
        self.hwm_before_kib = proc_status_kib(self.pid, "VmHWM")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.hwm_after_kib = proc_status_kib(self.pid, "VmHWM")
        self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
        if self.hwm_after_kib > self.hwm_before_kib:  # a new high-water mark was set during the block
            self.peak_kib = max(self.peak_kib, self.hwm_after_kib)

    @property
    def growth_mb(self) -> float:
        return (self.peak_kib - self.before_kib) * 1024 / 1e6

    def describe(self) -> str:
        return (f"VmRSS before {self.before_kib / 1024:.0f} MiB, peak {self.peak_kib / 1024:.0f} MiB; "
                f"VmHWM {self.hwm_before_kib / 1024:.0f} -> {self.hwm_after_kib / 1024:.0f} MiB")


def write_random_file(path: Path, size: int, block: int = 4 * MiB) -> str:
    """Stream `size` random bytes to `path` a block at a time; returns the sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def bench_transfer(args: argparse.Namespace) -> None:
    size = args.size_mib * MiB
    print(f"\n== 2. Upload and download of {args.size_mib} MiB ({size / 1e6:.0f} MB) through the client ==",
          flush=True)
    from prunery.service.store import tokens

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(migrated_postgres())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prunery-bench-transfer-")))
        token = tokens.create(url, "bench", "bench_service transfer")
        env = dict(os.environ, PRUNERY_DATA_DIR=str(tmp / "data"), PRUNERY_DATABASE_URL=url,
                   PRUNERY_STORE_URL=(tmp / "objects").as_uri(), PRUNERY_LISTEN_ADDRESS="127.0.0.1:0",
                   PRUNERY_MIGRATE="1", PRUNERY_METRICS_PORT="0", PRUNERY_TENANT_CAP_BYTES=str(max(8 << 30, 2 * size)))
        log = tmp / "serve.log"
        with log.open("wb") as log_f:
            serve = stack.enter_context(managed_popen([sys.executable, "-m", "prunery.cli", "serve"], env=env,
                                                      stdout=log_f, stderr=subprocess.STDOUT))
        m = wait_for_line(log, re.compile(r"Prunery API on (\S+:\d+)"), serve, 120)
        address = m.group(1)
        print(f"`prunery serve` pid {serve.pid} at {address}, folder store in {tmp / 'objects'}", flush=True)

        t0 = time.monotonic()
        src = tmp / "big.bin"
        sha = write_random_file(src, size)
        print(f"wrote {src} ({size / 1e6:.0f} MB random) in {time.monotonic() - t0:.1f}s", flush=True)
        t0 = time.monotonic()
        file_sha256(src)
        hash_s = time.monotonic() - t0

        with Client(address, token) as client:
            warm = tmp / "warm.bin"  # a small round trip first: one-time costs are not the transfer's
            write_random_file(warm, 8 * MiB)
            warm_artifact = client.upload(warm)
            client.download(warm_artifact.name, tmp / "warm.out")

            with RssSampler(serve.pid) as up_rss:
                t0 = time.monotonic()
                artifact = client.upload(src)
                up_s = time.monotonic() - t0
            if artifact.size_bytes != size or artifact.sha256 != sha:
                raise RuntimeError(f"uploaded artifact mismatch: {artifact.size_bytes} bytes, sha256 {artifact.sha256}")
            up_rate = size / 1e6 / up_s
            report("transfer", f"Upload: {up_rate:.0f} MB/s (target >= {TRANSFER_MB_S:.0f}), {size / 1e6:.0f} MB in "
                   f"{up_s:.2f}s, API RSS +{up_rss.growth_mb:.1f} MB (target < {TRANSFER_RSS_MB:.0f} MB)",
                   up_rate >= TRANSFER_MB_S and up_rss.growth_mb < TRANSFER_RSS_MB)
            print(f"  {up_rss.describe()}; the client hashes the file as it sends it (a sha256 pass alone: "
                  f"{hash_s:.2f}s, {size / 1e6 / hash_s:.0f} MB/s)", flush=True)

            out = tmp / "big.out"
            with RssSampler(serve.pid) as down_rss:
                t0 = time.monotonic()
                client.download(artifact.name, out)
                down_s = time.monotonic() - t0
            down_rate = size / 1e6 / down_s
            report("transfer", f"Download: {down_rate:.0f} MB/s (target >= {TRANSFER_MB_S:.0f}), {size / 1e6:.0f} MB "
                   f"in {down_s:.2f}s, API RSS +{down_rss.growth_mb:.1f} MB (target < {TRANSFER_RSS_MB:.0f} MB)",
                   down_rate >= TRANSFER_MB_S and down_rss.growth_mb < TRANSFER_RSS_MB)
            print(f"  {down_rss.describe()}", flush=True)
            if out.stat().st_size != size or file_sha256(out) != sha:
                raise RuntimeError("the downloaded file differs from the uploaded one")
            print("  downloaded file verified (size and sha256)", flush=True)


# ---------------------------------------------------------------------------------------------------------
# 3. Overhead of a job through the service
# ---------------------------------------------------------------------------------------------------------

def ts(t: Any) -> float:
    """A google.protobuf.Timestamp as Unix seconds."""
    return t.seconds + t.nanos / 1e9


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    value = fn()
    return time.monotonic() - t0, value


def bench_overhead(args: argparse.Namespace) -> None:
    print("\n== 3. A resnet_basic job through the service (prunery up) vs the same prune locally ==", flush=True)
    import torch

    from prunery.core import PruneConfig, load_program, prune
    from tests import zoo

    ratio = 0.5
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prunery-bench-overhead-")))
        log = tmp / "up.log"
        with log.open("wb") as log_f:
            up = stack.enter_context(managed_popen(
                [sys.executable, "-m", "prunery.cli", "up", "--data-dir", str(tmp / "service"), "--port", "0"],
                stdout=log_f, stderr=subprocess.STDOUT))
        model = tmp / "resnet_basic.pt2"
        torch.export.save(zoo.export("resnet_basic"), model)
        print(f"exported resnet_basic to {model} ({model.stat().st_size / 1e6:.2f} MB)", flush=True)
        address = wait_for_line(log, re.compile(r"^address: (\S+)$", re.M), up, 120).group(1)
        token = wait_for_line(log, re.compile(r"^token: (\S+)$", re.M), up, 30).group(1)
        print(f"`prunery up` pid {up.pid} at {address}", flush=True)

        def local(i: int) -> float:
            out = tmp / f"local-{i}.pt2"
            t0 = time.monotonic()
            result = prune(load_program(model), PruneConfig(ratio=ratio))
            torch.export.save(result.program, out)
            return time.monotonic() - t0

        local_first = local(0)
        local_times = [local(i) for i in (1, 2, 3)]
        local_s = statistics.median(local_times)
        print(f"local load_program + prune + save: first {local_first:.3f}s, then "
              f"{', '.join(f'{t:.3f}' for t in local_times)}s (median {local_s:.3f}s)", flush=True)

        def through_service(client: Client, i: int) -> dict[str, Any]:
            events: list[pb.JobEvent] = []
            t_begin = time.time()
            up_s, artifact = timed(lambda: client.upload(model))
            create_s, job = timed(lambda: client.create_job(spec_from_options(artifact.name, ratio)))
            wait_s, job = timed(lambda: client.wait(job.name, on_event=events.append))
            t_waited = time.time()
            if job.state != pb.SUCCEEDED:
                raise RuntimeError(f"{job.name} ended {pb.JobState.Name(job.state)}: {job.error.message}")
            down_s, _ = timed(lambda: client.download(f"{job.name}/model", tmp / f"service-{i}.pt2"))
            total = up_s + create_s + wait_s + down_s
            created, started, ended = ts(job.create_time), ts(job.start_time), ts(job.end_time)
            stages: dict[str, float] = {}
            prev = None
            for ev in events:  # time from each stage's event to the next event
                if prev is not None and prev.stage:
                    stages[prev.stage] = stages.get(prev.stage, 0.0) + ts(ev.time) - ts(prev.time)
                prev = ev
            return dict(total=total, upload=up_s, create=create_s, wait=wait_s, download=down_s,
                        queue=started - created, run=ended - started, notify=t_waited - ended,
                        before_create=created - t_begin, stages=stages, attempts=job.attempt_count)

        with Client(address, token, timeout=60.0) as client:
            warm_s = through_service(client, 0)["total"]
            print(f"warm-up job through the service: {warm_s:.3f}s (includes the worker's start-up)", flush=True)
            runs = [through_service(client, i) for i in (1, 2, 3)]
        runs.sort(key=lambda r: r["total"])
        median = runs[1]
        diff = median["total"] - local_s
        report("overhead", f"Job overhead: service {median['total']:.3f}s - local {local_s:.3f}s = {diff:.3f}s "
               f"(target < {OVERHEAD_S:.0f} s)", diff < OVERHEAD_S)
        print("  service runs (s), sorted by total:", flush=True)
        for r in runs:
            stage_text = ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items())
            print(f"    total {r['total']:.3f} = upload {r['upload']:.3f} + create {r['create']:.3f} + wait "
                  f"{r['wait']:.3f} + download {r['download']:.3f}; wait = queue {r['queue']:.3f} "
                  f"(create_time -> start_time) + run {r['run']:.3f} (start_time -> end_time) + end seen by client "
                  f"{r['notify']:.3f}; stages: {stage_text}; attempts {r['attempts']}", flush=True)


# ---------------------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "getjob": bench_getjob, "transfer": bench_transfer, "overhead": bench_overhead}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    p.add_argument("--seconds", type=float, default=10.0, help="GetJob: seconds per client layout")
    p.add_argument("--size-mib", type=int, default=1024, help="transfer: artifact size in MiB")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.size_mib <= 0:
        p.error("--seconds and --size-mib must be positive")

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    t_start = time.monotonic()
    failed: list[str] = []
    for name, fn in SECTIONS.items():
        if args.only and name != args.only:
            continue
        print(f"\n[{name}: load average {os.getloadavg()[0]:.2f} before the section]", end="", flush=True)
        try:
            fn(args)
        except Exception as e:
            failed.append(name)
            print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
    print(f"\n== summary (wall {time.monotonic() - t_start:.0f}s, load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} cores) ==")
    for r in RESULTS:
        print(r.line)
    for name in failed:
        print(f"{name}: ERROR (see above)")
    met = sum(r.ok for r in RESULTS)
    print(f"targets met: {met}/{len(RESULTS)}" + (f"; sections failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
