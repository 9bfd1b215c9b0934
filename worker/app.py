"""The Celery app of Prunery's workers, and `enqueue` for the API.

    celery -A prunery.worker.app worker --pool prefork -c 1 -Q prunery --without-gossip --without-mingle

One task, `prunery.run_job`, whose whole message is a job id; the job's state, spec and lease live in the
database (`prunery.service.store.jobs`), so a message may be delivered twice or lost without harm:

- late acks (`task_acks_late`) and `task_reject_on_worker_lost`: the message of a job whose process died
  goes back to the queue; `worker_prefetch_multiplier=1`: a worker holds no message it is not running;
- `worker_max_tasks_per_child=1`: every job runs in a freshly forked process that exits afterwards, which
  frees all its (GPU) memory. The main process never touches CUDA (it may import torch, which does not
  initialise CUDA; see `PRUNERY_WORKER_PRELOAD`), so forking stays safe;
- Redis `visibility_timeout` (PRUNERY_VISIBILITY_TIMEOUT_S, 1 h by default): an unacked message older than
  this is handed to another worker. For a job that is still running there, the redelivered task finds a
  live lease and returns (acking the copy): the lease, not the broker, says who runs a job;
- a reaper thread in each worker's main process (`prunery.worker.reaper`) requeues jobs whose lease
  expired (their worker died and no redelivery came) or fails them once their attempts are used up, and sends
  again the messages of QUEUED jobs it finds missing from the broker (`inspect_queue`);
- a task that cannot claim its job never uses Celery's `retry`, nor any message with an ETA (issue 10: never more
  than one outstanding message per job). Celery publishes a retry (same task id, an ETA) before the worker's main
  process acks the message being run (late acks: after the job process reports back): two messages for up to
  ~100 ms. And any ETA message breaks the broker's view: a worker holding one gets one more prefetch credit, so
  it BRPOPs; when the held task starts it takes that credit back, and kombu then keeps a message Redis has already
  popped for that BRPOP unread in the socket until the credit returns (after a whole job): in neither the queue
  nor the unacked hash, so the reaper finds that job without a message and sends it again. Instead:
  - the database (or anything else before the claim) is unavailable: the task tries again inside the same
    execution (`claim_retry_countdown` sleeps: 1, 2, 4 ... 30 s with +-25% jitter), holding its one message,
    for up to `claim_hold_s` (min(300 s, half the visibility timeout): a message held that long would be handed
    to another worker by Redis as well). The worker could run nothing else during an outage anyway (a warm
    shutdown meanwhile waits for the task, as for a running job). Past that bound it hands the job back at once
    (no delay: its backoff was spent holding the message), as below.
  - the job's tenant is at PRUNERY_TENANT_MAX_RUNNING: the task hands the job back with a delay (the worker
    stays free for other tenants' jobs; `jobs.mark_sent` has recorded the deferral).
  To hand back, the task raises `HandBack` (a Celery `Ignore`); the worker's main process
  (`HandBackRequest.on_failure`) first acks the message, then sends the job's next message (same task id, the
  retry count + 1), at once or, for a delay (`hand_back_delay`: the claim backoff, at most half
  PRUNERY_RESEND_QUEUED_S), from a timer of its own: the job has no message in the broker meanwhile, and no
  reaper looks for one, its `last_sent_at` being that recent (this worker's own reaper counts the timer as the
  job's message). A warm shutdown sends the pending ones at once. The job is never with two messages; between
  the ack and the send it has none, and if the main process dies then, or the send fails, the job is QUEUED
  without a message: a reaper's `resend_lost` finds it after PRUNERY_RESEND_QUEUED_S and sends it again. Should
  the ack itself fail (the broker connection drops at that instant), the old message comes back after the
  visibility timeout next to the new one: two messages, both harmless (the claim decides).

The broker is `PRUNERY_BROKER_URL` (Redis in production). The embedded default is kombu's `filesystem://`
transport with its folders under `PRUNERY_DATA_DIR/broker`: it needs no server and works across processes
(a message is a file; a consumer takes it by renaming it away, an atomic step within one file system, so
two processes never both take it). We prefer it to `sqla+sqlite://`, whose consumers poll a SQLite table
and contend with the API and workers for the same write lock. It has no acks (a message is gone once
taken); a job whose worker died is recovered by the reaper from its lease instead.
"""

