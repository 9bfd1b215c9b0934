"""The gRPC servicers: `ArtifactService` and `JobService` (prunery.v1), over the database, the object store
and the job queue. Never imports torch, and never parses an uploaded file: the workers do, through the
engine's safe intake.

The servicers are coroutines of a grpc.aio server (`server.py` says why): every blocking step (a SQL
statement, an object store request, sending to the broker) runs in the server's bounded thread pool
(`limits.BlockingPool`), so an open stream holds no thread, and the event loop itself answers cached GetJob
calls. A database that is away makes any call UNAVAILABLE (DATABASE_UNAVAILABLE, with a RetryInfo); the
object store, STORE_UNAVAILABLE.

Every call runs for the tenant of its bearer token (`auth.current_tenant()`); another tenant's resources
are NOT_FOUND, exactly like missing ones. Resource names are `artifacts/{uuid}` and `jobs/{uuid}`;
DownloadArtifact also takes `jobs/{uuid}/model` and `jobs/{uuid}/report` (a job's results, available once it
has SUCCEEDED). Errors carry a google.rpc.Status with an ErrorInfo (stable reasons in `errors.Reason`) and,
for bad fields, a BadRequest.

Uploads stream straight into the object store (one chunk in memory at a time, plus at most one S3 part in
the store): the size and SHA-256 are checked as the bytes pass, and a mismatch, a broken or cancelled
stream makes `put_stream` drop what it wrote before anything becomes visible. An upload first reserves its
declared size: a PENDING artifact row (with its storage key) inserted under the tenant row's lock, so the
tenant's cap counts uploads in progress and concurrent uploads cannot together pass it. Once the object is
complete and verified the row becomes READY; a failed upload deletes its object and its row, leaving
nothing. Every read ignores PENDING rows. What a crash of the API leaves (a PENDING row, maybe its object)
is deleted by the workers' reaper after `PRUNERY_PENDING_UPLOAD_TTL_S` (`worker/reaper.py`).

A job's spec is a `prunery.core.spec.JobSpec` (the one definition of every option, its default and its checks;
`prunery/spec_proto.py` reads it off the request), stored as `JobSpec.to_dict()`: every field, the engine's
names, null where the engine chooses. Only the checks that need the database (the model and dataset artifacts),
the labels and the queue are written here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import grpc
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import Session

from prunery.core.spec import JobSpec
from prunery.service.api import errors
from prunery.service.api.auth import current_tenant
from prunery.service.api.errors import ApiError, Reason, Violation, quote
from prunery.service.api.jobcache import JobCache
from prunery.service.api.limits import BlockingPool
from prunery.service.api.metrics import Metrics
from prunery.service.api.settings import Settings
from prunery.service.store import jobs
from prunery.service.store.db import (
    Artifact,
    ArtifactKind,
    ArtifactState,
    Database,
    Job,
    JobEvent,
    JobState,
    Tenant,
    utcnow,
)
from prunery.service.store.objectstore import InvalidRange, ObjectNotFound, ObjectStore, ObjectWriter, TooLarge
from prunery.spec_proto import spec_from_proto, spec_to_proto
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc

__all__ = ["ApiBackend", "ArtifactService", "JobService", "artifact_proto", "job_proto", "parse_filter",
           ]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_DISPLAY_NAME = 512
MAX_IGNORE = 1000
MAX_REQUEST_ID = 128
UPLOAD_KINDS = (pb.MODEL, pb.DATASET)

MAX_FILTER = 4096
MAX_QUEUE_NAME = 128

# whole-string patterns: always used with fullmatch (`$` would accept a trailing newline)
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
ARTIFACT_NAME_RE = re.compile(rf"artifacts/({_UUID})")
JOB_NAME_RE = re.compile(rf"jobs/({_UUID})")
JOB_RESULT_RE = re.compile(rf"jobs/({_UUID})/(model|report)")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")

T = TypeVar("T")
Enqueue = Callable[[str, str], None]  # (job id, queue)


# ---------------------------------------------------------------------------------------------------------
# Names, labels, filters, page tokens
# ---------------------------------------------------------------------------------------------------------

def artifact_name(artifact_id: uuid.UUID | str) -> str:
    return f"artifacts/{artifact_id}"


def job_name(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}"


def _parse_name(pattern: re.Pattern[str], name: str, field: str, example: str) -> uuid.UUID:
    m = pattern.fullmatch(name or "")
    if m is None:
        raise errors.invalid([(field, f"must be a resource name like {example!r}, got {quote(name)}")],
                             reason=Reason.INVALID_NAME)
    return uuid.UUID(m.group(1))


def parse_artifact_name(name: str, field: str = "name") -> uuid.UUID:
    return _parse_name(ARTIFACT_NAME_RE, name, field, "artifacts/{uuid}")


def parse_job_name(name: str, field: str = "name") -> uuid.UUID:
    return _parse_name(JOB_NAME_RE, name, field, "jobs/{uuid}")


def _label_violations(labels: Mapping[str, str], field: str) -> list[Violation]:
    if len(labels) > MAX_LABELS:
        return [(field, f"at most {MAX_LABELS} labels; got {len(labels)}")]
    out: list[Violation] = []
    for key, value in labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            out.append((f"{field}[{quote(key, 64)}]", "label keys are 1-63 of A-Z a-z 0-9 _ . - starting "
                                                      "alphanumeric"))
        elif len(value) > MAX_LABEL_VALUE:
            out.append((f"{field}[{quote(key, 64)}]", f"label values are at most {MAX_LABEL_VALUE} characters; "
                                                      f"got {len(value)}"))
    return out


_TERM_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s"]+)\s*')
_AND_RE = re.compile(r"AND\b")


def parse_filter(text: str, allowed: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """`key=value` terms joined by ` AND `. Keys are those of `allowed` (with their permitted values; an
    empty collection allows any value) or `labels.<key>`. Values may be double-quoted."""
    terms: list[tuple[str, str]] = []
    text = text or ""
    pos = 0
    if not text.strip():
        return terms

    def bad(why: str) -> ApiError:
        keys = ", ".join([*allowed, "labels.<key>"])
        return errors.invalid([("filter", f"{why} (use key=value terms joined by ' AND '; keys: {keys})")],
                              message=f"invalid filter {quote(text)}: {why}", reason=Reason.INVALID_FILTER)

    if len(text) > MAX_FILTER:
        raise bad(f"at most {MAX_FILTER} characters; got {len(text)}")

    while True:
        m = _TERM_RE.match(text, pos)
        if m is None:
            raise bad(f"expected key=value at character {pos}")
        key, value = m.group(1), m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if key.startswith("labels."):
            if not LABEL_KEY_RE.fullmatch(key[len("labels."):]):
                raise bad(f"invalid label key in {quote(key, 80)}")
        elif key in allowed:
            permitted = list(allowed[key])
            if permitted and value not in permitted:
                raise bad(f"unknown {key} {quote(value, 80)}; use one of {', '.join(permitted)}")
        else:
            raise bad(f"unknown key {quote(key, 80)}")
        terms.append((key, value))
        pos = m.end()
        if pos == len(text):
            return terms
        a = _AND_RE.match(text, pos)
        if a is None:
            raise bad(f"expected AND at character {pos}")
        pos = a.end()


def _page_size(requested: int) -> int:
    if requested < 0:
        raise errors.invalid([("page_size", "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _filter_digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def _encode_page_token(create_time: datetime, row_id: uuid.UUID, filter_text: str) -> str:
    raw = json.dumps({"t": create_time.isoformat(), "i": str(row_id), "f": _filter_digest(filter_text)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, filter_text: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        create_time, row_id = datetime.fromisoformat(raw["t"]), uuid.UUID(raw["i"])
        digest = raw["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise errors.invalid([("page_token", "not a page token returned by this list call")],
                             reason=Reason.INVALID_PAGE_TOKEN) from None
    if digest != _filter_digest(filter_text):
        raise errors.invalid([("page_token", "the filter changed since this page token was issued")],
                             reason=Reason.INVALID_PAGE_TOKEN)
    return create_time, row_id


def _page(conn: Connection, model: type[Artifact] | type[Job], stmt: Any, page_size: int, token: str,
          filter_text: str) -> tuple[list[Any], str]:
    """Keyset pagination, newest first: (rows, next_page_token)."""
    size = _page_size(page_size)
    after = _decode_page_token(token, filter_text)
    if after is not None:
        t, i = after
        stmt = stmt.where(or_(model.create_time < t, and_(model.create_time == t, model.id < i)))
    rows = list(conn.execute(stmt.order_by(model.create_time.desc(), model.id.desc()).limit(size + 1)))
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, _encode_page_token(rows[-1].create_time, rows[-1].id, filter_text)


# ---------------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------------

def artifact_proto(a: Artifact | Row[Any]) -> pb.Artifact:
    """From an ORM object or a Core row of the artifacts table."""
    msg = pb.Artifact(name=artifact_name(a.id), display_name=a.display_name, kind=pb.ArtifactKind.Value(a.kind),
                      size_bytes=a.size_bytes, sha256=a.sha256, labels=dict(a.labels or {}),
                      producer_job=job_name(a.producer_job_id) if a.producer_job_id else "")
    msg.create_time.FromDatetime(a.create_time)
    return msg


def _same_request(job: Job, requested: pb.Job) -> bool:
    """Whether a CreateJob retry asks for the job that its request_id already created."""
    try:
        spec, unreadable = spec_from_proto(requested.spec)
        return (not unreadable and _stored_spec(spec) == _stored_spec(JobSpec.from_dict(job.spec or {}))
                and dict(requested.labels) == (job.labels or {}) and requested.queue in ("", job.queue))
    except (errors.ApiError, TypeError, ValueError):
        return False


def _stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The stored form of a (validated) spec: `JobSpec.to_dict`, artifact names in their canonical form."""
    spec = spec.replace(model=artifact_name(parse_artifact_name(spec.model, "job.spec.model")),
                        dataset=artifact_name(parse_artifact_name(spec.dataset, "job.spec.dataset"))
                        if spec.dataset else "")
    return spec.to_dict()


