"""What the servicers (`artifact_service.py`, `job_service.py`) share: the wrappers that turn a method's errors
into the call's status (`unary`, `streaming`; `blocking` runs a blocking body in the server's bounded pool,
`limits.BlockingPool`), the backend they run on (`ApiBackend`), and the tenant's byte cap.

The servicers are coroutines of a grpc.aio server (`server.py` says why): every blocking step (a SQL
statement, an object store request, sending to the broker) runs in the pool, so an open stream holds no thread,
and the event loop itself answers cached GetJob calls. A database that is away makes any call UNAVAILABLE
(DATABASE_UNAVAILABLE, with a RetryInfo); the object store, STORE_UNAVAILABLE; anything else unexpected is
INTERNAL, logged, never its text.

Every call runs for the tenant of its bearer token (`auth.current_tenant()`); another tenant's resources are
NOT_FOUND, exactly like missing ones. Errors carry a google.rpc.Status with an ErrorInfo (stable reasons in
`errors.Reason`) and, for bad fields, a BadRequest. Nothing here imports torch or parses an uploaded file: the
workers do, through the engine's safe intake.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..store.db import (
    Artifact,
    Database,
)
from ..store.objectstore import ObjectStore
from . import errors
from .errors import ApiError, Reason
from .jobcache import JobCache
from .limits import BlockingPool
from .metrics import Metrics
from .settings import Settings

__all__ = ["WATCH_FALLBACK_POLL_S", "ApiBackend", "Enqueue", "blocking", "cap_error", "streaming", "tenant_bytes",
           "unary"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Enqueue = Callable[[str, str], None]  # (job id, queue)


def _unexpected(e: Exception, method: str) -> ApiError:
    """The answer to an exception that is not an ApiError: UNAVAILABLE for an outage of the database
    (logged in one line: it is expected now and then), INTERNAL for anything else (logged in full). Never
    the exception's text."""
    outage = errors.classify_outage(e)
    if outage is not None:
        log.warning("%s: the database is unavailable (%s: %s)", method, type(e).__name__,
                    str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
        return outage
    log.exception("%s failed", method)
    return ApiError(grpc.StatusCode.INTERNAL, "internal error (logged on the server)", Reason.INTERNAL)


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An async RPC method (it runs its blocking steps in the pool itself). Errors become the call's status."""
    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except ApiError as e:
            await errors.abort(context, e)
        except Exception as e:
            await errors.abort(context, _unexpected(e, fn.__name__))
    return call


def blocking(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """An RPC method whose body `fn(self, request)` blocks (database, object store, broker): it runs in the
    server's bounded pool, off the event loop. Errors become the call's status."""
    @functools.wraps(fn)
    async def in_pool(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        return await self.b.pool.run(fn, self, request)
    return unary(in_pool)


def streaming(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """An async-generator RPC method; errors become the call's status."""
    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for response in fn(self, request, context):
                yield response
        except ApiError as e:
            await errors.abort(context, e)
        except Exception as e:
            await errors.abort(context, _unexpected(e, fn.__name__))
    return call


# WatchJob's poll while job notifications arrive (they wake it at once; when they stop, every watch is woken
# and polls at PRUNERY_WATCH_POLL_S): a safety net only, kept rare so that idle watches cost nothing
WATCH_FALLBACK_POLL_S = 30.0


@dataclass
class ApiBackend:
    """What the servicers share."""

    database: Database
    store: ObjectStore
    settings: Settings
    enqueue: Enqueue
    pool: BlockingPool
    metrics: Metrics | None = None
    job_cache: JobCache | None = None  # Postgres only: GetJob from memory, WatchJob woken by notifications

    def __post_init__(self) -> None:
        engine = self.database.engine
        # reads of one statement need no transaction: on Postgres, autocommit saves the BEGIN/COMMIT round trips
        self._read_engine = engine if engine.dialect.name == "sqlite" else \
            engine.execution_options(isolation_level="AUTOCOMMIT")

    def session(self) -> contextlib.AbstractContextManager[Session]:
        return self.database.session()

    def reader(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for single-statement reads (Core rows, which the *_proto functions accept)."""
        return self._read_engine.connect()


def tenant_bytes(session: Session, tenant: str) -> int:
    """Bytes the tenant holds, including the declared sizes of its uploads in progress (PENDING rows)."""
    return int(session.scalar(select(func.coalesce(func.sum(Artifact.size_bytes), 0))
                              .where(Artifact.tenant_id == tenant)) or 0)


def cap_error(cap: int, used: int, size: int) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"storing {size} more bytes would pass this tenant's cap of {cap} bytes ({used} bytes are "
                    "stored): delete artifacts or jobs you no longer need", Reason.TENANT_CAP_EXCEEDED,
                    metadata={"cap_bytes": str(cap), "used_bytes": str(used), "size_bytes": str(size)})


