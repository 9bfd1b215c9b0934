"""The reaper's resend of lost messages, the claim's retry, and the worker's housekeeping, on real parts (issue 10).

Real Postgres databases (and, to take one away from a worker, a Postgres cluster of our own), the shared Redis
under a unique key prefix per stack (`PRUNERY_BROKER_KEYPREFIX`), the embedded filesystem broker, and real
`celery worker` processes (tests/workers.py). What the broker holds is read in the tests with their own code
(`redis_outstanding`, `_folder_outstanding`), independently of the product's inspection.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch

from prunery.service.store.db import upgrade
from prunery.service.store.testing import temporary_postgres_database
from prunery.worker.app import enqueue, make_app, queue_depth
from prunery.worker.settings import WorkerSettings
from tests import zoo
from tests.workers import (
    FINAL,
    REDIS_URL,
    BrokerMessage,
    Stack,
    owner_pid,
    postgres_cluster,
    redis_messages,
    redis_outstanding,
)

LOST = 'prunery_jobs_requeued_total{reason="message_lost"}'


@pytest.fixture(scope="module")
def conv1d_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.export.save(zoo.export("conv1d"), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with temporary_postgres_database(prefix="prunery_reaper_test") as url:
        upgrade(url)
        yield url


@pytest.fixture
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A fresh queue and key prefix on the shared database; the test starts its workers."""
    st = Stack(database_url, tmp_path_factory.mktemp("objects"), tmp_path_factory.mktemp("reaper"))
    try:
        yield st
    finally:
        st.close()


