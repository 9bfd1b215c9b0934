"""The fault suite (issue 10): the API (`prunery serve`) and two workers (`celery worker`) on a Postgres and a Redis
of the test's own (random ports, a temporary folder), a folder object store; a batch of jobs submitted through
`prunery.client.Client` with its default settings, one thread per caller; during the batch one fault:

- worker_sigkill   SIGKILL one worker (its main process and its job process) while it runs a job; start it again
- redis_restart    stop Redis, start a new one on the same port ~3 s later (`--save ""`: the queue and the unacked
                   messages are LOST; the reaper has to send them again)
- postgres_restart stop Postgres (immediate), start it again ~4 s later
- api_sigkill      SIGKILL the API, start it again on the same port ~6 s later
- redis_long_outage  as redis_restart, Redis away for ~12 s: longer than the reaper's wait before it resends
                   (PRUNERY_RESEND_QUEUED_S, 3 s here) and than the API's first retries of the sends that failed

Every job must end SUCCEEDED exactly once (one SUCCEEDED event, one set of outputs: a MODEL and a REPORT artifact,
READY, and exactly those objects in the store; no PENDING artifact left; no job created twice) and no caller may
see any error. Each case runs with and without `PRUNERY_BROKER_KEYPREFIX` (the long Redis outage with it only);
throughout, the messages outstanding per
job (queue lists + unacked hash, read independently of the product's code: `tests.workers.redis_outstanding`) are
sampled every ~100 ms, and no job may ever have more than one.

The time to recover is printed per case: from the moment the dependency is back (process restarted and accepting)
to the first successful client call, to the first job event, and to the first claim of a job; and until the batch
is done. `benchmarks/bench_faults.py` runs the same scenarios (`run_scenario`) and prints the same figures.

Run it alone: `python -m pytest tests/e2e/test_faults.py -m slow -s` (each case ~40-60 s on 2 cores).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from sqlalchemy import select

from prunery.client import Client, spec_from_options
from prunery.service.store import db, tokens
from prunery.service.store.db import Artifact, Database, Job, JobEvent
from prunery.service.store.jobs import RESENT
from prunery.service.store.objectstore import FolderStore
from prunery.service.store.testing import free_port
from prunery.v1 import prunery_pb2 as pb
from tests.workers import FAST, PostgresCluster, WorkerProc, redis_outstanding

FAULTS = ("worker_sigkill", "redis_restart", "postgres_restart", "api_sigkill", "redis_long_outage")
# (fault, with PRUNERY_BROKER_KEYPREFIX): the cases of the suite and, by default, of benchmarks/bench_faults.py
CASES = [(f, kp) for f in FAULTS[:4] for kp in (False, True)] + [("redis_long_outage", True)]
TENANT = "faults"
QUEUE = "faults"
N_JOBS = 10
CREATE_EVERY_S = 0.6  # callers start one after another: creates go on through the fault
JOB_DELAY = {"prunery-test-delay": "prune=1.5"}  # ~2 s a job: the batch spans the fault (PRUNERY_TEST_HOOKS=1)
BATCH_TIMEOUT_S = 75.0
SAMPLE_EVERY_S = 0.1
# the suite's worker settings: FAST (short lease, heartbeat, reaper, visibility timeout) and a reaper that looks
# for lost messages of jobs QUEUED for 3 s (production: 120 s)
WORKER_ENV = {**FAST, "PRUNERY_RESEND_QUEUED_S": "3"}
PAUSE_S = {"worker_sigkill": 1.0, "redis_restart": 3.0, "postgres_restart": 4.0, "api_sigkill": 6.0,
           "redis_long_outage": 12.0}


# ---------------------------------------------------------------------------------------------------------
# Processes of our own: Redis, the API
# ---------------------------------------------------------------------------------------------------------

def _wait(what: str, ok: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
          log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode}" + (f":\n{_tail(log)}" if log else ""))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f}s" + (f":\n{_tail(log)}" if log else ""))
        time.sleep(0.05)


def _tail(path: Path | None, n: int = 6000) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_bytes()[-n:].decode(errors="replace")


def _group_kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class RedisServer:
    """`redis-server --port N --save "" --appendonly no` on a free loopback port, as a subprocess: `stop()` ends it
    (everything it held is gone), `start()` starts a new one on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = self.root / "redis.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.root), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(f"redis-server on {self.port}", self.accepting, 20, self.proc, self.log)

    def accepting(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class ApiProc:
    """`python -m prunery.cli serve` on a fixed port (so it can be killed and started again there)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**env, "PRUNERY_LISTEN_ADDRESS": self.address, "PRUNERY_METRICS_PORT": "0"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "prunery.cli", "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait(f"the API on {self.address}", self.accepting, timeout, self.proc, self.log)

    def accepting(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        if self.proc is not None:
            _group_kill(self.proc)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _group_kill(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        _group_kill(self.proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# ---------------------------------------------------------------------------------------------------------
# The stack: Postgres, Redis, a folder store, the API and two workers
# ---------------------------------------------------------------------------------------------------------

class FaultStack:
    """Everything of one case, in `root`; `close()` stops it all (on failure too)."""

    def __init__(self, root: Path, *, keyprefix: bool) -> None:
        self.root = root
        self.data_dir = root / "data"  # the workers' logs and metrics (WorkerProc), scratch space
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"faults-{uuid.uuid4().hex[:8]}:" if keyprefix else ""
        self.queue = QUEUE
        self.workers: dict[str, WorkerProc] = {}
        self.retired: list[WorkerProc] = []
        self.pg: PostgresCluster | None = None
        self.redis: RedisServer | None = None
        self.api: ApiProc | None = None
        self.db: Database | None = None
        self._cleanup = contextlib.ExitStack()
        try:
            self.pg = PostgresCluster()
            self._cleanup.callback(self.pg.close)
            self.pg.start()
            db.upgrade(self.pg.url)
            self.db = Database(self.pg.url)
            self._cleanup.callback(self.db.dispose)
            self.token = tokens.create(self.pg.url, TENANT)
            self.redis = RedisServer(root / "redis")
            self._cleanup.callback(self.redis.stop)
            self.redis.start()
            self.store = FolderStore(root / "objects")
            self.api = ApiProc(self.env(), root / "api.log")
            self._cleanup.callback(self.api.stop)
            for name in ("w1", "w2"):
                self.start_worker(name)
            self.api.start()
            for worker in self.workers.values():
                worker.wait_ready()
        except BaseException:
            self.close()
            raise

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the API and the workers (WorkerProc calls this with its own extras)."""
        assert self.pg is not None and self.redis is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PRUNERY_", "PROMETHEUS_"))}
        env.update(WORKER_ENV)
        env.update(PRUNERY_DATA_DIR=str(self.data_dir), PRUNERY_DATABASE_URL=self.pg.url,
                   PRUNERY_STORE_URL=(self.root / "objects").as_uri(), PRUNERY_BROKER_URL=self.redis.url,
                   PRUNERY_QUEUE=self.queue, PRUNERY_TMP_DIR=str(self.data_dir / "tmp"))
        if self.prefix:
            env["PRUNERY_BROKER_KEYPREFIX"] = self.prefix
        env.update(extra)
        return env

    def start_worker(self, name: str) -> WorkerProc:
        worker = WorkerProc(name, self, free_port(), self.queue, {})  # type: ignore[arg-type]  # duck-typed stack
        self.workers[name.split("-")[0]] = worker
        self._cleanup.callback(worker.stop)
        return worker

    def logs(self) -> str:
        parts = [f"--- api\n{_tail(self.api.log if self.api else None)}"]
        for worker in [*self.retired, *self.workers.values()]:
            parts.append(f"--- worker {worker.name}\n{worker.log_tail()}")
        if self.redis is not None:
            parts.append(f"--- redis\n{_tail(self.redis.log, 1500)}")
        return "\n".join(parts)

    def close(self) -> None:
        self._cleanup.close()


# ---------------------------------------------------------------------------------------------------------
# One scenario: the batch, the fault, the checks
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    fault: str
    keyprefix: bool
    jobs: list[str] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the once-checks that failed
    notes: list[str] = field(default_factory=list)
    fault_at: float | None = None  # time.time()
    back_at: float | None = None
    recover_call_s: float | None = None  # back -> first successful client call completed after it
    recover_event_s: float | None = None  # back -> first job event recorded after it
    recover_claim_s: float | None = None  # back -> first claim of a job after it
    drain_s: float | None = None  # back -> the batch's last SUCCEEDED
    victim: str | None = None  # worker_sigkill: the job the killed worker was running
    victim_rerun_s: float | None = None  # the kill -> that job claimed again
    resent: int = 0  # messages the reaper found lost and sent again (RESENT events)
    requeued: int = 0  # jobs whose lease expired, queued again
    max_outstanding: int = 0
    outstanding_samples: int = 0
    violations: list[str] = field(default_factory=list)  # samples with a job holding more than one message
    wall_s: float = 0.0
    logs: str = ""

    @property
    def succeeded_once(self) -> bool:
        return not self.problems

    @property
    def no_client_error(self) -> bool:
        return not self.client_errors

    @property
    def one_message(self) -> bool:
        return not self.violations

    @property
    def ok(self) -> bool:
        return self.succeeded_once and self.no_client_error and self.one_message

    def name(self) -> str:
        return f"{self.fault}{' with PRUNERY_BROKER_KEYPREFIX' if self.keyprefix else ''}"

    def recovery_line(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        victim = f"; the killed job claimed again {s(self.victim_rerun_s)} after the kill" if self.victim else ""
        return (f"{self.name()}: recovery after the dependency was back: first client call {s(self.recover_call_s)}, "
                f"first job event {s(self.recover_event_s)}, first claim {s(self.recover_claim_s)}, batch done "
                f"{s(self.drain_s)}{victim}; {self.requeued} lease(s) expired, {self.resent} lost message(s) resent; "
                f"max messages per job {self.max_outstanding} ({self.outstanding_samples} samples); "
                f"wall {self.wall_s:.1f}s")

    def describe(self) -> str:
        lines = [self.recovery_line()]
        lines += [f"caller error: {e}" for e in self.client_errors]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"more than one message: {v}" for v in self.violations[:20]]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Recorder:
    """What the callers saw: when each call succeeded, and every error."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.successes: list[tuple[float, str]] = []
        self.errors: list[str] = []

    def ok(self, what: str) -> None:
        with self.lock:
            self.successes.append((time.time(), what))

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


class _Sampler(threading.Thread):
    """Reads the messages outstanding per job from Redis every SAMPLE_EVERY_S (a Redis down is skipped)."""

    def __init__(self, stack: FaultStack) -> None:
        super().__init__(name="outstanding-sampler", daemon=True)
        assert stack.redis is not None
        self.stack = stack
        self.stop_event = threading.Event()
        self.samples = 0
        self.max_per_job: Counter[str] = Counter()
        self.violations: list[str] = []

    def run(self) -> None:
        assert self.stack.redis is not None
        client = redis.Redis(port=self.stack.redis.port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            while not self.stop_event.wait(SAMPLE_EVERY_S):
                try:
                    found = redis_outstanding(client, self.stack.prefix, self.stack.queue)
                except redis.RedisError:
                    continue
                self.samples += 1
                over = {job: n for job, n in found.items() if n > 1}
                for job, n in found.items():
                    self.max_per_job[job] = max(self.max_per_job[job], n)
                if over and len(self.violations) < 200:
                    try:
                        where = _where_messages(client, self.stack.prefix, self.stack.queue)
                    except redis.RedisError:
                        where = {}
                    for job, n in over.items():
                        self.violations.append(f"{datetime.now().isoformat(timespec='milliseconds')} job {job}: "
                                               f"{n} messages ({', '.join(where.get(job, []))})")
        finally:
            client.close()


def _where_messages(client: redis.Redis, prefix: str, queue: str) -> dict[str, list[str]]:
    """Where each job's messages are, for the report of a job holding more than one: `queue:<task id>` or
    `unacked:<task id>` (the task id tells a resent message from a restored or retried one)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.lrange(prefix + queue, 0, -1)
        pipe.hvals(prefix + "unacked")
        waiting, taken = pipe.execute()
    found: dict[str, list[str]] = {}

    def add(where: str, message: dict[str, Any]) -> None:
        headers = message.get("headers") or {}
        if headers.get("task") != "prunery.run_job":
            return
        args = json.loads(base64.b64decode(message["body"]))[0]
        eta = f" eta {headers['eta']}" if headers.get("eta") else ""
        found.setdefault(str(args[0]), []).append(f"{where}:{str(headers.get('id'))[:8]}{eta}")

    for raw in waiting:
        add("queue", json.loads(raw))
    for raw in taken:
        add("unacked", json.loads(raw)[0])
    return found


def _caller(address: str, token: str, model: str, index: int, t0: float, rec: _Recorder, created: list[str | None],
            outcomes: dict[int, str], clients: list[Client]) -> None:
    """One caller: create a job, wait for its end, with the client's default settings."""
    client = Client(address, token)
    clients.append(client)
    try:
        time.sleep(max(0.0, t0 + index * CREATE_EVERY_S - time.monotonic()))
        job = client.create_job(spec_from_options(model, 0.5), labels=dict(JOB_DELAY))
        rec.ok("CreateJob")
        created[index] = job.name
        done = client.wait(job.name, on_event=lambda _e: rec.ok("WatchJob event"))
        rec.ok("GetJob")
        outcomes[index] = pb.JobState.Name(done.state)
        if done.state != pb.SUCCEEDED:
            rec.error(f"caller {index}: {job.name} ended {pb.JobState.Name(done.state)}: {done.error.message}")
    except Exception as e:  # any error at all fails the case
        rec.error(f"caller {index} ({created[index] or 'no job yet'}): {type(e).__name__}: {e}\n"
                  f"{traceback.format_exc(limit=4)}")


def _prober(address: str, token: str, rec: _Recorder, stop: threading.Event, clients: list[Client]) -> None:
    """A caller listing jobs every 0.25 s (ListJobs reads the database): the first call after a fault."""
    client = Client(address, token)
    clients.append(client)
    try:
        while not stop.wait(0.25):
            next(iter(client.list_jobs(page_size=1)), None)
            rec.ok("ListJobs")
    except Exception as e:
        if not stop.is_set():
            rec.error(f"prober: {type(e).__name__}: {e}")


def _jobs(stack: FaultStack) -> list[Job]:
    assert stack.db is not None
    with stack.db.session() as s:
        return list(s.scalars(select(Job).where(Job.tenant_id == TENANT)))


def _wait_for(what: str, ok: Callable[[], bool], timeout: float, rec: _Recorder) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except Exception:  # noqa: S110 - the database may be away for a moment; the condition is read again
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fault's moment never came: {what} within {timeout:.0f}s "
                               f"(caller errors so far: {rec.errors[:3]})")
        time.sleep(0.05)


