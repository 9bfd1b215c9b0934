"""Python client of the Prunery gRPC API, for pipelines and the `prunery` client commands.

Every call carries a deadline; calls that fail with UNAVAILABLE (a restarting server, a load
balancer shuffling) are retried with backoff by gRPC's own retry policy, and uploads and downloads
are retried by re-sending from the file (uploads) or resuming from the byte already written
(downloads). No torch import: a pipeline can drive the service without the engine installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc

CHUNK = 1 << 20
IMPORTANCE = {"l1": pb.L1, "l2": pb.L2, "bn": pb.BN, "random": pb.RANDOM, "taylor": pb.TAYLOR, "fisher": pb.FISHER}
ATTENTION = {"heads": pb.ATTENTION_HEADS, "head-dim": pb.ATTENTION_HEAD_DIM, "none": pb.ATTENTION_NONE}
OPTIMIZER = {"sgd": pb.OPTIMIZER_SGD, "adam": pb.OPTIMIZER_ADAM, "adamw": pb.OPTIMIZER_ADAMW}
DISTILL_LOSS = {"kl": pb.DISTILL_LOSS_KL, "mse": pb.DISTILL_LOSS_MSE, "cosine": pb.DISTILL_LOSS_COSINE}
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}

_RETRY_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "prunery.v1.ArtifactService"}, {"service": "prunery.v1.JobService"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


class PruneryError(RuntimeError):
    """A call failed; `code` is the gRPC status code and the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def _wrap(e: grpc.RpcError) -> PruneryError:
    return PruneryError(e.code(), e.details() or "")


def job_name(job: str) -> str:
    """Accept `jobs/{id}` or a bare id."""
    return job if job.startswith("jobs/") else f"jobs/{job}"


def spec_from_options(model: str, ratio: float, importance: str = "l2", global_pruning: bool = False,
                      round_to: int | None = None, max_ratio: float = 1.0, ignore: list[str] | None = None,
                      seed: int = 0, attention: str = "heads", prune_hidden: bool = False,
                      **recipe: Any) -> pb.PruneSpec:
    """The job spec for the same options `prunery prune` takes; `recipe`: the data-driven fields of
    `PruneSpec` by name (dataset="artifacts/...", sparse_steps=..., target_macs=..., ...; optimizer and
    distill_loss by the engine's names, "adamw", "cosine", ...). None leaves a field unset."""
    for field, names in (("optimizer", OPTIMIZER), ("distill_loss", DISTILL_LOSS)):
        if recipe.get(field) is not None:
            if recipe[field] not in names:
                raise ValueError(f"unknown {field} {recipe[field]!r}; choose one of {', '.join(names)}")
            recipe[field] = names[recipe[field]]
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE)}")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention mode {attention!r}; choose one of {', '.join(ATTENTION)}")
    return pb.PruneSpec(model=model, ratio=ratio, importance=IMPORTANCE[importance], global_pruning=global_pruning,
                        round_to=round_to or 0, max_ratio=max_ratio, ignore=list(ignore or []), seed=seed,
                        attention=ATTENTION[attention], prune_hidden=prune_hidden,
                        **{k: v for k, v in recipe.items() if v is not None})


class Client:
    """A connection to a Prunery API server, authenticated as one tenant."""

    def __init__(self, address: str, token: str, timeout: float = 30.0) -> None:
        if not address:
            raise ValueError("no server address: pass --address or set PRUNERY_ADDRESS")
        if not token:
            raise ValueError("no token: pass --token or set PRUNERY_TOKEN")
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _RETRY_CONFIG),
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

    def _call(self, method: Callable, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _wrap(e) from None

    # --- artifacts ---------------------------------------------------------------------------
    def upload(self, path: str | os.PathLike, kind: int = pb.MODEL, labels: dict[str, str] | None = None,
               timeout: float = 3600.0, attempts: int = 3) -> pb.Artifact:
        """Stream a file up in chunks (sha256 and size declared first, checked by the server)."""
        path = Path(path)
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                digest.update(block)
        meta = pb.Artifact(display_name=path.name, kind=kind, labels=labels or {},
                           size_bytes=path.stat().st_size, sha256=digest.hexdigest())

        def requests() -> Iterator[pb.UploadArtifactRequest]:
            yield pb.UploadArtifactRequest(metadata=meta)
            with path.open("rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    yield pb.UploadArtifactRequest(chunk=block)

        for attempt in range(attempts):
            try:
                return self.artifacts.UploadArtifact(requests(), timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise _wrap(e) from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def get_artifact(self, name: str) -> pb.Artifact:
        return self._call(self.artifacts.GetArtifact, pb.GetArtifactRequest(name=name))

    def download(self, name: str, out: str | os.PathLike, timeout: float = 3600.0, attempts: int = 3) -> Path:
        """Stream an artifact (or `jobs/{id}/model`, `jobs/{id}/report`) to `out`, resuming after a
        dropped connection from the bytes already written; the file appears only when complete."""
        out = Path(out)
        partial = out.with_name(out.name + ".partial")
        partial.unlink(missing_ok=True)
        for attempt in range(attempts):
            offset = partial.stat().st_size if partial.exists() else 0
            try:
                stream = self.artifacts.DownloadArtifact(pb.DownloadArtifactRequest(name=name, offset=offset),
                                                         timeout=timeout, metadata=self._metadata)
                with partial.open("ab") as f:
                    for msg in stream:
                        f.write(msg.data)
                os.replace(partial, out)
                return out
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    partial.unlink(missing_ok=True)
                    raise _wrap(e) from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    # --- jobs ----------------------------------------------------------------------------------
    def create_job(self, spec: pb.PruneSpec, labels: dict[str, str] | None = None,
                   request_id: str | None = None, queue: str = "") -> pb.Job:
        """Create a job (on `queue`, a worker pool of the server; default: its default queue); retrying with the
        same request_id returns the same job."""
        request = pb.CreateJobRequest(job=pb.Job(spec=spec, labels=labels or {}, queue=queue),
                                      request_id=request_id or str(uuid.uuid4()))
        return self._call(self.jobs.CreateJob, request)

    def get_job(self, job: str) -> pb.Job:
        return self._call(self.jobs.GetJob, pb.GetJobRequest(name=job_name(job)))

    def list_jobs(self, filter: str = "", page_size: int = 50) -> Iterator[pb.Job]:
        token = ""
        while True:
            page = self._call(self.jobs.ListJobs, pb.ListJobsRequest(page_size=page_size, page_token=token,
                                                                     filter=filter))
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel_job(self, job: str) -> pb.Job:
        return self._call(self.jobs.CancelJob, pb.CancelJobRequest(name=job_name(job)))

    def delete_job(self, job: str) -> None:
        self._call(self.jobs.DeleteJob, pb.DeleteJobRequest(name=job_name(job)))

    def watch_job(self, job: str, after_sequence: int = 0, timeout: float = 24 * 3600.0) -> Iterator[pb.JobEvent]:
        """Events of a job until it ends; reconnects after UNAVAILABLE from the last event seen."""
        seen = after_sequence
        while True:
            try:
                stream = self.jobs.WatchJob(pb.WatchJobRequest(name=job_name(job), after_sequence=seen),
                                            timeout=timeout, metadata=self._metadata)
                for event in stream:
                    seen = event.sequence
                    yield event
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise _wrap(e) from None
                time.sleep(1.0)

    def wait(self, job: str, on_event: Callable[[pb.JobEvent], None] | None = None) -> pb.Job:
        """Block until the job ends; returns it as it ended."""
        for event in self.watch_job(job):
            if on_event is not None:
                on_event(event)
        return self.get_job(job)