class Sampler(threading.Thread):
    """Reads what the broker holds for each job every `interval_s` while a test runs; keeps the most messages
    seen at once for each job."""

    def __init__(self, read: Callable[[], Counter[str]], interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.interval_s = interval_s
        self.most: Counter[str] = Counter()
        self.samples = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                for job, n in self.read().items():
                    self.most[job] = max(self.most[job], n)
                self.samples += 1
            except BaseException as e:  # reported by stop()
                self.error = e
                return
            self._stop_event.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop_event.set()
        self.join(10)
        if self.error is not None:
            raise self.error


def _redis_sampler(st: Stack) -> Sampler:
    client = redis.Redis.from_url(REDIS_URL)
    return Sampler(lambda: redis_outstanding(client, st.prefix, st.queue))


class _MessageLog:
    """Every message of ours seen by a sampler (`redis_messages`), for the checks of what was sent."""

    def __init__(self, st: Stack) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
        self.st = st
        self.seen: set[BrokerMessage] = set()

    def read(self) -> Counter[str]:
        messages = redis_messages(self.client, self.st.prefix, self.st.queue)
        self.seen.update(messages)
        return Counter(m.job for m in messages)

    def etas(self, job_id: uuid.UUID) -> set[str]:
        return {m.eta for m in self.seen if m.job == str(job_id) and m.eta}


def _folder_outstanding(st: Stack) -> Counter[str]:
    return _folder_outstanding_of(st.settings)


def _folder_outstanding_of(settings: WorkerSettings) -> Counter[str]:
    """Messages per job id in the filesystem broker's queue folder (kombu: `{ms}_{uuid}.{queue}.msg`, JSON)."""
    found: Counter[str] = Counter()
    folder = settings.broker_dir / "queue"
    for path in folder.glob(f"*.{settings.queue}.msg"):
        try:
            message = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            continue  # taken meanwhile, or being written
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        found[str(args[0])] += 1
    return found


def _resends(st: Stack, job_id: uuid.UUID) -> int:
    return sum("sent again" in e.message for e in st.events(job_id))


def _settle(worker: object, sample: str, ticks_s: float = 1.5) -> float:
    """The value of a metric once it has stopped moving for `ticks_s` (several reaper ticks)."""
    value = worker.metric(sample)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(ticks_s)
        now = worker.metric(sample)  # type: ignore[attr-defined]
        if now == value:
            return now
        value = now
    raise AssertionError(f"{sample} keeps moving: {value}")


# ---------------------------------------------------------------------------------------------------------
# The broker inspection, on its own
# ---------------------------------------------------------------------------------------------------------

def _redis_settings(tmp_path: Path, prefix: str) -> WorkerSettings:
    """Under a prefix, the shared Redis database; without one, a database of this xdist worker's own, emptied
    first (kombu's unacked hash has a fixed name there: two such tests in parallel would see each other's)."""
    url = REDIS_URL
    if not prefix:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        url = REDIS_URL.rsplit("/", 1)[0] + f"/{10 + int(worker) % 6 if worker.isdigit() else 10}"
        redis.Redis.from_url(url).flushdb()
    return WorkerSettings(data_dir=tmp_path, database_url="sqlite://", store_url=tmp_path.as_uri(),
                          broker_url=url, queue=f"q-{uuid.uuid4().hex[:10]}", broker_keyprefix=prefix)


def test_queue_depth_counts_messages_under_a_key_prefix(tmp_path: Path) -> None:
    """kombu's passive queue_declare does not apply `global_keyprefix` (it always answered 0 under a prefix)."""
    settings = _redis_settings(tmp_path, f"prunery-test-{uuid.uuid4().hex[:10]}:")
    celery = make_app(settings)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for _ in range(3):
            enqueue(uuid.uuid4(), celery=celery)
        assert client.llen(settings.broker_keyprefix + settings.queue) == 3  # where kombu put them
        assert queue_depth(celery) == 3
    finally:
        keys = list(client.scan_iter(match=f"{settings.broker_keyprefix}*"))
        if keys:
            client.delete(*keys)
        celery.close()
        client.close()


@pytest.mark.parametrize("prefixed", [True, False], ids=["prefix", "no-prefix"])
def test_redis_inspection_lists_queued_priority_and_unacked_messages(tmp_path: Path, prefixed: bool) -> None:
    from prunery.worker.app import inspect_queue

    prefix = f"prunery-test-{uuid.uuid4().hex[:10]}:" if prefixed else ""
    settings = _redis_settings(tmp_path, prefix)
    other_queue = f"other-{uuid.uuid4().hex[:10]}"
    celery = make_app(settings)
    client = redis.Redis.from_url(settings.broker_url)
    plain, urgent, taken = (str(uuid.uuid4()) for _ in range(3))
    message = None
    try:
        enqueue(plain, celery=celery)
        celery.send_task("prunery.run_job", args=[urgent], queue=settings.queue, priority=9)  # kombu's priority list
        enqueue(taken, celery=celery)
        enqueue(uuid.uuid4(), queue=other_queue, celery=celery)  # another queue's message is not ours
        assert client.llen(f"{prefix}{settings.queue}\x06\x169") == 1
        view = inspect_queue(celery)
        assert (view.listed, view.ready, view.job_ids) == (True, 3, {plain, urgent, taken})

        # a consumer takes `taken` without acking it (kombu moves it to the unacked hash): still outstanding
        with celery.connection_for_read() as conn, conn.channel() as channel:
            for _ in range(3):
                message = channel.basic_get(settings.queue, no_ack=False)
                if message.decode()[0] == [taken]:
                    break
                message.reject(requeue=True)
            else:
                raise AssertionError("could not take the message of `taken`")
            assert client.hlen(prefix + "unacked") >= 1
            view = inspect_queue(celery)
            assert (view.ready, view.job_ids) == (2, {plain, urgent, taken})
            message.ack()
            message = None
            view = inspect_queue(celery)
            assert (view.ready, view.job_ids) == (2, {plain, urgent})
            assert queue_depth(celery) == 2
    finally:
        if message is not None:
            message.ack()
        keys = [k for pattern in (f"{prefix}*{settings.queue}*", f"{prefix}*{other_queue}*")
                for k in client.scan_iter(match=pattern)]
        if keys:
            client.delete(*keys)
        celery.close()
        client.close()


def test_filesystem_inspection_lists_the_queue_folder(tmp_path: Path) -> None:
    from prunery.worker.app import inspect_queue

    settings = WorkerSettings(data_dir=tmp_path, database_url="sqlite://", store_url=tmp_path.as_uri(),
                              broker_url="filesystem://")
    celery = make_app(settings)
    try:
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        enqueue(first, celery=celery)
        enqueue(second, celery=celery)
        enqueue(str(uuid.uuid4()), queue="elsewhere", celery=celery)
        view = inspect_queue(celery)
        assert (view.listed, view.ready, view.job_ids) == (True, 2, {first, second})
        (tmp_path / "broker" / "queue" / "~garbage.prunery.msg").write_text("{not json")  # ignored (sorts last)
        with celery.connection_for_read() as conn, conn.channel() as channel:
            taken = channel.basic_get(settings.queue, no_ack=True)  # renamed into processed/
            assert taken is not None
        view = inspect_queue(celery)
        assert view.ready == 1 and len(view.job_ids) == 1 and view.job_ids <= {first, second}
    finally:
        celery.close()


@pytest.mark.parametrize("prefixed", [True, False], ids=["prefix", "no-prefix"])
def test_a_taken_message_is_restored_to_its_queue_with_a_new_delivery_tag(tmp_path: Path, prefixed: bool) -> None:
    """`restore_message` moves a job's unacked message (a consumer took it and never acked) back to the job's queue
    in one MULTI/EXEC: never in both places, never in neither. Its new delivery tag makes a late ack or reject of
    the old delivery (a worker that was alive after all) a no-op that leaves the next consumer's record alone."""
    from prunery.worker.app import restore_message

    prefix = f"prunery-test-{uuid.uuid4().hex[:10]}:" if prefixed else ""
    settings = _redis_settings(tmp_path, prefix)
    celery = make_app(settings)
    client = redis.Redis.from_url(settings.broker_url)
    job, waiting, other = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    try:
        enqueue(job, celery=celery)
        with celery.connection_for_read() as first_conn, first_conn.channel() as first, \
                celery.connection_for_read() as second_conn, second_conn.channel() as second:
            taken = first.basic_get(settings.queue, no_ack=False)  # a worker takes it, then dies (or not)
            assert taken is not None and taken.decode()[0] == [job]
            assert [m.where.split(":")[0] for m in redis_messages(client, prefix, settings.queue)] == ["unacked"]
            assert client.zcard(prefix + "unacked_index") == 1

            assert restore_message(job, settings.queue, celery=celery) is True
            [back] = redis_messages(client, prefix, settings.queue)
            assert (back.job, back.where) == (job, "queue")  # moved: the unacked record and its index entry gone
            assert client.hlen(prefix + "unacked") == 0 and client.zcard(prefix + "unacked_index") == 0

            again = second.basic_get(settings.queue, no_ack=False)  # another worker takes the restored message
            assert again is not None and again.decode()[0] == [job] and again.headers["id"] == taken.headers["id"]
            assert again.delivery_tag != taken.delivery_tag and again.delivery_info.get("redelivered") is True
            # the first worker was alive after all: its job process gives up and the main process rejects its old
            # delivery back to the queue (task_reject_on_worker_lost): kombu finds no record under that tag
            taken.reject(requeue=True)
            assert [m.where for m in redis_messages(client, prefix, settings.queue)] == [
                f"unacked:{again.delivery_tag}"]

            # the second worker dies too; the third takes the message; the second's late ack changes nothing
            assert restore_message(job, settings.queue, celery=celery) is True
            third = second_conn.channel()
            try:
                last = third.basic_get(settings.queue, no_ack=False)
                assert last is not None and last.delivery_tag not in (taken.delivery_tag, again.delivery_tag)
                again.ack()
                assert [m.where for m in redis_messages(client, prefix, settings.queue)] == [
                    f"unacked:{last.delivery_tag}"]
                last.ack()
            finally:
                third.close()
            assert not redis_outstanding(client, prefix, settings.queue)
            assert client.hlen(prefix + "unacked") == 0 and client.zcard(prefix + "unacked_index") == 0

        # a job whose message waits in its queue keeps it; a job without one is left for the caller to send
        enqueue(waiting, celery=celery)
        assert restore_message(waiting, settings.queue, celery=celery) is True
        assert restore_message(other, settings.queue, celery=celery) is False
        assert redis_outstanding(client, prefix, settings.queue) == Counter({waiting: 1})
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*{settings.queue}*"))
        keys += [prefix + "unacked", prefix + "unacked_index"] if prefixed else []
        if keys:
            client.delete(*keys)
        celery.close()
        client.close()


def test_a_job_handed_back_waits_in_the_main_process_then_is_sent_once(tmp_path: Path) -> None:
    """A job handed back with a delay has no message in the broker until the worker's main process sends it (no ETA
    copy: a worker holding one BRPOPs on extra prefetch credit, and kombu may keep what Redis popped for it unread
    for a whole job); meanwhile this worker's reaper counts it as held; a warm shutdown sends it at once."""
    from prunery.worker import broker

    prefix = f"prunery-test-{uuid.uuid4().hex[:10]}:"
    settings = _redis_settings(tmp_path, prefix)
    celery = make_app(settings)
    client = redis.Redis.from_url(REDIS_URL)
    late, soon = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        first = broker.HandedBack(celery, late, settings.queue, str(uuid.uuid4()), 3)
        broker.send_later(first, 60)
        assert late in broker._held_here()  # what the reaper's inspect_queue adds to the broker's view
        assert not redis_outstanding(client, prefix, settings.queue)
        broker.flush_pending()  # the worker's shutdown
        [sent] = redis_messages(client, prefix, settings.queue)
        assert (sent.job, sent.task_id, sent.eta, sent.where) == (late, first.task_id, None, "queue")
        assert late not in broker._held_here()

        second = broker.HandedBack(celery, soon, settings.queue, str(uuid.uuid4()), 1)
        broker.send_later(second, 0.3)
        deadline = time.monotonic() + 5
        while not redis_outstanding(client, prefix, settings.queue)[soon]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert soon not in broker._held_here()
        broker.flush_pending()  # nothing left to send
        assert redis_outstanding(client, prefix, settings.queue) == Counter({late: 1, soon: 1})
    finally:
        broker.flush_pending()
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        celery.close()
        client.close()


def test_restore_message_on_the_filesystem_broker_finds_nothing(tmp_path: Path) -> None:
    """The filesystem broker has no acks (a taken message is gone): there is nothing to restore, the reaper sends
    a new message; one still waiting in the queue folder counts."""
    from prunery.worker.app import restore_message

    settings = WorkerSettings(data_dir=tmp_path, database_url="sqlite://", store_url=tmp_path.as_uri(),
                              broker_url="filesystem://")
    celery = make_app(settings)
    try:
        job = str(uuid.uuid4())
        assert restore_message(job, celery=celery) is False
        enqueue(job, celery=celery)
        assert restore_message(job, celery=celery) is True
        assert len(_folder_outstanding_of(settings)) == 1
    finally:
        celery.close()


# ---------------------------------------------------------------------------------------------------------
# Resending lost messages, with real workers
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_backlog_under_a_key_prefix_keeps_one_message_per_job(stack: Stack, conv1d_bytes: bytes) -> None:
    """12 jobs for 1 worker, the first one slow: most wait far longer than PRUNERY_RESEND_QUEUED_S. The reaper
    must see their messages (under the key prefix) and send none again."""
    worker = stack.start_worker("one", PRUNERY_RESEND_QUEUED_S="2", PRUNERY_REAPER_INTERVAL_S="0.5",
                                PRUNERY_VISIBILITY_TIMEOUT_S="30").wait_ready()
    model = stack.upload(conv1d_bytes)
    with _redis_sampler(stack) as sampler:
        ids = [stack.submit(model, labels={"prunery-test-delay": "prune=2"})]
        ids += [stack.submit(model) for _ in range(11)]
        for job_id in ids:
            stack.succeeded(job_id, timeout=120)
    assert sampler.samples > 50
    assert len(set(sampler.most) & {str(i) for i in ids}) >= 10  # the sampler saw them waiting
    assert max(sampler.most.values()) == 1, {j: n for j, n in sampler.most.items() if n > 1}
    for job_id in ids:
        events = stack.events(job_id)
        assert [e.state for e in events].count("SUCCEEDED") == 1
        assert stack.job(job_id).attempt_count == 1
        assert _resends(stack, job_id) == 0
    assert _settle(worker, LOST) == 0
    assert not redis_outstanding(redis.Redis.from_url(REDIS_URL), stack.prefix, stack.queue)


@pytest.mark.slow
def test_lost_messages_are_sent_again_exactly_once(stack: Stack, conv1d_bytes: bytes) -> None:
    """Behind a slow job: one job's message deleted from the Redis list, one job row never sent; a third waits
    with its message. The first two are sent again once each; the third is left alone."""
    worker = stack.start_worker("one", PRUNERY_RESEND_QUEUED_S="2", PRUNERY_REAPER_INTERVAL_S="0.5",
                                PRUNERY_VISIBILITY_TIMEOUT_S="30").wait_ready()
    model = stack.upload(conv1d_bytes)
    client = redis.Redis.from_url(REDIS_URL)
    with _redis_sampler(stack) as sampler:
        slow = stack.submit(model, labels={"prunery-test-delay": "prune=8"})
        stack.wait(slow, lambda j: j.state == "RUNNING", timeout=60)
        waiting = stack.submit(model)
        deleted = stack.submit(model)
        never_sent = stack.create(model)
        key = stack.prefix + stack.queue
        raw = next(m for m in client.lrange(key, 0, -1)
                   if str(deleted) in base64.b64decode(json.loads(m)["body"]).decode())
        assert client.lrem(key, 1, raw) == 1  # the broker lost it
        for job_id in (slow, waiting, deleted, never_sent):
            stack.succeeded(job_id, timeout=90)
    assert max(sampler.most.values()) == 1, sampler.most
    assert [_resends(stack, j) for j in (slow, waiting, deleted, never_sent)] == [0, 0, 1, 1]
    for job_id in (slow, waiting, deleted, never_sent):
        assert [e.state for e in stack.events(job_id)].count("SUCCEEDED") == 1
    assert _settle(worker, LOST) == 2
    # one gauge of queued jobs: the API's, measured from the database (the worker's read its last reaper tick)
    assert "prunery_jobs_queued" not in worker.metrics()


@pytest.mark.slow
def test_filesystem_broker_sends_a_lost_message_again_exactly_once(conv1d_bytes: bytes, tmp_path: Path) -> None:
    """The embedded stack (SQLite, folder store, filesystem broker): jobs waiting in the queue folder behind a
    slow job are left alone; a job row whose message never came is sent again once."""
    url = f"sqlite:///{tmp_path / 'prunery.db'}"
    upgrade(url)
    st = Stack(url, tmp_path / "objects", tmp_path, embedded=True)
    try:
        worker = st.start_worker("embedded", PRUNERY_RESEND_QUEUED_S="2", PRUNERY_REAPER_INTERVAL_S="0.5",
                                 PRUNERY_DATABASE_URL=url).wait_ready()
        model = st.upload(conv1d_bytes)
        with Sampler(lambda: _folder_outstanding(st)) as sampler:
            slow = st.submit(model, labels={"prunery-test-delay": "prune=8"})
            st.wait(slow, lambda j: j.state == "RUNNING", timeout=60)
            waiting = [st.submit(model) for _ in range(3)]
            never_sent = st.create(model)
            # sent again while the queue is not empty (the jobs behind the slow one wait in it)
            deadline = time.monotonic() + 30
            while not _resends(st, never_sent):
                assert time.monotonic() < deadline, worker.log_tail()
                time.sleep(0.1)
            assert st.job(slow).state == "RUNNING" and all(st.job(j).state == "QUEUED" for j in waiting)
            for job_id in (slow, *waiting, never_sent):
                st.succeeded(job_id, timeout=90)
        assert max(sampler.most.values()) == 1, sampler.most
        assert [_resends(st, j) for j in (slow, *waiting, never_sent)] == [0, 0, 0, 0, 1]
        assert _settle(worker, LOST) == 1
    finally:
        st.close()


# ---------------------------------------------------------------------------------------------------------
# A worker killed mid-job: its message is restored, not sent again
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_message_of_a_sigkilled_worker_is_restored_not_sent_again(stack: Stack, conv1d_bytes: bytes) -> None:
    """A worker SIGKILLed mid-job leaves the job's message in the unacked hash. When the lease expires the reaper
    moves that very message back to the queue (Redis would give it back only after the visibility timeout, 2 min
    here): the job has one message throughout, runs again at once, succeeds once, and nothing of it is left in the
    broker afterwards."""
    env = {"PRUNERY_VISIBILITY_TIMEOUT_S": "120"}
    a, b = stack.start_worker("a", **env), stack.start_worker("b", **env)
    a.wait_ready()
    b.wait_ready()
    model = stack.upload(conv1d_bytes)
    messages = _MessageLog(stack)
    with Sampler(messages.read) as sampler:
        job_id = stack.submit(model, labels={"prunery-test-delay": "prune=3"})
        running = stack.wait(job_id, lambda j: j.state == "RUNNING" and j.stage == "prune", timeout=60)
        victim = next(w for w in (a, b) if w.owns(owner_pid(running)))
        survivor = b if victim is a else a
        [held] = [m for m in redis_messages(messages.client, stack.prefix, stack.queue) if m.job == str(job_id)]
        assert held.where.startswith("unacked:")
        victim.kill()  # main process and job process: no ack, no reject, no cleanup
        t0 = time.monotonic()
        job = stack.succeeded(job_id, timeout=60)
        assert time.monotonic() - t0 < 30, "recovered by the reaper, not by the visibility timeout"
        # the survivor acks the restored message once the job's process has reported back
        deadline = time.monotonic() + 10
        while redis_outstanding(messages.client, stack.prefix, stack.queue)[str(job_id)]:
            assert time.monotonic() < deadline, redis_messages(messages.client, stack.prefix, stack.queue)
            time.sleep(0.05)
        time.sleep(1.5)  # a few more samples (and reaper ticks) after the ack
    assert sampler.samples > 50
    assert sampler.most[str(job_id)] == 1, sampler.most
    assert {m.task_id for m in messages.seen if m.job == str(job_id)} == {held.task_id}  # one message, moved
    assert not redis_outstanding(messages.client, stack.prefix, stack.queue)
    assert messages.client.hlen(stack.prefix + "unacked") == 0
    assert messages.client.zcard(stack.prefix + "unacked_index") == 0
    assert job.attempt_count == 2 and f"claimed by {job.lease_owner} " in survivor.log_tail(10**6)
    events = stack.events(job_id)
    assert [e.state for e in events].count("SUCCEEDED") == 1
    assert sum("expired; queued again" in e.message for e in events) == 1 and _resends(stack, job_id) == 0
    assert f"job {job_id}: restored the message" in survivor.log_tail(10**6)
    assert survivor.metric('prunery_jobs_requeued_total{reason="lease_expired"}') == 1
    messages.client.close()


# ---------------------------------------------------------------------------------------------------------
# The claim retries while the database is down
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("visibility_s", [120, 6], ids=["holds-its-message", "hands-it-back"])
def test_a_job_sent_while_the_database_is_down_runs_when_it_is_back(conv1d_bytes: bytes, tmp_path: Path,
                                                                    visibility_s: int) -> None:
    """The task cannot claim its job: it tries again inside the same execution (backoff with jitter), holding the
    job's one message, for up to min(300 s, half the visibility timeout); past that (a 6 s visibility timeout: 3 s)
    it hands the job back: the worker's main process acks the message, then sends the next one. Never Celery's
    retry (which publishes before the ack: two messages for a moment), never a message with an ETA. Sampled every
    50 ms: at most one message for the job, never none for long; it runs once Postgres is back, long before the
    reaper's resend (600 s here)."""
    holds = visibility_s == 120
    with postgres_cluster() as pg:
        upgrade(pg.url)
        st = Stack(pg.url, tmp_path / "objects", tmp_path)
        try:
            worker = st.start_worker("one", PRUNERY_RESEND_QUEUED_S="600",
                                     PRUNERY_VISIBILITY_TIMEOUT_S=str(visibility_s)).wait_ready()
            job_id = st.create(st.upload(conv1d_bytes))
            st.db.dispose()
            messages = _MessageLog(st)
            with Sampler(messages.read) as sampler:
                pg.stop()
                st.send(job_id)
                # meanwhile the job keeps its message: in the list, or held unacked by the worker (running the task,
                # or for a countdown); never missing from several readings in a row (a worker's pop and its unacked
                # record are two steps, and so are the main process's ack and its send)
                client = redis.Redis.from_url(REDIS_URL)
                deadline, misses, readings = time.monotonic() + 8, 0, 0
                while time.monotonic() < deadline:
                    misses = 0 if redis_outstanding(client, st.prefix, st.queue)[str(job_id)] else misses + 1
                    readings += 1
                    assert misses < 3, worker.log_tail()
                    time.sleep(0.05)
                client.close()
                log = worker.log_tail(10**6)
                assert readings > 80 and f"job {job_id}: not claimed now (UNAVAILABLE" in log, log
                pg.start()
                t0 = time.monotonic()
                job = st.succeeded(job_id, timeout=60)
                assert time.monotonic() - t0 < 45
                time.sleep(0.5)
            assert sampler.samples > 100
            assert sampler.most[str(job_id)] == 1, sampler.most
            assert job.attempt_count == 1 and _resends(st, job_id) == 0
            log = worker.log_tail(10**6)
            assert "] retry: " not in log, log  # Celery's retry was never used
            assert messages.etas(job_id) == set(), messages.seen  # nor a message with a countdown
            assert len({m.task_id for m in messages.seen if m.job == str(job_id)}) == 1, messages.seen
            assert "trying again in" in log, log
            handed_back = re.findall(rf"job {job_id}: not claimed now \(UNAVAILABLE.*sending it again in 0.0s", log)
            assert (len(handed_back) == 0) if holds else (len(handed_back) >= 1), log
            assert not redis_outstanding(messages.client, st.prefix, st.queue)
            messages.client.close()
        finally:
            st.close()


# ---------------------------------------------------------------------------------------------------------
# The worker's temporary metrics folder
# ---------------------------------------------------------------------------------------------------------

def _metrics_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("prunery-worker-metrics-*"))


