"""The job state machine: the only code that changes a job's state.

States and legal transitions (`TRANSITIONS`):

    QUEUED     -> RUNNING     claim(): a worker takes the job with a lease (attempt_count + 1)
               -> CANCELLED   request_cancel(): nothing ran yet, so the cancel is immediate
               -> FAILED      fail(), or claim() finding the attempts used up (after a requeue)
    RUNNING    -> RUNNING     claim() by another worker once the lease has expired (the owner died)
               -> SUCCEEDED   succeed() by the lease owner
               -> FAILED      fail(); claim() of an expired lease with the attempts used up
               -> CANCELLING  request_cancel(): the worker sees it at its next check or heartbeat
               -> QUEUED      release() by the owner (graceful shutdown), requeue_expired() after a lost lease
    CANCELLING -> CANCELLED   finish_cancel() by the worker; claim()/requeue_expired() once its lease expired
               -> FAILED      fail(): the worker hit an error before it noticed the cancel
    SUCCEEDED, FAILED, CANCELLED: terminal.

CANCELLING -> SUCCEEDED is deliberately illegal: a cancel the API accepted is honoured, so a worker that
finishes after the request sees `succeed()` return False and calls `finish_cancel()` (deleting its outputs).

Every change of state, and every progress/stage update, adds a `job_events` row with the job's next
sequence number (1, 2, ...) in the caller's transaction, so a row and its events commit together.
Heartbeats only move the lease and write no event.

Concurrency: every operation first locks the job row (`SELECT ... FOR UPDATE` on Postgres; on SQLite every
transaction is BEGIN IMMEDIATE, see db.make_engine), then checks and changes it, so two workers claiming one
job race safely: exactly one wins. None of these functions commit: the caller owns the transaction
(`with db.session() as s: jobs.claim(s, ...)`) and should commit promptly, since the row stays locked.

Messages: each job should have one message outstanding in its queue while it is QUEUED. `last_sent_at` records
when one was last sent: set by create_job() (the API sends right after the commit), release() and
requeue_expired() (after the commit their callers send one, or, the reaper, give the job back the message a dead
worker held), mark_sent() (a worker deferring its claim at the tenant limit, whose main process sends the job's
next message after a delay) and record_resend() (the reaper, for a message it found lost). The reaper looks
for lost messages only among jobs whose `last_sent_at` is old (`prunery.worker.reaper`).

Leases use this host's UTC clock; keep worker and API clocks in sync (NTP) to well under the lease length.
A worker id must be unique per worker process (e.g. "host:pid:uuid4"): ownership checks compare it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from google.rpc import code_pb2
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .config import DEFAULT_QUEUE
from .db import Job, JobEvent, JobState, Tenant, utcnow
from .reasons import Reason

__all__ = [
    "DEFAULT_MAX_ATTEMPTS", "RESENT", "TERMINAL", "TRANSITIONS", "TOO_MANY_ATTEMPTS", "IllegalTransition",
    "JobNotFound", "JobState", "TenantAtLimit", "claim", "create_job", "fail", "finish_cancel", "get_job", "heartbeat",
    "mark_sent", "record_resend", "release", "request_cancel",
    "requeue_expired", "sent_time", "set_progress", "succeed",
]

S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLING, S.QUEUED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
DEFAULT_MAX_ATTEMPTS = 3
TOO_MANY_ATTEMPTS = Reason.TOO_MANY_ATTEMPTS  # error_reason of a job whose worker died on every attempt
RESENT = "its message to the workers was lost; sent again"  # the event of record_resend()


class JobNotFound(LookupError):
    pass


class TenantAtLimit(Exception):
    """claim() refused: the job's tenant already has its limit of running jobs (nothing was changed)."""

    def __init__(self, job_id: uuid.UUID, tenant: str, running: int, limit: int) -> None:
        super().__init__(job_id, tenant, running, limit)
        self.job_id, self.tenant, self.running, self.limit = job_id, tenant, running, limit

    def __str__(self) -> str:
        return f"tenant {self.tenant} has {self.running} running job(s), its limit is {self.limit}"


class IllegalTransition(Exception):
    def __init__(self, job_id: uuid.UUID, current: str, target: str) -> None:
        super().__init__(f"job {job_id} is {current}; it cannot become {target}")
        self.job_id, self.current, self.target = job_id, current, target


def _uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def _lock(session: Session, job_id: uuid.UUID | str) -> Job | None:
    stmt = select(Job).where(Job.id == _uuid(job_id)).with_for_update().execution_options(populate_existing=True)
    return session.scalars(stmt).one_or_none()


