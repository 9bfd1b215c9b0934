"""How a job fails: `JobFailure` (a google.rpc code, a reason from the catalog shared with the API,
`prunery.service.store.reasons.Reason`, and a one-line message), `ClaimDeferred` (the job cannot be claimed now),
and the one-line messages made from engine errors and exceptions."""

from __future__ import annotations

import uuid

from google.rpc import code_pb2

from ..core.errors import exception_line, one_line
from ..service.store.reasons import Reason

__all__ = ["MESSAGE_LIMIT", "ClaimDeferred", "JobFailure", "exc_line", "message_line", "out_of_memory",
           "spec_error"]


class JobFailure(Exception):
    """Ends the job FAILED with a google.rpc code, a stable reason and a one-line message; `transient`
    failures go back to the queue while attempts remain."""

    def __init__(self, code: int, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.transient = code, reason, message, transient


class ClaimDeferred(Exception):
    """The job could not be claimed now; its task should try again later. `reason`: UNAVAILABLE (the database,
    or something else needed before the claim, failed) or TENANT_AT_LIMIT."""

    def __init__(self, job_id: uuid.UUID | str, reason: str, message: str) -> None:
        super().__init__(str(job_id), reason, message)  # all the args: it pickles (a job process sends it up)
        self.job_id, self.reason, self.message = str(job_id), reason, message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


MESSAGE_LIMIT = 500  # characters of a job's error message


def message_line(text: object) -> str:
    """Text for a job's error message: one printable line (`core.errors.one_line`)."""
    return one_line(text, MESSAGE_LIMIT)


def exc_line(exc: BaseException) -> str:
    """An exception for a job's error message: its type and the first line of its text."""
    return exception_line(exc, MESSAGE_LIMIT)


def out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator failing (a RuntimeError) under the job's memory limit."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def spec_error(message: str) -> JobFailure:
    return JobFailure(code_pb2.INVALID_ARGUMENT, Reason.INVALID_SPEC, f"invalid spec: {message}")
