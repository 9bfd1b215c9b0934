"""Real worker stacks for the tests (tests/worker/test_worker.py, tests/worker/test_reaper.py): a database, a
folder object store, a broker queue and `celery worker` processes consuming it; plus a Postgres cluster of our
own that a test can stop and start, and an independent reader of what the Redis broker holds.

Nothing here mocks a service. Every Stack gets its own Redis key prefix and queue name, so parallel runs
(pytest -n 2) and other users of the shared Redis never see each other's messages.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

from prunery.service.store import jobs
from prunery.service.store.db import (
    Artifact,
    ArtifactKind,
    ArtifactState,
    Database,
    Job,
    JobEvent,
    ensure_tenant,
    utcnow,
)
from prunery.service.store.objectstore import FolderStore
from prunery.service.store.testing import free_port
from prunery.worker.app import enqueue, make_app
from prunery.worker.settings import WorkerSettings

REDIS_URL = os.environ.get("PRUNERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TENANT = "acme"
FAST = {  # short lease, heartbeat, reaper and redelivery, so recovery takes seconds
    "PRUNERY_LEASE_S": "4",
    "PRUNERY_HEARTBEAT_S": "0.5",
    "PRUNERY_REAPER_INTERVAL_S": "0.5",
    "PRUNERY_VISIBILITY_TIMEOUT_S": "6",
    "PRUNERY_CANCEL_GRACE_S": "3",
    "PRUNERY_RESEND_QUEUED_S": "0",
    "PRUNERY_TEST_HOOKS": "1",
}
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class Stack:
    """One database, object store and queue, and the workers consuming it."""

    database_url: str
    store_dir: Path
    data_dir: Path
    prefix: str = field(default_factory=lambda: f"prunery-test-{uuid.uuid4().hex[:10]}:")
    queue: str = field(default_factory=lambda: f"q-{uuid.uuid4().hex[:10]}")
    workers: list[WorkerProc] = field(default_factory=list)
    embedded: bool = False  # the worker gets only PRUNERY_DATA_DIR: SQLite, a folder store, filesystem broker

    def __post_init__(self) -> None:
        self.db = Database(self.database_url)
        self.store = FolderStore(self.store_dir)
        if self.embedded:
            self.settings = WorkerSettings(data_dir=self.data_dir, database_url=self.database_url,
                                           store_url=self.store.url, broker_url="filesystem://")
        else:
            self.settings = WorkerSettings(data_dir=self.data_dir, database_url=self.database_url,
                                           store_url=self.store.url, broker_url=REDIS_URL, queue=self.queue,
                                           broker_keyprefix=self.prefix, visibility_timeout_s=6.0,
                                           tmp_dir=self.data_dir / "tmp")
        self.celery = make_app(self.settings)
        with self.db.session() as s:
            ensure_tenant(s, TENANT)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PRUNERY_", "PROMETHEUS_"))}
        env.update(FAST)
        env["PRUNERY_DATA_DIR"] = str(self.data_dir)
        if self.embedded:
            env.update(extra)
            return env
        env.update({
            "PRUNERY_DATA_DIR": str(self.data_dir),
            "PRUNERY_DATABASE_URL": self.database_url,
            "PRUNERY_STORE_URL": self.store.url,
            "PRUNERY_BROKER_URL": REDIS_URL,
            "PRUNERY_BROKER_KEYPREFIX": self.prefix,
            "PRUNERY_QUEUE": self.queue,
            "PRUNERY_TMP_DIR": str(self.settings.tmp_dir),
        })
        env.update(extra)
        return env

    def start_worker(self, name: str, *, own_metrics_dir: bool = False, **env: str) -> WorkerProc:
        """A worker process; `own_metrics_dir`: no PROMETHEUS_MULTIPROC_DIR given, the worker makes its own."""
        worker = WorkerProc(name, self, free_port(), self.settings.queue, env, own_metrics_dir=own_metrics_dir)
        self.workers.append(worker)
        return worker

    # -- jobs, as the API makes them ------------------------------------------------------------------------

    def upload(self, data: bytes, name: str = "model.pt2", tenant: str = TENANT) -> uuid.UUID:
        artifact_id = uuid.uuid4()
        key = f"artifacts/{artifact_id}"
        size, sha = self.store.put_bytes(key, data)
        with self.db.session() as s:
            ensure_tenant(s, tenant)
            s.add(Artifact(id=artifact_id, tenant_id=tenant, display_name=name, kind=ArtifactKind.MODEL.value,
                           state=ArtifactState.READY.value, size_bytes=size, sha256=sha, labels={}, storage_key=key,
                           create_time=utcnow()))
        return artifact_id

    def create(self, artifact_id: uuid.UUID, *, ratio: float = 0.5, labels: dict[str, str] | None = None,
               max_attempts: int = 3, tenant: str = TENANT, **spec: Any) -> uuid.UUID:
        """The job row alone, as an API that died before sending its message leaves it."""
        with self.db.session() as s:
            ensure_tenant(s, tenant)
            job, _ = jobs.create_job(s, tenant, {"model": f"artifacts/{artifact_id}", "ratio": ratio, **spec},
                                     labels=labels, max_attempts=max_attempts, queue=self.settings.queue)
            return job.id

    def submit(self, artifact_id: uuid.UUID, **kwargs: Any) -> uuid.UUID:
        job_id = self.create(artifact_id, **kwargs)
        self.send(job_id)  # after the commit, as the API does
        return job_id

    def send(self, job_id: uuid.UUID) -> None:
        enqueue(job_id, celery=self.celery)

    def job(self, job_id: uuid.UUID) -> Job:
        with self.db.session() as s:
            job = jobs.get_job(s, job_id)
            assert job is not None
            return job

    def events(self, job_id: uuid.UUID) -> list[Any]:
        with self.db.session() as s:
            return list_events(s, job_id)

    def wait(self, job_id: uuid.UUID, done: Callable[[Job], bool], timeout: float = 90.0) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in self.workers)
                raise AssertionError(f"job {job_id} stuck in {job.state} ({job.stage}, attempt {job.attempt_count})"
                                     f"; events: {[(e.state, e.stage, e.message) for e in self.events(job_id)]}\n"
                                     f"{logs}")
            time.sleep(0.1)

    def wait_state(self, job_id: uuid.UUID, *states: str, timeout: float = 90.0) -> Job:
        return self.wait(job_id, lambda j: j.state in states, timeout)

    def succeeded(self, job_id: uuid.UUID, timeout: float = 90.0) -> Job:
        job = self.wait_state(job_id, *FINAL, timeout=timeout)
        assert job.state == "SUCCEEDED", (job.error_reason, job.error_message)
        return job

    def keys_under(self, prefix: str) -> list[str]:
        root = self.store.root / prefix
        return sorted(str(p.relative_to(self.store.root)) for p in root.rglob("*") if p.is_file()) \
            if root.exists() else []

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.celery.close()
        self.db.dispose()
        if self.embedded:
            return
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


class WorkerProc:
    """A real worker: `celery worker --pool prefork -c 1` in its own process group."""

    def __init__(self, name: str, stack: Stack, metrics_port: int, queue: str, extra_env: dict[str, str], *,
                 own_metrics_dir: bool = False) -> None:
        self.name = name
        self.metrics_port = metrics_port
        self.log_path = stack.data_dir / f"worker-{name}.log"
        self.metrics_dir = stack.data_dir / f"metrics-{name}"
        if not own_metrics_dir:
            extra_env = {"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir), **extra_env}
        env = stack.env(PRUNERY_METRICS_PORT=str(metrics_port), PRUNERY_METRICS_ADDR="127.0.0.1", **extra_env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "prunery.worker.app", "worker", "--pool", "prefork", "-c", "1",
             "-Q", queue, "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "INFO"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> WorkerProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if b" ready." in self.log_path.read_bytes():
                return self
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def owns(self, pid: int) -> bool:
        """Whether process `pid` (a job process) belongs to this worker's process group."""
        try:
            return os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def log_tail(self, n: int = 6000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metric(self, sample: str) -> float:
        """The value of one sample, e.g. `prunery_jobs_finished_total{state="FAILED"}` (0 if absent)."""
        found = re.search(rf"^{re.escape(sample)} (\S+)$", self.metrics(), re.M)
        return float(found.group(1)) if found else 0.0

    def wait_metric(self, sample: str, ok: Callable[[float], bool], timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while not ok(value := self.metric(sample)):
            assert time.monotonic() < deadline, f"{sample} = {value}"
            time.sleep(0.2)
        return value

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        try:  # reap job processes left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


def owner_pid(job: Job) -> int:
    assert job.lease_owner is not None
    return int(job.lease_owner.split(":")[-2])


# ---------------------------------------------------------------------------------------------------------
# What the Redis broker holds, read without the product's code
# ---------------------------------------------------------------------------------------------------------

def _job_of_kombu_message(raw: bytes | str) -> str | None:
    """The job id a kombu message (JSON: body base64 of Celery protocol 2's `[args, kwargs, embed]`) carries."""
    message = json.loads(raw)
    if (message.get("headers") or {}).get("task") != "prunery.run_job":
        return None
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return str(args[0])


def redis_outstanding(client: redis.Redis, prefix: str, queue: str) -> Counter[str]:
    """Messages per job id in `prefix + queue` (and kombu's priority lists `queue\\x06\\x16{3,6,9}`) and in the
    unacked hash `prefix + "unacked"` (values `[message, exchange, routing_key]`), read in one MULTI/EXEC so a
    message moving from the list to the hash is never seen in both or neither."""
    lists = [prefix + queue] + [f"{prefix}{queue}\x06\x16{p}" for p in (3, 6, 9)]
    with client.pipeline(transaction=True) as pipe:
        for key in lists:
            pipe.lrange(key, 0, -1)
        pipe.hvals(prefix + "unacked")
        *queued, unacked = pipe.execute()
    found: Counter[str] = Counter()
    for raw in (m for items in queued for m in items):
        if (job := _job_of_kombu_message(raw)) is not None:
            found[job] += 1
    for raw in unacked:
        message, _exchange, _routing_key = json.loads(raw)
        if (job := _job_of_kombu_message(json.dumps(message))) is not None:
            found[job] += 1
    return found


# ---------------------------------------------------------------------------------------------------------
# A Postgres cluster of our own, to stop and start
# ---------------------------------------------------------------------------------------------------------

def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("no Postgres server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PostgresCluster:
    """`initdb` + `pg_ctl` in a temporary folder on a free port (trust auth, run as the `postgres` user when we
    are root), so a test can take the database away from a worker and give it back."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="prunery-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.socket_dir.mkdir()
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "server.log"),
                  "-o", f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", "immediate", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@dataclass(frozen=True)
class BrokerMessage:
    """One message of ours in the Redis broker (`redis_messages`)."""

    job: str
    task_id: str | None
    eta: str | None  # Celery's `eta` header: a retry's (or a countdown's) copy
    where: str  # "queue", or "unacked:<delivery tag>"


def redis_messages(client: redis.Redis, prefix: str, queue: str) -> list[BrokerMessage]:
    """The messages of `redis_outstanding`, one by one with their task id, ETA and place, read the same way (one
    MULTI/EXEC over the queue's lists and the unacked hash)."""
    lists = [prefix + queue] + [f"{prefix}{queue}\x06\x16{p}" for p in (3, 6, 9)]
    with client.pipeline(transaction=True) as pipe:
        for key in lists:
            pipe.lrange(key, 0, -1)
        pipe.hgetall(prefix + "unacked")
        *queued, unacked = pipe.execute()
    found: list[BrokerMessage] = []
    places = [("queue", json.loads(m)) for items in queued for m in items]
    places += [(f"unacked:{tag.decode()}", json.loads(raw)[0]) for tag, raw in unacked.items()]
    for where, message in places:
        job = _job_of_kombu_message(json.dumps(message))
        if job is not None:
            headers = message.get("headers") or {}
            found.append(BrokerMessage(job, headers.get("id"), headers.get("eta"), where))
    return found


def list_events(session: Any, job_id: uuid.UUID | str, after_sequence: int = 0) -> list[JobEvent]:
    """A job's events after `after_sequence`, in order (what WatchJob streams)."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(str(job_id)),
                                                       JobEvent.sequence > after_sequence)
                                .order_by(JobEvent.sequence)))
