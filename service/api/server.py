"""The API server: a grpc.aio (asyncio) server with ArtifactService and JobService behind bearer-token
authentication and per-tenant admission, standard health checking (`grpc.health.v1`), server reflection,
and Prometheus metrics on a separate HTTP port.

    server = build_server(Settings.from_env())   # binds the port
    server.start(); print(server.address); server.wait_for_termination()

Why asyncio: most calls are short, but WatchJob streams (every `prunery submit --wait`), uploads and
downloads last minutes. In a thread-per-call server each of them held one of a fixed number of threads,
so forty idle watches from one tenant starved everyone's GetJob and the health check. Here an open stream
costs a coroutine (a few KB), the event loop answers cached GetJob calls and health checks itself, and the
short blocking steps of calls (SQL statements through SQLAlchemy, object store requests) run in a bounded
thread pool (`limits.BlockingPool`) that sheds load with UNAVAILABLE instead of queuing forever. We keep
the synchronous SQLAlchemy code the workers share (`jobs.py`'s state machine) rather than keep a second,
async copy of it: a statement holds a pool thread for about a millisecond, never for a stream's life.

The event loop runs in a thread of its own, so `PruneryServer` offers the familiar start/stop/wait methods
to threads (tests, `prunery up`). `serve()` is the production entry point (`prunery serve`): settings from
`PRUNERY_*`, migrations to head (unless PRUNERY_MIGRATE=0), graceful stop on SIGTERM/SIGINT. Never
imports torch.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from prunery.v1 import prunery_pb2

from ..store import db, jobs
from ..store.objectstore import ObjectStore, open_store
from .artifact_service import ArtifactService
from .auth import Authentication, Behavior, TokenAuthenticator
from .job_service import JobService
from .jobcache import JobCache
from .limits import BlockingPool, TenantLimits
from .metrics import CallMetrics, Metrics
from .sending import CeleryEnqueuer, RetryingSender
from .servicers import ApiBackend
from .settings import Settings

__all__ = ["SERVICE_NAMES", "PruneryServer", "build_server", "serve"]

log = logging.getLogger("prunery.service")

SERVICE_NAMES = tuple(s.full_name for s in prunery_pb2.DESCRIPTOR.services_by_name.values())
T = TypeVar("T")


class _LoopThread:
    """An asyncio event loop running in a daemon thread; `call(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        try:  # uvloop: the same asyncio API, about a sixth less CPU per GetJob (benchmarks/bench_service.py)
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - a platform without uvloop
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="prunery-api-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class PruneryServer:
    """The API server (a grpc.aio server on its own event loop thread) with the metrics endpoint, the health
    status and the database engine it owns; knows its bound `port`, `address`, `metrics_port` (after
    `start()`)."""

    def __init__(self, server: grpc.aio.Server, runner: _LoopThread, *, settings: Settings, port: int,
                 backend: ApiBackend, health_servicer: Any, metrics: Metrics, limits: TenantLimits,
                 cleanups: Sequence[Callable[[], None]] = ()) -> None:
        self._server, self._runner = server, runner
        self.settings, self.port, self.backend = settings, port, backend
        self.health, self.metrics, self.limits = health_servicer, metrics, limits
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        self._cleanups = list(cleanups)
        self._stopped = threading.Event()
        self._stopping = threading.Lock()
        self._stop_started = False
        host = settings.listen_address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    def start(self) -> None:
        if self.settings.metrics_port is not None:
            self._metrics_httpd, _thread = start_http_server(self.settings.metrics_port, self.settings.metrics_addr,
                                                             registry=self.metrics.registry)
            self.metrics_port = int(self._metrics_httpd.server_port)
        if self.backend.job_cache is not None:
            self.backend.job_cache.start()
        # everything loaded so far lives as long as the server: keep it out of the collector's full passes,
        # which otherwise stall the event loop for milliseconds (the GetJob p99)
        gc.collect()
        gc.freeze()
        self._runner.call(self._server.start())
        self._runner.call(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        log.info("Prunery API on %s (metrics: %s)", self.address,
                 f"http://{self.settings.metrics_addr}:{self.metrics_port}/metrics" if self.metrics_port else "off")

    def stop(self, grace: float | None) -> threading.Event:
        """Health turns NOT_SERVING at once; calls in flight get `grace` seconds; then the event loop, the
        metrics endpoint and the database pool close. Returns an event set once all is stopped."""
        with self._stopping:
            if self._stop_started:
                return self._stopped
            self._stop_started = True

        async def stop_server() -> None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)

        def finish() -> None:
            try:
                if not self._runner.loop.is_closed():
                    self._runner.call(stop_server())
            except Exception:
                log.exception("stopping the gRPC server failed")
            finally:
                self._cleanup()

        threading.Thread(target=finish, name="prunery-api-stop", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False)."""
        return self._stopped.wait(timeout)

    def _cleanup(self) -> None:
        if self._stopped.is_set():
            return
        self._runner.close()
        self.backend.pool.shutdown()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        for fn in self._cleanups:
            try:
                fn()
            except Exception:
                log.exception("cleanup failed while stopping the API server")
        self._stopped.set()


def _server_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        # requests up to this size are read and refused by our validation (a reply with the reason) rather
        # than cut off by gRPC's 4 MiB default
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # ping idle connections, so the streams of a client that vanished without closing (a dead host, a cut
        # link) end and give their tenant's stream slots back
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


_HANDLER_FACTORIES = {  # (client streaming, server streaming) -> grpc's handler factory
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor,
                wrap: Callable[[str, Behavior, bool], Behavior]) -> None:
    """Register `servicer`'s methods of `service` with each behavior wrapped once, here, as
    `wrap(full method name, behavior, response streaming)`: metrics and authentication cost a call nothing
    but their own work (grpc.aio's interceptors run a coroutine chain per call)."""
    handlers = {}
    for m in service.methods:
        behavior = wrap(f"/{service.full_name}/{m.name}", getattr(servicer, m.name), m.server_streaming)
        handlers[m.name] = _HANDLER_FACTORIES[(m.client_streaming, m.server_streaming)](
            behavior, request_deserializer=message_factory.GetMessageClass(m.input_type).FromString,
            response_serializer=message_factory.GetMessageClass(m.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _record_resend(database: db.Database, job_id: str, queue: str, failed_at: datetime) -> bool:
    """For the API's background sends: record the send as the reaper does (`jobs.record_resend`, under the row
    lock); False when the job started, ended or was sent again since its send failed."""
    with database.session() as s:
        return bool(jobs.record_resend(s, [uuid.UUID(job_id)], queue=queue, sent_before=failed_at))


def build_server(settings: Settings | None = None, *, database: db.Database | None = None,
                 store: ObjectStore | None = None, enqueue: Callable[[str, str], None] | None = None,
                 metrics: Metrics | None = None) -> PruneryServer:
    """A server for `settings` (default: from the environment), bound to `settings.listen_address` (port 0:
    any free port; see `.port`) but not started. The database must be migrated (`db.upgrade`). `database`,
    `store` and `enqueue` replace the ones the settings describe (tests inject a counting `enqueue`);
    a database passed in is not disposed when the server stops."""
    settings = settings or Settings.from_env()
    cleanups: list[Callable[[], None]] = []
    if database is None:
        engine_kwargs: dict[str, Any] = {}
        if not db.normalize_url(settings.database_url).startswith("sqlite"):
            # a connection per pool thread (+ token lookups and the metrics scrape); a new Postgres
            # connection costs milliseconds of CPU, so they are kept
            engine_kwargs = {"pool_size": settings.grpc_workers + 2, "max_overflow": 8, "pool_timeout": 10}
        database = db.Database(settings.database_url, **engine_kwargs)
        cleanups.append(database.dispose)
    store = store or open_store(settings.store_url)
    if enqueue is None:
        enqueuer = CeleryEnqueuer(settings)
        cleanups.append(enqueuer.close)
        enqueue = enqueuer
    sender = RetryingSender(enqueue, may_resend=functools.partial(_record_resend, database))
    cleanups.insert(0, sender.close)
    metrics = metrics or Metrics(database)
    job_cache = None
    if settings.job_cache and database.engine.dialect.name == "postgresql":
        job_cache = JobCache(database.url)
        cleanups.append(job_cache.stop)
    pool = BlockingPool(settings.grpc_workers, settings.max_pending)
    limits = TenantLimits(rate=settings.tenant_rate, burst=settings.tenant_burst or 2 * settings.tenant_rate,
                          streams_per_tenant=settings.tenant_streams, max_streams=settings.max_streams)
    backend = ApiBackend(database=database, store=store, settings=settings, enqueue=sender, pool=pool,
                         metrics=metrics, job_cache=job_cache)
    runner = _LoopThread()

    async def make() -> tuple[grpc.aio.Server, Any, int]:
        server = grpc.aio.server(options=_server_options(settings))
        call_metrics = CallMetrics(metrics)
        auth = Authentication(TokenAuthenticator(database, cache_s=settings.auth_cache_s), pool, limits)

        def wrap(method: str, behavior: Behavior, streaming: bool) -> Behavior:  # metrics outermost
            return call_metrics.wrap(method, auth.wrap(method, behavior, streaming), streaming)

        services = prunery_pb2.DESCRIPTOR.services_by_name
        add_service(server, ArtifactService(backend), services["ArtifactService"], wrap)
        add_service(server, JobService(backend), services["JobService"], wrap)
        health_servicer = health.aio.HealthServicer()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # SERVING once started
        add_service(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"], wrap)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        try:
            port = server.add_insecure_port(settings.listen_address)
        except RuntimeError:
            port = 0
        return server, health_servicer, port

    try:
        server, health_servicer, port = runner.call(make())
    except BaseException:
        runner.close()
        pool.shutdown()
        for fn in cleanups:
            fn()
        raise
    if not port:
        runner.close()
        pool.shutdown()
        for fn in cleanups:
            fn()
        raise RuntimeError(f"cannot listen on {settings.listen_address!r} (in use, or not an address of this host)")
    return PruneryServer(server, runner, settings=settings, port=port, backend=backend,
                         health_servicer=health_servicer, metrics=metrics, limits=limits, cleanups=cleanups)


def serve(settings: Settings | None = None, *, grace_s: float = 10.0) -> None:
    """Run the API until SIGTERM or SIGINT (production: `prunery serve`)."""
    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.migrate:
        db.upgrade(settings.database_url)
    server = build_server(settings)
    server.start()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: stopping (grace %.0fs)", signum, grace_s)
            server.stop(grace_s)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    server.wait_for_termination()
