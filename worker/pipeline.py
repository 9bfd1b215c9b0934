"""One pruning job, run in a worker's job process: claim, then load, prune, export, store.

`run_job(job_id, worker_id)` first claims the job in the database (`jobs.claim`: a compare-and-set with a
lease, counting the attempt). A task whose job is already finished, cancelled, or live under another
worker's lease does nothing, so a redelivered or duplicated message is harmless. When the claim cannot be
made now (the database, or anything before the claim, fails; or the job's tenant is at
PRUNERY_TENANT_MAX_RUNNING), `run_job` raises ClaimDeferred, having changed nothing, and the task tries again
(worker/app.py): the job stays QUEUED with its one message and no attempt counted; the task calls `run_job` again
itself while the database is away (holding the message), or hands the message back to its worker's main process,
which acks it and then sends the job's next message (after a delay, at the tenant limit). Then the stages, each
announced as a progress event (stage names as in the API's `Job.stage`), a cancel honoured between them:

    load    5%   fetch the model artifact to a temp file (size and sha256 checked against its row) and open
                 it with `prunery.core.load_program`, the engine's safe intake: uploaded files are loaded
                 in no other way
    graph   15%  the program's dependency graph (`prunery.core.DependencyGraph`, with the spec's ignore globs)
    prune   40%  `prunery.core.prune` with that graph and a `PruneConfig` from the job's spec (the `prunery
                 prune` options): importance, group selection, removal and re-export, whose parts
                 (importance, select_and_remove, reexport) the report and the stage metrics break out
    (a spec with a dataset, a target, sparse training or recovery runs `prunery.core.recipe.run_recipe`
     instead of graph and prune: stages sparse 20%, prune 40%, finetune 50%, evaluate 80%, each reporting
     its steps as progress events and honouring a cancel between them)
    export  85%  `torch.export.save` of the pruned program, then `vet_archive` on the file: we publish only
                 what our own intake accepts
    store   92%  write `jobs/{id}/model.pt2` and `jobs/{id}/report.json` (fixed keys: a retry overwrites,
                 never duplicates), then in ONE transaction register both as artifacts (kinds MODEL and
                 REPORT, the job's tenant, producer_job set) and mark the job SUCCEEDED with the report

While it runs, a lease keeper thread renews the lease every `heartbeat_s`; a renewal that finds the job
CANCELLING, or owned by another worker, raises a flag the next stage boundary acts on. Cancelling deletes
everything under `jobs/{id}/` and ends CANCELLED. A stage that does not reach its boundary within
`cancel_grace_s` of the flag (one long engine call) is cut short: the keeper finishes the cancel itself and
ends the process (it runs one job and is replaced anyway). A worker that lost its lease stops without
touching the job: its new owner redoes it, writing the same keys.

Failures: a model the engine refuses or cannot load, or a spec it cannot apply (the engine's ValueErrors:
UnsafeArchiveError, ArchiveLoadError, PruneError), fails the job with the engine's one-line message and a
stable reason (MODEL_REFUSED, MODEL_LOAD_FAILED, PRUNE_FAILED, INVALID_SPEC, MODEL_NOT_FOUND, ...), and the
worker goes on with its next job. Object-store trouble is transient: the job goes back to the queue while
attempts remain. Partial outputs of a failed job are deleted.

Device: CUDA when available, else CPU, chosen in the job process (never in the worker's main process) and
recorded in the report; the recipe's training, scoring and evaluation run there (`core/recipe.py`).

Test hooks (only when PRUNERY_TEST_HOOKS=1 in the worker's environment, never in production), read from
the job's labels: `prunery-test-delay: "stage=seconds,..."` sleeps at the start of those stages, as a long
engine call would (not checking for cancellation); `prunery-test-crash: "stage"` ends the job process
abruptly (os._exit) at the start of that stage, on every attempt; `prunery-test-alloc: "stage=bytes"` allocates
that many bytes at the start of the stage.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from google.rpc import code_pb2
from sqlalchemy import select

from ..core import (
    ArchiveLoadError,
    DependencyGraph,
    PruneConfig,
    UnsafeArchiveError,
    load_program,
    prune,
    vet_archive,
)
from ..core.data import Dataset, DatasetError, load_dataset
from ..core.recipe import Recipe, run_recipe
from ..core.spec import JobSpec, first_problem
from ..service.store import jobs
from ..service.store.db import Artifact, ArtifactKind, ArtifactState, Database, Job, JobState, utcnow
from ..service.store.objectstore import ObjectNotFound, ObjectStore, TooLarge, open_store
from ..service.store.reasons import Reason
from . import metrics
from .failures import ClaimDeferred, JobFailure, exc_line, message_line, out_of_memory, spec_error
from .lease import TERMINAL, LeaseKeeper, memory_limit
from .settings import WorkerSettings

__all__ = ["STAGES", "ClaimDeferred", "JobFailure", "spec_of", "preload_engine", "run_job", "select_device"]

log = logging.getLogger("prunery.worker.pipeline")

# each stage's share of the progress bar starts here (the data-driven stages run only when the spec asks)
STAGES: dict[str, float] = {"load": 0.05, "graph": 0.15, "sparse": 0.2, "prune": 0.4, "finetune": 0.5,
                            "evaluate": 0.8, "export": 0.85, "store": 0.92}
_CHUNK = 1 << 20


class _Cancelled(Exception):
    pass


class _LeaseLost(Exception):
    pass


class _Refused(Exception):
    """succeed() said no: the transaction rolls back and we find out why."""


def spec_of(stored: Mapping[str, Any]) -> JobSpec:
    """The job's spec from its row (`JobSpec.from_dict`, which reads the forms stored before it too); a spec
    that cannot be read or cannot run fails the job with INVALID_SPEC (the API refuses such specs; a row written
    some other way may still hold one)."""
    try:
        spec = JobSpec.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise spec_error(exc_line(e)) from None
    problems = spec.problems()
    if problems:
        raise spec_error(message_line(first_problem(problems)))
    return spec


def _artifact_ref(spec: Mapping[str, Any], field: str) -> uuid.UUID:
    ref = str(spec.get(field) or "")
    try:
        return uuid.UUID(ref.removeprefix("artifacts/"))
    except ValueError:
        raise spec_error(f"{field} must name an artifact as artifacts/{{id}}, got {ref!r}") from None


# Modules torch imports lazily on a program's first load/export (~1 s): imported once in the worker's main
# process (`preload_engine`), each job process inherits them. Importing runs no kernels and starts no threads.
_LAZY_MODULES = ("torch._export.serde.serialize", "torch.export._trace", "torch._dynamo",
                 "torch._functorch.aot_autograd", "torch._inductor.fx_passes", "torch._subclasses.schema_check_mode",
                 "torch.export.passes", "sympy")


def preload_engine() -> None:
    """Import what the stages will need, without touching CUDA (safe in the process that forks)."""
    for name in _LAZY_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # internal module names move between torch versions; this is only a speed-up
            log.debug("could not preload %s", name, exc_info=True)


def select_device() -> str:
    """CUDA when present, else CPU. Call only in a job process: CUDA must not start in the forking parent."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------------
