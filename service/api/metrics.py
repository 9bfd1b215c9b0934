"""Prometheus metrics of the API server (prometheus-client), in a registry of their own per server.

- `prunery_grpc_requests_total{method,code}`: finished calls by full method name
  ("prunery.v1.JobService/GetJob") and status code name ("OK", "NOT_FOUND", "CANCELLED", ...)
- `prunery_grpc_request_duration_seconds{method}`: call latency (a stream's whole life)
- `prunery_jobs_created_total`: jobs created (an idempotent retry creates none)
- `prunery_artifact_bytes_total{direction}`: artifact bytes received ("in") and sent ("out")
- `prunery_jobs_queued`, `prunery_jobs_running`: read from the database at each scrape, so every API
  replica reports the same numbers (RUNNING counts CANCELLING jobs, which still hold a worker)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ..store.db import Database, Job, JobState
from .auth import Behavior

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)


class JobStateCollector(Collector):
    """The queued/running gauges, counted in the database when Prometheus scrapes."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def collect(self) -> Iterable[Metric]:
        queued = GaugeMetricFamily("prunery_jobs_queued", "Jobs waiting for a worker (state QUEUED).")
        running = GaugeMetricFamily("prunery_jobs_running", "Jobs on a worker (state RUNNING or CANCELLING).")
        try:
            with self.database.session() as s:
                counts = dict(s.execute(select(Job.state, func.count()).where(
                    Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING])).group_by(Job.state)
                ).all())
        except Exception:  # a scrape must not fail because the database is briefly away
            log.warning("could not count jobs for /metrics", exc_info=True)
            return []
        queued.add_metric([], counts.get(JobState.QUEUED.value, 0))
        running.add_metric([], counts.get(JobState.RUNNING.value, 0) + counts.get(JobState.CANCELLING.value, 0))
        return [queued, running]


class Metrics:
    def __init__(self, database: Database | None = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("prunery_grpc_requests", "gRPC calls handled, by method and status code.",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("prunery_grpc_request_duration_seconds", "gRPC call duration, by method.",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.jobs_created = Counter("prunery_jobs_created", "Jobs created through the API.",
                                    registry=self.registry)
        self.artifact_bytes = Counter("prunery_artifact_bytes", "Artifact bytes uploaded (in) and downloaded (out).",
                                      ["direction"], registry=self.registry)
        self.bytes_in = self.artifact_bytes.labels("in")
        self.bytes_out = self.artifact_bytes.labels("out")
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}
        if database is not None:
            self.registry.register(JobStateCollector(database))

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        # the labelled children, looked up once: `labels()` takes a lock and builds a key on every call
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (self.requests.labels(method, code.name),
                                                          self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)


def _final_code(context: grpc.aio.ServicerContext, failed: bool, cancelled: bool = False) -> grpc.StatusCode:
    if cancelled:  # the client went away (or the server is stopping): grpc.aio cancelled the call's task
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions report the number
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if context.cancelled():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class CallMetrics:
    """Counts every call by method and final status code and times it: `wrap` a behavior outermost (around
    authentication), so calls refused by authentication or admission are counted too. Applied once, when the
    server registers its handlers."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def wrap(self, full_method: str, behavior: Behavior, response_streaming: bool) -> Behavior:
        method = full_method.lstrip("/")
        observe = self.metrics.observe
        if not response_streaming:
            async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, failed, cancelled = time.perf_counter(), True, False
                try:
                    response = await behavior(request, context)
                    failed = False
                    return response
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    observe(method, _final_code(context, failed, cancelled), time.perf_counter() - start)
            return timed

        async def timed_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, failed, cancelled = time.perf_counter(), True, False
            try:
                async for response in behavior(request, context):
                    yield response
                failed = False
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                cancelled = True
                raise
            finally:
                observe(method, _final_code(context, failed, cancelled), time.perf_counter() - start)
        return timed_stream
