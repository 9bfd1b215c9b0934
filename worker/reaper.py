"""The reaper: no job stays stuck because its worker died or its message was lost.

How a job survives the death of its worker (the lease, the broker and the reaper together):

- A worker owns a job through a lease in the database (`jobs.claim`, a compare-and-set that also counts the
  attempt); the job process renews it every `PRUNERY_HEARTBEAT_S` for `PRUNERY_LEASE_S`.
- When a job process dies, the worker's main process rejects its message back to the queue
  (`task_reject_on_worker_lost`); when the whole worker dies, its message stays in Redis's unacked hash, and
  Redis would hand it to another worker only after `PRUNERY_VISIBILITY_TIMEOUT_S` (1 h). A redelivered task
  claims the job only once the lease has expired; while it is live (the job still runs elsewhere) the copy is
  acked and dropped.
- Redelivery is not enough: the copy may have been dropped while the job was still alive (and its worker
  died later), the embedded broker has no redelivery at all, a message can be lost outright, and an hour is too
  long. So every worker's main process runs this reaper every `PRUNERY_REAPER_INTERVAL_S`: jobs RUNNING with an
  expired lease go back to QUEUED (`jobs.requeue_expired`), or FAIL with TOO_MANY_ATTEMPTS once their attempts
  are used up, so a job that kills its worker every time ends instead of looping; CANCELLING jobs with an
  expired lease become CANCELLED. Requeued jobs go back to the queue they were created for (`jobs.queue`: one
  per worker pool, e.g. a GPU class), whichever pool the reaper's worker serves.
- A requeued job gets its own message back rather than a new one (after the commit; `requeue_message`): a job
  must have at most one message outstanding (issue 10), and a worker SIGKILLed mid-job leaves the job's message
  in Redis's unacked hash. Sending a new message would give the job two: the new one, and the stale one Redis
  restores after the visibility timeout (then run again, or dropped by the claim, up to an hour later). So the
  reaper first asks the broker (`prunery.worker.app.restore_message`): a message of the job held unacked is
  moved back to the job's queue in one Redis transaction, exactly as kombu's own restore would do it an hour
  later, and runs at once; a message already waiting in the queue is left there; only when the broker holds
  none (the filesystem broker, which has no acks; AMQP, where RabbitMQ requeued a dead consumer's message at
  once and the copy was dropped while the lease was live; a message truly lost) is a new one sent. The moved
  message gets a new delivery tag, so a worker that was alive after all (it lost its lease, e.g. cut off from
  the database) and acks or rejects its old delivery when its job process gives up changes nothing: kombu's ack
  of a tag no longer in the unacked hash is a no-op (HDEL/ZREM of a missing field), its reject-to-requeue finds
  no record to move, and the next holder's record stands.
  Not covered: the instant between a worker's pop of a message (BRPOP) and its record as unacked (HSET), when
  a message is in neither place; a job whose message is exactly there when the reaper looks (a redelivered
  copy being taken) gets a new one too, a brief duplicate the claim makes harmless.
- Duplicates are harmless: every path goes through `jobs.claim`, so a job runs in one place at a time, and
  an attempt is counted per claim. Reapers of several workers may run at once: each job row is locked.

Lost messages (`resend_lost`). A QUEUED job must have one message in the broker; it can lose it (the API died
between its commit and its send, the broker lost it). Every path that sends a job's message first records when
(`jobs.last_sent_at`: creation, a requeue, a release, a claim deferred by the tenant limit, a resend). For the
QUEUED jobs of its own queue sent more than `PRUNERY_RESEND_QUEUED_S` ago, the reaper asks the broker which jobs
have a message outstanding (`prunery.worker.app.inspect_queue`): on Redis the queue's lists and kombu's unacked
hash (a message a worker has taken, running or retrying its claim, stays there until acked), read with the key
prefix applied; on the filesystem broker the queue folder (plus the requests this worker holds); on another broker
(AMQP) only the ready count, and then it resends only when that queue is empty. A job found without a message is a
suspect; it is resent only if it is still without one at a reading at least `CONFIRM_S` later (which covers the
instant between a worker's pop of a message and its record of it as unacked). The resend locks the row (SKIP
LOCKED) and checks again that the job is still QUEUED there and was last sent before the cutoff, moves
`last_sent_at` to now (with an event) and sends after the commit: a job claimed or sent again meanwhile is left
alone, and two reapers never both resend one job. `prunery_jobs_requeued_total{reason="message_lost"}` counts these
resends: true losses only.

What it does not see: a worker killed while holding a message for a job it had not claimed yet (it popped it, or
was retrying the claim while the database was away). The job is QUEUED, with no lease to expire, so nothing tells
the reaper its holder is dead. On Redis the message is in the unacked hash, so the job counts as having one until
Redis restores it to the queue after `PRUNERY_VISIBILITY_TIMEOUT_S`; on the filesystem broker, another worker's
held message is invisible, so such a job may be sent twice (harmless: the claim decides). A job handed back at its
tenant's limit has no message at all while its worker's main process waits to send the next one (at most half
`PRUNERY_RESEND_QUEUED_S`, after `jobs.mark_sent`): too recent for this sweep, and that worker's own reaper counts
it as held; if that process dies meanwhile, the message is lost and resent like any other. The workers never send
a message with an ETA (see app.py): a worker holding one BRPOPs on extra credit, and kombu may then keep a message
Redis popped for it unread for a whole job, in neither the queue nor the unacked hash, which this sweep would take
for lost.

The reaper also deletes what a crash of the API leaves of an upload (`sweep_pending_uploads`, at most every
`UPLOAD_SWEEP_INTERVAL_S`). An upload first reserves a PENDING artifact row, then streams its object, then
makes the row READY; a failed upload deletes both. An API killed in between leaves the PENDING row (counted
in its tenant's cap, invisible to clients) and perhaps the object, or a folder store's temporary file or an
S3 incomplete multipart upload. PENDING rows older than `PRUNERY_PENDING_UPLOAD_TTL_S` have their object
deleted, then their row; stale temporary files of a folder store go too. S3 incomplete multipart uploads
are left to the bucket's `AbortIncompleteMultipartUpload` lifecycle rule.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from ..service.store import jobs
from ..service.store.db import Artifact, ArtifactState, Database, Job, JobState, utcnow
from ..service.store.objectstore import ObjectStore
from . import broker
from .broker import QueueView
from .metrics import pid_alive, remove_orphaned_dirs
from .settings import WorkerSettings

__all__ = ["ReapResult", "Reaper", "UploadSweep", "reap_expired", "requeue_message", "resend_lost",
           "sweep_pending_uploads"]

log = logging.getLogger("prunery.worker.reaper")

EnqueueFn = Callable[[uuid.UUID, str], None]  # (job id, its queue)

# a job found without a message is resent only when a reading of the broker at least this much later finds it
# without one too (a worker's pop and its record of the message as unacked are two steps)
CONFIRM_S = 1.0
# at most this many QUEUED jobs of the queue are compared with the broker per sweep (the oldest sent first)
RESEND_SCAN_LIMIT = 10_000

# the sweep scans the artifacts table for PENDING rows, and they age for hours: no need to look every tick
UPLOAD_SWEEP_INTERVAL_S = 300.0


@dataclass
class ReapResult:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)  # attempts used up (TOO_MANY_ATTEMPTS)
    cancelled: list[uuid.UUID] = field(default_factory=list)  # CANCELLING whose worker died


def _after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run `fn` once the session's transaction has committed (never if it rolls back)."""

    def _run(_session: Session) -> None:
        try:
            fn()
        except Exception:  # the commit stands; the job waits for the next sweep to be sent again
            log.exception("sending after commit failed")

    event.listen(session, "after_commit", _run, once=True)