def _inject(fault: str, stack: FaultStack, rec: _Recorder, result: ScenarioResult) -> None:
    """Wait for the fault's moment in the batch, inject it, bring the dependency back; set fault_at/back_at."""
    assert stack.pg is not None and stack.redis is not None and stack.api is not None
    if fault == "worker_sigkill":
        w1 = stack.workers["w1"]
        victim: list[Job] = []

        def w1_mid_job() -> bool:
            running = [j for j in _jobs(stack) if j.state == "RUNNING" and j.stage in ("graph", "prune")
                       and j.lease_owner and w1.owns(int(j.lease_owner.split(":")[-2]))]
            victim[:] = running[:1]
            return bool(running)

        _wait_for("a job running on worker w1", w1_mid_job, 40, rec)
        result.fault_at = time.time()
        w1.kill()
        result.victim = str(victim[0].id)
        result.notes.append(f"killed worker w1 (pid {w1.proc.pid}) while it ran {victim[0].id} "
                            f"(stage {victim[0].stage})")
        stack.retired.append(w1)
        time.sleep(PAUSE_S[fault])
        stack.start_worker("w1-restarted").wait_ready()
        result.back_at = time.time()
        result.notes.append(f"killed job: {_job_line(stack, victim[0].id)}")
    elif fault in ("redis_restart", "redis_long_outage"):
        probe = redis.Redis(port=stack.redis.port, socket_timeout=1)

        # the long outage starts early in the batch: most jobs are created while Redis is away
        need = 2 if fault == "redis_restart" else 1

        def messages_waiting() -> bool:
            n = probe.llen(stack.prefix + stack.queue)
            return n >= need and sum(1 for j in _jobs(stack) if j.state == "RUNNING") >= 1

        try:
            _wait_for(f"{need} message(s) waiting in the queue and a job running", messages_waiting, 40, rec)
            waiting = probe.llen(stack.prefix + stack.queue)
            held = probe.hlen(stack.prefix + "unacked")
        finally:
            probe.close()
        result.fault_at = time.time()
        stack.redis.stop()
        result.notes.append(f"stopped Redis holding {waiting} waiting and {held} unacked messages (all lost)")
        time.sleep(PAUSE_S[fault])
        stack.redis.start()
        result.back_at = time.time()
    elif fault == "postgres_restart":
        def mid_batch() -> bool:
            js = _jobs(stack)
            return len(js) >= 4 and any(j.state == "RUNNING" and j.stage in ("graph", "prune") for j in js)

        _wait_for("four jobs created and one running", mid_batch, 40, rec)
        result.fault_at = time.time()
        stack.pg.stop()
        time.sleep(PAUSE_S[fault])
        stack.pg.start()  # pg_ctl -w: returns once it accepts connections
        result.back_at = time.time()
    elif fault == "api_sigkill":
        def mid_batch() -> bool:
            js = _jobs(stack)
            return len(js) >= 4 and any(j.state == "RUNNING" for j in js)

        _wait_for("four jobs created and one running", mid_batch, 40, rec)
        result.fault_at = time.time()
        stack.api.kill()
        time.sleep(PAUSE_S[fault])
        stack.api.start()
        result.back_at = time.time()
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _job_line(stack: FaultStack, job_id: uuid.UUID) -> str:
    assert stack.db is not None
    with stack.db.session() as s:
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.sequence)))
    return f"{job_id}: " + "; ".join(f"{e.sequence} {e.state}/{e.stage} {e.message[:80]}" for e in events)


