"""The job queue as the workers see it: the broker's transport options, sending a job's message (`send`), the
hand-backs waiting for their delay in a worker's main process (`send_later`, `flush_pending`), and what the broker
holds (`inspect_queue`, `restore_message`, `queue_depth`). Every function takes the Celery app to use
(`worker/app.py` makes it); this module imports no other of the worker's, so the reaper and the pipeline use it
without importing the app.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery

from ..service.store.queue import TASK_NAME, is_filesystem, is_redis, transport_options
from .settings import WorkerSettings

__all__ = ["HandedBack", "QueueView", "broker_transport_options", "ensure_broker_dirs", "flush_pending",
           "inspect_queue", "pending_jobs", "queue_depth", "restore_message", "send", "send_later"]

log = logging.getLogger("prunery.worker")

_SEND_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


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


def ensure_broker_dirs(settings: WorkerSettings) -> None:
    if is_filesystem(settings.broker_url):
        for key in ("data_folder_in", "control_folder", "processed_folder"):
            os.makedirs(broker_transport_options(settings)[key], exist_ok=True)


@dataclass(frozen=True, eq=False)
class HandedBack:
    """The next message of a job handed back, to send from the worker's main process."""

    celery: Celery
    job_id: str
    queue: str
    task_id: str
    retries: int

    def send(self) -> None:
        try:
            self.celery.send_task(TASK_NAME, args=[self.job_id], queue=self.queue, task_id=self.task_id,
                                  retries=self.retries, retry=True, retry_policy=_SEND_RETRY_POLICY)
        except Exception:
            log.exception("job %s: could not send its message again after handing it back; a reaper will send it "
                          "once it finds the job without one", self.job_id)


_pending_lock = threading.Lock()
_pending: dict[HandedBack, threading.Timer] = {}  # hand-backs waiting for their delay in this main process


def send_later(handed: HandedBack, delay: float) -> None:
    """Send `handed` after `delay` seconds (at once if none) from a timer thread of this process."""
    if delay <= 0:
        handed.send()
        return

    def fire() -> None:
        with _pending_lock:
            if _pending.pop(handed, None) is None:
                return  # sent by the shutdown's flush
        handed.send()

    timer = threading.Timer(delay, fire)
    timer.daemon = True
    with _pending_lock:
        _pending[handed] = timer
    timer.start()


def flush_pending() -> None:
    """Send the hand-backs still waiting for their delay at once (the worker is shutting down)."""
    with _pending_lock:
        waiting = list(_pending.items())
        _pending.clear()
    for handed, timer in waiting:
        timer.cancel()
        handed.send()


def pending_jobs() -> set[str]:
    with _pending_lock:
        return {handed.job_id for handed in _pending}


def send(celery: Celery, job_id: uuid.UUID | str, queue: str | None = None) -> None:
    """Send job `job_id` to the workers, by task name (the caller need not import the worker code).

    Call it after the job row is committed: a worker receiving the id must find the job. `queue`: the job's
    (default: the app's)."""
    target = celery
    settings: WorkerSettings = target.prunery_settings  # type: ignore[attr-defined]
    ensure_broker_dirs(settings)
    target.send_task(TASK_NAME, args=[str(job_id)], queue=queue or settings.queue, retry=True,
                     retry_policy=_SEND_RETRY_POLICY)


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
        if body is None:
            return None
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