from __future__ import annotations

import gc
import glob
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import Celery, Task, signals
from celery.exceptions import Ignore
from celery.worker.request import Request

from ..service.store.queue import TASK_NAME
from . import broker
from .broker import broker_transport_options
from .settings import WorkerSettings

__all__ = ["CLAIM_HOLD_MAX_S", "CLAIM_RETRY_MAX_S", "TASK_NAME", "HandBack", "HandBackRequest", "app",
           "broker_transport_options", "claim_hold_s", "claim_retry_countdown", "enqueue", "hand_back_delay",
           "inspect_queue", "main", "make_app", "queue_depth", "restore_message", "worker_argv", "worker_id"]


log = logging.getLogger("prunery.worker")

CLAIM_RETRY_MAX_S = 30.0  # the longest wait between two tries of a claim
CLAIM_HOLD_MAX_S = 300.0  # the longest a task keeps trying its claim while the database is unavailable


def worker_id() -> str:
    """Unique per job process (the lease owner): host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim_retry_countdown(retries: int) -> float:
    """Seconds before a claim that could not be made is tried again: 1, 2, 4 ... up to CLAIM_RETRY_MAX_S, +-25%
    jitter (so the jobs of one database outage do not all come back at once). The callers cap it by their own
    bounds (`claim_hold_s`, `hand_back_delay`)."""
    return round(min(CLAIM_RETRY_MAX_S, 2.0 ** min(retries, 16) * random.uniform(0.75, 1.25)), 2)


def claim_hold_s(settings: WorkerSettings) -> float:
    """How long a task keeps trying a claim the database refuses, holding its message, before it hands it back:
    min(300 s, half the visibility timeout; past the timeout Redis would give the message to another worker too)."""
    return min(CLAIM_HOLD_MAX_S, settings.visibility_timeout_s / 2)


def hand_back_delay(retries: int, settings: WorkerSettings) -> float:
    """The delay before a job handed back at its tenant's limit is sent again: `claim_retry_countdown`, at most half
    PRUNERY_RESEND_QUEUED_S (the job has no message in the broker meanwhile, and its `last_sent_at`, just recorded,
    must stay too recent for any reaper to look for one)."""
    delay = claim_retry_countdown(retries)
    if settings.resend_queued_s > 0:
        delay = min(delay, settings.resend_queued_s / 2)
    return delay


class HandBack(Ignore):
    """Raised by the task whose job cannot be claimed now: the worker's main process acks its message, then sends
    the job's next message, `countdown` seconds later (`HandBackRequest`). A Celery `Ignore`: no failure is
    recorded."""

    def __init__(self, job_id: str, countdown: float, reason: str) -> None:
        super().__init__(job_id, countdown, reason)  # all the args: it pickles (the job process sends it up)
        self.job_id, self.countdown, self.reason = job_id, countdown, reason

    def __str__(self) -> str:
        return f"job {self.job_id} handed back ({self.reason}); sent again in {self.countdown:.1f}s"


class HandBackRequest(Request):
    """The task's request in the worker's main process: after a `HandBack`, ack first, then send the next message.

    Celery's base `on_failure` acks an `Ignore` (synchronously: on Redis, the HDEL of the unacked record has happened
    when it returns); only then is the job's next message published from this process (as Celery itself does for
    `task_retry_on_worker_lost`), at once or from a timer (`_send_later`). Nothing here raises into the worker's
    event loop."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        if isinstance(exc, HandBack):
            try:
                target: Celery = self.task.app
                queue = (self.delivery_info or {}).get("routing_key") or target.prunery_settings.queue  # type: ignore[attr-defined]
                retries = int((self.request_dict or {}).get("retries") or 0) + 1
                broker.send_later(broker.HandedBack(target, exc.job_id, queue, self.id, retries), exc.countdown)
            except Exception:
                log.exception("job %s: could not send its message again after handing it back; a reaper will send "
                              "it once it finds the job without one", exc.job_id)