def _check(stack: FaultStack, result: ScenarioResult, upload: str) -> None:
    """Every job SUCCEEDED exactly once, with one set of outputs; nothing created twice; no PENDING upload."""
    assert stack.db is not None
    problems = result.problems
    with stack.db.session() as s:
        jobs = {str(j.id): j for j in s.scalars(select(Job).where(Job.tenant_id == TENANT))}
        events: dict[str, list[JobEvent]] = {}
        for e in s.scalars(select(JobEvent).order_by(JobEvent.job_id, JobEvent.sequence)):
            events.setdefault(str(e.job_id), []).append(e)
        artifacts = list(s.scalars(select(Artifact).where(Artifact.tenant_id == TENANT)))
    named = {n.removeprefix("jobs/") for n in result.jobs}
    if len(jobs) != N_JOBS or set(jobs) != named:
        problems.append(f"{len(jobs)} jobs in the database for {N_JOBS} creates (callers got {sorted(named)}; "
                        f"database has {sorted(jobs)})")
    by_producer: dict[str, list[Artifact]] = {}
    for a in artifacts:
        if a.producer_job_id is not None:
            by_producer.setdefault(str(a.producer_job_id), []).append(a)
    for job_id, job in sorted(jobs.items()):
        evs = events.get(job_id, [])
        if job.state != "SUCCEEDED":
            problems.append(f"job {job_id} is {job.state} ({job.error_reason}: {job.error_message})")
        n_succeeded = sum(e.state == "SUCCEEDED" for e in evs)
        if n_succeeded != 1:
            problems.append(f"job {job_id} has {n_succeeded} SUCCEEDED events")
        if [e.sequence for e in evs] != list(range(1, len(evs) + 1)):
            problems.append(f"job {job_id}: event sequences {[e.sequence for e in evs]}")
        outputs = sorted(by_producer.get(job_id, []), key=lambda a: a.kind)
        got = [(a.kind, a.storage_key, a.state) for a in outputs]
        want = [("MODEL", f"jobs/{job_id}/model.pt2", "READY"), ("REPORT", f"jobs/{job_id}/report.json", "READY")]
        if got != want:
            problems.append(f"job {job_id}: outputs {got}")
        elif sorted(job.result_artifact_ids or []) != sorted(str(a.id) for a in outputs):
            problems.append(f"job {job_id}: result_artifact_ids {job.result_artifact_ids} are not its outputs "
                            f"{[str(a.id) for a in outputs]}")
        if job.attempt_count > 1:
            result.notes.append(f"job {job_id} took {job.attempt_count} attempts")
    pending = [(str(a.id), a.storage_key) for a in artifacts if a.state != "READY"]
    if pending:
        problems.append(f"artifacts not READY: {pending}")
    uploads = [a for a in artifacts if a.producer_job_id is None]
    if [f"artifacts/{a.id}" for a in uploads] != [upload]:
        problems.append(f"uploaded artifacts {[str(a.id) for a in uploads]}, expected only {upload}")
    # the store holds exactly the READY artifacts' objects (its .tmp/ aside: reaped after a TTL)
    files = sorted(str(p.relative_to(stack.store.root)) for p in stack.store.root.rglob("*")
                   if p.is_file() and not str(p.relative_to(stack.store.root)).startswith(".tmp/"))
    expected = sorted(a.storage_key for a in artifacts)
    if files != expected:
        problems.append(f"the store holds {sorted(set(files) - set(expected))} beyond the artifacts and lacks "
                        f"{sorted(set(expected) - set(files))}")
    leftovers = [p.name for p in (stack.store.root / ".tmp").glob("*")] if (stack.store.root / ".tmp").is_dir() else []
    if leftovers:
        result.notes.append(f"the store's .tmp/ holds {len(leftovers)} temporary file(s) (a killed writer's)")
    # recovery: first job event / claim after the dependency was back, and the batch's last SUCCEEDED
    if result.back_at is not None:
        back = result.back_at
        after = [(e.time.timestamp(), e) for evs in events.values() for e in evs if e.time.timestamp() > back]
        if after:
            result.recover_event_s = min(t for t, _ in after) - back
        claims = [t for t, e in after if e.state == "RUNNING" and e.message.startswith("attempt ")]
        if claims:
            result.recover_claim_s = min(claims) - back
        ends = [e.time.timestamp() for evs in events.values() for e in evs if e.state == "SUCCEEDED"]
        if ends:
            result.drain_s = max(ends) - back
    if result.victim is not None and result.fault_at is not None:
        again = [e.time.timestamp() for e in events.get(result.victim, []) if e.state == "RUNNING"
                 and e.message.startswith("attempt ") and e.time.timestamp() > result.fault_at]
        result.victim_rerun_s = (min(again) - result.fault_at) if again else None
    all_events = [e for evs in events.values() for e in evs]
    result.resent = sum(e.message == RESENT for e in all_events)
    result.requeued = sum(e.state == "QUEUED" and "expired; queued again" in e.message for e in all_events)


