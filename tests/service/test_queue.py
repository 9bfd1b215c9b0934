"""service/api/sending.py: sending jobs to the workers survives a broker that is briefly away (pure logic: the
sender is given a `send` that fails while the "broker" is down; the real broker path is in
tests/service/test_outages.py)."""

from __future__ import annotations

import threading
import time

from prunery.service.api.sending import RetryingSender
from tests.workers import list_events


class FlakyBroker:
    def __init__(self) -> None:
        self.up = False
        self.sent: list[tuple[str, str]] = []
        self.attempts = 0
        self.lock = threading.Lock()

    def __call__(self, job_id: str, queue: str) -> None:
        with self.lock:
            self.attempts += 1
            if not self.up:
                raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            self.sent.append((job_id, queue))


def wait_for(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_send_during_an_outage_returns_at_once_and_is_delivered_once_the_broker_is_back() -> None:
    broker = FlakyBroker()
    sender = RetryingSender(broker)
    try:
        t0 = time.monotonic()
        sender("job-1", "gpu")
        sender("job-2", "prunery")
        assert time.monotonic() - t0 < 0.5  # the caller is not held by the outage
        assert broker.sent == [] and sender.pending == 2
        assert wait_for(lambda: broker.attempts >= 4, 5.0)  # retried in the background, with backoff
        broker.up = True
        assert wait_for(lambda: len(broker.sent) == 2, 40.0)
        assert sorted(broker.sent) == [("job-1", "gpu"), ("job-2", "prunery")]  # each once, to its queue
        assert sender.pending == 0
        time.sleep(0.3)
        assert len(broker.sent) == 2
    finally:
        sender.close()


def test_a_send_that_works_is_sent_once_in_the_callers_thread() -> None:
    broker = FlakyBroker()
    broker.up = True
    sender = RetryingSender(broker)
    sender("job-1", "prunery")
    assert broker.sent == [("job-1", "prunery")] and broker.attempts == 1 and sender.pending == 0
    sender.close()


def test_past_its_time_the_sender_gives_up_and_leaves_the_job_to_the_reaper() -> None:
    broker = FlakyBroker()
    sender = RetryingSender(broker, give_up_s=2.5)
    try:
        sender("job-1", "prunery")
        assert wait_for(lambda: sender.pending == 0, 10.0)
        attempts = broker.attempts
        time.sleep(1.5)
        assert broker.attempts == attempts and broker.sent == []  # no more tries
    finally:
        sender.close()


def test_the_api_and_the_reaper_never_both_resend_a_job(pg_url: str) -> None:
    """On a real database: of the API's background send and the reaper's resend (`jobs.record_resend`), only
    the first to record the send under the job's row lock sends it."""
    from datetime import UTC, datetime, timedelta

    from prunery.service.api.server import _record_resend
    from prunery.service.store import db, jobs
    from prunery.service.store.db import Job

    database = db.Database(pg_url)
    try:
        with database.session() as s:
            db.ensure_tenant(s, "acme")
            reaped, alone = (jobs.create_job(s, "acme", {"model": "artifacts/x"}, queue="prunery")[0].id
                             for _ in range(2))
        broker = FlakyBroker()
        sender = RetryingSender(broker, may_resend=lambda j, q, t: _record_resend(database, j, q, t))
        try:
            sender(str(reaped), "prunery")
            sender(str(alone), "prunery")
            # the reaper finds `reaped` without a message first and resends it (as resend_lost does)
            with database.session() as s:
                assert jobs.record_resend(s, [reaped], queue="prunery",
                                          sent_before=datetime.now(UTC) + timedelta(seconds=1)) == [reaped]
            broker.up = True
            assert wait_for(lambda: sender.pending == 0 and len(broker.sent) >= 1, 40.0)
            time.sleep(0.5)
            assert broker.sent == [(str(alone), "prunery")]  # `reaped` was the reaper's to send, not ours
            with database.session() as s:
                events = {job_id: [e.message for e in list_events(s, job_id)] for job_id in (reaped, alone)}
                sent = {job_id: s.get(Job, job_id).last_sent_at for job_id in (reaped, alone)}
            assert events[reaped].count(jobs.RESENT) == 1 and events[alone].count(jobs.RESENT) == 1
            assert all(t is not None for t in sent.values())
        finally:
            sender.close()
    finally:
        database.dispose()
