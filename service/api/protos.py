"""Messages from rows: artifacts, jobs and events as the API answers them, and a job's spec between its
request, its stored form (`JobSpec.to_dict`) and the wire (`prunery/spec_proto.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Row

from prunery.spec_proto import spec_from_proto, spec_to_proto
from prunery.v1 import prunery_pb2 as pb

from ...core.spec import JobSpec
from ..store import jobs
from ..store.db import (
    Artifact,
    Job,
    JobEvent,
)
from . import errors
from .names import artifact_name, job_name, parse_artifact_name

__all__ = ["artifact_proto", "event_proto", "job_proto", "result_names", "same_request", "stored_spec"]

log = logging.getLogger(__name__)


def artifact_proto(a: Artifact | Row[Any]) -> pb.Artifact:
    """From an ORM object or a Core row of the artifacts table."""
    msg = pb.Artifact(name=artifact_name(a.id), display_name=a.display_name, kind=pb.ArtifactKind.Value(a.kind),
                      size_bytes=a.size_bytes, sha256=a.sha256, labels=dict(a.labels or {}),
                      producer_job=job_name(a.producer_job_id) if a.producer_job_id else "")
    msg.create_time.FromDatetime(a.create_time)
    return msg


def same_request(job: Job, requested: pb.Job) -> bool:
    """Whether a CreateJob retry asks for the job that its request_id already created."""
    try:
        spec, unreadable = spec_from_proto(requested.spec)
        return (not unreadable and stored_spec(spec) == stored_spec(JobSpec.from_dict(job.spec or {}))
                and dict(requested.labels) == (job.labels or {}) and requested.queue in ("", job.queue))
    except (errors.ApiError, TypeError, ValueError):
        return False


def stored_spec(spec: JobSpec) -> dict[str, Any]:
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


def result_names(job: Job | Row[Any]) -> list[str]:
    return [r if r.startswith("artifacts/") else artifact_name(r) for r in (job.result_artifact_ids or [])]


def job_proto(j: Job | Row[Any]) -> pb.Job:
    """From an ORM object or a Core row of the jobs table."""
    msg = pb.Job(name=job_name(j.id), spec=_spec_message(j.spec or {}), state=pb.JobState.Value(j.state),
                 progress=j.progress, attempt_count=j.attempt_count, result_artifacts=result_names(j),
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


