"""Worker configuration from `PRUNERY_*` environment variables; the embedded default needs none.

Imports neither torch nor Celery, so the API can read the same settings (broker URL, queue) cheaply.

- PRUNERY_DATA_DIR (`./prunery-data`): where the embedded defaults below live.
- PRUNERY_DATABASE_URL (`sqlite:///{data}/prunery.db`): SQLAlchemy URL; `postgresql://...` in production.
- PRUNERY_STORE_URL (`file://{data}/objects`): object store; `s3://bucket/prefix?endpoint_url=...`.
- PRUNERY_BROKER_URL (`filesystem://`, folders under `{data}/broker`): Celery broker; `redis://...` in production.
- PRUNERY_QUEUE (`prunery`): the queue jobs are sent to and consumed from (one per GPU class).
- PRUNERY_BROKER_KEYPREFIX (none): Redis `global_keyprefix`, isolating several deployments on one Redis (the
  reaper's reading of the queue applies it too).
- PRUNERY_VISIBILITY_TIMEOUT_S (3600): Redis hands an unacked message to another worker after this long.
- PRUNERY_LEASE_S (30) and PRUNERY_HEARTBEAT_S (5, at most half the lease): a job's lease in the database and
  how often its process renews it (each renewal also notices a cancel request).
- PRUNERY_REAPER_INTERVAL_S (10): how often a worker's main process sweeps for expired leases.
- PRUNERY_RESEND_QUEUED_S (120; 0: never): a QUEUED job whose message was last sent (`jobs.last_sent_at`) this
  long ago is looked for in the broker (its queue, and the messages workers hold unacked); when it has no message
  there in two readings of the broker a second or more apart, it lost it and is sent again, once. See reaper.py.
- PRUNERY_TENANT_MAX_RUNNING (0: no limit): at most this many RUNNING (or CANCELLING) jobs per tenant. A worker
  whose job's tenant is at the limit does not claim it: it hands the job back (its message is acked, then sent
  again by the worker's main process after a short delay, at most half PRUNERY_RESEND_QUEUED_S), so the worker
  is free for other tenants' jobs and the job never has two messages (`worker/app.py`).
- PRUNERY_PENDING_UPLOAD_TTL_S (21600, 6 hours): an upload still PENDING after this long was cut off by a
  crash of the API: the reaper deletes its row and object. Must exceed the longest upload.
- PRUNERY_CANCEL_GRACE_S (10): a cancel the running stage has not honoured by then ends the job's process.
- PRUNERY_MAX_RESULT_BYTES (16 GiB): cap on a stored result.
- PRUNERY_JOB_TIMEOUT_S (21600; 0: none): an attempt running longer FAILS with DEADLINE_EXCEEDED (JOB_TIMEOUT),
  not retried; its process ends. Guards against inputs that make the engine run without end.
- PRUNERY_JOB_MEMORY_BYTES (80% of the machine's memory; 0: no limit): the job process's data segment limit
  (RLIMIT_DATA: heap and anonymous mappings). A job past it FAILS with RESOURCE_EXHAUSTED (JOB_MEMORY_LIMIT)
  instead of taking the host down with it.
- PRUNERY_METRICS_PORT (0: off) and PRUNERY_METRICS_ADDR (0.0.0.0): the worker's Prometheus `/metrics`.
- PROMETHEUS_MULTIPROC_DIR (a fresh temporary folder, `prunery-worker-metrics-{pid}-*` in the system temp folder):
  per-process metric files (see metrics.py); private to one worker, emptied when it starts. A worker removes its
  own temporary folder when it stops; folders left by a killed worker (its pid, and those of its job processes,
  dead) are removed by the next worker to start on the host and by every worker's reaper.
- PRUNERY_TMP_DIR (the system temp folder): scratch space of running jobs (the fetched model, the result).
- PRUNERY_WORKER_PRELOAD (1): import the engine (torch) once in the worker's main process, so each forked job
  process starts without importing it again (CUDA is not touched there).
- PRUNERY_TEST_HOOKS (unset): test-only; see pipeline.py.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..service.store.config import DEFAULT_QUEUE, env_number


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    return env_number(name, default, minimum)


def _int(name: str, default: int, minimum: int = 0) -> int:
    return int(env_number(name, default, minimum))


def default_job_memory_bytes() -> int:
    """80% of the machine's physical memory (0 where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class WorkerSettings:
    data_dir: Path
    database_url: str
    store_url: str
    broker_url: str
    queue: str = DEFAULT_QUEUE
    broker_keyprefix: str = ""
    visibility_timeout_s: float = 3600.0
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    reaper_interval_s: float = 10.0
    resend_queued_s: float = 120.0
    tenant_max_running: int = 0
    pending_upload_ttl_s: float = 6 * 3600.0
    cancel_grace_s: float = 10.0
    max_result_bytes: int = 16 << 30
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"
    preload: bool = True
    tmp_dir: Path = Path(tempfile.gettempdir())
    job_timeout_s: float = 6 * 3600.0
    job_memory_bytes: int = 0

    @classmethod
    def from_env(cls) -> WorkerSettings:
        data_dir = Path(os.environ.get("PRUNERY_DATA_DIR") or "prunery-data").expanduser().resolve()
        lease_s = _float("PRUNERY_LEASE_S", 30.0, 1.0)
        heartbeat_s = _float("PRUNERY_HEARTBEAT_S", min(5.0, lease_s / 3), 0.05)
        if heartbeat_s * 2 > lease_s:
            raise ValueError(f"PRUNERY_HEARTBEAT_S={heartbeat_s} must be at most half of PRUNERY_LEASE_S={lease_s}")
        return cls(
            data_dir=data_dir,
            database_url=os.environ.get("PRUNERY_DATABASE_URL") or f"sqlite:///{data_dir / 'prunery.db'}",
            store_url=os.environ.get("PRUNERY_STORE_URL") or (data_dir / "objects").as_uri(),
            broker_url=os.environ.get("PRUNERY_BROKER_URL") or "filesystem://",
            queue=os.environ.get("PRUNERY_QUEUE") or DEFAULT_QUEUE,
            broker_keyprefix=os.environ.get("PRUNERY_BROKER_KEYPREFIX", ""),
            visibility_timeout_s=_float("PRUNERY_VISIBILITY_TIMEOUT_S", 3600.0, 1.0),
            lease_s=lease_s,
            heartbeat_s=heartbeat_s,
            reaper_interval_s=_float("PRUNERY_REAPER_INTERVAL_S", 10.0, 0.1),
            resend_queued_s=_float("PRUNERY_RESEND_QUEUED_S", 120.0),
            tenant_max_running=_int("PRUNERY_TENANT_MAX_RUNNING", 0),
            pending_upload_ttl_s=_float("PRUNERY_PENDING_UPLOAD_TTL_S", 6 * 3600.0, 1.0),
            cancel_grace_s=_float("PRUNERY_CANCEL_GRACE_S", 10.0, 0.1),
            max_result_bytes=_int("PRUNERY_MAX_RESULT_BYTES", 16 << 30, 1),
            metrics_port=_int("PRUNERY_METRICS_PORT", 0),
            metrics_addr=os.environ.get("PRUNERY_METRICS_ADDR") or "0.0.0.0",
            preload=(os.environ.get("PRUNERY_WORKER_PRELOAD") or "1").strip().lower() not in ("0", "false", "no"),
            tmp_dir=Path(os.environ.get("PRUNERY_TMP_DIR") or tempfile.gettempdir()),
            job_timeout_s=_float("PRUNERY_JOB_TIMEOUT_S", 6 * 3600.0),
            job_memory_bytes=_int("PRUNERY_JOB_MEMORY_BYTES", default_job_memory_bytes()),
        )

    @property
    def broker_dir(self) -> Path:
        """Folders of the `filesystem://` broker (embedded default)."""
        return self.data_dir / "broker"
