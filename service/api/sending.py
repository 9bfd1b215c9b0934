"""The API's side of the job queue: sending a Celery task by NAME (`prunery.run_job`, `store/queue.py`) whose
only argument is the job id, and sending again through a broker outage (`RetryingSender`). The API imports
neither the worker package nor torch; Celery itself is imported on first use. Call `enqueue` only after the job
row is committed, so a worker receiving the id finds the job.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..store.queue import TASK_NAME, transport_options
from .settings import Settings

__all__ = ["CeleryEnqueuer", "RetryingSender", "enqueue"]

log = logging.getLogger(__name__)


class CeleryEnqueuer:
    """`enqueuer(job_id, queue)` sends the job's task (to the settings' default queue if `queue` is None); one
    Celery app (and its connection pool) per instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Any = None
        self._lock = threading.Lock()

    def _celery(self) -> Any:
        with self._lock:
            if self._app is None:
                from celery import Celery

                app = Celery("prunery-api", set_as_current=False)
                app.conf.update(
                    broker_url=self.settings.broker_url,
                    broker_transport_options=transport_options(self.settings),
                    broker_connection_retry_on_startup=True,
                    task_default_queue=self.settings.queue,
                    task_serializer="json",
                    accept_content=["json"],
                    task_ignore_result=True,
                    result_backend=None,
                    task_send_sent_event=False,
                )
                self._app = app
            return self._app

    def __call__(self, job_id: uuid.UUID | str, queue: str | None = None) -> None:
        options = transport_options(self.settings)
        if "data_folder_out" in options:
            for key in ("data_folder_out", "control_folder", "processed_folder"):
                os.makedirs(options[key], exist_ok=True)
        self._celery().send_task(TASK_NAME, args=[str(job_id)], queue=queue or self.settings.queue, retry=True,
                                 retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                               "interval_max": 2.0})

    def close(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None


MayResend = Callable[[str, str, datetime], bool]  # (job id, queue, send failed at) -> whether to send it now


class RetryingSender:
    """`sender(job_id, queue)` sends at once with `send`; when that fails (the broker is away), the job is
    sent again from one background thread with backoff (1 s doubling to 30 s, with jitter) for up to
    `give_up_s`, so a broker outage shorter than that only delays jobs, and the caller (CreateJob) answers
    at once. An API that dies meanwhile loses nothing either: the workers' reaper resends a QUEUED job whose
    message is missing (`prunery.worker.reaper`).

    The reaper may find the same job without a message first. So that the two never both send it, each
    background send first asks `may_resend(job_id, queue, failed_at)`: the API records the send under the
    job's row lock (`jobs.record_resend`: still QUEUED, and not sent by anyone since the failure), exactly as
    the reaper does, and only the first of them to commit sends."""

    def __init__(self, send: Callable[[str, str], None], give_up_s: float = 600.0,
                 may_resend: MayResend | None = None) -> None:
        self.send, self.give_up_s, self.may_resend = send, give_up_s, may_resend
        # (due, give-up time, seq, job id, queue, when its last send failed)
        self._pending: list[tuple[float, float, int, str, str, datetime]] = []
        self._seq = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self, job_id: uuid.UUID | str, queue: str) -> None:
        try:
            self.send(str(job_id), queue)
        except Exception as e:
            log.warning("could not send job %s to the broker (%s: %s); retrying in the background", job_id,
                        type(e).__name__, str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
            self._later(str(job_id), queue, 1.0, time.monotonic() + self.give_up_s, datetime.now(UTC))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _later(self, job_id: str, queue: str, delay: float, give_up: float, failed_at: datetime) -> None:
        with self._wake:
            if self._closed:
                return
            self._seq += 1
            heapq.heappush(self._pending, (time.monotonic() + delay, give_up, self._seq, job_id, queue, failed_at))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prunery-resend", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        delays: dict[str, float] = {}
        while True:
            with self._wake:
                while not self._closed and (not self._pending or self._pending[0][0] > time.monotonic()):
                    self._wake.wait(None if not self._pending else self._pending[0][0] - time.monotonic())
                if self._closed:
                    return
                _due, give_up, _seq, job_id, queue, failed_at = heapq.heappop(self._pending)
            try:
                if self.may_resend is not None and not self.may_resend(job_id, queue, failed_at):
                    delays.pop(job_id, None)
                    log.info("job %s was sent (or started) by someone else meanwhile; not sending it", job_id)
                    continue
                self.send(job_id, queue)
                delays.pop(job_id, None)
                log.info("sent job %s to the broker after an earlier failure", job_id)
            except Exception:
                delay = min(30.0, delays.get(job_id, 1.0) * 2)
                delays[job_id] = delay
                if time.monotonic() + delay > give_up:
                    delays.pop(job_id, None)
                    log.error("giving up sending job %s to the broker; the workers' reaper will resend it", job_id)
                else:
                    self._later(job_id, queue, delay * random.uniform(0.5, 1.0), give_up, datetime.now(UTC))

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()


_default: CeleryEnqueuer | None = None
_default_lock = threading.Lock()


def enqueue(job_id: uuid.UUID | str, queue: str | None = None) -> None:
    """Send `job_id` with the broker configured by the `PRUNERY_*` environment."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CeleryEnqueuer(Settings.from_env())
    _default(job_id, queue)
