"""The Celery app of Prunery's workers, and `enqueue` for the API.

    celery -A prunery.worker.app worker --pool prefork -c 1 -Q prunery --without-gossip --without-mingle

One task, `prunery.run_job`, whose whole message is a job id; the job's state, spec and lease live in the
database (`prunery.service.jobs`), so a message may be delivered twice or lost without harm:

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
- a task that cannot claim its job, because the database (or anything before the claim) is unavailable or the
  job's tenant is at PRUNERY_TENANT_MAX_RUNNING, retries itself (`claim_retry_countdown`: 1, 2, 4 ... 30 s with
  jitter, never more than half the visibility timeout, without limit on the count). Celery publishes the retry
  (the same task id, an ETA) before it acks the message it runs, so the job is never without a message; a worker
  holds a message with an ETA until it is due, unacked (on Redis: in the unacked hash, where the reaper sees it).

The broker is `PRUNERY_BROKER_URL` (Redis in production). The embedded default is kombu's `filesystem://`
transport with its folders under `PRUNERY_DATA_DIR/broker`: it needs no server and works across processes
(a message is a file; a consumer takes it by renaming it away, an atomic step within one file system, so
two processes never both take it). We prefer it to `sqla+sqlite://`, whose consumers poll a SQLite table
and contend with the API and workers for the same write lock. It has no acks (a message is gone once
taken); a job whose worker died is recovered by the reaper from its lease instead.
"""

from __future__ import annotations

import base64
import gc
import glob
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, signals

from prunery.service.queue import TASK_NAME, is_filesystem, is_redis, transport_options
from prunery.worker.settings import WorkerSettings

__all__ = ["CLAIM_RETRY_MAX_S", "TASK_NAME", "QueueView", "app", "broker_transport_options", "claim_retry_countdown",
           "enqueue", "inspect_queue", "main", "make_app", "queue_depth", "worker_argv", "worker_id"]


log = logging.getLogger("prunery.worker")

CLAIM_RETRY_MAX_S = 30.0  # the longest countdown of a task retrying its claim


def worker_id() -> str:
    """Unique per job process (the lease owner): host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def broker_transport_options(settings: WorkerSettings) -> dict[str, Any]:
    options = transport_options(settings)
    if is_filesystem(settings.broker_url):
        return options
    options["visibility_timeout"] = settings.visibility_timeout_s
    if is_redis(settings.broker_url):
        # look for unacked messages older than the visibility timeout every few seconds (kombu's default
        # scan runs every ~100 s), so a lost worker's message comes back soon after the timeout
        options.update(unacked_restore_interval=max(1, min(10, int(settings.visibility_timeout_s / 6))),
                       unacked_restore_throttle=1, socket_timeout=30, socket_connect_timeout=10)
    return options


def _ensure_broker_dirs(settings: WorkerSettings) -> None:
    if is_filesystem(settings.broker_url):
        for key in ("data_folder_in", "control_folder", "processed_folder"):
            os.makedirs(broker_transport_options(settings)[key], exist_ok=True)


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

    @celery.task(name=TASK_NAME, ignore_result=True, bind=True, max_retries=None)
    def run_job(self: Task, job_id: str) -> dict[str, Any]:
        # imported here: the engine (torch) loads in worker processes only, never in the API
        from prunery.worker import pipeline

        try:
            return pipeline.run_job(job_id, worker_id(), settings=settings,
                                    enqueue_fn=lambda jid: enqueue(jid, celery=celery))
        except pipeline.ClaimDeferred as deferred:
            countdown = claim_retry_countdown(self.request.retries, settings)
            log.warning("job %s: not claimed now (%s); trying again in %.1fs", job_id, deferred, countdown)
            raise self.retry(exc=deferred, countdown=countdown, max_retries=None) from None

    return celery


app = make_app(main=True)


def enqueue(job_id: uuid.UUID | str, queue: str | None = None, *, celery: Celery | None = None) -> None:
    """Send job `job_id` to the workers, by task name (the caller need not import the worker code).

    Call it after the job row is committed: a worker receiving the id must find the job. `queue`: the job's
    (default: this app's)."""
    target = celery or app
    settings: WorkerSettings = target.prunery_settings  # type: ignore[attr-defined]
    _ensure_broker_dirs(settings)
    target.send_task(TASK_NAME, args=[str(job_id)], queue=queue or settings.queue, retry=True,
                     retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2.0})