def requeue_message(job_id: uuid.UUID, queue: str, celery: Any) -> bool:
    """Give a job whose lease expired a message in `queue` (its own): its old one restored from the broker when it
    still holds one (`restore_message`), else a new one. True when the old one was kept (see the module doc)."""
    if broker.restore_message(celery, job_id, queue):
        log.info("job %s: the broker still holds its message; no new one sent", job_id)
        return True
    broker.send(celery, job_id, queue)
    return False


def reap_expired(session: Session, *, enqueue_fn: EnqueueFn | None, limit: int = 100) -> ReapResult:
    """Requeue (or fail, or finish cancelling) RUNNING/CANCELLING jobs whose lease expired.

    The state changes are made in `session` (the caller commits); after that commit each requeued job gets a
    message in its own queue (whichever pool this reaper's worker serves) from `enqueue_fn` (None: none is sent),
    so a worker receiving one always finds it QUEUED. The reaper's is `requeue_message`, which restores the job's
    old message when the broker still holds it (a dead worker's, unacked) and sends a new one only otherwise."""
    now = utcnow()
    expired = {
        job_id: state
        for job_id, state in session.execute(
            select(Job.id, Job.state)
            .where(Job.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value]), Job.lease_expires_at < now)
            .limit(limit))
    }
    result = ReapResult()
    if not expired:
        return result
    result.requeued = jobs.requeue_expired(session, now=now, limit=limit)
    for job_id, state in session.execute(select(Job.id, Job.state).where(Job.id.in_(list(expired)))):
        if state == JobState.FAILED and job_id not in result.requeued:
            result.failed.append(job_id)
        elif state == JobState.CANCELLED and expired[job_id] == JobState.CANCELLING:
            result.cancelled.append(job_id)
    for job_id in result.requeued:
        log.warning("job %s: its worker stopped renewing the lease; queued again", job_id)
    for job_id in result.failed:
        log.warning("job %s: its worker died on every attempt; failed", job_id)
    if result.requeued and enqueue_fn is not None:
        queues = dict(session.execute(select(Job.id, Job.queue).where(Job.id.in_(result.requeued))).all())
        sends = [(i, queues[i]) for i in result.requeued]
        send = enqueue_fn

        def send_all() -> None:
            for i, q in sends:
                send(i, q)

        _after_commit(session, send_all)
    return result