def _event(session: Session, job: Job, now: datetime, message: str) -> None:
    job.event_sequence += 1
    job.update_time = now
    session.add(JobEvent(job_id=job.id, sequence=job.event_sequence, time=now, state=job.state,
                         progress=job.progress, stage=job.stage, message=message))


def _move(session: Session, job: Job, target: JobState, now: datetime, message: str) -> None:
    """Change the state of a locked job, checked against TRANSITIONS, with its event."""
    if target not in TRANSITIONS[JobState(job.state)]:
        raise IllegalTransition(job.id, job.state, target)
    job.state = target.value
    if target in TERMINAL:
        job.end_time = now
        job.lease_expires_at = None
    _event(session, job, now, message)
    session.flush()


def _lease_expired(job: Job, now: datetime) -> bool:
    return job.lease_expires_at is None or job.lease_expires_at <= now


def sent_time() -> ColumnElement[Any]:
    """When a job's message was last sent, in SQL: `last_sent_at`, or its create time for rows that have none."""
    return func.coalesce(Job.last_sent_at, Job.create_time)


def _set_error(job: Job, code: int, reason: str, message: str) -> None:
    job.error_code, job.error_reason, job.error_message = int(code), reason, message


def _too_many_attempts(session: Session, job: Job, now: datetime) -> None:
    msg = (f"too many attempts: the job was started {job.attempt_count} times (max_attempts={job.max_attempts}) "
           "and its worker stopped before finishing each time")
    _set_error(job, code_pb2.INTERNAL, TOO_MANY_ATTEMPTS, msg)
    _move(session, job, S.FAILED, now, msg)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

def get_job(session: Session, job_id: uuid.UUID | str, tenant: str | None = None) -> Job | None:
    """The job, or None if it does not exist or (with `tenant`) belongs to another tenant."""
    job = session.get(Job, _uuid(job_id))
    if job is None or (tenant is not None and job.tenant_id != tenant):
        return None
    return job


# ---------------------------------------------------------------------------------------------------------
# API side
# ---------------------------------------------------------------------------------------------------------