def _spec_message(stored: Mapping[str, Any]) -> pb.PruneSpec:
    """A stored spec on the wire (`JobSpec.from_dict` also reads the forms stored before it)."""
    try:
        return spec_to_proto(JobSpec.from_dict(stored))
    except (TypeError, ValueError) as e:  # a row written by hand, or by a newer server: show what can be shown
        log.warning("a stored job spec cannot be read (%s: %s)", type(e).__name__, e)
        return pb.PruneSpec(model=str(stored.get("model", "")))


def _result_names(job: Job | Row[Any]) -> list[str]:
    return [r if r.startswith("artifacts/") else artifact_name(r) for r in (job.result_artifact_ids or [])]


def job_proto(j: Job | Row[Any]) -> pb.Job:
    """From an ORM object or a Core row of the jobs table."""
    msg = pb.Job(name=job_name(j.id), spec=_spec_message(j.spec or {}), state=pb.JobState.Value(j.state),
                 progress=j.progress, attempt_count=j.attempt_count, result_artifacts=_result_names(j),
                 labels=dict(j.labels or {}), stage=j.stage or "", queue=j.queue)
    msg.create_time.FromDatetime(j.create_time)
    if j.start_time is not None:
        msg.start_time.FromDatetime(j.start_time)
    if j.end_time is not None:
        msg.end_time.FromDatetime(j.end_time)
    if j.error_code is not None:
        msg.error.CopyFrom(errors.status_proto(j.error_code, j.error_message or "", j.error_reason or None))
    if j.report is not None:
        try:
            msg.report.update(j.report)
        except (ValueError, TypeError):
            log.warning("job %s: its report is not JSON-like; sent as a string", j.id)
            msg.report.Clear()
            msg.report.update({"report": json.dumps(j.report, default=str)})
    return msg