def resend_lost(session: Session, older_than_s: float, inspect: Callable[[], QueueView], queue: str, *,
                missing_since: dict[uuid.UUID, float] | None = None, confirm_s: float = CONFIRM_S,
                enqueue_fn: EnqueueFn | None, limit: int = 100) -> list[uuid.UUID]:
    """Send again the jobs of `queue` that lost their message (see the module doc); return their ids.

    Candidates: QUEUED on `queue`, last sent more than `older_than_s` ago. `inspect()` reads the broker. A
    candidate without a message is resent once it has been without one for `confirm_s` across calls:
    `missing_since` (job id -> time.monotonic() it was first found without one) carries that between calls and
    belongs to the caller (the reaper keeps one); with confirm_s=0 the first reading suffices. At most `limit`
    jobs are resent per call; their rows are updated in `session` and they are sent after its commit."""
    suspects = {} if missing_since is None else missing_since
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    stale = list(session.scalars(
        select(Job.id).where(Job.state == JobState.QUEUED.value, Job.queue == queue, jobs.sent_time() < cutoff)
        .order_by(jobs.sent_time(), Job.id).limit(RESEND_SCAN_LIMIT)))
    if not stale:
        suspects.clear()
        return []
    view = inspect()
    if view.listed or view.ready == 0:  # a broker that cannot list its messages: only an empty queue tells
        missing = [j for j in stale if str(j) not in view.job_ids]
    else:
        missing = []
    t = time.monotonic()
    for job_id in set(suspects) - set(missing):
        del suspects[job_id]  # it has a message (or is no longer a candidate)
    confirmed = [j for j in missing if t - suspects.setdefault(j, t) >= confirm_s]
    if not confirmed:
        return []
    resent = jobs.record_resend(session, confirmed[:limit], queue=queue, sent_before=cutoff, now=now)
    for job_id in resent:
        suspects.pop(job_id, None)
    if resent:
        log.warning("%d job(s) of queue %s last sent over %.0fs ago have no message in the broker (lost); sending "
                    "again: %s", len(resent), queue, older_than_s, ", ".join(map(str, resent)))
        if enqueue_fn is not None:
            send = enqueue_fn

            def send_all() -> None:
                for i in resent:
                    send(i, queue)

            _after_commit(session, send_all)
    return resent