def _settings_and_queue(celery: Celery, queue: str | None) -> tuple[Celery, WorkerSettings, str]:
    target = celery
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
    running), and of the jobs it handed back and sends again after a delay: empty outside a worker's main process.
    On a broker without an unacked record (filesystem, AMQP's message count) these are the taken messages the
    broker cannot show us; the delayed ones are nowhere in the broker."""
    held = pending_jobs()
    try:
        from celery.worker import state
    except ImportError:
        return held
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


def inspect_queue(celery: Celery, queue: str | None = None) -> QueueView:
    """Which jobs have a message outstanding for `queue` (default: this app's), read from the broker.

    - Redis: the queue's lists (the plain one and kombu's priority lists) and kombu's unacked hash (messages
      workers have taken and not acked: running, or retrying the claim; values are JSON
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


def restore_message(celery: Celery, job_id: uuid.UUID | str, queue: str | None = None) -> bool:
    """Give job `job_id` its message back in `queue` (the job's; default: this app's) without sending a new one, when
    the broker still holds one: True when it does (now waiting in the queue), False when it holds none (the caller
    sends a new message). For the reaper's requeue of a job whose lease expired (reaper.py).

    - Redis: the queue's lists and kombu's unacked hash are read in one MULTI/EXEC. A message of the job already
      waiting in a list: True, nothing moved. A message of the job in the unacked hash (a worker took it and died
      holding it): moved back to the job's queue (RPUSH to the list kombu would restore it to: the first to be
      taken) the way kombu's `QoS.restore_by_tag` does it, in one transaction under WATCH of the hash (HDEL of
      the record and ZREM of its `unacked_index` entry, RPUSH of the message, flagged redelivered), so it is
      never in both places nor in neither; a record acked, restored or changed meanwhile is read again. The
      message gets a new delivery tag: kombu keeps a restored message's tag, and a worker that took it
      would record it under the tag of the first holder; should that holder be alive after all and ack its old
      delivery later (HDEL and ZREM of a tag no longer there), or reject it back to the queue when its job process
      gives up (`task_reject_on_worker_lost`: kombu's restore_by_tag finds no record under that tag), nothing
      changes, where the same tag would drop, or duplicate, the next holder's message. Several unacked records of
      the job (should not happen): one is restored. With the key prefix applied throughout.
    - filesystem: a taken message is gone (no acks); True only for one waiting in the queue folder.
    - any other broker (AMQP): False (RabbitMQ itself requeues a dead consumer's unacked messages at once, and the
      redelivered copy was dropped while the lease was live)."""
    target, settings, queue = _settings_and_queue(celery, queue)
    job = str(uuid.UUID(str(job_id)))
    if is_filesystem(settings.broker_url):
        return job in {_job_of(m) for m in _filesystem_messages(settings, queue)}
    if not is_redis(settings.broker_url):
        return False
    with target.connection_for_write() as conn, conn.channel() as channel:
        if not hasattr(channel, "pool"):
            return False
        return _restore_redis(channel, job, queue)


RESTORE_TRIES = 20


def _restore_redis(channel: Any, job: str, queue: str) -> bool:
    import redis

    lists, unacked = _redis_keys(channel, queue)
    prefix = getattr(channel, "global_keyprefix", "") or ""
    index = prefix + getattr(channel, "unacked_index_key", "unacked_index")
    client = _redis_client(channel)
    for _ in range(RESTORE_TRIES):
        with client.pipeline(transaction=True) as pipe:
            for key in lists:
                pipe.lrange(key, 0, -1)
            pipe.hgetall(unacked)
            *waiting, taken = pipe.execute()
        if any(_job_of(_loads(raw)) == job for items in waiting for raw in items):
            return True
        held = []
        for tag, raw in taken.items():
            entry = _loads(raw)  # [message, exchange, routing_key]
            if isinstance(entry, list) and entry and _job_of(entry[0]) == job:
                held.append((tag, raw, entry[0]))
        if not held:
            return False
        if len(held) > 1:
            log.warning("job %s: %d of its messages are held unacked; restoring one", job, len(held))
        tag, raw, message = held[0]
        try:
            message["headers"]["redelivered"] = True  # as kombu's restore marks it
            message["properties"]["delivery_info"]["redelivered"] = True
        except (KeyError, TypeError):
            pass
        message.setdefault("properties", {})["delivery_tag"] = str(uuid.uuid4())
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.watch(unacked)
                if pipe.hget(unacked, tag) != raw:
                    continue  # acked, restored or changed since we read it: read again
                pipe.multi()
                pipe.zrem(index, tag)
                pipe.hdel(unacked, tag)
                pipe.rpush(prefix + _queue_list(channel, queue, message), json.dumps(message))
                pipe.execute()
            log.warning("job %s: restored the message a worker took and never acked (delivery %s) to queue %s",
                        job, tag.decode() if isinstance(tag, bytes) else tag, queue)
            return True
        except redis.WatchError:
            continue
    # the hash kept changing under us: leave the message where it is (Redis restores it after the visibility timeout)
    log.warning("job %s: could not restore its message held unacked (the unacked hash kept changing); it comes "
                "back after the visibility timeout", job)
    return True


def _queue_list(channel: Any, queue: str, message: Any) -> str:
    """The list of `queue` kombu keeps a message of its priority in (without the key prefix)."""
    try:
        return str(channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False)))
    except Exception:  # another kombu: the plain list
        return queue


def _loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def queue_depth(celery: Celery, queue: str | None = None) -> int:
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


