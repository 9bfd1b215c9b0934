"""API errors as `google.rpc.Status` with details: an `ErrorInfo` (a stable reason, domain "prunery.dev") on
every error, and a `BadRequest` with field violations where a request field is at fault.

Servicer code raises `ApiError` (or one of the shortcuts); `servicers.py`'s wrappers turn it into the call's
status with `abort(context, error)`. Clients read the details with `grpc_status.rpc_status.from_call(call)`.

Reasons are part of the API: clients may branch on them, so never rename one.

Every message and detail quotes at most `MAX_QUOTE` characters of any input (`quote`), so a refusal always
fits the client's metadata limit and arrives as itself. An outage of the database, the object store or the
broker is `UNAVAILABLE` with a stable reason and a `RetryInfo` (`outage`), never INTERNAL or UNKNOWN, and
never the driver's text (that is logged on the server).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..store.reasons import Reason

DOMAIN = "prunery.dev"


MAX_QUOTE = 200  # characters of any input an error message or detail repeats


MAX_VIOLATIONS = 5  # field violations in a BadRequest (the message names the first few)


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """`value` quoted in ASCII (control characters and NUL escaped), cut to `limit` characters, saying how
    long it was when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return ascii(text)
    return f"{ascii(text[:limit])}... ({len(text)} characters)"


Violation = tuple[str, str]  # (field path like "job.spec.ratio", description)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def error_info(reason: str, metadata: Mapping[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                       metadata={k: str(v) for k, v in (metadata or {}).items()})


def status_proto(code: grpc.StatusCode | int, message: str, reason: str | None = None, *,
                 metadata: Mapping[str, str] | None = None, violations: Iterable[Violation] = (),
                 retry_after_s: float | None = None) -> status_pb2.Status:
    """A google.rpc.Status with an ErrorInfo (when `reason` is given), a BadRequest (when there are
    violations) and a RetryInfo (with `retry_after_s`). `code` is a grpc.StatusCode or a google.rpc.Code
    number."""
    number = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    status = status_pb2.Status(code=number, message=message)
    if reason:
        status.details.append(_pack(error_info(reason, metadata)))
    if retry_after_s is not None:
        seconds = max(0.0, retry_after_s)
        whole = math.floor(seconds)
        delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    violations = list(violations)
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])
        status.details.append(_pack(bad))
    return status


class ApiError(Exception):
    """An error to return to the caller: a status code, a message a person can act on, a stable reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, *,
                 violations: Iterable[Violation] = (), metadata: Mapping[str, str] | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason
        self.violations = list(violations)
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s

    def to_status_proto(self) -> status_pb2.Status:
        return status_proto(self.code, self.message, self.reason, metadata=self.metadata,
                            violations=self.violations, retry_after_s=self.retry_after_s)

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


async def abort(context: grpc.aio.ServicerContext, error: ApiError) -> NoReturn:
    """End the call with `error` (raises, as `context.abort` does)."""
    status = error.to_grpc_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # pragma: no cover


# ------------------------------------------------------------------------------------------------------
# Shortcuts
# ------------------------------------------------------------------------------------------------------

def invalid(violations: Iterable[Violation], message: str | None = None,
            reason: str = Reason.INVALID_FIELD) -> ApiError:
    """INVALID_ARGUMENT with field violations (the first MAX_VIOLATIONS: a reply stays small whatever the
    request); the message lists the first three when none is given."""
    violations = list(violations)
    more = len(violations) - MAX_VIOLATIONS
    if more > 0:
        violations = violations[:MAX_VIOLATIONS] + [("", f"{more} more violation(s) not listed")]
    if message is None:
        message = "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations[:3])
        if len(violations) > 3:
            message += f" (and {len(violations) - 3} more: see the BadRequest details)"
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, reason, violations=violations)


def not_found(kind: str, name: str) -> ApiError:
    reason = {"artifact": Reason.ARTIFACT_NOT_FOUND, "job": Reason.JOB_NOT_FOUND}.get(kind, Reason.RESULT_NOT_FOUND)
    return ApiError(grpc.StatusCode.NOT_FOUND, f"{kind} {quote(name)} not found", reason,
                    metadata={"name": name[:MAX_QUOTE]})


def outage(reason: str, what: str, retry_after_s: float = 1.0) -> ApiError:
    """UNAVAILABLE for a dependency that is briefly away: the caller should retry (after `retry_after_s`)."""
    return ApiError(grpc.StatusCode.UNAVAILABLE, f"{what} is unavailable right now; retry shortly", reason,
                    retry_after_s=retry_after_s)


def classify_outage(exc: BaseException) -> ApiError | None:
    """The UNAVAILABLE error for an exception that means the database is unreachable (a dropped or refused
    connection, a pool timeout, a server shutting down), else None."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return outage(Reason.DATABASE_UNAVAILABLE, "the database")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                        sa_exc.TimeoutError)):
        return outage(Reason.DATABASE_UNAVAILABLE, "the database")
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return None
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return outage(Reason.DATABASE_UNAVAILABLE, "the database")
    return None


def failed_precondition(message: str, reason: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, message, reason, metadata=metadata)


def unauthenticated(message: str, reason: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, message, reason)
