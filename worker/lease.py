"""The limits of a job's attempt, kept from a thread of its own (`LeaseKeeper`): the lease is renewed every
PRUNERY_HEARTBEAT_S; a cancel (CANCELLING, still ours) or a lost lease is flagged for the main thread, which
stops between stages; a stage that does not stop within PRUNERY_CANCEL_GRACE_S, or an attempt past
PRUNERY_JOB_TIMEOUT_S, ends the process (the job's state recorded first). And the job's memory limit
(`memory_limit`)."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from google.rpc import code_pb2

from ..service.store import jobs
from ..service.store.db import Database, Job, JobState
from ..service.store.objectstore import ObjectStore
from ..service.store.reasons import Reason
from .settings import WorkerSettings

__all__ = ["TERMINAL", "Attempt", "LeaseKeeper", "memory_limit"]

log = logging.getLogger("prunery.worker.pipeline")

TERMINAL = {JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value}


class Attempt(Protocol):
    """What the lease keeper reads and does of the attempt it watches (`pipeline._Run`)."""

    settings: WorkerSettings
    db: Database
    store: ObjectStore
    job: Any  # has `id`
    worker_id: str
    tmpdir: Path
    stage: str
    started: float
    io_lock: threading.RLock
    finishing: threading.Lock

    @property
    def prefix(self) -> str: ...

    def account(self, final_state: str | None) -> None: ...

    def finish_cancel(self, message: str) -> str | None: ...



class LeaseKeeper(threading.Thread):
    """Renews the lease; raises `cancel` (CANCELLING, still ours) or `lost` (someone else's, or ended). When
    the main thread has not acted on either within the grace period, ends the process (see module doc)."""

    def __init__(self, run: Attempt) -> None:
        super().__init__(name=f"prunery-lease-{run.job.id}", daemon=True)
        self.run_ = run
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self.done = threading.Event()
        self.flag_time: float | None = None

    def run(self) -> None:
        r = self.run_
        settings = r.settings
        last_ok = time.monotonic()
        while not self.done.wait(settings.heartbeat_s):
            if not self.lost.is_set():
                try:
                    with r.db.session() as s:
                        ok = jobs.heartbeat(s, r.job.id, r.worker_id, settings.lease_s)
                        row = None if ok else s.get(Job, r.job.id)
                        state, owner = (row.state, row.lease_owner) if row is not None else (None, None)
                    last_ok = time.monotonic()
                    if not ok:
                        if state in TERMINAL and owner == r.worker_id:
                            return  # the main thread has just ended the job itself
                        if state == JobState.CANCELLING and owner == r.worker_id:
                            self.cancel.set()
                        else:
                            log.warning("job %s: lease lost (state %s, owner %s)", r.job.id, state, owner)
                            self.lost.set()
                except Exception:
                    log.exception("job %s: lease renewal failed", r.job.id)
                    if time.monotonic() - last_ok > settings.lease_s:
                        self.lost.set()  # another worker may own it by now
            limit = settings.job_timeout_s
            if limit and time.perf_counter() - r.started > limit and not self.lost.is_set():
                self._time_out(limit)
            if (self.cancel.is_set() or self.lost.is_set()) and self.flag_time is None:
                self.flag_time = time.monotonic()
            if self.flag_time is not None and time.monotonic() - self.flag_time > settings.cancel_grace_s:
                self._hard_stop()

    def _time_out(self, limit: float) -> None:
        """The attempt ran past PRUNERY_JOB_TIMEOUT_S: fail the job (no retry: it would time out again) and
        end this process, whatever the main thread is doing."""
        r = self.run_
        if not r.finishing.acquire(blocking=False):
            return  # the main thread is finishing the job itself
        with r.io_lock:
            log.warning("job %s: past its time limit of %.0fs in the %s stage; ending its process",
                        r.job.id, limit, r.stage)
            state = None
            try:
                r.store.delete_prefix(r.prefix)
                with r.db.session() as s:
                    if jobs.fail(s, r.job.id, code_pb2.DEADLINE_EXCEEDED, Reason.JOB_TIMEOUT,
                                 f"the job ran longer than its limit of {limit:.0f} s (in the {r.stage or 'worker'} "
                                 "stage; PRUNERY_JOB_TIMEOUT_S on the worker sets the limit)",
                                 worker_id=r.worker_id):
                        state = JobState.FAILED.value
            except Exception:
                log.exception("job %s: could not record its timeout (its lease will expire)", r.job.id)
            r.account(state)
            shutil.rmtree(r.tmpdir, ignore_errors=True)
            logging.shutdown()
            os._exit(0)

    def _hard_stop(self) -> None:
        r = self.run_
        if not r.finishing.acquire(blocking=False):
            return  # the main thread is finishing the job itself
        with r.io_lock:  # let a store write in flight complete; none starts after this
            if self.cancel.is_set() and not self.lost.is_set():
                log.warning("job %s: the %s stage did not stop within %.0fs of the cancel; ending its process",
                            r.job.id, r.stage, r.settings.cancel_grace_s)
                state = r.finish_cancel("cancelled (the running stage was stopped)")
            else:
                log.warning("job %s: lease lost during the %s stage; ending its process", r.job.id, r.stage)
                state = None
            r.account(state)
            shutil.rmtree(r.tmpdir, ignore_errors=True)
            logging.shutdown()
            os._exit(0)


@contextmanager
def memory_limit(nbytes: int) -> Iterator[None]:
    """Lower this process's RLIMIT_DATA soft limit to `nbytes` (0: leave it) for the block, then restore it.
    RLIMIT_DATA counts the heap and private anonymous mappings (where tensors live) but not the address space
    reserved for thread stacks and file mappings, which RLIMIT_AS would count against torch's many threads."""
    if not nbytes:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (new, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