def make_app(settings: WorkerSettings | None = None, *, main: bool = False) -> Celery:
    """A Celery app for `settings` (default: from the environment) with the `prunery.run_job` task."""
    settings = settings or WorkerSettings.from_env()
    celery = Celery("prunery", set_as_current=main)
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        # keep running a job when the broker connection drops: the lease keeps it owned, and its message
        # comes back to some worker after the visibility timeout anyway
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    celery.prunery_settings = settings  # type: ignore[attr-defined]

    @celery.task(name=TASK_NAME, ignore_result=True, bind=True, max_retries=None, Request=HandBackRequest)
    def run_job(self: Task, job_id: str) -> dict[str, Any]:
        # imported here: the engine (torch) loads in worker processes only, never in the API
        from . import pipeline

        hold_until = time.monotonic() + claim_hold_s(settings)
        tries = 0
        while True:
            try:
                return pipeline.run_job(job_id, worker_id(), settings=settings,
                                        enqueue_fn=lambda jid: enqueue(jid, celery=celery))
            except pipeline.ClaimDeferred as deferred:
                remaining = hold_until - time.monotonic()
                if deferred.reason == "UNAVAILABLE" and remaining > 0:  # hold the message, try again here
                    delay = min(claim_retry_countdown(tries), remaining)
                    log.warning("job %s: not claimed now (%s); trying again in %.1fs, holding its message", job_id,
                                deferred, delay)
                    time.sleep(delay)
                    tries += 1
                    continue
                # hand it back: our main process acks this message, then sends the next one (HandBackRequest)
                delay = 0.0 if deferred.reason == "UNAVAILABLE" else hand_back_delay(self.request.retries, settings)
                log.warning("job %s: not claimed now (%s); sending it again in %.1fs", job_id, deferred, delay)
                raise HandBack(str(job_id), delay, str(deferred)) from None

    return celery


app = make_app(main=True)


def enqueue(job_id: uuid.UUID | str, queue: str | None = None, *, celery: Celery | None = None) -> None:
    """Send job `job_id` to the workers (`broker.send`) through `celery` (default: this module's app)."""
    broker.send(celery or app, job_id, queue)


def inspect_queue(celery: Celery | None = None, queue: str | None = None) -> broker.QueueView:
    return broker.inspect_queue(celery or app, queue)


def restore_message(job_id: uuid.UUID | str, queue: str | None = None, *, celery: Celery | None = None) -> bool:
    return broker.restore_message(celery or app, job_id, queue)


def queue_depth(celery: Celery | None = None, queue: str | None = None) -> int:
    return broker.queue_depth(celery or app, queue)


def worker_argv(settings: WorkerSettings | None = None, *extra: str) -> list[str]:
    """`celery worker` arguments of a Prunery worker: prefork, ONE job process at a time (one job per GPU:
    run one worker per GPU, each with its CUDA_VISIBLE_DEVICES), our queue, no gossip/mingle/heartbeat
    (we need no worker-to-worker chatter; liveness is the lease)."""
    settings = settings or app.prunery_settings  # type: ignore[attr-defined]
    return ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", settings.queue, "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel", os.environ.get("PRUNERY_LOG_LEVEL", "INFO"),
            *extra]


def main(argv: list[str] | None = None) -> None:
    """Run a worker in this process (`python -m prunery.worker [celery worker options]`), configured from
    the environment; returns when it shuts down (SIGTERM/SIGINT: warm shutdown)."""
    import sys

    app.worker_main(worker_argv(None, *(sys.argv[1:] if argv is None else argv)))