# Per-process resources
# ---------------------------------------------------------------------------------------------------------

_resources: dict[tuple[int, str, str], tuple[Database, ObjectStore]] = {}


def _open(settings: WorkerSettings) -> tuple[Database, ObjectStore]:
    key = (os.getpid(), settings.database_url, settings.store_url)
    if key not in _resources:
        _resources[key] = (Database(settings.database_url), open_store(settings.store_url))
    return _resources[key]


@dataclass(frozen=True)
class _JobView:
    id: uuid.UUID
    tenant: str
    spec: dict[str, Any]
    labels: dict[str, str]
    state: str
    attempt: int
    max_attempts: int

    @classmethod
    def of(cls, job: Job) -> _JobView:
        return cls(job.id, job.tenant_id, dict(job.spec or {}), dict(job.labels or {}), job.state,
                   job.attempt_count, job.max_attempts)


@dataclass(frozen=True)
class _Input:
    id: uuid.UUID
    display_name: str
    storage_key: str
    size_bytes: int
    sha256: str


# ---------------------------------------------------------------------------------------------------------
# One attempt
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    settings: WorkerSettings
    db: Database
    store: ObjectStore
    job: _JobView
    worker_id: str
    enqueue_fn: Callable[[uuid.UUID], None] | None
    tmpdir: Path = field(init=False)
    stage: str = ""
    durations: dict[str, float] = field(default_factory=dict)
    io_lock: threading.RLock = field(default_factory=threading.RLock)  # held around store writes
    finishing: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.perf_counter)
    accounted: bool = False
    last_progress: float = 0.0

    def __post_init__(self) -> None:
        self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        # the pid lets the reaper remove the folder if this process dies without cleaning up
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"prunery-job-{os.getpid()}-{self.job.id}-",
                                            dir=self.settings.tmp_dir))
        self.keeper = LeaseKeeper(self)

    @property
    def prefix(self) -> str:
        return f"jobs/{self.job.id}/"

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def account(self, final_state: str | None) -> None:
        """Metrics of this attempt, once: running gauge, duration, and the final state if it ended."""
        if self.accounted:
            return
        self.accounted = True
        metrics.JOBS_RUNNING.dec()
        metrics.JOB_DURATION.observe(time.perf_counter() - self.started)
        if final_state in TERMINAL:
            metrics.JOBS_FINISHED.labels(final_state).inc()

    def _state_after_refusal(self) -> type[Exception]:
        """Why a write as the owner was refused: the job is CANCELLING (ours) or we lost it."""
        with self.db.session() as s:
            row = s.get(Job, self.job.id)
            if row is not None and row.state == JobState.CANCELLING and row.lease_owner == self.worker_id:
                return _Cancelled
        return _LeaseLost

    def checkpoint(self, stage: str, message: str) -> None:
        if self.keeper.lost.is_set():
            raise _LeaseLost
        if self.keeper.cancel.is_set():
            raise _Cancelled
        with self.db.session() as s:
            self.last_progress = max(self.last_progress, STAGES[stage])
            ok = jobs.set_progress(s, self.job.id, self.worker_id, self.last_progress, stage=stage, message=message)
        if not ok:
            raise self._state_after_refusal()

    def progress(self, stage: str, fraction: float, message: str) -> None:
        """A step inside a stage of the recipe (sparse training, pruning rounds, fine-tuning): a progress event
        within the stage's share, and the cancellation check a stage boundary makes."""
        if self.keeper.lost.is_set():
            raise _LeaseLost
        if self.keeper.cancel.is_set():
            raise _Cancelled
        starts = sorted(STAGES.values())
        start = STAGES[stage]
        end = next((v for v in starts if v > start), 1.0)
        if stage != self.stage:
            self.stage = stage
            self._test_hooks(stage)
        # never backwards: a stage may report a step again (the scores of the next pruning round)
        self.last_progress = max(self.last_progress, start + max(0.0, min(fraction, 1.0)) * (end - start))
        with self.db.session() as s:
            ok = jobs.set_progress(s, self.job.id, self.worker_id, self.last_progress, stage=stage, message=message)
        if not ok:
            raise self._state_after_refusal()

    @contextmanager
    def stage_(self, name: str, message: str) -> Iterator[None]:
        self.checkpoint(name, message)
        self.stage = name
        self._test_hooks(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = round(time.perf_counter() - t0, 4)
            metrics.STAGE_DURATION.labels(name).observe(time.perf_counter() - t0)

    def _test_hooks(self, stage: str) -> None:
        if os.environ.get("PRUNERY_TEST_HOOKS") != "1":
            return
        if self.job.labels.get("prunery-test-crash") == stage:
            log.warning("job %s: test hook: crashing at %s", self.job.id, stage)
            os._exit(70)
        alloc_stage, _, alloc_bytes = (self.job.labels.get("prunery-test-alloc") or "").partition("=")
        if alloc_stage == stage:
            bytearray(int(alloc_bytes))  # as an input that makes the engine allocate without end would
        for item in (self.job.labels.get("prunery-test-delay") or "").split(","):
            name, _, seconds = item.partition("=")
            if name.strip() == stage:
                time.sleep(float(seconds))

    # -- the attempt ----------------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        metrics.JOBS_RUNNING.inc()
        self.keeper.start()
        state: str | None = None
        outcome = "lost"
        try:
            try:
                self.stages()
                self.finishing.acquire()
                state, outcome = JobState.SUCCEEDED.value, "succeeded"
            except _Cancelled:
                self.finishing.acquire()
                state, outcome = self.finish_cancel("cancelled"), "cancelled"
            except _LeaseLost:
                log.warning("job %s: lease lost; leaving the job to its new owner", self.job.id)
            except JobFailure as f:
                self.finishing.acquire()
                state, outcome = self.failed(f)
            except Exception as e:
                self.finishing.acquire()
                if out_of_memory(e):
                    limit = self.settings.job_memory_bytes
                    failure = JobFailure(code_pb2.RESOURCE_EXHAUSTED, Reason.JOB_MEMORY_LIMIT,
                                         f"{self.stage or 'worker'}: the job needed more memory than " + (
                                             f"its limit of {limit / 2**30:.1f} GiB (PRUNERY_JOB_MEMORY_BYTES on "
                                             "the worker)" if limit else "the worker has"))
                else:
                    log.exception("job %s: unexpected error in the %s stage", self.job.id, self.stage)
                    failure = JobFailure(code_pb2.INTERNAL, Reason.WORKER_ERROR,
                                         f"{self.stage or 'worker'}: {exc_line(e)}")
                state, outcome = self.failed(failure)
        finally:
            self.keeper.done.set()
            self.account(state)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        log.info("job %s: %s (attempt %d)", self.job.id, outcome, self.job.attempt)
        return {"job": str(self.job.id), "outcome": outcome, "state": state, "attempt": self.job.attempt}

    def finish_cancel(self, message: str) -> str | None:
        try:
            with self.io_lock:
                self.store.delete_prefix(self.prefix)
        except Exception:
            log.exception("job %s: could not delete its partial outputs", self.job.id)
        try:
            with self.db.session() as s:
                ok = jobs.finish_cancel(s, self.job.id, worker_id=self.worker_id, message=message)
        except Exception:
            log.exception("job %s: could not record the cancel (its lease will expire)", self.job.id)
            return None
        return JobState.CANCELLED.value if ok else None

    def failed(self, f: JobFailure) -> tuple[str | None, str]:
        if self.keeper.cancel.is_set():
            return self.finish_cancel("cancelled"), "cancelled"
        if self.keeper.lost.is_set():
            return None, "lost"
        try:
            if f.transient and self.job.attempt < self.job.max_attempts:
                with self.db.session() as s:
                    released = jobs.release(s, self.job.id, self.worker_id, f"{f.message}; queued again")
                if released:
                    log.warning("job %s: %s; queued again", self.job.id, f.message)
                    if self.enqueue_fn is not None:
                        self.enqueue_fn(self.job.id)
                    return None, "requeued"
            with self.io_lock:
                try:
                    self.store.delete_prefix(self.prefix)
                except Exception:
                    log.exception("job %s: could not delete its partial outputs", self.job.id)
            with self.db.session() as s:
                ok = jobs.fail(s, self.job.id, f.code, f.reason, f.message, worker_id=self.worker_id)
        except Exception:
            log.exception("job %s: could not record its failure (its lease will expire)", self.job.id)
            return None, "lost"
        log.warning("job %s: failed: %s: %s", self.job.id, f.reason, f.message)
        return (JobState.FAILED.value if ok else None), "failed"

    def stages(self) -> None:
        spec = spec_of(self.job.spec)
        config = PruneConfig.from_spec(spec)
        with self.stage_("load", "fetching the model and opening it through the safe intake"):
            source = self._input()
            path = self._fetch(source)
            program = self._load(path, source)
            dataset = self._dataset() if spec.dataset else None
        device = select_device()
        recipe = Recipe.from_spec(spec, dataset, device)
        if recipe is not None:  # data, sparse training, targets, recovery: stages reported as the recipe goes
            result = self._engine(run_recipe, program, config, recipe, self.progress)
        else:
            with self.stage_("graph", "building the dependency graph"):
                graph = self._engine(DependencyGraph, program, ignore=config.ignore, attention=config.attention)
            with self.stage_("prune", f"pruning {config.ratio:.0%} of each group ({config.importance}) on {device}"):
                result = self._engine(prune, program, config, graph=graph)
        for part, seconds in (result.report.get("timings_s") or {}).items():
            if part not in STAGES:  # the engine's parts of the prune stage
                metrics.STAGE_DURATION.labels(part).observe(float(seconds))
        with self.stage_("export", "saving the pruned program"):
            out = self._export(result.program)
        report = dict(result.report)
        report.update({
            "job": f"jobs/{self.job.id}",
            "input": {"artifact": f"artifacts/{source.id}", "display_name": source.display_name,
                      "size_bytes": source.size_bytes, "sha256": source.sha256},
            "device": device,
            "worker": {"id": self.worker_id, "attempt": self.job.attempt, "torch": torch.__version__},
            "stage_durations_s": dict(self.durations),
        })
        with self.stage_("store", "storing the pruned model and the report"):
            self._store(out, report, source)

    # -- stages ---------------------------------------------------------------------------------------------

    def _input(self, field: str = "model") -> _Input:
        """The job's model (or dataset) artifact row: this tenant's, READY, of the right kind."""
        artifact_id = _artifact_ref(self.job.spec, field)
        kind, word = (ArtifactKind.MODEL, "MODEL") if field == "model" else (ArtifactKind.DATASET, "DATASET")
        with self.db.session() as s:
            a = s.get(Artifact, artifact_id)
            if a is None or a.tenant_id != self.job.tenant or a.state != ArtifactState.READY:
                raise JobFailure(code_pb2.FAILED_PRECONDITION, f"{word}_NOT_FOUND",
                                 f"{field} artifacts/{artifact_id} does not exist")
            if a.kind != kind:
                raise JobFailure(code_pb2.INVALID_ARGUMENT, f"NOT_A_{word}",
                                 f"artifacts/{artifact_id} is a {a.kind} artifact, not a {word}")
            return _Input(a.id, a.display_name, a.storage_key, a.size_bytes, a.sha256)

    def _dataset(self) -> Dataset:
        source = self._input("dataset")
        path = self._fetch(source, "dataset.bin", "DATASET")
        try:
            return load_dataset(path)
        except DatasetError as e:
            raise JobFailure(code_pb2.INVALID_ARGUMENT, Reason.DATASET_INVALID,
                             f"dataset artifacts/{source.id} refused: {message_line(e)}") from None

    def _fetch(self, source: _Input, name: str = "model.pt2", word: str = "MODEL") -> Path:
        path = self.tmpdir / name
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "wb") as f:
                for chunk in self.store.open_range(source.storage_key, 0):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except ObjectNotFound:
            raise JobFailure(code_pb2.FAILED_PRECONDITION, f"{word}_NOT_FOUND",
                             f"the bytes of artifacts/{source.id} are missing from the object store") from None
        except Exception as e:
            raise JobFailure(code_pb2.UNAVAILABLE, Reason.STORE_UNAVAILABLE,
                             f"could not read artifacts/{source.id}: {exc_line(e)}", transient=True) from e
        finally:
            metrics.ARTIFACT_IN_BYTES.inc(size)
        if (source.sha256 and digest.hexdigest() != source.sha256) or size != source.size_bytes:
            raise JobFailure(code_pb2.DATA_LOSS, f"{word}_CORRUPT",
                             f"artifacts/{source.id} in the object store does not match its recorded size and "
                             "sha256")
        return path

    def _load(self, path: Path, source: _Input) -> torch.export.ExportedProgram:
        name = f"artifacts/{source.id}"

        def msg(e: BaseException | str) -> str:
            return message_line(str(e).replace(str(path), name))

        try:
            return load_program(path)
        except UnsafeArchiveError as e:
            raise JobFailure(code_pb2.INVALID_ARGUMENT, Reason.MODEL_REFUSED, msg(e)) from None
        except ArchiveLoadError as e:
            raise JobFailure(code_pb2.INVALID_ARGUMENT, Reason.MODEL_LOAD_FAILED, msg(e)) from None
        except ValueError as e:
            raise JobFailure(code_pb2.INVALID_ARGUMENT, Reason.MODEL_REFUSED, msg(e)) from None
        except Exception as e:
            raise JobFailure(code_pb2.INTERNAL, Reason.MODEL_LOAD_FAILED, msg(exc_line(e))) from e

    def _engine(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An engine call, its refusals mapped to PRUNE_FAILED (a refused dataset to DATASET_INVALID); a cancel or a
        lost lease noticed by a progress callback, and running out of memory, pass through."""
        try:
            return fn(*args, **kwargs)
        except (_Cancelled, _LeaseLost):
            raise
        except DatasetError as e:
            raise JobFailure(code_pb2.INVALID_ARGUMENT, Reason.DATASET_INVALID,
                             f"dataset refused: {message_line(e)}") from None
        except Exception as e:
            if out_of_memory(e):
                raise
            if isinstance(e, ValueError):  # PruneError and the engine's other refusals
                raise JobFailure(code_pb2.FAILED_PRECONDITION, Reason.PRUNE_FAILED, message_line(e)) from None
            raise JobFailure(code_pb2.INTERNAL, Reason.PRUNE_FAILED, exc_line(e)) from e

    def _export(self, program: torch.export.ExportedProgram) -> Path:
        out = self.tmpdir / "pruned.pt2"
        try:
            torch.export.save(program, out)
            vet_archive(out)
        except Exception as e:
            raise JobFailure(code_pb2.INTERNAL, Reason.EXPORT_FAILED, exc_line(e).replace(str(out), "model.pt2")) from e
        return out

    def _put(self, key: str, chunks: Iterator[bytes] | list[bytes]) -> tuple[int, str]:
        with self.io_lock:
            if self.keeper.lost.is_set():
                raise _LeaseLost
            if self.keeper.cancel.is_set():
                raise _Cancelled
            try:
                size, sha = self.store.put_stream(key, chunks, self.settings.max_result_bytes)
            except TooLarge as e:
                raise JobFailure(code_pb2.RESOURCE_EXHAUSTED, Reason.RESULT_TOO_LARGE, message_line(e)) from None
            except Exception as e:
                raise JobFailure(code_pb2.UNAVAILABLE, Reason.STORE_UNAVAILABLE,
                                 f"could not write {key}: {exc_line(e)}", transient=True) from e
        metrics.ARTIFACT_OUT_BYTES.inc(size)
        return size, sha

    def _store(self, model_path: Path, report: dict[str, Any], source: _Input) -> None:
        stem = Path(source.display_name).stem or "model"
        model_key, report_key = self.prefix + "model.pt2", self.prefix + "report.json"
        with open(model_path, "rb") as f:
            model_size, model_sha = self._put(model_key, iter(lambda: f.read(_CHUNK), b""))
        report_bytes = (json.dumps(report, indent=2) + "\n").encode()
        report_size, report_sha = self._put(report_key, [report_bytes])
        outputs = [
            (ArtifactKind.MODEL, model_key, model_size, model_sha, f"{stem}-pruned.pt2"),
            (ArtifactKind.REPORT, report_key, report_size, report_sha, f"{stem}-report.json"),
        ]

        try:
            with self.db.session() as s:
                ids = _register(s, self.job, outputs)
                if not jobs.succeed(s, self.job.id, self.worker_id, ids, report):
                    raise _Refused  # rolls the artifact rows back with it
        except _Refused:
            raise self._state_after_refusal() from None


def _register(session: Any, job: _JobView, outputs: list[tuple[ArtifactKind, str, int, str, str]]) -> list[str]:
    """Create (or, for a retried attempt, update) the job's result artifacts; return their ids in order."""
    existing = {a.storage_key: a for a in session.scalars(select(Artifact).where(Artifact.producer_job_id == job.id))}
    ids = []
    for kind, key, size, sha, name in outputs:
        artifact = existing.get(key)
        if artifact is None:
            artifact = Artifact(id=uuid.uuid4(), tenant_id=job.tenant, kind=kind.value, storage_key=key,
                                producer_job_id=job.id, labels={}, create_time=utcnow())
            session.add(artifact)
        artifact.display_name, artifact.size_bytes, artifact.sha256 = name, size, sha
        artifact.state = ArtifactState.READY.value
        ids.append(str(artifact.id))
    session.flush()
    return ids


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def run_job(job_id: str | uuid.UUID, worker_id: str, *, settings: WorkerSettings | None = None,
            enqueue_fn: Callable[[uuid.UUID], None]) -> dict[str, Any]:
    """Claim job `job_id` for `worker_id` (unique per process) and run it to its end; return a summary.

    Does nothing when the job is missing, finished, cancelled, or running under another live lease. Raises
    ClaimDeferred, having changed nothing, when the claim cannot be made now (see the module doc).
    `enqueue_fn` sends a job released after a transient failure back to the queue (the worker app's task passes
    its own app's)."""
    settings = settings or WorkerSettings.from_env()
    try:
        jid = uuid.UUID(str(job_id))
    except ValueError:
        log.error("ignoring a message with an invalid job id %r", job_id)
        return {"job": str(job_id), "outcome": "invalid"}
    try:
        db, store = _open(settings)
        with db.session() as s:
            before = s.scalar(select(Job.state).where(Job.id == jid))
            claimed = before is not None and jobs.claim(s, jid, worker_id, settings.lease_s,
                                                        tenant_max_running=settings.tenant_max_running)
            row = s.get(Job, jid) if before is not None else None
            view = _JobView.of(row) if row is not None else None
    except jobs.TenantAtLimit as e:
        # the task hands its message back and its worker's main process sends the next one after a delay: say when,
        # so no reaper takes the job for lost meanwhile (the broker holds no message for it until then)
        try:
            with db.session() as s:
                jobs.mark_sent(s, jid)
        except Exception:
            log.warning("job %s: could not record its deferral", jid, exc_info=True)
        raise ClaimDeferred(jid, "TENANT_AT_LIMIT", str(e)) from None
    except Exception as e:
        # nothing is claimed (a commit that failed after all leaves a lease no one renews: the reaper requeues it)
        raise ClaimDeferred(jid, "UNAVAILABLE", exc_line(e)) from e
    if not claimed or view is None:
        state = view.state if view is not None else None
        if state is not None and state != before and state in TERMINAL:  # claim ended it (attempts used up)
            metrics.JOBS_FINISHED.labels(state).inc()
        log.info("job %s: not claimed (state %s); nothing to do", jid, state or "missing")
        return {"job": str(jid), "outcome": "skipped", "state": state}
    log.info("job %s: claimed by %s (attempt %d of %d)", jid, worker_id, view.attempt, view.max_attempts)
    with memory_limit(settings.job_memory_bytes):
        return _Run(settings, db, store, view, worker_id, enqueue_fn).execute()