def create_job(session: Session, tenant: str, spec: Mapping[str, Any], labels: Mapping[str, str] | None = None,
               request_id: str | None = None, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
               queue: str | None = None) -> tuple[Job, bool]:
    """Insert a QUEUED job and its first event; return (job, created).

    With a `request_id`, a second call by the same tenant returns the first job and created=False, even when
    both calls race (the unique (tenant, request_id) index decides; the loser reads the winner's row).
    The tenant row must exist (db.ensure_tenant). `queue`: the worker pool to send it to (default queue if
    None); the caller sends it there after the commit (`last_sent_at` says it did, now).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    request_id = request_id or None

    def existing() -> Job | None:
        if request_id is None:
            return None
        return session.scalars(select(Job).where(Job.tenant_id == tenant, Job.request_id == request_id)
                               .execution_options(populate_existing=True)).one_or_none()

    found = existing()
    if found is not None:
        return found, False
    now = utcnow()
    job = Job(id=uuid.uuid4(), tenant_id=tenant, request_id=request_id, spec=dict(spec), labels=dict(labels or {}),
              state=S.QUEUED.value, progress=0.0, stage="", attempt_count=0, max_attempts=max_attempts,
              result_artifact_ids=[], create_time=now, update_time=now, event_sequence=1,
              queue=queue or DEFAULT_QUEUE, last_sent_at=now)
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()  # the job row first: the event references it
            session.add(JobEvent(job_id=job.id, sequence=1, time=now, state=job.state, progress=0.0, stage="",
                                 message="queued"))
            session.flush()
    except IntegrityError:
        found = existing()
        if found is None:
            raise
        return found, False
    return job, True


def request_cancel(session: Session, job_id: uuid.UUID | str, tenant: str | None = None) -> Job:
    """Cancel a job: QUEUED -> CANCELLED at once, RUNNING -> CANCELLING (the worker finishes the cancel).

    Idempotent while CANCELLING or CANCELLED. Raises JobNotFound (missing, or another tenant's) and
    IllegalTransition for a job that already SUCCEEDED or FAILED.
    """
    job = _lock(session, job_id)
    if job is None or (tenant is not None and job.tenant_id != tenant):
        raise JobNotFound(str(job_id))
    now = utcnow()
    if job.state == S.QUEUED:
        _move(session, job, S.CANCELLED, now, "cancelled before it started")
    elif job.state == S.RUNNING:
        _move(session, job, S.CANCELLING, now, "cancel requested")
    elif job.state in (S.SUCCEEDED, S.FAILED):
        raise IllegalTransition(job.id, job.state, S.CANCELLED)
    return job


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------

def claim(session: Session, job_id: uuid.UUID | str, worker_id: str, lease_s: float, *,
          now: datetime | None = None, tenant_max_running: int = 0) -> bool:
    """Take the job for `worker_id` with a lease of `lease_s` seconds (compare-and-set).

    Succeeds only if the job is QUEUED, or RUNNING with an expired lease (its worker died: this is a new
    attempt). Each claim counts an attempt; when the attempts are used up the job FAILS with reason
    TOO_MANY_ATTEMPTS instead. A CANCELLING job whose lease expired is CANCELLED. Returns True when this
    worker now owns the job and should run it.

    `tenant_max_running` (0: no limit): raise TenantAtLimit, changing nothing, when the job's tenant already has
    that many other RUNNING or CANCELLING jobs under a live lease. The tenant row is locked while counting, so
    two workers claiming two jobs of one tenant at once cannot both pass the limit.
    """
    now = now or utcnow()
    job = _lock(session, job_id)
    if job is None:
        return False
    if job.state == S.CANCELLING and _lease_expired(job, now):
        _move(session, job, S.CANCELLED, now, "cancelled (its worker stopped before finishing the cancel)")
        return False
    if not (job.state == S.QUEUED or (job.state == S.RUNNING and _lease_expired(job, now))):
        return False
    if job.attempt_count >= job.max_attempts:
        _too_many_attempts(session, job, now)
        return False
    if tenant_max_running > 0:
        session.execute(select(Tenant.id).where(Tenant.id == job.tenant_id).with_for_update())
        running = session.scalar(
            select(func.count()).select_from(Job)
            .where(Job.tenant_id == job.tenant_id, Job.id != job.id,
                   Job.state.in_([S.RUNNING.value, S.CANCELLING.value]), Job.lease_expires_at > now))
        if (running or 0) >= tenant_max_running:
            raise TenantAtLimit(job.id, job.tenant_id, running or 0, tenant_max_running)
    previous = job.lease_owner if job.state == S.RUNNING else None
    job.attempt_count += 1
    job.lease_owner = worker_id
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.heartbeat_at = now
    job.start_time = job.start_time or now
    job.progress, job.stage = 0.0, ""
    message = f"attempt {job.attempt_count} of {job.max_attempts} claimed by {worker_id}"
    if previous is not None:
        message += f" (the lease of {previous} expired)"
    _move(session, job, S.RUNNING, now, message)
    return True


def heartbeat(session: Session, job_id: uuid.UUID | str, worker_id: str, lease_s: float, *,
              now: datetime | None = None) -> bool:
    """Extend the owner's lease. Returns False when the worker should stop: it lost the job (another worker
    claimed it, or it ended) or a cancel was requested (the lease is still extended while CANCELLING, so the
    worker can clean up and call finish_cancel)."""
    now = now or utcnow()
    job = _lock(session, job_id)
    if job is None or job.lease_owner != worker_id or job.state not in (S.RUNNING, S.CANCELLING):
        return False
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.heartbeat_at = now
    session.flush()
    return job.state == S.RUNNING


def set_progress(session: Session, job_id: uuid.UUID | str, worker_id: str, progress: float,
                 stage: str | None = None, message: str = "") -> bool:
    """Record progress (clamped to 0..1) and optionally the stage, as an event. False unless the worker owns
    the RUNNING job."""
    job = _lock(session, job_id)
    if job is None or job.lease_owner != worker_id or job.state != S.RUNNING:
        return False
    job.progress = min(1.0, max(0.0, float(progress)))
    if stage is not None:
        job.stage = stage
    _event(session, job, utcnow(), message or (f"{job.stage}: {job.progress:.0%}" if job.stage else ""))
    session.flush()
    return True


def succeed(session: Session, job_id: uuid.UUID | str, worker_id: str, result_artifact_ids: Sequence[str],
            report: Mapping[str, Any] | None) -> bool:
    """RUNNING -> SUCCEEDED with the results. False (nothing changed) unless the worker owns the RUNNING job;
    if a cancel was requested meanwhile, the worker should discard its outputs and call finish_cancel."""
    job = _lock(session, job_id)
    if job is None or job.lease_owner != worker_id or job.state != S.RUNNING:
        return False
    job.progress = 1.0
    job.result_artifact_ids = [str(a) for a in result_artifact_ids]
    job.report = dict(report) if report is not None else None
    job.error_code = job.error_reason = job.error_message = None
    _move(session, job, S.SUCCEEDED, utcnow(), "succeeded")
    return True


def fail(session: Session, job_id: uuid.UUID | str, code: int, reason: str, message: str, *,
         worker_id: str | None = None) -> bool:
    """Fail a job that has not ended, with a google.rpc.Code, a stable reason and a readable message.

    With `worker_id`, only the lease owner may fail it. False when the job is missing, ended, or not owned."""
    job = _lock(session, job_id)
    if job is None or job.state in TERMINAL:
        return False
    if worker_id is not None and job.lease_owner != worker_id:
        return False
    _set_error(job, code, reason, message)
    _move(session, job, S.FAILED, utcnow(), message)
    return True


def finish_cancel(session: Session, job_id: uuid.UUID | str, *, worker_id: str | None = None,
                  message: str = "cancelled") -> bool:
    """CANCELLING -> CANCELLED once the worker has stopped (with `worker_id`: only its lease owner)."""
    job = _lock(session, job_id)
    if job is None or job.state != S.CANCELLING:
        return False
    if worker_id is not None and job.lease_owner != worker_id:
        return False
    _move(session, job, S.CANCELLED, utcnow(), message)
    return True


def release(session: Session, job_id: uuid.UUID | str, worker_id: str, message: str = "") -> bool:
    """RUNNING -> QUEUED: the owner gives the job back unfinished (e.g. a worker shutting down), so another
    worker can claim it at once. The attempt still counts. The caller sends it again after the commit."""
    job = _lock(session, job_id)
    if job is None or job.lease_owner != worker_id or job.state != S.RUNNING:
        return False
    now = utcnow()
    job.lease_expires_at = None
    job.progress, job.stage = 0.0, ""
    job.last_sent_at = now  # the caller sends it again after the commit
    _move(session, job, S.QUEUED, now, message or f"released by {worker_id}; queued again")
    return True


def requeue_expired(session: Session, *, now: datetime | None = None, limit: int = 100) -> list[uuid.UUID]:
    """Sweep jobs whose worker stopped heartbeating: RUNNING -> QUEUED (or FAILED when the attempts are used
    up), CANCELLING -> CANCELLED. Returns the ids put back in the queue, for the caller to give a message again
    after committing (the reaper restores the one a dead worker held, if the broker still has it)."""
    now = now or utcnow()
    ids = session.scalars(select(Job.id).where(Job.state.in_([S.RUNNING.value, S.CANCELLING.value]),
                                               Job.lease_expires_at < now).limit(limit)).all()
    requeued: list[uuid.UUID] = []
    for job_id in ids:
        job = _lock(session, job_id)
        if job is None or not _lease_expired(job, now):
            continue
        if job.state == S.CANCELLING:
            _move(session, job, S.CANCELLED, now, "cancelled (its worker stopped before finishing the cancel)")
        elif job.state == S.RUNNING:
            if job.attempt_count >= job.max_attempts:
                _too_many_attempts(session, job, now)
            else:
                owner = job.lease_owner
                job.lease_expires_at = None
                job.progress, job.stage = 0.0, ""
                job.last_sent_at = now  # the caller sends it after the commit
                _move(session, job, S.QUEUED, now, f"the lease of {owner} expired; queued again")
                requeued.append(job.id)
    return requeued


def mark_sent(session: Session, job_id: uuid.UUID | str, *, now: datetime | None = None) -> bool:
    """Record that a message of the QUEUED job is being sent (a worker deferring its claim hands its message back,
    and the next one, sent after a short delay, is the job's message now). False when the job is not QUEUED."""
    job = _lock(session, job_id)
    if job is None or job.state != S.QUEUED:
        return False
    job.last_sent_at = now or utcnow()
    session.flush()
    return True


def record_resend(session: Session, job_ids: Sequence[uuid.UUID], *, queue: str, sent_before: datetime,
                  now: datetime | None = None) -> list[uuid.UUID]:
    """The reaper found no message for these jobs: lock those still QUEUED on `queue` whose message was last sent
    before `sent_before`, skipping rows another transaction holds (another reaper, a claim), set their
    `last_sent_at` to now with a RESENT event, and return their ids for the caller to send after the commit.

    The checks under the lock are what make a resend safe: a job claimed, cancelled, requeued or sent again by
    anyone since the caller looked is left alone, and of two reapers only the first to commit resends a job
    (the second finds `last_sent_at` moved past `sent_before`)."""
    if not job_ids:
        return []
    now = now or utcnow()
    rows = session.scalars(
        select(Job).where(Job.id.in_(list(job_ids)), Job.state == S.QUEUED.value, Job.queue == queue,
                          sent_time() < sent_before)
        .order_by(sent_time(), Job.id).with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)).all()
    for job in rows:
        job.last_sent_at = now
        _event(session, job, now, RESENT)
    session.flush()
    return [job.id for job in rows]