def event_proto(ev: JobEvent | Row[Any], job: pb.Job) -> pb.JobEvent:
    """The event, with the job as of the event (its state, progress and stage; no end or results before the
    terminal event)."""
    msg = pb.JobEvent(sequence=ev.sequence, state=pb.JobState.Value(ev.state), progress=ev.progress,
                      stage=ev.stage, message=ev.message)
    msg.time.FromDatetime(ev.time)
    msg.job.CopyFrom(job)
    msg.job.state, msg.job.progress, msg.job.stage = msg.state, msg.progress, msg.stage
    if ev.state not in jobs.TERMINAL:
        for field in ("end_time", "error", "report"):
            msg.job.ClearField(field)
        del msg.job.result_artifacts[:]
    return msg


# ---------------------------------------------------------------------------------------------------------
# Servicers
# ---------------------------------------------------------------------------------------------------------

def _unexpected(e: Exception, method: str) -> ApiError:
    """The answer to an exception that is not an ApiError: UNAVAILABLE for an outage of the database
    (logged in one line: it is expected now and then), INTERNAL for anything else (logged in full). Never
    the exception's text."""
    outage = errors.classify_outage(e)
    if outage is not None:
        log.warning("%s: the database is unavailable (%s: %s)", method, type(e).__name__,
                    str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
        return outage
    log.exception("%s failed", method)
    return ApiError(grpc.StatusCode.INTERNAL, "internal error (logged on the server)", Reason.INTERNAL)


def _unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An async RPC method (it runs its blocking steps in the pool itself). Errors become the call's status."""
    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except ApiError as e:
            await errors.abort(context, e)
        except Exception as e:
            await errors.abort(context, _unexpected(e, fn.__name__))
    return call


def _blocking(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """An RPC method whose body `fn(self, request)` blocks (database, object store, broker): it runs in the
    server's bounded pool, off the event loop. Errors become the call's status."""
    @functools.wraps(fn)
    async def in_pool(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        return await self.b.pool.run(fn, self, request)
    return _unary(in_pool)


def _streaming(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """An async-generator RPC method; errors become the call's status."""
    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for response in fn(self, request, context):
                yield response
        except ApiError as e:
            await errors.abort(context, e)
        except Exception as e:
            await errors.abort(context, _unexpected(e, fn.__name__))
    return call


# WatchJob's poll while job notifications arrive (they wake it at once; when they stop, every watch is woken
# and polls at PRUNERY_WATCH_POLL_S): a safety net only, kept rare so that idle watches cost nothing
WATCH_FALLBACK_POLL_S = 30.0


@dataclass
class ApiBackend:
    """What the servicers share."""

    database: Database
    store: ObjectStore
    settings: Settings
    enqueue: Enqueue
    pool: BlockingPool
    metrics: Metrics | None = None
    job_cache: JobCache | None = None  # Postgres only: GetJob from memory, WatchJob woken by notifications

    def __post_init__(self) -> None:
        engine = self.database.engine
        # reads of one statement need no transaction: on Postgres, autocommit saves the BEGIN/COMMIT round trips
        self._read_engine = engine if engine.dialect.name == "sqlite" else \
            engine.execution_options(isolation_level="AUTOCOMMIT")

    def session(self) -> contextlib.AbstractContextManager[Session]:
        return self.database.session()

    def reader(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for single-statement reads (Core rows, which the *_proto functions accept)."""
        return self._read_engine.connect()


def _tenant_bytes(session: Session, tenant: str) -> int:
    """Bytes the tenant holds, including the declared sizes of its uploads in progress (PENDING rows)."""
    return int(session.scalar(select(func.coalesce(func.sum(Artifact.size_bytes), 0))
                              .where(Artifact.tenant_id == tenant)) or 0)


def _cap_error(cap: int, used: int, size: int) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"storing {size} more bytes would pass this tenant's cap of {cap} bytes ({used} bytes are "
                    "stored): delete artifacts or jobs you no longer need", Reason.TENANT_CAP_EXCEEDED,
                    metadata={"cap_bytes": str(cap), "used_bytes": str(used), "size_bytes": str(size)})


class _UploadVerifier:
    """Checks the streamed bytes against the declared size as they pass, and at the end against the declared
    SHA-256 (in the metadata, or in the last message), which the object writer computes as it writes (one
    hashing pass, before anything is visible)."""

    def __init__(self, size: int, sha256: str, writer: ObjectWriter) -> None:
        self.declared_size, self.declared_sha = size, sha256.lower()
        self.received = 0
        self.writer = writer

    def add(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.declared_size:
            raise errors.invalid(
                [("metadata.size_bytes", f"declared {self.declared_size} bytes, but more were sent")],
                message=f"the upload is larger than its declared size of {self.declared_size} bytes",
                reason=Reason.SIZE_MISMATCH)

    def finish(self, sha256_last: str | None) -> None:
        """`sha256_last`: the SHA-256 the last message declared, if the metadata left it empty."""
        if self.received != self.declared_size:
            raise errors.invalid(
                [("metadata.size_bytes", f"declared {self.declared_size} bytes, received {self.received}")],
                message=f"the upload ended after {self.received} of its declared {self.declared_size} bytes",
                reason=Reason.SIZE_MISMATCH)
        field, declared = ("sha256", sha256_last.lower()) if sha256_last is not None else (
            "metadata.sha256", self.declared_sha)
        if not declared:
            raise errors.invalid(
                [("sha256", "the upload ended without its SHA-256: declare it in metadata.sha256, or send it as the "
                            "last message")], reason=Reason.INVALID_UPLOAD)
        actual = self.writer.sha256_hex()
        if actual != declared:
            raise errors.invalid(
                [(field, f"declared {declared}, the bytes received hash to {actual}")],
                message="the uploaded bytes do not match the declared sha256", reason=Reason.SHA256_MISMATCH)


def _sha256_last(meta: pb.Artifact, sha256: str) -> str:
    """The SHA-256 an upload's last message declares, checked: only when the metadata left it empty."""
    if meta.sha256:
        raise errors.invalid([("sha256", "declared in metadata.sha256 already: send it once")],
                             reason=Reason.INVALID_UPLOAD)
    if not SHA256_RE.fullmatch(sha256):
        raise errors.invalid([("sha256", f"must be the 64 hex digits of the file's SHA-256; got "
                                         f"{errors.quote(sha256)}")])
    return sha256


def _next_chunk(body: Iterator[bytes]) -> bytes | None:
    """The next chunk of a download, None at the end; a store that fails mid-stream is STORE_UNAVAILABLE."""
    try:
        return next(body, None)
    except Exception as e:
        log.warning("download: the object store failed mid-stream (%s: %s)", type(e).__name__, e)
        raise errors.outage(Reason.STORE_UNAVAILABLE, "the object store") from None


class ArtifactService(pb_grpc.ArtifactServiceServicer):
    def __init__(self, backend: ApiBackend) -> None:
        self.b = backend

    # -- helpers -------------------------------------------------------------------------------------------

    def _get(self, session: Session, artifact_id: uuid.UUID, tenant: str, *, lock: bool = False) -> Artifact | None:
        stmt = select(Artifact).where(Artifact.id == artifact_id, Artifact.tenant_id == tenant,
                                      Artifact.state == ArtifactState.READY.value)
        if lock:
            stmt = stmt.with_for_update()
        return session.scalars(stmt).one_or_none()

    def _bytes(self, direction: str, n: int) -> None:
        if self.b.metrics is not None:
            (self.b.metrics.bytes_in if direction == "in" else self.b.metrics.bytes_out).inc(n)

    # -- RPCs ----------------------------------------------------------------------------------------------

    def _reserve_upload(self, meta: pb.Artifact) -> uuid.UUID:
        """Check the metadata, then reserve the declared size: a PENDING row, committed under the tenant
        row's lock, so concurrent uploads cannot together pass the cap."""
        tenant = current_tenant()
        violations: list[Violation] = []
        if meta.kind not in UPLOAD_KINDS:
            violations.append(("metadata.kind", "must be MODEL or DATASET"))
        if meta.size_bytes < 0:
            violations.append(("metadata.size_bytes", "must be the file's size in bytes (not negative)"))
        if meta.sha256 and not SHA256_RE.fullmatch(meta.sha256):
            violations.append(("metadata.sha256", "must be the 64 hex digits of the file's SHA-256 (or empty, to "
                                                  "send them as the last message)"))
        if len(meta.display_name) > MAX_DISPLAY_NAME:
            violations.append(("metadata.display_name", f"at most {MAX_DISPLAY_NAME} characters; got "
                                                        f"{len(meta.display_name)}"))
        violations += _label_violations(meta.labels, "metadata.labels")
        if violations:
            raise errors.invalid(violations)
        cap = self.b.settings.tenant_cap_bytes
        artifact_id = uuid.uuid4()
        with self.b.session() as s:
            s.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())  # serialise the cap
            used = _tenant_bytes(s, tenant)
            if meta.size_bytes > cap - used:
                raise _cap_error(cap, used, meta.size_bytes)
            s.add(Artifact(id=artifact_id, tenant_id=tenant, display_name=meta.display_name,
                           kind=pb.ArtifactKind.Name(meta.kind), state=ArtifactState.PENDING.value,
                           size_bytes=meta.size_bytes, sha256="", labels=dict(meta.labels),
                           storage_key=artifact_name(artifact_id), create_time=utcnow()))
        return artifact_id

    def _open_writer(self, key: str, size: int) -> ObjectWriter:
        try:
            return self.b.store.open_writer(key, max_bytes=size)
        except Exception as e:
            log.warning("upload of %s: the object store failed (%s: %s)", key, type(e).__name__, e)
            raise errors.outage(Reason.STORE_UNAVAILABLE, "the object store") from None

    @staticmethod
    def _write_chunk(writer: ObjectWriter, verifier: _UploadVerifier, data: bytes) -> None:
        verifier.add(data)  # stops a stream past its declared size first; the store's cap is a backstop
        try:
            writer.write(data)
        except TooLarge:
            raise errors.invalid([("metadata.size_bytes", f"declared {verifier.declared_size} bytes, but more "
                                                          "were sent")], reason=Reason.SIZE_MISMATCH) from None
        except Exception as e:
            log.warning("upload: the object store failed (%s: %s)", type(e).__name__, e)
            raise errors.outage(Reason.STORE_UNAVAILABLE, "the object store") from None

    def _finish_upload(self, artifact_id: uuid.UUID, writer: ObjectWriter, verifier: _UploadVerifier,
                       sha256_last: str | None) -> pb.Artifact:
        """Verify, store, and make the row READY."""
        verifier.finish(sha256_last)
        key = artifact_name(artifact_id)
        try:
            size, sha256 = writer.commit()
        except Exception as e:
            log.warning("upload of %s: the object store failed (%s: %s)", key, type(e).__name__, e)
            raise errors.outage(Reason.STORE_UNAVAILABLE, "the object store") from None
        with self.b.session() as s:
            flipped = s.execute(update(Artifact).where(
                Artifact.id == artifact_id, Artifact.state == ArtifactState.PENDING.value,
            ).values(state=ArtifactState.READY.value, size_bytes=size, sha256=sha256)).rowcount
            if flipped != 1:  # the reaper swept the reservation: the upload outlived the pending-upload TTL
                raise ApiError(grpc.StatusCode.ABORTED, f"the upload of {key} took longer than the server keeps "
                               "an unfinished upload; retry", Reason.UPLOAD_EXPIRED)
            return artifact_proto(s.scalars(select(Artifact).where(Artifact.id == artifact_id)).one())

    @_unary
    async def UploadArtifact(self, request_iterator: AsyncIterator[pb.UploadArtifactRequest],  # noqa: N802
                             context: grpc.aio.ServicerContext) -> pb.Artifact:
        # every blocking step (the reservation, each chunk's write, the commit) runs in the pool: a slow
        # upload holds a coroutine and one chunk, not a thread
        tenant = current_tenant()
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise errors.invalid([("metadata", "the first message must carry the artifact's metadata")],
                                 reason=Reason.INVALID_UPLOAD)
        meta = first.metadata
        pool = self.b.pool
        artifact_id = await pool.run(self._reserve_upload, meta)
        key = artifact_name(artifact_id)
        # reserved (committed): from here on, any failure deletes the object and the PENDING row
        writer: ObjectWriter | None = None
        writing: concurrent.futures.Future[None] | None = None  # the chunk being written while the next arrives
        try:
            writer = await pool.run(self._open_writer, key, meta.size_bytes)
            verifier = _UploadVerifier(meta.size_bytes, meta.sha256, writer)
            sha256_last: str | None = None  # the last message's, when the metadata left it empty
            async for req in stream:
                payload = req.WhichOneof("payload")
                if sha256_last is not None:
                    raise errors.invalid([("sha256", "must be the last message; nothing may follow it")],
                                         reason=Reason.INVALID_UPLOAD)
                if payload == "sha256":
                    sha256_last = _sha256_last(meta, req.sha256)
                    continue
                if payload != "chunk":
                    raise errors.invalid([("metadata", "only the first message may carry metadata")],
                                         reason=Reason.INVALID_UPLOAD)
                if req.chunk:
                    if writing is not None:
                        await asyncio.wrap_future(writing)  # one write at a time, in order
                    writing = pool.submit(self._write_chunk, writer, verifier, req.chunk)
                    self._bytes("in", len(req.chunk))
            if writing is not None:
                await asyncio.wrap_future(writing)
            result = await pool.run(self._finish_upload, artifact_id, writer, verifier, sha256_last)
        except asyncio.CancelledError:  # the client went away: clean up in a thread, without awaiting
            pool.executor.submit(self._drop_pending, artifact_id, key, writer, writing)
            raise
        except BaseException:  # the caller hears of the failure once nothing of the upload is left
            await asyncio.get_running_loop().run_in_executor(
                pool.executor, self._drop_pending, artifact_id, key, writer, writing)
            raise
        log.info("tenant %s uploaded %s (%d bytes)", tenant, key, result.size_bytes)
        return result

    def _drop_pending(self, artifact_id: uuid.UUID, key: str, writer: ObjectWriter | None,
                      writing: concurrent.futures.Future[None] | None = None) -> None:
        """Undo a failed upload: what its writer wrote (or its object, once committed), then its PENDING row,
        once the chunk still being written (`writing`) is done. Never raises: what cannot be deleted now stays
        PENDING, and the reaper deletes it once the pending-upload TTL has passed."""
        if writing is not None:
            concurrent.futures.wait([writing])
        if writer is not None and not writer.committed:
            try:
                writer.abort()
            except Exception:
                log.exception("could not abort the write of %s after its upload failed", key)
        if writer is not None and writer.committed:
            try:
                self.b.store.delete(key)
            except Exception:
                log.exception("could not delete %s after its upload failed; the reaper will", key)
                return  # keep the row, so the object is not forgotten
        try:
            with self.b.session() as s:
                s.execute(delete(Artifact).where(Artifact.id == artifact_id,
                                                 Artifact.state == ArtifactState.PENDING.value))
        except Exception:
            log.exception("could not delete the reservation of failed upload %s; the reaper will", key)

    @_blocking
    def GetArtifact(self, request: pb.GetArtifactRequest) -> pb.Artifact:  # noqa: N802
        tenant = current_tenant()
        artifact_id = parse_artifact_name(request.name)
        with self.b.reader() as conn:
            row = conn.execute(select(Artifact.__table__).where(
                Artifact.id == artifact_id, Artifact.tenant_id == tenant,
                Artifact.state == ArtifactState.READY.value)).first()
        if row is None:
            raise errors.not_found("artifact", request.name)
        return artifact_proto(row)

    @_blocking
    def ListArtifacts(self, request: pb.ListArtifactsRequest) -> pb.ListArtifactsResponse:  # noqa: N802
        tenant = current_tenant()
        terms = parse_filter(request.filter, {"kind": [k.value for k in ArtifactKind]})
        stmt = select(Artifact.__table__).where(Artifact.tenant_id == tenant,
                                                Artifact.state == ArtifactState.READY.value)
        for key, value in terms:
            if key == "kind":
                stmt = stmt.where(Artifact.kind == value)
            else:
                stmt = stmt.where(Artifact.labels[key[len("labels."):]].as_string() == value)
        with self.b.reader() as conn:
            rows, token = _page(conn, Artifact, stmt, request.page_size, request.page_token, request.filter)
        return pb.ListArtifactsResponse(artifacts=[artifact_proto(r) for r in rows], next_page_token=token)

    @_blocking
    def DeleteArtifact(self, request: pb.DeleteArtifactRequest) -> pb.DeleteArtifactResponse:  # noqa: N802
        tenant = current_tenant()
        artifact_id = parse_artifact_name(request.name)
        name = artifact_name(artifact_id)
        with self.b.session() as s:
            row = self._get(s, artifact_id, tenant, lock=True)
            if row is None:
                raise errors.not_found("artifact", request.name)
            active = s.execute(select(Job.id, Job.spec).where(
                Job.tenant_id == tenant, Job.state.notin_([st.value for st in jobs.TERMINAL]))).all()
            users = [job_name(job_id) for job_id, spec in active if name in ((spec or {}).get("model"),
                                                                              (spec or {}).get("dataset"))]
            if users:
                raise errors.failed_precondition(
                    f"{name} is the model or dataset of {len(users)} unfinished job(s) ({', '.join(users[:3])}); "
                    "cancel them or wait for them to end", Reason.ARTIFACT_IN_USE, jobs=",".join(users[:10]))
            key = row.storage_key
            s.delete(row)
        try:  # the row is gone first, so no client ever sees an artifact without its bytes
            self.b.store.delete(key)
        except Exception:
            log.exception("could not delete the object %s of deleted artifact %s", key, name)
        return pb.DeleteArtifactResponse()

    def _resolve_download(self, name: str, tenant: str) -> Artifact:
        m = JOB_RESULT_RE.fullmatch(name or "")
        with self.b.session() as s:
            if m is None:
                artifact_id = _parse_name(ARTIFACT_NAME_RE, name, "name",
                                          "artifacts/{uuid}, jobs/{uuid}/model or jobs/{uuid}/report")
                row = self._get(s, artifact_id, tenant)
                if row is None:
                    raise errors.not_found("artifact", name)
                return row
            job_id, which = uuid.UUID(m.group(1)), m.group(2)
            job = jobs.get_job(s, job_id, tenant)
            if job is None:
                raise errors.not_found("job", job_name(job_id))
            if job.state != JobState.SUCCEEDED:
                raise errors.failed_precondition(
                    f"{job_name(job_id)} is {job.state}: its results can be downloaded once it has SUCCEEDED",
                    Reason.JOB_NOT_SUCCEEDED, job=job_name(job_id), state=job.state)
            ids = [uuid.UUID(n.split("/", 1)[1]) for n in _result_names(job)]
            rows = list(s.scalars(select(Artifact).where(Artifact.id.in_(ids), Artifact.tenant_id == tenant,
                                                         Artifact.state == ArtifactState.READY.value))) if ids else []
            kind = ArtifactKind.MODEL.value if which == "model" else ArtifactKind.REPORT.value
            by_kind = [r for r in rows if r.kind == kind]
            if not by_kind:
                raise errors.not_found("result", name)
            by_kind.sort(key=lambda r: ids.index(r.id))
            return by_kind[0]

    def _open_download(self, request: pb.DownloadArtifactRequest) -> tuple[pb.Artifact, Iterator[bytes]]:
        tenant = current_tenant()
        row = self._resolve_download(request.name, tenant)
        if request.offset < 0:
            raise errors.invalid([("offset", "must not be negative")])
        if request.offset > row.size_bytes:
            raise ApiError(grpc.StatusCode.OUT_OF_RANGE,
                           f"offset {request.offset} is past the end of {artifact_name(row.id)} "
                           f"({row.size_bytes} bytes)", Reason.OFFSET_OUT_OF_RANGE,
                           metadata={"size_bytes": str(row.size_bytes)})
        try:
            body = self.b.store.open_range(row.storage_key, request.offset, self.b.settings.chunk_size)
        except ObjectNotFound:
            raise ApiError(grpc.StatusCode.DATA_LOSS, f"the bytes of {artifact_name(row.id)} are missing from the "
                           "object store", Reason.OBJECT_MISSING) from None
        except InvalidRange as e:
            raise ApiError(grpc.StatusCode.OUT_OF_RANGE, str(e), Reason.OFFSET_OUT_OF_RANGE) from None
        except Exception as e:
            if errors.classify_outage(e) is not None:
                raise
            log.warning("download of %s: the object store failed (%s)", row.storage_key, type(e).__name__)
            raise errors.outage(Reason.STORE_UNAVAILABLE, "the object store") from None
        return artifact_proto(row), body

    @_streaming
    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ArtifactChunk]:
        # each chunk is read in the pool: a slow reader holds a coroutine, not a thread
        pool = self.b.pool
        meta, body = await pool.run(self._open_download, request)
        pos = request.offset
        first = True
        reading = pool.submit(_next_chunk, body)
        try:
            while True:
                data = await asyncio.wrap_future(reading)
                if data is None:
                    break
                reading = pool.submit(_next_chunk, body)  # read the next chunk while this one is sent
                msg = pb.ArtifactChunk(offset=pos, data=data)
                if first:
                    msg.artifact.CopyFrom(meta)
                    first = False
                yield msg
                pos += len(data)
                self._bytes("out", len(data))
            if first:  # nothing left to send: still tell the client what it asked for
                yield pb.ArtifactChunk(offset=pos, artifact=meta)
        finally:
            close = getattr(body, "close", None)
            if close is not None:  # a generator closes in a thread, never on the loop, once its read is done
                reading.add_done_callback(lambda _f: pool.executor.submit(close))


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
        v += _label_violations(job.labels, "job.labels")
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

    @_blocking
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
                    if request.HasField("job") and not _same_request(existing, request.job):
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
            job, created = jobs.create_job(s, tenant, _stored_spec(spec), dict(request.job.labels),
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

    @_unary
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

    @_blocking
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
            rows, token = _page(conn, Job, stmt, request.page_size, request.page_token, request.filter)
        return pb.ListJobsResponse(jobs=[job_proto(r) for r in rows], next_page_token=token)

    @_blocking
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

    @_blocking
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
            result_ids = [uuid.UUID(n.split("/", 1)[1]) for n in _result_names(job)]
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

    def _watch_read(self, job_id: uuid.UUID, tenant: str, after: int) -> tuple[list[Row[Any]], Row[Any] | None]:
        """The job's events after `after` (at most 500), then the job: a job read after its terminal event
        carries its results."""
        with self.b.reader() as conn:
            events = conn.execute(select(JobEvent.__table__).where(
                JobEvent.job_id == job_id, JobEvent.sequence > after).order_by(JobEvent.sequence).limit(500)).all()
            job = conn.execute(select(Job.__table__).where(Job.id == job_id, Job.tenant_id == tenant)).first()
        return events, job

    @_streaming
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