# ---------------------------------------------------------------------------------------------------------
# The worker's main process: metrics server, engine preload, reaper thread
# ---------------------------------------------------------------------------------------------------------

_main: dict[str, Any] = {}


def _prepare_metrics_dir() -> str:
    """Our own PROMETHEUS_MULTIPROC_DIR, emptied, set before prometheus-client is imported (metrics.py). A folder
    we make is named after this process (`prunery-worker-metrics-{pid}-`), so that once it is dead another worker
    knows the folder is left over (`metrics.remove_orphaned_dirs`)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = _main["own_metrics_dir"] = tempfile.mkdtemp(prefix=f"prunery-worker-metrics-{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        os.unlink(f)
    return path


def _settings_of(sender: Any) -> WorkerSettings:
    """The settings of the app whose worker sent a signal (our module's app unless made by make_app)."""
    return getattr(getattr(sender, "app", None), "prunery_settings", None) or app.prunery_settings


def _prompt_process_replacement(interval_s: float = 0.5) -> None:
    """Replace a job process that exited within `interval_s` rather than up to 5 s later.

    With one task per process, a task received while its process is exiting waits until the pool notices
    the exit; the pool sometimes misses the exit event and only finds out on its `maintain_pool` timer,
    every 5 s (celery/celery#9588, open). We run that timer every `interval_s` instead; it only polls the
    pool's processes. Guarded: if Celery's internals differ, this does nothing.
    """
    try:
        from celery.concurrency.asynpool import AsynPool
    except ImportError:
        return
    timers = AsynPool.__dict__.get("timers")
    if not isinstance(timers, property) or timers.fget is None or getattr(AsynPool, "_prunery_patched", False):
        return
    original = timers.fget

    def _timers(self: Any) -> dict[Any, float]:
        return {fn: min(every, interval_s) if getattr(fn, "__name__", "") == "maintain_pool" else every
                for fn, every in original(self).items()}

    AsynPool.timers = property(_timers)  # type: ignore[method-assign,assignment]
    AsynPool._prunery_patched = True  # type: ignore[attr-defined]


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_kwargs: Any) -> None:
    settings = _settings_of(sender)
    _prompt_process_replacement()
    broker.ensure_broker_dirs(settings)
    _prepare_metrics_dir()
    from . import metrics

    metrics.remove_orphaned_dirs()  # those of workers killed on this host
    if settings.metrics_port:
        _main["metrics"] = metrics.MetricsServer(settings.metrics_port, settings.metrics_addr)
    if settings.preload:
        t0 = time.perf_counter()
        from . import pipeline  # torch, imported once; CUDA stays untouched

        pipeline.preload_engine()
        _main["preload_s"] = time.perf_counter() - t0
    # Move everything imported so far out of the garbage collector's sight: Celery runs gc.collect() before
    # each fork (0.15 s over torch's objects), and job processes then share these pages instead of copying them
    gc.collect()
    gc.freeze()


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    from .reaper import Reaper

    celery = getattr(sender, "app", None) or app
    reaper = Reaper(_settings_of(sender), celery)
    reaper.start()
    _main["reaper"] = reaper
    if "preload_s" in _main:
        log.info("engine preloaded in %.1fs", _main["preload_s"])
    if "metrics" in _main:
        server = _main["metrics"]
        log.info("worker metrics on port %d (multiprocess files in %s)", server.port,
                 os.environ["PROMETHEUS_MULTIPROC_DIR"])


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_kwargs: Any) -> None:
    broker.flush_pending()
    reaper = _main.pop("reaper", None)
    if reaper is not None:
        reaper.stop()
    server = _main.pop("metrics", None)
    if server is not None:
        threading.Thread(target=server.close, daemon=True).start()
    own_dir = _main.pop("own_metrics_dir", None)
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)
