"""The catalog of stable reason strings the API and the workers share (`Reason`): what a failed call's
`ErrorInfo.reason` and a FAILED job's `error.reason` can be. Imports nothing."""

from __future__ import annotations

__all__ = ["Reason"]


class Reason:
    """Every stable reason string: the API's (`ErrorInfo.reason` of a failed call) and a FAILED job's
    (`Job.error.reason`, set by the workers and the reaper). Clients branch on these; never rename one."""

    # UNAUTHENTICATED
    MISSING_TOKEN = "MISSING_TOKEN"
    INVALID_TOKEN = "INVALID_TOKEN"
    # INVALID_ARGUMENT
    INVALID_FIELD = "INVALID_FIELD"  # see the BadRequest field violations
    INVALID_NAME = "INVALID_NAME"
    INVALID_FILTER = "INVALID_FILTER"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_UPLOAD = "INVALID_UPLOAD"  # the stream does not start with metadata, or repeats it
    SIZE_MISMATCH = "SIZE_MISMATCH"
    SHA256_MISMATCH = "SHA256_MISMATCH"
    # NOT_FOUND
    ARTIFACT_NOT_FOUND = "ARTIFACT_NOT_FOUND"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    RESULT_NOT_FOUND = "RESULT_NOT_FOUND"
    # OUT_OF_RANGE
    OFFSET_OUT_OF_RANGE = "OFFSET_OUT_OF_RANGE"
    # ALREADY_EXISTS
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"  # a CreateJob request_id sent again with another spec or labels
    # ABORTED
    UPLOAD_EXPIRED = "UPLOAD_EXPIRED"  # an upload outlived PRUNERY_PENDING_UPLOAD_TTL_S and its reservation went
    # RESOURCE_EXHAUSTED
    TENANT_CAP_EXCEEDED = "TENANT_CAP_EXCEEDED"
    TENANT_RATE_LIMIT = "TENANT_RATE_LIMIT"  # the tenant's calls per second (RetryInfo says when to retry)
    TENANT_STREAM_LIMIT = "TENANT_STREAM_LIMIT"  # the tenant's concurrent streams (WatchJob, uploads, downloads)
    TENANT_JOB_LIMIT = "TENANT_JOB_LIMIT"  # the tenant's unfinished (or queued) jobs
    # FAILED_PRECONDITION
    JOB_NOT_SUCCEEDED = "JOB_NOT_SUCCEEDED"
    JOB_NOT_FINISHED = "JOB_NOT_FINISHED"
    JOB_ALREADY_FINISHED = "JOB_ALREADY_FINISHED"
    ARTIFACT_IN_USE = "ARTIFACT_IN_USE"
    # DATA_LOSS / INTERNAL / UNAVAILABLE
    OBJECT_MISSING = "OBJECT_MISSING"
    INTERNAL = "INTERNAL"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    OVERLOADED = "OVERLOADED"  # the server sheds work past its bound on calls in flight

    # Job.error.reason of a FAILED job (its `code` is the google.rpc code in parentheses)
    INVALID_SPEC = "INVALID_SPEC"  # (INVALID_ARGUMENT) the stored spec cannot run
    MODEL_REFUSED = "MODEL_REFUSED"  # (INVALID_ARGUMENT) the safe intake refused the upload
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"  # (INVALID_ARGUMENT, INTERNAL) vetted, but torch could not load it
    DATASET_INVALID = "DATASET_INVALID"  # (INVALID_ARGUMENT) the dataset was refused or does not fit the program
    PRUNE_FAILED = "PRUNE_FAILED"  # (FAILED_PRECONDITION: the engine refused; INTERNAL: it failed)
    EXPORT_FAILED = "EXPORT_FAILED"  # (INTERNAL) the pruned program could not be saved
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"  # (RESOURCE_EXHAUSTED) the outputs pass the tenant's cap
    JOB_MEMORY_LIMIT = "JOB_MEMORY_LIMIT"  # (RESOURCE_EXHAUSTED) past PRUNERY_JOB_MEMORY_BYTES
    JOB_TIMEOUT = "JOB_TIMEOUT"  # (DEADLINE_EXCEEDED) past PRUNERY_JOB_TIMEOUT_S
    WORKER_ERROR = "WORKER_ERROR"  # (INTERNAL) anything else, in one line
    TOO_MANY_ATTEMPTS = "TOO_MANY_ATTEMPTS"  # (INTERNAL) its worker died on every attempt
    # (STORE_UNAVAILABLE, UNAVAILABLE: the object store failed on the last attempt)
