"""`JobService`: creating a job, reading, listing, watching, cancelling and deleting a tenant's jobs.

A job's spec is a `prunery.core.spec.JobSpec` (the one definition of every option, its default and its checks;
`prunery/spec_proto.py` reads it off the request), stored as `JobSpec.to_dict()`: every field, the engine's
names, null where the engine chooses. Only the checks that need the database (the model and dataset artifacts),
the labels and the queue are written here. CreateJob is idempotent by request_id and holds the tenant to its
quota of queued jobs; the row is committed before its message is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from prunery.spec_proto import spec_from_proto
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc

from ...core.spec import JobSpec
from ..store import jobs
from ..store.db import (
    Artifact,
    ArtifactKind,
    ArtifactState,
    Job,
    JobEvent,
    JobState,
    Tenant,
)
from . import errors
from .auth import current_tenant
from .errors import ApiError, Reason, Violation, quote
from .names import (
    ARTIFACT_NAME_RE,
    MAX_IGNORE,
    MAX_REQUEST_ID,
    job_name,
    label_violations,
    page,
    parse_filter,
    parse_job_name,
)
from .protos import event_proto, job_proto, result_names, same_request, stored_spec
from .servicers import WATCH_FALLBACK_POLL_S, ApiBackend, blocking, streaming, unary

__all__ = ["JobService"]

log = logging.getLogger(__name__)

class JobService(pb_grpc.JobServiceServicer):
    def __init__(self, backend: ApiBackend) -> None:
        self.b = backend

    def _spec_violations(self, session: Session, tenant: str, job: pb.Job) -> tuple[JobSpec, list[Violation]]:
        """The spec of a CreateJob request and everything wrong with it: what the spec itself says
        (`JobSpec.problems`), then what needs the database (the model and dataset artifacts of this tenant),
        the labels and the queue."""
        spec, v = spec_from_proto(job.spec)
        if len(job.spec.ignore) > MAX_IGNORE:  # bounded before anything looks at the globs
            return spec, [("job.spec.ignore", f"at most {MAX_IGNORE} globs; got {len(job.spec.ignore)}")]
        v = [(f"job.spec.{name}", message) for name, message in v + spec.problems(data_given=True)]
        v += self._artifact_violations(session, tenant, "model", spec.model, ArtifactKind.MODEL, required=True)
        needs = spec.needs_data()
        if needs and not spec.dataset:
            v.append(("job.spec.dataset", f"required by {', '.join(needs)}: the name 'artifacts/{{id}}' of an "
                                          "uploaded DATASET"))
        v += self._artifact_violations(session, tenant, "dataset", spec.dataset, ArtifactKind.DATASET)
        v += label_violations(job.labels, "job.labels")
        queues = self.b.settings.queues
        if job.queue and job.queue not in queues:
            v.append(("job.queue", f"unknown queue {quote(job.queue, 80)}; this server sends jobs to "
                                   f"{', '.join(queues)}"))
        return spec, v

    @staticmethod
    def _artifact_violations(session: Session, tenant: str, field: str, name: str, kind: ArtifactKind,
                             required: bool = False) -> list[Violation]:
        """A READY artifact of this tenant and kind under `name` (locked FOR SHARE: a concurrent DeleteArtifact,
        FOR UPDATE, waits for the job to exist, then sees it)."""
        path = f"job.spec.{field}"
        if not name:
            return [(path, f"required: the name 'artifacts/{{id}}' of an uploaded {kind.value}")] if required else []
        m = ARTIFACT_NAME_RE.fullmatch(name)
        if m is None:
            return [(path, f"must be an artifact name like 'artifacts/{{uuid}}', got {quote(name)}")]
        artifact = session.scalars(select(Artifact).where(
            Artifact.id == uuid.UUID(m.group(1)), Artifact.tenant_id == tenant,
            Artifact.state == ArtifactState.READY.value).with_for_update(read=True)).one_or_none()
        if artifact is None:
            return [(path, f"artifact {quote(name)} not found")]
        if artifact.kind != kind.value:
            return [(path, f"artifact {quote(name)} is a {artifact.kind}; upload it as a {kind.value}")]
        return []

    def _check_job_quota(self, session: Session, tenant: str) -> None:
        """RESOURCE_EXHAUSTED TENANT_JOB_LIMIT when the tenant already has its maximum of QUEUED jobs (under
        the tenant row's lock, so concurrent creates cannot together pass it)."""
        limit = self.b.settings.tenant_max_queued
        if not limit:
            return
        session.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())
        queued = int(session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant, Job.state == JobState.QUEUED.value)) or 0)
        if queued >= limit:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this tenant already has {queued} jobs waiting for a worker, its limit: wait for some "
                           "to start (or cancel them) before creating more", Reason.TENANT_JOB_LIMIT,
                           metadata={"queued_jobs": str(queued), "limit": str(limit)})

    @blocking
    def CreateJob(self, request: pb.CreateJobRequest) -> pb.Job:  # noqa: N802
        tenant = current_tenant()
        request_id = request.request_id or None
        if request_id is not None and len(request_id) > MAX_REQUEST_ID:
            raise errors.invalid([("request_id", f"at most {MAX_REQUEST_ID} characters")])
        with self.b.session() as s:
            if request_id is not None:
                existing = s.scalars(select(Job).where(Job.tenant_id == tenant,
                                                       Job.request_id == request_id)).one_or_none()
                if existing is not None:
                    if request.HasField("job") and not same_request(existing, request.job):
                        raise errors.ApiError(
                            grpc.StatusCode.ALREADY_EXISTS,
                            f"request_id {quote(request_id)} already created {job_proto(existing).name} with "
                            "another spec or labels; a retry must resend the same request, a new job needs a new "
                            "request_id",
                            Reason.REQUEST_ID_REUSED)
                    return job_proto(existing)
            if not request.HasField("job"):
                raise errors.invalid([("job", "required: the job's spec (and labels)")])
            spec, violations = self._spec_violations(s, tenant, request.job)
            if violations:
                raise errors.invalid(violations)
            self._check_job_quota(s, tenant)
            job, created = jobs.create_job(s, tenant, stored_spec(spec), dict(request.job.labels),
                                           request_id, queue=request.job.queue or self.b.settings.queue)
            result = job_proto(job)
        # committed: a worker receiving the id finds the job
        if created:
            if self.b.metrics is not None:
                self.b.metrics.jobs_created.inc()
            try:
                self.b.enqueue(str(job.id), job.queue)  # a RetryingSender: a broker outage delays, never fails
            except Exception:
                # the job is stored and QUEUED: the workers' reaper resends queued jobs whose message was lost
                log.exception("could not send %s to the broker; it stays QUEUED until resent", result.name)
            log.info("tenant %s created %s", tenant, result.name)
        return result

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:  # noqa: N802
        tenant = current_tenant()
        job_id = parse_job_name(request.name)
        cache = self.b.job_cache
        if cache is None:
            job = await self.b.pool.run(self._read_job, job_id, tenant)
        else:
            found, job = cache.lookup(job_id, tenant)  # from memory, on the event loop: no thread hop
            if not found:
                job = await self.b.pool.run(cache.load, job_id, tenant, functools.partial(self._load_job, job_id))
        if job is None:
            raise errors.not_found("job", request.name)
        return job

    def _read_job(self, job_id: uuid.UUID, tenant: str) -> pb.Job | None:
        with self.b.reader() as conn:
            row = conn.execute(select(Job.__table__).where(Job.id == job_id, Job.tenant_id == tenant)).first()
        return None if row is None else job_proto(row)

    def _load_job(self, job_id: uuid.UUID) -> tuple[str, int, pb.Job] | None:
        """For the job cache: the job whoever owns it (the cache checks the tenant)."""
        with self.b.reader() as conn:
            row = conn.execute(select(Job.__table__).where(Job.id == job_id)).first()
        return None if row is None else (row.tenant_id, row.event_sequence, job_proto(row))

    def _changed(self, job_id: uuid.UUID) -> None:
        """This process has committed a change to the job: its own reads must see it at once."""
        if self.b.job_cache is not None:
            self.b.job_cache.invalidate(job_id)

    @blocking
    def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:  # noqa: N802
        tenant = current_tenant()
        terms = parse_filter(request.filter, {"state": [st.value for st in JobState]})
        stmt = select(Job.__table__).where(Job.tenant_id == tenant)
        for key, value in terms:
            if key == "state":
                stmt = stmt.where(Job.state == value)
            else:
                stmt = stmt.where(Job.labels[key[len("labels."):]].as_string() == value)
        with self.b.reader() as conn:
            rows, token = page(conn, Job, stmt, request.page_size, request.page_token, request.filter)
        return pb.ListJobsResponse(jobs=[job_proto(r) for r in rows], next_page_token=token)

    @blocking
    def CancelJob(self, request: pb.CancelJobRequest) -> pb.Job:  # noqa: N802
        tenant = current_tenant()
        job_id = parse_job_name(request.name)
        try:
            with self.b.session() as s:
                job = job_proto(jobs.request_cancel(s, job_id, tenant))
            self._changed(job_id)
            return job
        except jobs.JobNotFound:
            raise errors.not_found("job", request.name) from None
        except jobs.IllegalTransition as e:
            raise errors.failed_precondition(f"{job_name(job_id)} already ended ({e.current}); nothing to cancel",
                                             Reason.JOB_ALREADY_FINISHED, state=str(e.current)) from None

    @blocking
    def DeleteJob(self, request: pb.DeleteJobRequest) -> pb.DeleteJobResponse:  # noqa: N802
        tenant = current_tenant()
        job_id = parse_job_name(request.name)
        with self.b.session() as s:
            job = s.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant)
                            .with_for_update()).one_or_none()
            if job is None:
                raise errors.not_found("job", request.name)
            if job.state not in jobs.TERMINAL:
                raise errors.failed_precondition(
                    f"{job_name(job_id)} is {job.state}: only a finished job can be deleted (cancel it first)",
                    Reason.JOB_NOT_FINISHED, state=job.state)
            result_ids = [uuid.UUID(n.split("/", 1)[1]) for n in result_names(job)]
            owned = or_(Artifact.producer_job_id == job_id, Artifact.id.in_(result_ids)) if result_ids \
                else Artifact.producer_job_id == job_id
            results = list(s.scalars(select(Artifact).where(Artifact.tenant_id == tenant, owned)))
            keys = [a.storage_key for a in results]
            for a in results:
                s.delete(a)
            s.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
            s.execute(delete(Job).where(Job.id == job_id))
        self._changed(job_id)
        try:
            for key in keys:
                self.b.store.delete(key)
            self.b.store.delete_prefix(f"jobs/{job_id}/")
        except Exception:
            log.exception("could not delete every object of deleted %s", job_name(job_id))
        return pb.DeleteJobResponse()

    def _watch_read(self, job_id: uuid.UUID, tenant: str,
                    after: int) -> tuple[Sequence[Row[Any]], Row[Any] | None]:
        """The job's events after `after` (at most 500), then the job: a job read after its terminal event
        carries its results."""
        with self.b.reader() as conn:
            events = conn.execute(select(JobEvent.__table__).where(
                JobEvent.job_id == job_id, JobEvent.sequence > after).order_by(JobEvent.sequence).limit(500)).all()
            job = conn.execute(select(Job.__table__).where(Job.id == job_id, Job.tenant_id == tenant)).first()
        return events, job

    @streaming
    async def WatchJob(self, request: pb.WatchJobRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobEvent]:
        # an idle watch is a coroutine waiting on an asyncio.Event: it holds no thread and no connection
        tenant = current_tenant()
        job_id = parse_job_name(request.name)
        if request.after_sequence < 0:
            raise errors.invalid([("after_sequence", "must not be negative (0: from the first event)")])
        cache = self.b.job_cache
        woken = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from the notification thread
            loop.call_soon_threadsafe(woken.set)

        with cache.on_change(job_id, wake) if cache is not None else contextlib.nullcontext():
            last = request.after_sequence
            first = True
            while True:
                woken.clear()  # before reading: a change committed from here on wakes the wait below
                events, job = await self.b.pool.run(self._watch_read, job_id, tenant, last)
                if job is None:
                    if first:
                        raise errors.not_found("job", request.name)
                    return  # deleted while watched: it ended long ago
                first = False
                if cache is not None and events:
                    cache.saw(job_id, events[-1].sequence)
                snapshot = job_proto(job)
                for ev in events:
                    yield event_proto(ev, snapshot)
                    last = ev.sequence
                    if ev.state in jobs.TERMINAL:
                        return
                if not events:
                    if job.state in jobs.TERMINAL:  # asked for events after the terminal one
                        return
                    # notifications wake us at once; the poll is the fallback (and the only way on SQLite)
                    poll = self.b.settings.watch_poll_s if cache is None or not cache.live else WATCH_FALLBACK_POLL_S
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), poll)