def run_scenario(fault: str, *, keyprefix: bool, root: Path, model_path: Path,
                 say: Callable[[str], None] = lambda _line: None) -> ScenarioResult:
    """One fault during one batch, on a stack of its own under `root` (stopped and removed on the way out);
    returns what was seen. Raises only when the harness itself cannot run (a process that does not start)."""
    result = ScenarioResult(fault, keyprefix)
    t_start = time.monotonic()
    stack = FaultStack(root, keyprefix=keyprefix)
    rec = _Recorder()
    clients: list[Client] = []
    stop_probe = threading.Event()
    sampler = _Sampler(stack)
    threads: list[threading.Thread] = []
    try:
        assert stack.api is not None
        say(f"{result.name()}: stack up in {time.monotonic() - t_start:.1f}s (API {stack.api.address}, Redis "
            f"{stack.redis.port if stack.redis else '?'}, Postgres {stack.pg.port if stack.pg else '?'})")
        with Client(stack.api.address, stack.token) as uploader:
            upload = uploader.upload(model_path).name
        sampler.start()
        created: list[str | None] = [None] * N_JOBS
        outcomes: dict[int, str] = {}
        t0 = time.monotonic()
        threads = [threading.Thread(target=_caller, name=f"caller-{i}", daemon=True,
                                    args=(stack.api.address, stack.token, upload, i, t0, rec, created, outcomes,
                                          clients)) for i in range(N_JOBS)]
        threads.append(threading.Thread(target=_prober, name="prober", daemon=True,
                                        args=(stack.api.address, stack.token, rec, stop_probe, clients)))
        for t in threads:
            t.start()
        try:
            _inject(fault, stack, rec, result)
        except RuntimeError as e:
            result.problems.append(str(e))
        deadline = t0 + BATCH_TIMEOUT_S
        for t in threads[:-1]:
            t.join(max(0.0, deadline - time.monotonic()))
        stop_probe.set()
        stuck = [t.name for t in threads[:-1] if t.is_alive()]
        if stuck:
            result.problems.append(f"{len(stuck)} caller(s) still waiting after {BATCH_TIMEOUT_S:.0f}s: {stuck}")
            for job in _jobs(stack):
                if job.state != "SUCCEEDED":
                    result.notes.append(f"unfinished {_job_line(stack, job.id)}")
        time.sleep(0.3)  # a last few samples of the broker
        sampler.stop_event.set()
        sampler.join(5)
        result.jobs = [n for n in created if n is not None]
        if result.back_at is not None:
            after = [t for t, _what in rec.successes if t > result.back_at]
            result.recover_call_s = (min(after) - result.back_at) if after else None
        result.client_errors = list(rec.errors)
        _check(stack, result, upload)
        result.max_outstanding = max(sampler.max_per_job.values(), default=0)
        result.outstanding_samples = sampler.samples
        result.violations = sampler.violations
        try:
            assert stack.redis is not None
            left = redis_outstanding(redis.Redis(port=stack.redis.port, socket_timeout=2), stack.prefix, stack.queue)
            if sum(left.values()):
                result.notes.append(f"messages left in the broker after the batch: {dict(left)}")
        except redis.RedisError as e:
            result.notes.append(f"could not read the broker after the batch: {e}")
        result.wall_s = time.monotonic() - t_start
        if not result.ok:
            result.logs = stack.logs()
        return result
    finally:
        stop_probe.set()
        sampler.stop_event.set()
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        stack.close()


def export_model(path: Path) -> Path:
    """The batch's model: the zoo's 1-D convnet (a job of it takes well under a second)."""
    import torch

    from tests import zoo

    torch.export.save(zoo.export("conv1d"), path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(tmp_path_factory.mktemp("faults-model") / "conv1d.pt2")


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "keyprefix"), CASES,
                         ids=[f"{f}-{'keyprefix' if kp else 'no_keyprefix'}" for f, kp in CASES])
def test_every_job_succeeds_exactly_once_and_no_caller_sees_an_error_through_a_fault(
        fault: str, keyprefix: bool, model_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"prunery-faults-{fault}-"))
    try:
        result = run_scenario(fault, keyprefix=keyprefix, root=root, model_path=model_path, say=print)
        if result.ok:
            print(result.describe())
        else:
            pytest.fail(f"{result.describe()}\n{result.logs}", pytrace=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
