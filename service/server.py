"""The API server: a thread-pool gRPC server with ArtifactService and JobService behind bearer-token
authentication, standard health checking (`grpc.health.v1`), server reflection, and Prometheus metrics on
a separate HTTP port.

    server = build_server(Settings.from_env())   # binds the port; a grpc.Server
    server.start(); print(server.address); server.wait_for_termination()

`serve()` is the production entry point (`prunery serve`): settings from `PRUNERY_*`, migrations to head
(unless PRUNERY_MIGRATE=0), graceful stop on SIGTERM/SIGINT. Never imports torch.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from prunery.service import db
from prunery.service.api import ApiBackend, ArtifactService, JobService
from prunery.service.auth import AuthInterceptor, TokenAuthenticator
from prunery.service.jobcache import JobCache
from prunery.service.metrics import Metrics, MetricsInterceptor
from prunery.service.objectstore import ObjectStore, open_store
from prunery.service.queue import CeleryEnqueuer
from prunery.service.settings import Settings
from prunery.v1 import prunery_pb2, prunery_pb2_grpc

__all__ = ["SERVICE_NAMES", "PruneryServer", "build_server", "serve"]

log = logging.getLogger("prunery.service")

SERVICE_NAMES = tuple(s.full_name for s in prunery_pb2.DESCRIPTOR.services_by_name.values())


class PruneryServer(grpc.Server):
    """A grpc.Server (delegating to the real one) that also owns the metrics endpoint, the health status and
    the database engine, and knows its bound port: `port`, `address`, `metrics_port` (after `start()`)."""

    def __init__(self, server: grpc.Server, *, settings: Settings, port: int, backend: ApiBackend,
                 health_servicer: health.HealthServicer, metrics: Metrics,
                 cleanups: Sequence[Callable[[], None]] = ()) -> None:
        self._server = server
        self.settings, self.port, self.backend = settings, port, backend
        self.health, self.metrics = health_servicer, metrics
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        self._cleanups = list(cleanups)
        self._stopped = threading.Event()
        host = settings.listen_address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"

    # grpc.Server
    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        if self.settings.metrics_port is not None:
            self._metrics_httpd, _thread = start_http_server(self.settings.metrics_port, self.settings.metrics_addr,
                                                             registry=self.metrics.registry)
            self.metrics_port = int(self._metrics_httpd.server_port)
        if self.backend.job_cache is not None:
            self.backend.job_cache.start()
        # everything loaded so far lives as long as the server: keep it out of the collector's full passes,
        # which otherwise stall every request thread for milliseconds (the GetJob p99)
        gc.collect()
        gc.freeze()
        self._server.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("Prunery API on %s (metrics: %s)", self.address,
                 f"http://{self.settings.metrics_addr}:{self.metrics_port}/metrics" if self.metrics_port else "off")

    def stop(self, grace: float | None) -> threading.Event:
        """Health turns NOT_SERVING at once; calls in flight get `grace` seconds; then the metrics endpoint
        and the database pool close."""
        self.health.enter_graceful_shutdown()
        done = self._server.stop(grace)

        def finish() -> None:
            done.wait()
            self._cleanup()

        threading.Thread(target=finish, name="prunery-api-stop", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def _cleanup(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        for fn in self._cleanups:
            try:
                fn()
            except Exception:
                log.exception("cleanup failed while stopping the API server")


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
            # a connection per request thread (+ the metrics scrape): connections opened past the pool are
            # closed again on return, and a new Postgres connection costs milliseconds of CPU
            engine_kwargs = {"pool_size": settings.grpc_workers + 2, "max_overflow": 8}
        database = db.Database(settings.database_url, **engine_kwargs)
        cleanups.append(database.dispose)
    store = store or open_store(settings.store_url)
    if enqueue is None:
        enqueuer = CeleryEnqueuer(settings)
        cleanups.append(enqueuer.close)
        enqueue = enqueuer
    metrics = metrics or Metrics(database)
    job_cache = None
    if settings.job_cache and database.engine.dialect.name == "postgresql":
        job_cache = JobCache(database.url)
        cleanups.append(job_cache.stop)
    backend = ApiBackend(database=database, store=store, settings=settings, enqueue=enqueue, metrics=metrics,
                         job_cache=job_cache)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="prunery-api"),
        interceptors=[MetricsInterceptor(metrics),
                      AuthInterceptor(TokenAuthenticator(database, cache_s=settings.auth_cache_s))],
        options=[("grpc.so_reuseport", 0)],  # a port in use is an error, not a second server sharing it
    )
    prunery_pb2_grpc.add_ArtifactServiceServicer_to_server(ArtifactService(backend), server)
    prunery_pb2_grpc.add_JobServiceServicer_to_server(JobService(backend), server)
    health_servicer = health.HealthServicer()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # SERVING once started
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    try:
        port = server.add_insecure_port(settings.listen_address)
    except RuntimeError as e:
        port, error = 0, e
    else:
        error = None
    if not port:
        for fn in cleanups:
            fn()
        raise RuntimeError(f"cannot listen on {settings.listen_address!r} (in use, or not an address of this host)"
                           ) from error
    return PruneryServer(server, settings=settings, port=port, backend=backend, health_servicer=health_servicer,
                         metrics=metrics, cleanups=cleanups)


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
    server._cleanup()
