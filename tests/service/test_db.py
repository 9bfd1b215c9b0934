"""Persistence and the job state machine against real databases: Postgres (a throwaway database per test
module and xdist worker, migrated with Alembic) and SQLite (the embedded default, a file in WAL mode)."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from google.rpc import code_pb2
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from prunery.service.store import db, jobs, testing
from prunery.service.store.db import ApiToken, Artifact, Database, Job, JobEvent, JobState
from prunery.service.store.jobs import IllegalTransition, JobNotFound
from tests.workers import list_events

TABLES = {"tenants", "api_tokens", "artifacts", "jobs", "job_events"}
SPEC = {"model": "artifacts/0", "ratio": 0.5}
S = JobState


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'prunery.db'}"
        db.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def new_job(database: Database, tenant: str, **kw) -> uuid.UUID:
    with database.session() as s:
        job, created = jobs.create_job(s, tenant, SPEC, {"team": "vision"}, **kw)
        assert created
        return job.id


def load(database: Database, job_id: uuid.UUID) -> Job:
    with database.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def events(database: Database, job_id: uuid.UUID) -> list[JobEvent]:
    with database.session() as s:
        return list_events(s, job_id)


def states(database: Database, job_id: uuid.UUID) -> list[str]:
    return [e.state for e in events(database, job_id)]


def expire(database: Database, job_id: uuid.UUID) -> None:
    """Simulate a worker that died: its lease ran out."""
    with database.session() as s:
        job = s.get(Job, job_id)
        job.lease_expires_at = db.utcnow() - timedelta(seconds=1)


# ---------------------------------------------------------------------------------------------------------
# Schema and migrations
# ---------------------------------------------------------------------------------------------------------

def test_migrations_upgrade_an_empty_postgres_database_and_downgrade_to_nothing() -> None:
    with testing.temporary_postgres_database() as url:
        assert db.current_revision(url) is None
        db.upgrade(url)
        assert db.current_revision(url) == "0004"
        engine = db.make_engine(url)

        def triggers() -> set[str]:
            with engine.connect() as conn:
                return set(conn.scalars(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")))

        try:
            assert TABLES <= set(inspect(engine).get_table_names())
            assert triggers() == {"jobs_notify_change"}
            db.downgrade(url, "0001")  # the notification trigger goes, the tables stay
            assert triggers() == set() and TABLES <= set(inspect(engine).get_table_names())
            db.downgrade(url, "base")
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
            assert db.current_revision(url) is None
            db.upgrade(url)  # and up again
            assert TABLES <= set(inspect(engine).get_table_names())
        finally:
            engine.dispose()


def test_models_match_the_migrated_schema(database: Database) -> None:
    with database.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, db.Base.metadata) == []


def test_constraints_hold(database: Database, tenant: str) -> None:
    with pytest.raises(IntegrityError), database.session() as s:
        s.add(Job(tenant_id=tenant, state="BOGUS"))
    with pytest.raises(IntegrityError), database.session() as s:
        s.add(Job(tenant_id="no-such-tenant"))
    with pytest.raises(IntegrityError), database.session() as s:
        s.add(Artifact(tenant_id=tenant, kind="PICTURE", storage_key="k"))


def test_artifact_rows_and_times_are_utc(database: Database, tenant: str) -> None:
    with database.session() as s:
        art = Artifact(tenant_id=tenant, kind="MODEL", storage_key="artifacts/x", labels={"a": "b"})
        s.add(art)
    with database.session() as s:
        got = s.get(Artifact, art.id)
        assert got.state == "PENDING" and got.labels == {"a": "b"} and got.size_bytes == 0
        assert got.create_time.utcoffset() == timedelta(0)
        assert abs(got.create_time - db.utcnow()) < timedelta(seconds=30)


# ---------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------

def test_tokens_are_stored_hashed_and_can_be_revoked(database: Database, tenant: str) -> None:
    with database.session() as s:
        row, token = db.create_token(s, tenant, "ci")
        token_id = row.id
    with database.session() as s:
        stored = s.get(ApiToken, token_id)
        assert stored.token_sha256 == db.hash_token(token) != token and stored.revoke_time is None
        assert token not in repr(stored.__dict__)
        assert db.authenticate(s, token) == tenant
        assert db.authenticate(s, token + "x") is None and db.authenticate(s, "") is None
    with database.session() as s:
        _, other = db.create_token(s, tenant)
        assert db.revoke_token(s, str(token_id))
        assert not db.revoke_token(s, str(token_id))
        assert db.revoke_token(s, other)  # by the token itself
    with database.session() as s:
        assert db.authenticate(s, token) is None and db.authenticate(s, other) is None
        assert s.get(ApiToken, token_id).revoke_time is not None
    for bad in ("Bad Tenant!", "acme\n", "", "a" * 65):  # the id must match whole: no trailing newline
        with pytest.raises(ValueError, match="invalid tenant id"), database.session() as s:
            db.ensure_tenant(s, bad)


# ---------------------------------------------------------------------------------------------------------
# The job state machine
# ---------------------------------------------------------------------------------------------------------

def test_transition_table() -> None:
    assert set(jobs.TRANSITIONS) == set(JobState)
    for state in jobs.TERMINAL:
        assert jobs.TRANSITIONS[state] == frozenset()
    reachable, frontier = {S.QUEUED}, [S.QUEUED]
    while frontier:
        for nxt in jobs.TRANSITIONS[frontier.pop()] - reachable:
            reachable.add(nxt)
            frontier.append(nxt)
    assert reachable == set(JobState)
    assert S.SUCCEEDED not in jobs.TRANSITIONS[S.CANCELLING]


def test_lifecycle_writes_one_event_per_change_in_sequence(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.claim(s, job_id, "w1", 30)
    with database.session() as s:
        assert jobs.set_progress(s, job_id, "w1", 0.25, "graph")
        assert jobs.set_progress(s, job_id, "w1", 0.75, "prune", "removing 120 channels")
        assert jobs.heartbeat(s, job_id, "w1", 30)
    with database.session() as s:
        assert jobs.succeed(s, job_id, "w1", ["a1", "a2"], {"params_after": 10})
    job = load(database, job_id)
    assert job.state == S.SUCCEEDED and job.progress == 1.0 and job.attempt_count == 1
    assert job.result_artifact_ids == ["a1", "a2"] and job.report == {"params_after": 10}
    assert job.create_time <= job.start_time <= job.end_time and job.lease_expires_at is None
    evs = events(database, job_id)
    assert [e.sequence for e in evs] == [1, 2, 3, 4, 5] == list(range(1, job.event_sequence + 1))
    assert [e.state for e in evs] == [S.QUEUED, S.RUNNING, S.RUNNING, S.RUNNING, S.SUCCEEDED]
    assert [(e.progress, e.stage) for e in evs[2:4]] == [(0.25, "graph"), (0.75, "prune")]
    assert evs[3].message == "removing 120 channels" and "w1" in evs[1].message
    with database.session() as s:
        assert [e.sequence for e in list_events(s, job_id, after_sequence=3)] == [4, 5]


def test_illegal_transitions_change_nothing(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:  # not RUNNING yet: worker calls refuse
        assert not jobs.succeed(s, job_id, "w1", [], None)
        assert not jobs.set_progress(s, job_id, "w1", 0.5)
        assert not jobs.heartbeat(s, job_id, "w1", 30)
        assert not jobs.finish_cancel(s, job_id)
        assert not jobs.release(s, job_id, "w1")
    assert states(database, job_id) == [S.QUEUED]
    with database.session() as s:
        assert jobs.claim(s, job_id, "w1", 30)
    with database.session() as s:  # not the owner
        assert not jobs.succeed(s, job_id, "w2", [], None)
        assert not jobs.fail(s, job_id, code_pb2.INTERNAL, "X", "x", worker_id="w2")
        assert not jobs.claim(s, job_id, "w2", 30)  # the lease is alive
    with database.session() as s:
        assert jobs.fail(s, job_id, code_pb2.INVALID_ARGUMENT, "MODEL_REJECTED", "pickle found", worker_id="w1")
    with database.session() as s:  # terminal: nothing moves it
        assert not jobs.claim(s, job_id, "w2", 30, now=db.utcnow() + timedelta(hours=1))
        assert not jobs.succeed(s, job_id, "w1", [], None)
        assert not jobs.fail(s, job_id, code_pb2.INTERNAL, "X", "again")
        with pytest.raises(IllegalTransition):
            jobs.request_cancel(s, job_id)
        job = jobs.get_job(s, job_id)
        with pytest.raises(IllegalTransition):  # the table itself refuses, whatever the caller
            jobs._move(s, job, S.RUNNING, db.utcnow(), "")
    job = load(database, job_id)
    assert (job.state, job.error_code, job.error_reason, job.error_message) == (
        S.FAILED, code_pb2.INVALID_ARGUMENT, "MODEL_REJECTED", "pickle found")
    assert states(database, job_id) == [S.QUEUED, S.RUNNING, S.FAILED]


def test_create_is_idempotent_on_request_id_per_tenant(database: Database, tenant: str) -> None:
    with database.session() as s:
        first, created = jobs.create_job(s, tenant, SPEC, None, "req-1")
        assert created
    with database.session() as s:
        again, created = jobs.create_job(s, tenant, {"model": "artifacts/other"}, None, "req-1")
        assert not created and again.id == first.id and again.spec == SPEC
        other, created = jobs.create_job(s, tenant, SPEC, None, "req-2")
        assert created and other.id != first.id
        no_id, created = jobs.create_job(s, tenant, SPEC, None, None)
        assert created and no_id.id not in (first.id, other.id)
    other_tenant = f"t-{uuid.uuid4().hex[:10]}"
    with database.session() as s:
        db.ensure_tenant(s, other_tenant)
        theirs, created = jobs.create_job(s, other_tenant, SPEC, None, "req-1")
        assert created and theirs.id != first.id
    assert states(database, first.id) == [S.QUEUED]


def test_concurrent_creates_with_one_request_id_make_one_job(database: Database, tenant: str) -> None:
    results: list[uuid.UUID] = []
    barrier = threading.Barrier(4)

    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            with database.session() as s:
                job, _ = jobs.create_job(s, tenant, SPEC, None, "same")
                results.append(job.id)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    with database.session() as s:
        assert len(s.scalars(select(Job).where(Job.tenant_id == tenant)).all()) == 1


def test_concurrent_claimers_exactly_one_wins(database: Database, tenant: str) -> None:
    for _ in range(5):
        job_id = new_job(database, tenant)
        wins: list[str] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def claimer(worker: str, job_id: uuid.UUID = job_id, wins: list[str] = wins,
                    errors: list[BaseException] = errors, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                with database.session() as s:  # each thread: its own session and connection
                    if jobs.claim(s, job_id, worker, 30):
                        wins.append(worker)
            except BaseException as e:  # a loser must lose cleanly, not crash on a conflict
                errors.append(e)

        threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and len(wins) == 1
        job = load(database, job_id)
        assert job.lease_owner == wins[0] and job.attempt_count == 1
        assert states(database, job_id) == [S.QUEUED, S.RUNNING]


def test_expired_lease_is_reclaimed_and_the_old_owner_is_fenced_off(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.claim(s, job_id, "w1", 30)
    with database.session() as s:
        assert not jobs.claim(s, job_id, "w2", 30)
        assert not jobs.claim(s, job_id, "w2", 30, now=db.utcnow() + timedelta(seconds=20))
        assert jobs.claim(s, job_id, "w2", 30, now=db.utcnow() + timedelta(seconds=31))
    job = load(database, job_id)
    assert (job.lease_owner, job.attempt_count, job.state) == ("w2", 2, S.RUNNING)
    with database.session() as s:
        assert not jobs.heartbeat(s, job_id, "w1", 30)
        assert not jobs.set_progress(s, job_id, "w1", 0.9)
        assert not jobs.succeed(s, job_id, "w1", ["stale"], None)
        assert jobs.succeed(s, job_id, "w2", ["fresh"], None)
    assert load(database, job_id).result_artifact_ids == ["fresh"]
    evs = events(database, job_id)
    assert [e.state for e in evs] == [S.QUEUED, S.RUNNING, S.RUNNING, S.SUCCEEDED]
    assert "w2" in evs[2].message and "expired" in evs[2].message


def test_attempts_are_bounded(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant, max_attempts=2)
    for worker in ("w1", "w2"):
        with database.session() as s:
            assert jobs.claim(s, job_id, worker, 30)
        expire(database, job_id)  # the worker crashed
    with database.session() as s:
        assert not jobs.claim(s, job_id, "w3", 30)
    job = load(database, job_id)
    assert (job.state, job.attempt_count, job.error_code, job.error_reason) == (
        S.FAILED, 2, code_pb2.INTERNAL, jobs.TOO_MANY_ATTEMPTS)
    assert "too many attempts" in job.error_message and job.end_time is not None
    assert states(database, job_id) == [S.QUEUED, S.RUNNING, S.RUNNING, S.FAILED]


def test_cancel_queued_is_immediate(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.request_cancel(s, job_id, tenant).state == S.CANCELLED
        assert not jobs.claim(s, job_id, "w1", 30)
        assert jobs.request_cancel(s, job_id).state == S.CANCELLED  # idempotent
    assert states(database, job_id) == [S.QUEUED, S.CANCELLED]
    assert load(database, job_id).end_time is not None


def test_cancel_running_goes_through_cancelling(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.claim(s, job_id, "w1", 30)
    with database.session() as s:
        with pytest.raises(JobNotFound):  # another tenant's job does not exist for them
            jobs.request_cancel(s, job_id, "someone-else")
        with pytest.raises(JobNotFound):
            jobs.request_cancel(s, uuid.uuid4())
        assert jobs.request_cancel(s, job_id, tenant).state == S.CANCELLING
    with database.session() as s:
        assert jobs.get_job(s, job_id).state == S.CANCELLING
        before = jobs.get_job(s, job_id).lease_expires_at
        assert not jobs.heartbeat(s, job_id, "w1", 60)  # "stop", but the lease is kept for the cleanup
        assert jobs.get_job(s, job_id).lease_expires_at > before
        assert not jobs.set_progress(s, job_id, "w1", 0.5)
        assert not jobs.succeed(s, job_id, "w1", ["late"], None)  # a finished result is not taken
        assert jobs.request_cancel(s, job_id).state == S.CANCELLING  # idempotent
        assert not jobs.finish_cancel(s, job_id, worker_id="w2")
        assert jobs.finish_cancel(s, job_id, worker_id="w1")
    job = load(database, job_id)
    assert job.state == S.CANCELLED and job.result_artifact_ids == []
    assert states(database, job_id) == [S.QUEUED, S.RUNNING, S.CANCELLING, S.CANCELLED]


def test_cancelling_job_whose_worker_died_gets_cancelled(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.claim(s, job_id, "w1", 30)
        jobs.request_cancel(s, job_id)
    expire(database, job_id)
    with database.session() as s:
        assert not jobs.claim(s, job_id, "w2", 30)
    assert states(database, job_id)[-2:] == [S.CANCELLING, S.CANCELLED]


def test_release_and_requeue_expired(database: Database, tenant: str) -> None:
    released = new_job(database, tenant)
    with database.session() as s:
        assert jobs.claim(s, released, "w1", 30)
        assert jobs.release(s, released, "w1")
    with database.session() as s:
        assert jobs.claim(s, released, "w2", 300)
    assert load(database, released).attempt_count == 2
    assert states(database, released) == [S.QUEUED, S.RUNNING, S.QUEUED, S.RUNNING]

    lost, exhausted, cancelling = (new_job(database, tenant), new_job(database, tenant, max_attempts=1),
                                   new_job(database, tenant))
    with database.session() as s:
        for job_id in (lost, exhausted, cancelling):
            assert jobs.claim(s, job_id, "w1", 30)
        jobs.request_cancel(s, cancelling)
    later = db.utcnow() + timedelta(seconds=60)
    with database.session() as s:
        requeued = jobs.requeue_expired(s, now=later)
    assert lost in requeued and exhausted not in requeued and cancelling not in requeued
    assert load(database, lost).state == S.QUEUED and load(database, lost).lease_expires_at is None
    assert load(database, exhausted).error_reason == jobs.TOO_MANY_ATTEMPTS
    assert load(database, cancelling).state == S.CANCELLED
    assert load(database, released).state == S.RUNNING  # w2's lease is still alive at `later`
    with database.session() as s:
        assert jobs.claim(s, lost, "w3", 30)


def test_fail_without_a_worker_and_queued(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.fail(s, job_id, code_pb2.FAILED_PRECONDITION, "MODEL_DELETED", "the model was deleted")
    assert states(database, job_id) == [S.QUEUED, S.FAILED]


def test_get_job_is_scoped_to_the_tenant(database: Database, tenant: str) -> None:
    job_id = new_job(database, tenant)
    with database.session() as s:
        assert jobs.get_job(s, job_id, tenant).id == job_id
        assert jobs.get_job(s, job_id, "other") is None
        assert jobs.get_job(s, str(job_id)) is not None


def test_service_modules_do_not_import_torch(tmp_path: Path) -> None:
    code = ("import sys; import prunery.service.store.db, prunery.service.store.jobs, "
            "prunery.service.store.objectstore; assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


CLAIM_LOOP = """
import sys
from prunery.service.store import db, jobs
database = db.Database(sys.argv[1])
worker = sys.argv[2]
won = []
for job_id in sys.argv[3:]:
    with database.session() as s:
        if not jobs.claim(s, job_id, worker, 30):
            continue
    won.append(job_id)
    with database.session() as s:
        assert jobs.set_progress(s, job_id, worker, 0.5, "prune")
    with database.session() as s:
        assert jobs.succeed(s, job_id, worker, [], {"by": worker})
print(" ".join(won))
"""


def test_sqlite_is_safe_for_several_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    db.upgrade(url)
    database = Database(url)
    with database.session() as s:
        db.ensure_tenant(s, "solo")
        ids = [str(jobs.create_job(s, "solo", SPEC)[0].id) for _ in range(30)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_LOOP, url, f"w{i}", *ids], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    won: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        won += out.split()
    assert sorted(won) == sorted(ids)  # every job ran exactly once
    for job_id in ids:
        assert states(database, uuid.UUID(job_id)) == [S.QUEUED, S.RUNNING, S.RUNNING, S.SUCCEEDED]
    database.dispose()