@pytest.mark.slow
def test_the_metrics_folder_of_a_sigkilled_worker_is_removed(stack: Stack, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first = stack.start_worker("first", own_metrics_dir=True, TMPDIR=str(tmp)).wait_ready()
    [left] = _metrics_dirs(tmp)
    assert left.name.startswith(f"prunery-worker-metrics-{first.proc.pid}-")  # named after its owner
    first.kill()  # SIGKILL: no shutdown handler runs
    assert left.exists()
    # a folder of another dead process, and one of a live process (ours), next to it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_dir = tmp / f"prunery-worker-metrics-{int(dead.stdout)}-abcdefgh"
    live_dir = tmp / f"prunery-worker-metrics-{os.getpid()}-abcdefgh"
    dead_dir.mkdir()
    live_dir.mkdir()

    second = stack.start_worker("second", own_metrics_dir=True, TMPDIR=str(tmp)).wait_ready()
    deadline = time.monotonic() + 10
    while left.exists() or dead_dir.exists():
        assert time.monotonic() < deadline, _metrics_dirs(tmp)
        time.sleep(0.2)
    [own] = [p for p in _metrics_dirs(tmp) if p != live_dir]
    assert own.name.startswith(f"prunery-worker-metrics-{second.proc.pid}-")
    assert live_dir.exists()

    # the reaper removes such folders too, not only a starting worker
    later = tmp / f"prunery-worker-metrics-{int(dead.stdout)}-ijklmnop"
    later.mkdir()
    deadline = time.monotonic() + 10
    while later.exists():
        assert time.monotonic() < deadline, _metrics_dirs(tmp)
        time.sleep(0.2)
    second.stop()
    assert not own.exists()  # a clean shutdown removes its own folder


# ---------------------------------------------------------------------------------------------------------
# A limit on each tenant's running jobs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_tenant_at_its_running_limit_waits_while_others_run(stack: Stack, conv1d_bytes: bytes) -> None:
    """A job of a tenant at PRUNERY_TENANT_MAX_RUNNING is handed back (its worker stays free for other tenants'
    jobs): the worker's main process acks its message first, then sends the next one after a delay (from a timer of
    its own: no message with an ETA), so the broker never holds two messages for it (sampled every 50 ms), and no
    reaper takes it for lost meanwhile."""
    env = {"PRUNERY_TENANT_MAX_RUNNING": "1", "PRUNERY_RESEND_QUEUED_S": "2", "PRUNERY_VISIBILITY_TIMEOUT_S": "30"}
    a, b = stack.start_worker("a", **env), stack.start_worker("b", **env)
    a.wait_ready()
    b.wait_ready()
    busy_model, other_model = stack.upload(conv1d_bytes, tenant="busy"), stack.upload(conv1d_bytes, tenant="other")
    messages = _MessageLog(stack)
    with Sampler(messages.read) as sampler:
        # `first` runs long enough for the other tenant's job to pass through the free worker even on a loaded CI
        # machine (a fresh job process per job: 6 s was once not enough there)
        first = stack.submit(busy_model, tenant="busy", labels={"prunery-test-delay": "prune=20"})
        stack.wait(first, lambda j: j.state == "RUNNING", timeout=60)
        second = stack.submit(busy_model, tenant="busy")
        other = stack.submit(other_model, tenant="other")

        # while `first` runs, `second` waits (a worker is free), and the other tenant's job runs on that worker
        most_running, other_done_first = 0, False
        while (first_now := stack.job(first)).state == "RUNNING":
            jobs_now = [first_now, stack.job(second)]
            most_running = max(most_running, sum(j.state in ("RUNNING", "CANCELLING") for j in jobs_now))
            other_done_first = other_done_first or stack.job(other).state == "SUCCEEDED"
            time.sleep(0.1)
        assert most_running == 1
        assert other_done_first, stack.job(other).state
        stack.succeeded(first)
        job = stack.succeeded(second, timeout=60)
        time.sleep(0.5)
    assert job.attempt_count == 1
    assert [_resends(stack, j) for j in (first, second, other)] == [0, 0, 0]
    assert not [e for e in stack.events(second) if e.state in FINAL and e.state != "SUCCEEDED"]
    assert sampler.samples > 50 and max(sampler.most.values()) == 1, sampler.most
    assert not [m for m in messages.seen if m.eta], messages.seen
    logs = a.log_tail(10**6) + b.log_tail(10**6)
    assert re.search(rf"job {second}: not claimed now \(TENANT_AT_LIMIT.*sending it again in \d", logs), logs
    assert "] retry: " not in logs, logs
    messages.client.close()