@dataclass
class UploadSweep:
    artifacts: list[uuid.UUID] = field(default_factory=list)  # PENDING rows deleted, with their objects
    temp_files: int = 0  # stale temporary files of the object store deleted


def sweep_pending_uploads(session: Session, store: ObjectStore, ttl_s: float, *, limit: int = 100) -> UploadSweep:
    """Delete the uploads a crash of the API left unfinished: PENDING artifacts created more than `ttl_s`
    ago lose their object (a missing one is fine), then their row (in `session`; the caller commits).

    Rows are locked with SKIP LOCKED, so concurrent reapers take different rows, and a row an upload is
    making READY right now is skipped (or, once this commits, the upload finds its row gone and deletes its
    object). A row whose object cannot be deleted stays, for the next sweep. The store's stale temporary
    files (a folder store's `.tmp/`) older than `ttl_s` go too; an S3 store's incomplete multipart uploads
    are left to the bucket's `AbortIncompleteMultipartUpload` lifecycle rule.
    """
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    rows = session.execute(
        select(Artifact.id, Artifact.storage_key)
        .where(Artifact.state == ArtifactState.PENDING.value, Artifact.create_time < cutoff)
        .order_by(Artifact.create_time).limit(limit).with_for_update(skip_locked=True)).all()
    result = UploadSweep()
    for artifact_id, key in rows:
        try:
            store.delete(key)
        except Exception:
            log.exception("unfinished upload %s: could not delete its object %s; retrying next sweep", artifact_id,
                          key)
            continue
        session.execute(delete(Artifact).where(Artifact.id == artifact_id,
                                               Artifact.state == ArtifactState.PENDING.value))
        result.artifacts.append(artifact_id)
    if result.artifacts:
        log.warning("deleted %d upload(s) left unfinished for over %.0fs (the API stopped mid-upload)",
                    len(result.artifacts), ttl_s)
    try:
        result.temp_files = store.remove_stale_temp_files(ttl_s)
    except Exception:
        log.exception("could not delete the stale temporary files of %r", store)
    if result.temp_files:
        log.warning("deleted %d temporary file(s) of uploads cut off by a crash", result.temp_files)
    return result


