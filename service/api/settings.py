"""API server configuration from `PRUNERY_*` environment variables; the embedded default needs none.

The storage and broker variables (and their defaults) are the worker's (`worker/settings.py`), so an API and
a worker started in the same environment share one database, one object store and one queue.

| variable                       | default                             | meaning                                       |
|--------------------------------|-------------------------------------|-----------------------------------------------|
| PRUNERY_DATA_DIR               | `./prunery-data`                    | embedded defaults live here                   |
| PRUNERY_DATABASE_URL           | `sqlite:///{data}/prunery.db`       | SQLAlchemy URL (postgresql://... in prod)     |
| PRUNERY_STORE_URL              | `file://{data}/objects`             | object store URL (s3://bucket/prefix?...)     |
| PRUNERY_BROKER_URL             | `filesystem://` under `{data}/broker` | Celery broker (redis://... in prod)         |
| PRUNERY_QUEUE                  | `prunery`                           | default queue of the jobs                     |
| PRUNERY_QUEUES                 | (none)                              | more queues a job may name (comma-separated,  |
|                                |                                     | one per worker pool / GPU class)              |
| PRUNERY_BROKER_KEYPREFIX       | (none)                              | Redis `global_keyprefix` (isolation)          |
| PRUNERY_LISTEN_ADDRESS         | `127.0.0.1:50051`                   | gRPC listen address (`0.0.0.0:50051` in prod) |
| PRUNERY_METRICS_PORT           | 0 (off)                             | Prometheus `/metrics` HTTP port of the API    |
| PRUNERY_METRICS_ADDR           | `0.0.0.0`                           | its bind address                              |
| PRUNERY_TENANT_CAP_BYTES       | 8589934592 (8 GiB)                  | bytes of artifacts one tenant may hold; an    |
|                                |                                     | upload past it fails with RESOURCE_EXHAUSTED  |
| PRUNERY_CHUNK_SIZE             | 1048576 (1 MiB)                     | download chunk size (at most 3 MiB)           |
| PRUNERY_GRPC_WORKERS           | 16                                  | threads for the blocking steps of calls (the  |
|                                |                                     | server is asyncio: an open stream holds none) |
| PRUNERY_MAX_PENDING            | 256                                 | steps waiting for a thread; past it, calls    |
|                                |                                     | are shed: UNAVAILABLE (OVERLOADED)            |
| PRUNERY_TENANT_RATE            | 2000                                | calls/s per tenant per API process (0: no     |
|                                |                                     | limit); past it RESOURCE_EXHAUSTED            |
| PRUNERY_TENANT_BURST           | 2 x the rate                        | calls a tenant may send at once               |
| PRUNERY_TENANT_STREAMS         | 1000                                | open WatchJob/upload/download streams per     |
|                                |                                     | tenant per API process (0: no limit)          |
| PRUNERY_MAX_STREAMS            | 20000                               | open streams per API process                  |
| PRUNERY_TENANT_MAX_QUEUED      | 1000                                | QUEUED jobs per tenant (0: no limit); past it |
|                                |                                     | CreateJob is RESOURCE_EXHAUSTED               |
| PRUNERY_MAX_MESSAGE_BYTES      | 16777216 (16 MiB)                   | largest request message accepted (a larger    |
|                                |                                     | one is RESOURCE_EXHAUSTED by gRPC itself)     |
| PRUNERY_WATCH_POLL_S           | 0.2                                 | WatchJob's database polling period            |
| PRUNERY_AUTH_CACHE_S           | 5                                   | how long a valid token is trusted without a   |
|                                |                                     | database lookup (a revoke takes this long)    |
| PRUNERY_MIGRATE                | 1                                   | `serve()` migrates the database to head first |

Imports neither torch nor Celery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store.config import DEFAULT_QUEUE, env_number

DEFAULT_LISTEN_ADDRESS = "127.0.0.1:50051"
DEFAULT_TENANT_CAP_BYTES = 8 << 30
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 3 << 20  # a chunk and its envelope stay below gRPC's default 4 MiB message limit


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use 1 or 0)")


@dataclass(frozen=True)
class Settings:
    """Everything `build_server` needs. `metrics_port`: None = no metrics endpoint, 0 = any free port."""

    data_dir: Path = field(default_factory=lambda: Path("prunery-data").resolve())
    database_url: str = ""  # "" = sqlite file in data_dir
    store_url: str = ""  # "" = folder in data_dir
    broker_url: str = "filesystem://"
    queue: str = DEFAULT_QUEUE
    extra_queues: tuple[str, ...] = ()
    broker_keyprefix: str = ""
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    tenant_cap_bytes: int = DEFAULT_TENANT_CAP_BYTES
    chunk_size: int = DEFAULT_CHUNK_SIZE
    grpc_workers: int = 16
    max_pending: int = 256
    tenant_rate: float = 2000.0
    tenant_burst: float = 0.0  # 0: twice the rate
    tenant_streams: int = 1000
    max_streams: int = 20000
    tenant_max_queued: int = 1000
    max_message_bytes: int = 16 << 20
    watch_poll_s: float = 0.2
    auth_cache_s: float = 5.0
    job_cache: bool = True  # Postgres: GetJob from memory kept fresh by LISTEN/NOTIFY (service/api/jobcache.py)
    migrate: bool = True

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'prunery.db'}")
        if not self.store_url:
            object.__setattr__(self, "store_url", (self.data_dir / "objects").as_uri())
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes")
        if self.tenant_cap_bytes < 0:
            raise ValueError("tenant_cap_bytes must not be negative")
        if self.grpc_workers < 1:
            raise ValueError("grpc_workers must be at least 1")

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues a job may name: the default first."""
        return (self.queue, *(q for q in self.extra_queues if q != self.queue))

    @property
    def broker_dir(self) -> Path:
        """Folders of the `filesystem://` broker (embedded default), as the worker uses them."""
        return self.data_dir / "broker"

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        data_dir = Path(os.environ.get("PRUNERY_DATA_DIR") or "prunery-data").expanduser().resolve()
        metrics_port = int(env_number("PRUNERY_METRICS_PORT", 0, 0, 65535))
        values: dict[str, Any] = dict(
            data_dir=data_dir,
            database_url=os.environ.get("PRUNERY_DATABASE_URL") or "",
            store_url=os.environ.get("PRUNERY_STORE_URL") or "",
            broker_url=os.environ.get("PRUNERY_BROKER_URL") or "filesystem://",
            queue=os.environ.get("PRUNERY_QUEUE") or DEFAULT_QUEUE,
            extra_queues=tuple(q.strip() for q in (os.environ.get("PRUNERY_QUEUES") or "").split(",") if q.strip()),
            broker_keyprefix=os.environ.get("PRUNERY_BROKER_KEYPREFIX", ""),
            listen_address=os.environ.get("PRUNERY_LISTEN_ADDRESS") or DEFAULT_LISTEN_ADDRESS,
            metrics_port=metrics_port or None,  # 0 means off, as for the worker
            metrics_addr=os.environ.get("PRUNERY_METRICS_ADDR") or "0.0.0.0",
            tenant_cap_bytes=int(env_number("PRUNERY_TENANT_CAP_BYTES", DEFAULT_TENANT_CAP_BYTES, 0)),
            chunk_size=int(env_number("PRUNERY_CHUNK_SIZE", DEFAULT_CHUNK_SIZE, 1, MAX_CHUNK_SIZE)),
            grpc_workers=int(env_number("PRUNERY_GRPC_WORKERS", 16, 1)),
            max_pending=int(env_number("PRUNERY_MAX_PENDING", 256, 1)),
            tenant_rate=env_number("PRUNERY_TENANT_RATE", 2000.0, 0.0),
            tenant_burst=env_number("PRUNERY_TENANT_BURST", 0.0, 0.0),
            tenant_streams=int(env_number("PRUNERY_TENANT_STREAMS", 1000, 0)),
            max_streams=int(env_number("PRUNERY_MAX_STREAMS", 20000, 1)),
            tenant_max_queued=int(env_number("PRUNERY_TENANT_MAX_QUEUED", 1000, 0)),
            max_message_bytes=int(env_number("PRUNERY_MAX_MESSAGE_BYTES", 16 << 20, 4 << 20, 1 << 30)),
            watch_poll_s=env_number("PRUNERY_WATCH_POLL_S", 0.2, 0.01),
            auth_cache_s=env_number("PRUNERY_AUTH_CACHE_S", 5.0, 0.0),
            job_cache=_bool("PRUNERY_JOB_CACHE", True),
            migrate=_bool("PRUNERY_MIGRATE", True),
        )
        values.update(overrides)
        return cls(**values)
