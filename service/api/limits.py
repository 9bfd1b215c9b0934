"""Admission control of the API: what keeps one tenant, or a flood, from being visible to the others.

- `TenantLimits.admit_call(tenant)`: a token bucket per tenant (`PRUNERY_TENANT_RATE` calls per second,
  bursts of `PRUNERY_TENANT_BURST`); past it, RESOURCE_EXHAUSTED `TENANT_RATE_LIMIT` with a RetryInfo of
  the time until the next token.
- `TenantLimits.acquire_stream(tenant)`: a tenant's concurrent long calls (WatchJob, uploads, downloads) are
  at most `PRUNERY_TENANT_STREAMS`, and the server's at most `PRUNERY_MAX_STREAMS`; past them,
  RESOURCE_EXHAUSTED `TENANT_STREAM_LIMIT` (or UNAVAILABLE `OVERLOADED` for the server's bound). An open
  stream costs a coroutine, not a thread, so these bound memory, not threads.
- `BlockingPool`: the short blocking steps of calls (database statements, object store requests) run in a
  bounded thread pool off the event loop; past `PRUNERY_MAX_PENDING` steps waiting for a thread, a call
  is shed at once with UNAVAILABLE `OVERLOADED` (and a RetryInfo) instead of queuing without bound.

Limits are per API process (each replica admits its own share). Everything here runs on the server's
event loop thread, except the pool's steps themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from .errors import ApiError, Reason

__all__ = ["BlockingPool", "TenantLimits"]

T = TypeVar("T")
# tenants idle this long lose their bucket (a full bucket is the same as none): the table stays small
_IDLE_BUCKET_S = 60.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TenantLimits:
    """Per-tenant call rate and concurrent streams, and the server's bound on streams. `rate` 0: no rate
    limit; `streams_per_tenant` 0: no per-tenant stream limit."""

    def __init__(self, *, rate: float, burst: float, streams_per_tenant: int, max_streams: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst = rate, max(burst, 1.0)
        self.streams_per_tenant, self.max_streams = streams_per_tenant, max_streams
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}
        self.open_streams = 0
        self._next_sweep = 0.0

    def admit_call(self, tenant: str) -> None:
        """Take one token of the tenant's bucket, or raise RESOURCE_EXHAUSTED TENANT_RATE_LIMIT."""
        if self.rate <= 0:
            return
        now = self.clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(self.burst, now)
            if now >= self._next_sweep:
                self._sweep(now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self.rate
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this tenant is past its limit of {self.rate:g} calls per second; retry in "
                           f"{wait:.2f}s", Reason.TENANT_RATE_LIMIT, retry_after_s=wait,
                           metadata={"calls_per_second": f"{self.rate:g}"})
        bucket.tokens -= 1.0

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _IDLE_BUCKET_S
        for tenant in [t for t, b in self._buckets.items() if now - b.stamp > _IDLE_BUCKET_S]:
            del self._buckets[tenant]

    def acquire_stream(self, tenant: str) -> None:
        """Take one of the tenant's (and the server's) stream slots; give it back with `release_stream`."""
        held = self._streams.get(tenant, 0)
        if self.streams_per_tenant and held >= self.streams_per_tenant:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this tenant already has {held} open streams (WatchJob, uploads, downloads), its "
                           f"limit: close some (or wait for them to end) and retry", Reason.TENANT_STREAM_LIMIT,
                           retry_after_s=1.0, metadata={"streams": str(self.streams_per_tenant)})
        if self.open_streams >= self.max_streams:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"the server holds its maximum of {self.max_streams} open streams; retry shortly",
                           Reason.OVERLOADED, retry_after_s=1.0)
        self._streams[tenant] = held + 1
        self.open_streams += 1

    def release_stream(self, tenant: str) -> None:
        self.open_streams -= 1
        left = self._streams[tenant] - 1
        if left:
            self._streams[tenant] = left
        else:
            del self._streams[tenant]

    def streams_of(self, tenant: str) -> int:
        return self._streams.get(tenant, 0)


class BlockingPool:
    """A thread pool for the blocking steps of calls, with a bound on steps waiting for a thread.

    `await pool.run(fn, *args)` runs `fn` on a pool thread in a copy of the caller's context (so
    `auth.current_tenant()` works there) and returns its result; past `max_pending` waiting steps it raises
    UNAVAILABLE OVERLOADED at once."""

    def __init__(self, threads: int, max_pending: int) -> None:
        self.threads, self.max_pending = threads, max_pending
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prunery-api")
        self.in_flight = 0  # steps submitted and not finished (running + waiting)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Start `fn` on a pool thread (in a copy of the caller's context) and return its future at once: for a
        step that overlaps the next one (a transfer's read-ahead, or its write while the next chunk arrives).
        Sheds like `run`. Call from the event loop thread."""
        if self.in_flight - self.threads >= self.max_pending:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"the server is overloaded ({self.in_flight} steps in flight); retry shortly",
                           Reason.OVERLOADED, retry_after_s=0.5)
        self.in_flight += 1
        ctx = contextvars.copy_context()
        future = self.executor.submit(ctx.run, fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        # the count changes on the loop thread only (the step may finish on a pool thread)
        def done(_future: concurrent.futures.Future[T]) -> None:
            try:
                loop.call_soon_threadsafe(self._done)
            except RuntimeError:  # the loop closed (the server stopped): nothing left to count
                pass

        future.add_done_callback(done)
        return future

    def _done(self) -> None:
        self.in_flight -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
