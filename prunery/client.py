"""Python client of the Prunery gRPC API, for pipelines and the `prunery` client commands.

No torch import: a pipeline can drive the service without the engine installed.

Retries. An API or database restart makes calls fail for several seconds; gRPC's own retry policy (a
channel service config: 5 attempts, about 3 s in all) gave up sooner than that, so the client retries in its
own loop instead (`Backoff`, `call_with_retries`):

- what: `UNAVAILABLE` on every method (whatever its reason: DATABASE_UNAVAILABLE, STORE_UNAVAILABLE,
  OVERLOADED, or no server at all); `DEADLINE_EXCEEDED` on reads only (GetJob,
  GetArtifact, ListJobs, ListArtifacts, and WatchJob/DownloadArtifact reconnects), since a write that timed
  out may have happened; `RESOURCE_EXHAUSTED` only for the reasons that pass with time (TENANT_RATE_LIMIT,
  TENANT_STREAM_LIMIT), never TENANT_JOB_LIMIT or TENANT_CAP_EXCEEDED.
- when: exponential backoff with full jitter (a pause drawn uniformly from [0, min(5 s, 0.2 s * 2**n)] before
  retry n + 1), never shorter than the server's `google.rpc.RetryInfo` delay when it sends one.
- how long: `retry_budget_s` (60 s by default; the CLI reads `PRUNERY_RETRY_BUDGET_S`), enough for an API or
  database restart. A call gives up with its last error when the next attempt could not start within the
  budget. Each attempt has its own deadline (`timeout`); a retry's deadline is cut to what is left of the
  budget, so a unary call ends within max(timeout, budget). Transfers and watches count the budget from their
  first failure after their last progress instead (a chunk written, an upload attempt that got further than
  the ones before, an event, a watch connection that stayed open 5 s before it was cut), so a long download
  or the watch of a long job survives several restarts.
- safety: CreateJob always carries a `request_id` (the caller's, or one made once per call) and every retry
  re-sends the same request, so the server returns the first job instead of creating a second. Uploads are
  re-sent from the file, downloads resume from the byte already written, watches resume after the last
  event sequence seen. A DeleteJob/DeleteArtifact that fails with NOT_FOUND on a retry (not on the first
  attempt) counts as done: the attempt before it may have deleted it. CancelJob is idempotent.
- gRPC's `grpc.enable_retries` stays on with no retry policy configured: that leaves only its transparent
  retries, which re-send a call that never reached the server (safe for every method). The channel's
  reconnect backoff is capped at 2 s, so a restarted server is found again within about that long.

Errors are `PruneryError`: the gRPC `code`, the `reason` of the server's `google.rpc.ErrorInfo` ("" when
there is none), its `message`; `str(e)` is "CODE: message".
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from prunery.core.spec import JobSpec
from prunery.spec_proto import spec_to_proto
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc

CHUNK = 1 << 20
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}

DEFAULT_RETRY_BUDGET_S = 60.0
INITIAL_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
# RESOURCE_EXHAUSTED reasons that pass with time; the others (TENANT_JOB_LIMIT, TENANT_CAP_EXCEEDED) need the
# caller to act
RETRYABLE_EXHAUSTED_REASONS = frozenset({"TENANT_RATE_LIMIT", "TENANT_STREAM_LIMIT"})
# a retry is not started with less than this much budget left (or the call's timeout, if shorter): an attempt
# that cannot finish would only turn the real error into DEADLINE_EXCEEDED
MIN_ATTEMPT_S = 1.0
# a watch stream open this long before it broke had a server behind it: its end starts a new retry budget
HEALTHY_STREAM_S = 5.0

T = TypeVar("T")


class PruneryError(RuntimeError):
    """A call failed: `code` (grpc.StatusCode), `reason` (the server's google.rpc.ErrorInfo reason, or ""),
    `message` (the server's), `retry_delay_s` (its google.rpc.RetryInfo delay, or None). `str(e)` is
    "CODE: message"."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "",
                 retry_delay_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason, self.retry_delay_s = code, message, reason, retry_delay_s


def error_of(e: grpc.RpcError) -> PruneryError:
    """The PruneryError of a failed call, with the ErrorInfo reason and RetryInfo delay of its status."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (e.details() if callable(getattr(e, "details", None)) else None) or ""
    reason, delay = "", None
    try:
        status = rpc_status.from_call(e)  # type: ignore[arg-type]  # a failed call's RpcError is a grpc.Call
    except (ValueError, AttributeError, TypeError):
        status = None  # no rich status, or one that disagrees with the call's: keep the call's code and text
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return PruneryError(code, message, reason, delay)


def retryable(error: PruneryError, read: bool) -> bool:
    """Whether a call that failed with `error` may be sent again (`read`: it changes nothing server-side)."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return read  # a write that timed out may have been done
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.reason in RETRYABLE_EXHAUSTED_REASONS
    return False


class Backoff:
    """Exponential backoff with full jitter within a time budget. Pure logic: the caller sleeps; `clock` and
    `rand` (a draw in [0, 1)) can be replaced, e.g. by a fake clock in tests.

    The budget runs from creation (`started`, a unary call: its whole time counts), or else from the first
    failure (`next_pause`) after creation or after the last `progress()` (a stream: the time it was working
    does not count). `progress()` also restarts the exponent."""

    def __init__(self, budget_s: float = DEFAULT_RETRY_BUDGET_S, initial_s: float = INITIAL_BACKOFF_S,
                 max_s: float = MAX_BACKOFF_S, multiplier: float = 2.0, *, started: bool = True,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random) -> None:
        if budget_s < 0 or initial_s <= 0 or max_s < initial_s or multiplier < 1:
            raise ValueError("backoff needs budget_s >= 0, 0 < initial_s <= max_s and multiplier >= 1")
        self.budget_s, self.initial_s, self.max_s, self.multiplier = budget_s, initial_s, max_s, multiplier
        self.clock, self.rand = clock, rand
        self.start: float | None = clock() if started else None
        self.retries = 0  # since the last progress

    def progress(self) -> None:
        self.start = None
        self.retries = 0

    def remaining(self) -> float:
        return self.budget_s if self.start is None else self.start + self.budget_s - self.clock()

    def ceiling(self) -> float:
        """The largest pause of the next retry: initial * multiplier**retries, capped."""
        return min(self.max_s, self.initial_s * self.multiplier ** min(self.retries, 64))

    def next_pause(self, at_least: float = 0.0, min_attempt_s: float = 0.0) -> float | None:
        """The pause before the next attempt, or None when the pause and `min_attempt_s` of the attempt after
        it would not fit in what is left of the budget. `at_least`: the server's RetryInfo delay."""
        if self.start is None:
            self.start = self.clock()
        pause = max(self.rand() * self.ceiling(), at_least)
        remaining = self.remaining()
        if remaining <= 0 or pause + min_attempt_s > remaining:
            return None
        self.retries += 1
        return pause


def call_with_retries(attempt: Callable[[float], T], timeout: float, backoff: Backoff, *, read: bool,
                      missing_ok_on_retry: bool = False,
                      sleep: Callable[[float], None] = time.sleep) -> T | None:
    """Run `attempt(deadline_s)` (it raises PruneryError on failure) until it succeeds, fails in a way that
    is not retried, or the budget runs out. The first attempt gets `timeout`; a retry gets at most what is
    left of the budget. `missing_ok_on_retry` (deletes): NOT_FOUND on a retry means an earlier attempt did
    it, and returns None."""
    retry = False
    while True:
        deadline = timeout if not retry else max(0.001, min(timeout, backoff.remaining()))
        try:
            return attempt(deadline)
        except PruneryError as e:
            if retry and missing_ok_on_retry and e.code == grpc.StatusCode.NOT_FOUND:
                return None
            pause = backoff.next_pause(e.retry_delay_s or 0.0, min(timeout, MIN_ATTEMPT_S)) \
                if retryable(e, read) else None
            if pause is None:
                raise
        sleep(pause)
        retry = True


def _file_chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    """The file's bytes in chunks, read afresh on every upload attempt."""
    with path.open("rb") as f:
        yield from iter(lambda: f.read(size), b"")


def job_name(job: str) -> str:
    """Accept `jobs/{id}` or a bare id."""
    return job if job.startswith("jobs/") else f"jobs/{job}"


def spec_from_options(model: str, ratio: float | None = None, importance: str = JobSpec.importance,
                      **options: Any) -> pb.PruneSpec:
    """The job spec for the same options `prunery prune` takes: the fields of `prunery.core.spec.JobSpec` by
    name (dataset="artifacts/...", sparse_steps=..., target_macs=..., optimizer="adamw", ...; None leaves a
    field to its default). Unknown options and names: ValueError; the values are checked by the server."""
    unknown = sorted(set(options) - set(JobSpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; the options are the fields of prunery.core.spec.JobSpec")
    values = {name: value for name, value in options.items() if value is not None}
    if "ignore" in values:
        values["ignore"] = tuple(values["ignore"])
    return spec_to_proto(JobSpec(model=model, ratio=ratio or None, importance=importance, **values))


class Client:
    """A connection to a Prunery API server, authenticated as one tenant.

    `timeout`: the deadline of each unary call's attempt, seconds. `retry_budget_s`: how long failed calls
    are retried (see the module docstring; 0: never)."""

    def __init__(self, address: str, token: str, timeout: float = 30.0,
                 retry_budget_s: float = DEFAULT_RETRY_BUDGET_S) -> None:
        if not address:
            raise ValueError("no server address: pass --address or set PRUNERY_ADDRESS")
        if not token:
            raise ValueError("no token: pass --token or set PRUNERY_TOKEN")
        if retry_budget_s < 0:
            raise ValueError(f"retry_budget_s must not be negative, got {retry_budget_s}")
        self.timeout = timeout
        self.retry_budget_s = retry_budget_s
        self._sleep: Callable[[float], None] = time.sleep
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.enable_retries", 1),  # transparent retries only: no retry policy is configured
            # find a restarted server quickly (defaults: 1 s growing to 120 s between connection attempts)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20),
        ])
        self.artifacts = pb_grpc.ArtifactServiceStub(self._channel)
        self.jobs = pb_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _backoff(self, started: bool = True) -> Backoff:
        return Backoff(self.retry_budget_s, started=started)

    def _call(self, method: Callable, request: Any, *, read: bool, timeout: float | None = None,
              missing_ok_on_retry: bool = False) -> Any:
        """A unary call with retries (`read`: also after DEADLINE_EXCEEDED)."""
        def attempt(deadline: float) -> Any:
            try:
                return method(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as e:
                raise error_of(e) from None

        return call_with_retries(attempt, timeout or self.timeout, self._backoff(), read=read,
                                 missing_ok_on_retry=missing_ok_on_retry, sleep=self._sleep)

    def _retry_or_raise(self, error: PruneryError, backoff: Backoff, *, read: bool) -> None:
        """Sleep before the next attempt of a stream, or raise `error` when it is not retried or the budget
        is spent."""
        pause = backoff.next_pause(error.retry_delay_s or 0.0) if retryable(error, read) else None
        if pause is None:
            raise error
        self._sleep(pause)

    # --- artifacts ---------------------------------------------------------------------------
    def upload(self, path: str | os.PathLike, kind: pb.ArtifactKind = pb.MODEL, labels: dict[str, str] | None = None,
               timeout: float = 3600.0) -> pb.Artifact:
        """Stream a file up in chunks: its size declared first, its SHA-256 (computed as the file is read, in one
        pass) in the last message; the server stores the file only if both match. An interrupted upload is sent
        again from the start of the file; the budget counts from the failure of the last attempt that got further
        than the ones before it."""
        path = Path(path)
        meta = pb.Artifact(display_name=path.name, kind=kind, labels=labels or {}, size_bytes=path.stat().st_size)
        backoff = self._backoff(started=False)
        furthest = -1  # bytes taken by the furthest attempt so far

        def requests(sent: list[int]) -> Iterator[pb.UploadArtifactRequest]:
            digest = hashlib.sha256()
            yield pb.UploadArtifactRequest(metadata=meta)
            for block in _file_chunks(path):
                digest.update(block)
                sent[0] += len(block)  # taken by gRPC, so on its way to the server
                yield pb.UploadArtifactRequest(chunk=block)
            yield pb.UploadArtifactRequest(sha256=digest.hexdigest())

        while True:
            sent = [0]
            try:
                return self.artifacts.UploadArtifact(requests(sent), timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                error = error_of(e)
            if sent[0] > furthest:  # this attempt got further: the transfer is progressing between restarts
                furthest = sent[0]
                backoff.progress()
            self._retry_or_raise(error, backoff, read=False)

    def get_artifact(self, name: str) -> pb.Artifact:
        return self._call(self.artifacts.GetArtifact, pb.GetArtifactRequest(name=name), read=True)

    def list_artifacts(self, filter: str = "", page_size: int = 50) -> Iterator[pb.Artifact]:
        token = ""
        while True:
            page = self._call(self.artifacts.ListArtifacts, pb.ListArtifactsRequest(
                page_size=page_size, page_token=token, filter=filter), read=True)
            yield from page.artifacts
            token = page.next_page_token
            if not token:
                return

    def delete_artifact(self, name: str) -> None:
        self._call(self.artifacts.DeleteArtifact, pb.DeleteArtifactRequest(name=name), read=False,
                   missing_ok_on_retry=True)

    def download(self, name: str, out: str | os.PathLike, timeout: float = 3600.0) -> Path:
        """Stream an artifact (or `jobs/{id}/model`, `jobs/{id}/report`) to `out`, resuming after a
        dropped connection from the bytes already written; the file appears only when complete. The budget
        counts from the first failure after the last chunk written."""
        out = Path(out)
        partial = out.with_name(out.name + ".partial")
        partial.unlink(missing_ok=True)
        backoff = self._backoff(started=False)
        try:
            while True:
                offset = partial.stat().st_size if partial.exists() else 0
                size: int | None = None
                try:
                    stream = self.artifacts.DownloadArtifact(pb.DownloadArtifactRequest(name=name, offset=offset),
                                                             timeout=timeout, metadata=self._metadata)
                    with partial.open("ab") as f:
                        for msg in stream:
                            if msg.HasField("artifact"):
                                size = msg.artifact.size_bytes
                            if msg.data:
                                f.write(msg.data)
                                backoff.progress()
                    written = partial.stat().st_size
                    if size is None or written == size:
                        os.replace(partial, out)
                        return out
                    # the stream ended early without an error (a server stopping): resume like after one
                    error = PruneryError(grpc.StatusCode.UNAVAILABLE,
                                         f"the download of {name} ended at byte {written} of {size}")
                except grpc.RpcError as e:
                    error = error_of(e)
                self._retry_or_raise(error, backoff, read=True)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    # --- jobs ----------------------------------------------------------------------------------
    def create_job(self, spec: pb.PruneSpec, labels: dict[str, str] | None = None,
                   request_id: str | None = None, queue: str = "") -> pb.Job:
        """Create a job (on `queue`, a worker pool of the server; default: its default queue). The request
        carries `request_id` (one is made when none is given) on every retry, so a retry returns the job the
        first attempt created; calling again with the same request_id does too."""
        request = pb.CreateJobRequest(job=pb.Job(spec=spec, labels=labels or {}, queue=queue),
                                      request_id=request_id or str(uuid.uuid4()))
        return self._call(self.jobs.CreateJob, request, read=False)

    def get_job(self, job: str) -> pb.Job:
        return self._call(self.jobs.GetJob, pb.GetJobRequest(name=job_name(job)), read=True)

    def list_jobs(self, filter: str = "", page_size: int = 50) -> Iterator[pb.Job]:
        token = ""
        while True:
            page = self._call(self.jobs.ListJobs, pb.ListJobsRequest(page_size=page_size, page_token=token,
                                                                     filter=filter), read=True)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel_job(self, job: str) -> pb.Job:
        return self._call(self.jobs.CancelJob, pb.CancelJobRequest(name=job_name(job)), read=False)

    def delete_job(self, job: str) -> None:
        self._call(self.jobs.DeleteJob, pb.DeleteJobRequest(name=job_name(job)), read=False,
                   missing_ok_on_retry=True)

    def watch_job(self, job: str, after_sequence: int = 0, timeout: float = 24 * 3600.0) -> Iterator[pb.JobEvent]:
        """The job's events after `after_sequence`, until its last one (SUCCEEDED, FAILED or CANCELLED).

        A dropped stream is reopened after the last event seen, so no event is yielded twice or missed;
        `timeout` is each connection's deadline (the watch then reconnects). The retry budget counts from the
        first failure after the last event (or after a connection that stayed open a while), so a watch of a
        long job survives several restarts."""
        name = job_name(job)
        seen = after_sequence
        backoff = self._backoff(started=False)
        empty_ends = 0  # streams in a row that ended without error and without an event
        existed = False  # the server showed the job exists (an event, or a stream that ended without error)
        while True:
            got = False
            started = time.monotonic()
            try:
                stream = self.jobs.WatchJob(pb.WatchJobRequest(name=name, after_sequence=seen), timeout=timeout,
                                            metadata=self._metadata)
                try:
                    for event in stream:
                        if event.sequence <= seen:
                            continue
                        seen, got, existed = event.sequence, True, True
                        backoff.progress()
                        yield event
                        if event.state in TERMINAL:
                            return
                finally:
                    stream.cancel()  # a caller that stops early must not leave the call open
            except grpc.RpcError as e:
                error = error_of(e)
                if error.code == grpc.StatusCode.NOT_FOUND and existed:
                    return  # deleted while the watch was reconnecting: it had ended
                lasted = time.monotonic() - started
                if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and lasted >= 0.9 * timeout:
                    backoff.progress()  # the connection lived its whole deadline: a quiet job, not an outage
                    continue
                if lasted >= HEALTHY_STREAM_S and not error.reason:
                    # open that long, then cut (a restart): the server was up, the job quiet; a server that
                    # ends the stream with a reason (DATABASE_UNAVAILABLE, ...) is failing, not quiet
                    backoff.progress()
                self._retry_or_raise(error, backoff, read=True)
                continue
            # the stream ended without an error and without the job's last event: the job was deleted, or
            # had ended before `seen`, or the server stopped the stream early
            existed = True
            if got:
                empty_ends = 0
                continue
            empty_ends += 1
            try:
                state = self.get_job(name).state
            except PruneryError as e:
                if e.code == grpc.StatusCode.NOT_FOUND:
                    return  # deleted while watched: it had ended
                raise
            if state in TERMINAL:
                if empty_ends >= 2:
                    return  # nothing after `seen`: it ended there
                continue  # reconnect at once: its last events may be after `seen`
            self._retry_or_raise(PruneryError(grpc.StatusCode.UNAVAILABLE, f"the watch of {name} ended early"),
                                 backoff, read=True)

    def wait(self, job: str, on_event: Callable[[pb.JobEvent], None] | None = None) -> pb.Job:
        """Block until the job ends; returns it as it ended."""
        for event in self.watch_job(job):
            if on_event is not None:
                on_event(event)
        return self.get_job(job)