def claim_retry_countdown(retries: int, settings: WorkerSettings) -> float:
    """Seconds before a task that could not claim its job tries again: 1, 2, 4 ... up to CLAIM_RETRY_MAX_S, +-25%
    jitter (so the jobs of one database outage do not all come back at once), and never more than half the
    visibility timeout (a worker holds the retried message unacked meanwhile; past the timeout, Redis would hand
    it to another worker as well)."""
    cap = min(CLAIM_RETRY_MAX_S, settings.visibility_timeout_s / 2)
    return round(min(cap, 2.0 ** min(retries, 16) * random.uniform(0.75, 1.25)), 2)


# ---------------------------------------------------------------------------------------------------------
# What the broker holds
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueView:
    """What the broker holds for one queue (`inspect_queue`)."""

    job_ids: frozenset[str]  # jobs with a message waiting in the queue, or taken by a worker and not acked yet
    ready: int  # messages waiting in the queue (not counting those a worker has taken)
    listed: bool  # job_ids names every message the broker holds for the queue; False: only `ready` is known


def _job_of(message: Any) -> str | None:
    """The job id in a kombu message of our task (a dict: `headers`, `properties`, `body`), else None.

    Celery's protocol 2 puts the task name in the headers and `[args, kwargs, embed]` in the body (protocol 1:
    a dict with `task` and `args`); kombu's virtual transports (Redis, filesystem) store the body base64-encoded
    (`properties.body_encoding`). Only JSON is accepted (`accept_content`), so nothing else can be ours."""
    if not isinstance(message, dict):
        return None
    try:
        body = message.get("body")
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        headers = message.get("headers") or {}
        if isinstance(decoded, list):
            task, args = headers.get("task"), decoded[0]
        else:
            task, args = decoded.get("task"), decoded.get("args")
        if task != TASK_NAME or not args:
            return None
        return str(uuid.UUID(str(args[0])))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):  # not a message of ours
        return None


def _settings_and_queue(celery: Celery | None, queue: str | None) -> tuple[Celery, WorkerSettings, str]:
    target = celery or app
    settings: WorkerSettings = target.prunery_settings  # type: ignore[attr-defined]
    return target, settings, queue or settings.queue


def _redis_keys(channel: Any, queue: str) -> tuple[list[str], str]:
    """The Redis keys kombu's channel keeps `queue` in (its list, and one per priority step) and its unacked hash,
    with the channel's `global_keyprefix` applied (kombu's own size query forgets it)."""
    prefix = getattr(channel, "global_keyprefix", "") or ""
    sep = getattr(channel, "sep", "\x06\x16")
    steps = getattr(channel, "priority_steps", [0, 3, 6, 9])
    lists = [prefix + queue] + [f"{prefix}{queue}{sep}{step}" for step in steps if step]
    return list(dict.fromkeys(lists)), prefix + getattr(channel, "unacked_key", "unacked")


def _redis_client(channel: Any) -> Any:
    """A plain client on kombu's connection pool (its URL, TLS, sentinel, ... settings): we prefix keys ourselves,
    kombu's prefixing client prefixes only the commands kombu itself sends."""
    import redis

    return redis.Redis(connection_pool=channel.pool)


def _filesystem_messages(settings: WorkerSettings, queue: str) -> list[Any]:
    """The messages waiting in the filesystem broker's folder for `queue` (kombu: `{ms}_{uuid}.{queue}.msg`,
    JSON). A message a consumer takes meanwhile is skipped; one being written is read again once."""
    folder = broker_transport_options(settings)["data_folder_in"]
    try:
        names = sorted(n for n in os.listdir(folder) if n.partition(".")[2] == f"{queue}.msg")
    except FileNotFoundError:
        return []
    messages = []
    for name in names:
        for attempt in range(2):
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    messages.append(json.loads(f.read()))
                break
            except FileNotFoundError:
                break  # taken by a consumer
            except ValueError:
                if attempt == 0:
                    time.sleep(0.05)  # kombu writes in place: give a writer a moment
                else:
                    log.warning("ignoring an unreadable message file %s in the broker folder", name)
    return messages


def _held_here() -> set[str]:
    """Job ids of the task requests this process's Celery consumer holds (scheduled for an ETA, reserved, or
    running): empty outside a worker's main process. On a broker without an unacked record (filesystem, AMQP's
    message count) these are the taken messages the broker cannot show us."""
    try:
        from celery.worker import state
    except ImportError:
        return set()
    held: set[str] = set()
    for name in ("scheduled_requests", "reserved_requests", "active_requests"):
        group = getattr(state, name, None)
        if group is None:
            continue
        for _ in range(20):  # the consumer's thread may change the set while we copy it
            try:
                requests = list(group)
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            raise RuntimeError(f"could not read the worker's {name}")
        for request in requests:
            args = getattr(request, "args", None)
            if getattr(request, "name", None) == TASK_NAME and args:
                try:
                    held.add(str(uuid.UUID(str(args[0]))))
                except ValueError:
                    pass
    return held