class Reaper(threading.Thread):
    """Runs the sweeps every `reaper_interval_s` in a worker's main process (a daemon thread)."""

    def __init__(self, settings: WorkerSettings, celery: Any) -> None:
        super().__init__(name="prunery-reaper", daemon=True)
        self.settings = settings
        self.celery = celery
        self._stop_event = threading.Event()
        self._db: Database | None = None
        self._store: ObjectStore | None = None
        self._next_upload_sweep = 0.0  # time.monotonic() of the next sweep_pending_uploads
        self._missing_since: dict[uuid.UUID, float] = {}  # resend_lost's suspects, across ticks

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def _enqueue(self, job_id: uuid.UUID, queue: str) -> None:
        broker.send(self.celery, job_id, queue)

    def _requeue(self, job_id: uuid.UUID, queue: str) -> None:
        requeue_message(job_id, queue, self.celery)

    def _inspect(self) -> QueueView:
        return broker.inspect_queue(self.celery, self.settings.queue)

    def run(self) -> None:
        # a random first delay spreads the sweeps of workers started together
        first = self.settings.reaper_interval_s * (0.5 + (int.from_bytes(os.urandom(1), "big") / 255) / 2)
        if self._stop_event.wait(first):
            return
        failing = False
        while True:
            try:
                self.tick()
                failing = False
            except Exception as e:
                if not failing:  # the whole story once, then a line per retry
                    log.exception("reaper sweep failed; retrying every %.1fs", self.settings.reaper_interval_s)
                else:
                    log.error("reaper sweep failed again: %s", str(e).strip().splitlines()[0] if str(e) else e)
                failing = True
            if self._stop_event.wait(self.settings.reaper_interval_s):
                break
        if self._db is not None:
            self._db.dispose()

    def tick(self) -> ReapResult:
        from . import metrics

        if self._db is None:
            self._db = Database(self.settings.database_url)
        with self._db.session() as session:
            result = reap_expired(session, enqueue_fn=self._requeue)
        resent: list[uuid.UUID] = []
        if self.settings.resend_queued_s > 0:
            with self._db.session() as session:
                resent = resend_lost(session, self.settings.resend_queued_s, self._inspect, self.settings.queue,
                                     missing_since=self._missing_since, enqueue_fn=self._enqueue)
        with metrics.parent_write():
            if result.requeued:
                metrics.JOBS_REQUEUED.labels("lease_expired").inc(len(result.requeued))
            if resent:
                metrics.JOBS_REQUEUED.labels("message_lost").inc(len(resent))
            if result.failed:
                metrics.JOBS_FINISHED.labels(JobState.FAILED.value).inc(len(result.failed))
            if result.cancelled:
                metrics.JOBS_FINISHED.labels(JobState.CANCELLED.value).inc(len(result.cancelled))
        for job_id in result.failed + result.cancelled:  # their workers died: delete partial outputs
            self._delete_outputs(job_id)
        self._sweep_uploads()
        metrics.housekeeping()
        remove_orphaned_dirs()  # metrics folders of workers killed on this host
        self._prune_processed_messages()
        self._prune_job_tmpdirs()
        return result

    def _object_store(self) -> ObjectStore:
        if self._store is None:
            from ..service.store.objectstore import open_store

            self._store = open_store(self.settings.store_url)
        return self._store

    def _delete_outputs(self, job_id: uuid.UUID) -> None:
        store = self._object_store()
        try:
            store.delete_prefix(f"jobs/{job_id}/")
        except Exception:
            log.exception("job %s: could not delete its partial outputs", job_id)

    def _sweep_uploads(self) -> None:
        from . import metrics

        now = time.monotonic()
        if now < self._next_upload_sweep or self._db is None:
            return
        self._next_upload_sweep = now + UPLOAD_SWEEP_INTERVAL_S
        try:
            with self._db.session() as session:
                swept = sweep_pending_uploads(session, self._object_store(), self.settings.pending_upload_ttl_s)
        except Exception:
            log.exception("the sweep of unfinished uploads failed; retrying in %.0fs", UPLOAD_SWEEP_INTERVAL_S)
            return
        if swept.artifacts:
            with metrics.parent_write():
                metrics.UPLOADS_SWEPT.inc(len(swept.artifacts))

    def _prune_job_tmpdirs(self) -> None:
        """Scratch folders of job processes that died without cleaning up (`prunery-job-{pid}-...`)."""
        root = self.settings.tmp_dir
        for path in root.glob("prunery-job-*") if root.is_dir() else []:
            pid = path.name.split("-")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def _prune_processed_messages(self, max_age_s: float = 3600.0) -> None:
        """The filesystem broker keeps taken messages in `processed/`; drop the old ones."""
        if not self.settings.broker_url.startswith("filesystem://"):
            return
        folder = self.settings.broker_dir / "processed"
        cutoff = time.time() - max_age_s
        for path in folder.glob("*.msg") if folder.is_dir() else []:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass
