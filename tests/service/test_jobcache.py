"""The API's job cache and WatchJob wake-ups, on a real Postgres with the migration's NOTIFY trigger, and
through a real gRPC server on loopback (service/api/jobcache.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from sqlalchemy import text

from prunery.service.api.jobcache import JobCache
from prunery.service.api.protos import job_proto
from prunery.service.api.server import build_server
from prunery.service.api.settings import Settings
from prunery.service.store import jobs, tokens
from prunery.service.store.db import Database, Job
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc

SPEC = {"model": "artifacts/00000000-0000-0000-0000-000000000000", "ratio": 0.5}


@pytest.fixture(scope="module")
def database(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture
def cache(pg_url: str) -> Iterator[JobCache]:
    cache = JobCache(pg_url, reconnect_s=0.1)
    cache.start()
    assert cache.live, "the listener did not connect"
    yield cache
    cache.stop()


def new_job(database: Database, tenant: str) -> uuid.UUID:
    with database.session() as s:
        job, _ = jobs.create_job(s, tenant, SPEC)
        return job.id


class CountingLoad:
    """`load` for JobCache.get, reading the row like the API does; counts its calls."""

    def __init__(self, database: Database, job_id: uuid.UUID, before_return: Callable[[], None] | None = None) -> None:
        self.database, self.job_id, self.before_return = database, job_id, before_return
        self.calls = 0

    def __call__(self) -> tuple[str, int, pb.Job] | None:
        self.calls += 1
        with self.database.engine.connect() as conn:
            row = conn.execute(Job.__table__.select().where(Job.id == self.job_id)).first()
        if self.before_return is not None:
            self.before_return()
        return None if row is None else (row.tenant_id, row.event_sequence, job_proto(row))


def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def created(cache: JobCache, database: Database, tenant: str) -> uuid.UUID:
    """A new job, once the cache has had the notification of its insert (which drops what a read made before
    it arrived may have stored)."""
    generation = cache._generation
    job_id = new_job(database, tenant)
    assert eventually(lambda: cache._generation != generation, 2.0)
    return job_id


def test_reads_are_cached_and_dropped_when_another_connection_changes_the_job(
        cache: JobCache, database: Database, tenant: str) -> None:
    job_id = created(cache, database, tenant)
    load = CountingLoad(database, job_id)
    first = cache.get(job_id, tenant, load)
    assert first is not None and first.state == pb.QUEUED
    for _ in range(5):
        assert cache.get(job_id, tenant, load) is first
    assert load.calls == 1
    assert cache.get(job_id, "someone-else", load) is None  # another tenant never sees it, cached or not

    with database.session() as s:  # a worker, elsewhere
        assert jobs.claim(s, job_id, "w1", lease_s=60)
    assert eventually(lambda: cache.get(job_id, tenant, load).state == pb.RUNNING, 2.0)
    assert load.calls == 2
    with database.session() as s:
        s.execute(text("DELETE FROM job_events WHERE job_id = :id"), {"id": job_id})
        s.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": job_id})
    assert eventually(lambda: cache.get(job_id, tenant, load) is None, 2.0)


def test_a_read_that_races_with_a_change_is_not_kept(cache: JobCache, database: Database, tenant: str) -> None:
    job_id = created(cache, database, tenant)

    def change_and_wait_for_its_notification() -> None:
        generation = cache._generation
        with database.session() as s:
            assert jobs.claim(s, job_id, "w1", lease_s=60)
        assert eventually(lambda: cache._generation != generation, 2.0)

    racing = CountingLoad(database, job_id, before_return=change_and_wait_for_its_notification)
    stale = cache.get(job_id, tenant, racing)
    assert stale is not None and stale.state == pb.QUEUED  # what the racing read saw: fine to answer once
    load = CountingLoad(database, job_id)
    assert cache.get(job_id, tenant, load).state == pb.RUNNING  # but it was not kept
    assert load.calls == 1


def test_without_its_listener_the_cache_is_bypassed_until_it_listens_again(
        cache: JobCache, database: Database, tenant: str) -> None:
    job_id = created(cache, database, tenant)
    load = CountingLoad(database, job_id)
    cache.get(job_id, tenant, load)
    with database.session() as s:
        killed = s.scalar(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE application_name = 'prunery-api-listener' AND datname = current_database()"))
    assert killed == 1
    assert eventually(lambda: not cache.live, 3.0)
    calls = load.calls
    cache.get(job_id, tenant, load)
    cache.get(job_id, tenant, load)
    assert load.calls >= calls + (2 if not cache.live else 1)  # dark: every read goes to the database
    assert eventually(lambda: cache.live, 5.0), "the listener did not come back"
    with database.session() as s:  # and notifications flow again
        assert jobs.claim(s, job_id, "w1", lease_s=60)
    assert eventually(lambda: cache.get(job_id, tenant, load).state == pb.RUNNING, 2.0)


def test_through_the_api_getjob_follows_a_worker_and_watchjob_wakes_on_notifications(
        pg_url: str, database: Database, tenant: str, tmp_path) -> None:
    # a 30 s poll: only the notification can deliver the events below within the test's deadlines
    settings = Settings(database_url=pg_url, store_url=(tmp_path / "objects").as_uri(), listen_address="127.0.0.1:0",
                        watch_poll_s=30.0, auth_cache_s=0, grpc_workers=8)
    server = build_server(settings, database=database, enqueue=lambda job_id, queue: None)
    server.start()
    token = tokens.create(pg_url, tenant, "jobcache test")
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        assert server.backend.job_cache is not None and server.backend.job_cache.live
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.JobServiceStub(channel)
            job_id = created(server.backend.job_cache, database, tenant)
            name = f"jobs/{job_id}"
            assert stub.GetJob(pb.GetJobRequest(name=name), metadata=metadata).state == pb.QUEUED
            hits = server.backend.job_cache.hits
            assert stub.GetJob(pb.GetJobRequest(name=name), metadata=metadata).state == pb.QUEUED
            assert server.backend.job_cache.hits == hits + 1

            received: list[tuple[float, pb.JobEvent]] = []

            def watch() -> None:
                for ev in stub.WatchJob(pb.WatchJobRequest(name=name), metadata=metadata, timeout=20):
                    received.append((time.monotonic(), ev))

            watcher = threading.Thread(target=watch)
            watcher.start()
            assert eventually(lambda: len(received) == 1, 5.0)  # the creation event
            changed_at = time.monotonic()
            with database.session() as s:
                assert jobs.claim(s, job_id, "w1", lease_s=60)
            assert eventually(lambda: len(received) == 2, 3.0), "WatchJob was not woken by the change"
            assert received[1][1].state == pb.RUNNING and received[1][0] - changed_at < 3.0
            assert stub.GetJob(pb.GetJobRequest(name=name), metadata=metadata).state == pb.RUNNING
            with database.session() as s:
                assert jobs.fail(s, job_id, 13, "TEST", "failed by the test", worker_id="w1")
            watcher.join(5.0)
            assert not watcher.is_alive() and received[-1][1].state == pb.FAILED
            job = stub.GetJob(pb.GetJobRequest(name=name), metadata=metadata)
            assert job.state == pb.FAILED and job.error.message == "failed by the test"
            # CancelJob answered by this process is visible to its next read at once
            other = new_job(database, tenant)
            stub.GetJob(pb.GetJobRequest(name=f"jobs/{other}"), metadata=metadata)
            stub.CancelJob(pb.CancelJobRequest(name=f"jobs/{other}"), metadata=metadata)
            assert stub.GetJob(pb.GetJobRequest(name=f"jobs/{other}"), metadata=metadata).state == pb.CANCELLED
    finally:
        server.stop(0).wait(10)