def inspect_queue(celery: Celery | None = None, queue: str | None = None) -> QueueView:
    """Which jobs have a message outstanding for `queue` (default: this app's), read from the broker.

    - Redis: the queue's lists (the plain one and kombu's priority lists) and kombu's unacked hash (messages
      workers have taken and not acked: running, or held for a retry's countdown; values are JSON
      `[message, exchange, routing_key]`), with the key prefix applied, read in one MULTI/EXEC so a message
      moving between them is seen once. Exact, except for the instant between a worker's BRPOP and its HSET of
      the unacked record, when the message is in neither (the reaper reads twice before believing a loss).
    - filesystem: the message files in the queue folder. A message a worker has taken is gone from the folder:
      this process's own worker's requests are added; other processes' are not visible.
    - any other broker (AMQP): no listing; `ready` is the queue's ready-message count from a passive
      queue_declare (exact on RabbitMQ, which leaves out unacked messages), `listed` is False.
    The requests this process's worker holds (`_held_here`) are added in every case."""
    target, settings, queue = _settings_and_queue(celery, queue)
    held = _held_here()
    if is_filesystem(settings.broker_url):
        messages = _filesystem_messages(settings, queue)
        found = {j for j in map(_job_of, messages) if j is not None}
        return QueueView(frozenset(found | held), len(messages), True)
    with target.connection_for_read() as conn, conn.channel() as channel:
        if is_redis(settings.broker_url) and hasattr(channel, "pool"):
            lists, unacked = _redis_keys(channel, queue)
            with _redis_client(channel).pipeline(transaction=True) as pipe:
                for key in lists:
                    pipe.lrange(key, 0, -1)
                pipe.hvals(unacked)
                *waiting, taken = pipe.execute()
            payloads = [_loads(raw) for items in waiting for raw in items]
            for raw in taken:  # [message, exchange, routing_key]
                entry = _loads(raw)
                payloads.append(entry[0] if isinstance(entry, list) and entry else None)
            found = {j for j in map(_job_of, payloads) if j is not None}
            return QueueView(frozenset(found | held), sum(len(items) for items in waiting), True)
        try:
            ready = int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:
            ready = 0  # the queue does not exist (yet)
        return QueueView(frozenset(held), ready, False)


def _loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def queue_depth(celery: Celery | None = None, queue: str | None = None) -> int:
    """Messages waiting in the queue (default: this app's), not counting those a worker has taken."""
    target, settings, queue = _settings_and_queue(celery, queue)
    if is_filesystem(settings.broker_url):
        return len(_filesystem_messages(settings, queue))
    with target.connection_for_read() as conn, conn.channel() as channel:
        if is_redis(settings.broker_url) and hasattr(channel, "pool"):
            lists, _unacked = _redis_keys(channel, queue)
            with _redis_client(channel).pipeline(transaction=False) as pipe:
                for key in lists:
                    pipe.llen(key)
                return sum(int(n) for n in pipe.execute())
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:
            return 0


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
    _ensure_broker_dirs(settings)
    _prepare_metrics_dir()
    from prunery.worker import metrics

    metrics.remove_orphaned_dirs()  # those of workers killed on this host
    if settings.metrics_port:
        _main["metrics"] = metrics.MetricsServer(settings.metrics_port, settings.metrics_addr)
    if settings.preload:
        t0 = time.perf_counter()
        from prunery.worker import pipeline  # torch, imported once; CUDA stays untouched

        pipeline.preload_engine()
        _main["preload_s"] = time.perf_counter() - t0
    # Move everything imported so far out of the garbage collector's sight: Celery runs gc.collect() before
    # each fork (0.15 s over torch's objects), and job processes then share these pages instead of copying them
    gc.collect()
    gc.freeze()


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    from prunery.worker.reaper import Reaper

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
    reaper = _main.pop("reaper", None)
    if reaper is not None:
        reaper.stop()
    server = _main.pop("metrics", None)
    if server is not None:
        threading.Thread(target=server.close, daemon=True).start()
    own_dir = _main.pop("own_metrics_dir", None)
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)
