"""`ArtifactService`: uploads, downloads, listing and deletion of a tenant's artifacts.

Resource names are `artifacts/{uuid}`; DownloadArtifact also takes `jobs/{uuid}/model` and `jobs/{uuid}/report`
(a job's results, available once it has SUCCEEDED), and resumes from an offset.

Uploads stream straight into the object store (one chunk in memory at a time, plus at most one S3 part in
the store): the size and SHA-256 (declared first, or sent last by a client that hashes as it sends) are checked
as the bytes pass, and a mismatch, a broken or cancelled stream drops what was written before anything becomes
visible. An upload first reserves its declared size: a PENDING artifact row (with its storage key) inserted under
the tenant row's lock, so the tenant's cap counts uploads in progress and concurrent uploads cannot together pass
it. Once the object is complete and verified the row becomes READY; a failed upload deletes its object and its
row, leaving nothing. Every read ignores PENDING rows. What a crash of the API leaves (a PENDING row, maybe its
object) is deleted by the workers' reaper after `PRUNERY_PENDING_UPLOAD_TTL_S` (`worker/reaper.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc

from ..store import jobs
from ..store.db import (
    Artifact,
    ArtifactKind,
    ArtifactState,
    Job,
    JobState,
    Tenant,
    utcnow,
)
from ..store.objectstore import InvalidRange, ObjectNotFound, ObjectWriter, TooLarge
from . import errors
from .auth import current_tenant
from .errors import ApiError, Reason, Violation
from .names import (
    ARTIFACT_NAME_RE,
    JOB_RESULT_RE,
    MAX_DISPLAY_NAME,
    SHA256_RE,
    UPLOAD_KINDS,
    artifact_name,
    job_name,
    label_violations,
    page,
    parse_artifact_name,
    parse_filter,
    parse_name,
)
from .protos import artifact_proto, result_names
from .servicers import ApiBackend, blocking, cap_error, streaming, tenant_bytes, unary

__all__ = ["ArtifactService"]

log = logging.getLogger(__name__)

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
        violations += label_violations(meta.labels, "metadata.labels")
        if violations:
            raise errors.invalid(violations)
        cap = self.b.settings.tenant_cap_bytes
        artifact_id = uuid.uuid4()
        with self.b.session() as s:
            s.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())  # serialise the cap
            used = tenant_bytes(s, tenant)
            if meta.size_bytes > cap - used:
                raise cap_error(cap, used, meta.size_bytes)
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
            # an UPDATE's result is a CursorResult (rowcount); Session.execute is typed for any statement
            flipped = cast(CursorResult[Any], s.execute(update(Artifact).where(
                Artifact.id == artifact_id, Artifact.state == ArtifactState.PENDING.value,
            ).values(state=ArtifactState.READY.value, size_bytes=size, sha256=sha256))).rowcount
            if flipped != 1:  # the reaper swept the reservation: the upload outlived the pending-upload TTL
                raise ApiError(grpc.StatusCode.ABORTED, f"the upload of {key} took longer than the server keeps "
                               "an unfinished upload; retry", Reason.UPLOAD_EXPIRED)
            return artifact_proto(s.scalars(select(Artifact).where(Artifact.id == artifact_id)).one())

    @unary
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

    @blocking
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

    @blocking
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
            rows, token = page(conn, Artifact, stmt, request.page_size, request.page_token, request.filter)
        return pb.ListArtifactsResponse(artifacts=[artifact_proto(r) for r in rows], next_page_token=token)

    @blocking
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
                artifact_id = parse_name(ARTIFACT_NAME_RE, name, "name",
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
            ids = [uuid.UUID(n.split("/", 1)[1]) for n in result_names(job)]
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

    @streaming
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


