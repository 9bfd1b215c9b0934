"""The worker with real parts: a fresh Postgres database, Redis as the broker, Celery worker processes
(`celery -A prunery.worker.app worker --pool prefork`), and a folder object store in tmp_path.

Jobs and artifacts are created directly through `prunery.service.store.db` / `prunery.service.store.jobs` and sent with
`prunery.worker.app.enqueue`, as the API does. Every test module run gets its own database, Redis key prefix
and queue name, so parallel runs (pytest -n 2) never share state. Leases, heartbeats, the reaper and the
Redis visibility timeout are set short through the environment so recovery paths run in seconds; slow and
crashing jobs use the worker's test hooks (job labels, honoured only with PRUNERY_TEST_HOOKS=1).
"""

from __future__ import annotations

import io
import os
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
import torch
from sqlalchemy import select

from prunery.core import PruneConfig, count, load_program, prune
from prunery.service.store import jobs
from prunery.service.store.db import Artifact, Database, Job, ensure_tenant, upgrade
from prunery.service.store.testing import temporary_postgres_database
from prunery.worker.app import queue_depth
from prunery.worker.broker import QueueView
from prunery.worker.reaper import reap_expired, resend_lost
from prunery.worker.settings import WorkerSettings
from tests import zoo
from tests.workers import REDIS_URL, TENANT, Stack, list_events, owner_pid


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with temporary_postgres_database(prefix="prunery_worker_test") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared stack of most tests: one worker."""
    st = Stack(database_url, tmp_path_factory.mktemp("objects"), tmp_path_factory.mktemp("worker"))
    try:
        st.start_worker("main").wait_ready()
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def conv1d_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.export.save(zoo.export("conv1d"), buffer)
    return buffer.getvalue()


def _params(data: bytes, tmp_path: Path) -> int:
    path = tmp_path / f"{uuid.uuid4().hex}.pt2"
    path.write_bytes(data)
    return count(load_program(path)).params


class _Touch:
    """Unpickling this creates `path` (stands in for arbitrary code); see tests/core/test_safe_load.py."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def _with_evil_sample_inputs(good: bytes, marker: Path) -> bytes:
    """The good archive with its sample-inputs pickle replaced by one whose loading creates `marker`."""
    with zipfile.ZipFile(io.BytesIO(good)) as zin:
        items = {name: zin.read(name) for name in zin.namelist()}
    root = next(iter(items)).split("/")[0]
    payload = io.BytesIO()
    torch.save(_Touch(marker), payload)
    items[f"{root}/data/sample_inputs/model.pt"] = payload.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for name, data in items.items():
            zout.writestr(name, data)
    return out.getvalue()


def _succeeded(stack: Stack, job_id: uuid.UUID) -> Job:
    job = stack.wait_state(job_id, "SUCCEEDED", "FAILED", "CANCELLED")
    assert job.state == "SUCCEEDED", (job.error_reason, job.error_message)
    return job


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------

def test_job_runs_to_succeeded(stack: Stack, conv1d_bytes: bytes, tmp_path: Path) -> None:
    artifact = stack.upload(conv1d_bytes, "conv1d.pt2")
    job_id = stack.submit(artifact, ratio=0.5, importance="L2")
    job = _succeeded(stack, job_id)

    # two results under jobs/{id}/, registered as the job's artifacts, owned by its tenant
    assert stack.keys_under(f"jobs/{job_id}") == [f"jobs/{job_id}/model.pt2", f"jobs/{job_id}/report.json"]
    with stack.db.session() as s:
        results = [s.get(Artifact, uuid.UUID(a)) for a in job.result_artifact_ids]
    assert [(a.kind, a.storage_key, a.producer_job_id, a.tenant_id, a.state) for a in results] == [
        ("MODEL", f"jobs/{job_id}/model.pt2", job_id, TENANT, "READY"),
        ("REPORT", f"jobs/{job_id}/report.json", job_id, TENANT, "READY"),
    ]
    model_bytes = stack.store.get_bytes(results[0].storage_key)
    assert len(model_bytes) == results[0].size_bytes

    # the pruned model loads through the safe intake, has fewer params, and is what a local run gives
    before, after = _params(conv1d_bytes, tmp_path), _params(model_bytes, tmp_path)
    assert after < before
    local_path = tmp_path / "local.pt2"
    local_path.write_bytes(conv1d_bytes)
    local = prune(load_program(local_path), PruneConfig(ratio=0.5, importance="l2"))
    assert count(local.program).params == after
    report = job.report
    assert report is not None
    assert (report["params_before"], report["params_after"]) == (before, after)
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["input"]["artifact"] == f"artifacts/{artifact}"
    assert job.attempt_count == 1 and job.progress == 1.0

    # events in order: queued, claimed, each stage, succeeded
    events = stack.events(job_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [(e.state, e.stage) for e in events] == [
        ("QUEUED", ""), ("RUNNING", ""), ("RUNNING", "load"), ("RUNNING", "graph"), ("RUNNING", "prune"),
        ("RUNNING", "export"), ("RUNNING", "store"), ("SUCCEEDED", "store"),
    ]
    assert [e.progress for e in events] == sorted(e.progress for e in events)

    # the worker's /metrics merges what its job processes recorded
    text = stack.workers[0].metrics()
    assert 'prunery_jobs_finished_total{state="SUCCEEDED"}' in text
    for stage in ("load", "graph", "prune", "export", "store", "importance", "select_and_remove", "reexport"):
        assert f'prunery_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text, stage
    assert "prunery_job_duration_seconds_count" in text
    assert "prunery_artifact_out_bytes_total" in text and "prunery_jobs_running 0.0" in text


def test_malicious_model_fails_and_the_worker_goes_on(stack: Stack, conv1d_bytes: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = stack.upload(_with_evil_sample_inputs(conv1d_bytes, marker), "evil.pt2")
    bad = stack.submit(evil)
    job = stack.wait_state(bad, "SUCCEEDED", "FAILED", "CANCELLED")
    assert job.state == "FAILED"
    assert job.error_reason == "MODEL_REFUSED"
    assert job.error_message.startswith("refused ") and "sample_inputs/model.pt" in job.error_message
    assert "\n" not in job.error_message and str(stack.settings.tmp_dir) not in job.error_message
    assert job.attempt_count == 1  # the engine's refusal is final, not retried
    assert not marker.exists()
    assert stack.keys_under(f"jobs/{bad}") == []

    good = stack.submit(stack.upload(conv1d_bytes))
    _succeeded(stack, good)
    assert not marker.exists()

    # each job ran in its own process; the worker's main process folds their metric files into archives
    worker = stack.workers[0]
    worker.wait_metric('prunery_jobs_finished_total{state="FAILED"}', lambda v: v >= 1)
    worker.wait_metric('prunery_jobs_finished_total{state="SUCCEEDED"}', lambda v: v >= 1)
    deadline = time.monotonic() + 10
    while len(list(worker.metrics_dir.glob("counter_*.db"))) > 3:  # the main process's, the archive, a live job's
        assert time.monotonic() < deadline, sorted(p.name for p in worker.metrics_dir.iterdir())
        time.sleep(0.2)
    assert (worker.metrics_dir / "counter_archive.db").exists()
    assert worker.metric('prunery_jobs_finished_total{state="FAILED"}') >= 1


def test_bad_inputs_fail_with_their_reason(stack: Stack, conv1d_bytes: bytes) -> None:
    cases = {
        stack.submit(stack.upload(conv1d_bytes), ratio=1.5): ("INVALID_SPEC", "ratio must be in (0, 1)"),
        stack.submit(uuid.uuid4()): ("MODEL_NOT_FOUND", "does not exist"),
        stack.submit(stack.upload(b"not a zip archive")): ("MODEL_REFUSED", "refused "),
    }
    for job_id, (reason, text) in cases.items():
        job = stack.wait_state(job_id, "SUCCEEDED", "FAILED", "CANCELLED")
        assert (job.state, job.error_reason) == ("FAILED", reason), job.error_message
        assert text in job.error_message and job.attempt_count == 1


@pytest.mark.parametrize("delay, how", [
    ("load=1", "cancelled"),  # the next stage boundary notices it
    ("prune=60", "cancelled (the running stage was stopped)"),  # a stage too long: its process is ended
])
def test_cancel_a_running_job(stack: Stack, conv1d_bytes: bytes, delay: str, how: str) -> None:
    job_id = stack.submit(stack.upload(conv1d_bytes), labels={"prunery-test-delay": delay})
    stage = delay.split("=")[0]
    stack.wait(job_id, lambda j: j.state == "RUNNING" and j.stage == stage, timeout=60)
    stack.store.put_bytes(f"jobs/{job_id}/partial.bin", b"x" * 100)  # as if a stage had written part of it
    t0 = time.monotonic()
    with stack.db.session() as s:
        assert jobs.request_cancel(s, job_id).state == "CANCELLING"
    job = stack.wait_state(job_id, "CANCELLED", "SUCCEEDED", "FAILED", timeout=30)
    elapsed = time.monotonic() - t0
    assert job.state == "CANCELLED", how
    assert elapsed < 8, f"cancel {how} took {elapsed:.1f}s"
    assert stack.keys_under(f"jobs/{job_id}") == []
    events = stack.events(job_id)
    assert [e.state for e in events][-2:] == ["CANCELLING", "CANCELLED"] and events[-1].message == how
    # the worker takes the next job
    _succeeded(stack, stack.submit(stack.upload(conv1d_bytes)))
    assert stack.job(job_id).state == "CANCELLED"  # the redelivered message of the ended process did nothing


def test_a_job_longer_than_its_lease_and_the_visibility_timeout_runs_once(stack: Stack, conv1d_bytes: bytes) -> None:
    """Heartbeats keep the lease; the copy Redis hands out after the visibility timeout finds it live."""
    job_id = stack.submit(stack.upload(conv1d_bytes), labels={"prunery-test-delay": "prune=8"})  # lease 4 s, vt 6 s
    job = _succeeded(stack, job_id)
    assert job.attempt_count == 1
    # the copy runs once the job has ended (the worker holds one message at a time): wait for its outcome rather
    # than for an empty broker, which a message between its pop and its unacked record also shows
    copy_ran = f"job {job_id}: not claimed (state SUCCEEDED)"
    deadline = time.monotonic() + 30
    while copy_ran not in stack.workers[0].log_tail(10**7):
        assert time.monotonic() < deadline, "the copy of the job's message never ran"
        time.sleep(0.2)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 20
        while client.llen(f"{stack.prefix}{stack.queue}") or client.hlen(f"{stack.prefix}unacked"):
            assert time.monotonic() < deadline, "the broker still holds the job's messages"
            time.sleep(0.2)
    finally:
        client.close()
    job = stack.job(job_id)
    assert (job.state, job.attempt_count) == ("SUCCEEDED", 1)
    assert [e.state for e in stack.events(job_id)].count("SUCCEEDED") == 1


def test_a_job_that_always_crashes_its_worker_fails_after_max_attempts(stack: Stack, conv1d_bytes: bytes) -> None:
    job_id = stack.submit(stack.upload(conv1d_bytes), labels={"prunery-test-crash": "prune"}, max_attempts=2)
    job = stack.wait_state(job_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=90)
    assert job.state == "FAILED"
    assert job.error_reason == jobs.TOO_MANY_ATTEMPTS
    assert job.attempt_count == 2
    claims = [e for e in stack.events(job_id) if e.message.startswith("attempt ")]
    assert len(claims) == 2
    worker = stack.workers[0]
    # counted once, by the reaper that failed it; the killed processes no longer count as running
    worker.wait_metric('prunery_jobs_finished_total{state="FAILED"}', lambda v: v >= 1)
    worker.wait_metric("prunery_jobs_running", lambda v: v == 0)
    _succeeded(stack, stack.submit(stack.upload(conv1d_bytes)))  # the worker survived its job processes


def test_jobs_past_their_time_or_memory_limit_fail_and_the_worker_goes_on(
        database_url: str, conv1d_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    st = Stack(database_url, tmp_path_factory.mktemp("objects"), tmp_path_factory.mktemp("limits"))
    try:
        worker = st.start_worker("limited", PRUNERY_JOB_TIMEOUT_S="3", PRUNERY_JOB_MEMORY_BYTES=str(6 << 30))
        worker.wait_ready()
        model = st.upload(conv1d_bytes)
        slow = st.submit(model, labels={"prunery-test-delay": "prune=60"})  # as an engine call that never ends
        greedy = st.submit(model, labels={"prunery-test-alloc": f"load={8 << 30}"})  # past 6 GiB at once
        fine = st.submit(model)
        t0 = time.monotonic()
        job = st.wait_state(slow, "SUCCEEDED", "FAILED", "CANCELLED", timeout=60)
        assert (job.state, job.error_reason, job.error_code) == ("FAILED", "JOB_TIMEOUT", 4), job.error_message
        assert "limit of 3 s (in the prune stage" in job.error_message and job.attempt_count == 1
        assert time.monotonic() - t0 < 30
        job = st.wait_state(greedy, "SUCCEEDED", "FAILED", "CANCELLED", timeout=60)
        assert (job.state, job.error_reason, job.error_code) == ("FAILED", "JOB_MEMORY_LIMIT", 8), job.error_message
        assert "load: the job needed more memory than its limit of 6.0 GiB" in job.error_message
        _succeeded(st, fine)  # under the same limits, a normal job runs
        assert st.keys_under(f"jobs/{slow}") == [] and st.keys_under(f"jobs/{greedy}") == []
    finally:
        st.close()


def test_sigkill_a_worker_mid_job_while_another_runs(conv1d_bytes: bytes, tmp_path_factory: pytest.TempPathFactory,
                                                    ) -> None:
    with ExitStack() as cleanup:
        url = cleanup.enter_context(temporary_postgres_database(prefix="prunery_worker_test"))
        upgrade(url)
        st = Stack(url, tmp_path_factory.mktemp("objects"), tmp_path_factory.mktemp("kill"))
        cleanup.callback(st.close)
        a, b = st.start_worker("a"), st.start_worker("b")
        a.wait_ready()
        b.wait_ready()

        job_id = st.submit(st.upload(conv1d_bytes), labels={"prunery-test-delay": "prune=3"}, max_attempts=3)
        running = st.wait(job_id, lambda j: j.state == "RUNNING" and j.stage == "prune", timeout=60)
        first_owner = running.lease_owner
        victim = next(w for w in (a, b) if w.owns(owner_pid(running)))
        survivor = b if victim is a else a
        victim.kill()  # the whole process group: main process and job process, mid-job, no cleanup

        job = _succeeded(st, job_id)
        assert job.lease_owner != first_owner and f"claimed by {job.lease_owner} " in survivor.log_tail(100_000)
        assert job.attempt_count == 2
        # the killed worker's message went back to the queue when the reaper requeued the job (restored, not sent
        # again): wait until the broker holds nothing (queue and unacked set both empty), then nothing may have
        # changed
        client = redis.Redis.from_url(REDIS_URL)
        cleanup.callback(client.close)
        deadline = time.monotonic() + st.settings.visibility_timeout_s + 20
        while client.llen(f"{st.prefix}{st.queue}") or client.hlen(f"{st.prefix}unacked"):
            assert time.monotonic() < deadline, "the broker still holds the job's messages"
            time.sleep(0.2)
        job = st.job(job_id)
        assert job.state == "SUCCEEDED" and job.attempt_count == 2
        events = st.events(job_id)
        assert [e.state for e in events].count("SUCCEEDED") == 1
        assert sum(e.message.startswith("attempt ") for e in events) == 2
        with st.db.session() as s:
            produced = s.scalars(select(Artifact).where(Artifact.producer_job_id == job_id)).all()
        assert sorted((p.kind, p.storage_key) for p in produced) == [
            ("MODEL", f"jobs/{job_id}/model.pt2"), ("REPORT", f"jobs/{job_id}/report.json")]
        assert sorted(str(p.id) for p in produced) == sorted(job.result_artifact_ids)
        assert st.keys_under(f"jobs/{job_id}") == [f"jobs/{job_id}/model.pt2", f"jobs/{job_id}/report.json"]
        assert "lease" in " ".join(e.message for e in events)  # the second claim says why it happened
        assert queue_depth(st.celery) == 0
        # the killed job process's scratch folder is removed by the surviving worker's reaper
        deadline = time.monotonic() + 10
        while list(st.settings.tmp_dir.glob("prunery-job-*")):
            assert time.monotonic() < deadline, list(st.settings.tmp_dir.iterdir())
            time.sleep(0.2)


def test_embedded_defaults(conv1d_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only PRUNERY_DATA_DIR: SQLite, a folder store and the filesystem broker, across processes."""
    for key in [k for k in os.environ if k.startswith("PRUNERY_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PRUNERY_DATA_DIR", str(tmp_path))
    defaults = WorkerSettings.from_env()
    assert defaults.broker_url == "filesystem://" and defaults.database_url.startswith("sqlite:///")
    upgrade(defaults.database_url)
    st = Stack(defaults.database_url, tmp_path / "objects", tmp_path, embedded=True)
    try:
        assert st.store.url == defaults.store_url
        job_id = st.submit(st.upload(conv1d_bytes))  # waits in the broker's folder until a worker starts
        assert queue_depth(st.celery) == 1
        st.start_worker("embedded").wait_ready()
        _succeeded(st, job_id)
        assert queue_depth(st.celery) == 0
    finally:
        st.close()


def test_reaper_sweeps() -> None:
    """reap_expired and resend_lost on their own (a database no worker watches), sending only after commit, each
    job to its own queue."""
    with temporary_postgres_database(prefix="prunery_worker_test") as url:
        upgrade(url)
        db = Database(url)
        try:
            with db.session() as s:
                ensure_tenant(s, TENANT)
                ids = [jobs.create_job(s, TENANT, {"ratio": 0.5}, max_attempts=n, queue=q)[0].id
                       for n, q in ((3, "a100"), (1, None), (3, None), (3, None), (3, "a100"))]
            retry, exhausted, cancelling, queued, queued_elsewhere = ids
            with db.session() as s:
                for job_id in (retry, exhausted, cancelling):
                    assert jobs.claim(s, job_id, "dead-host:1:x", lease_s=0.05)
                jobs.request_cancel(s, cancelling)
            time.sleep(0.1)

            sent: list[tuple[uuid.UUID, str]] = []

            def send(job_id: uuid.UUID, queue: str) -> None:
                sent.append((job_id, queue))

            with db.session() as s:
                result = reap_expired(s, enqueue_fn=send)
                assert sent == []  # not before the commit
            assert (result.requeued, result.failed, result.cancelled) == ([retry], [exhausted], [cancelling])
            assert sent == [(retry, "a100")]  # back to the pool it was created for
            with db.session() as s:
                states = {i: (j.state, j.error_reason) for i in ids if (j := jobs.get_job(s, i))}
            assert states == {retry: ("QUEUED", None), exhausted: ("FAILED", jobs.TOO_MANY_ATTEMPTS),
                              cancelling: ("CANCELLED", None), queued: ("QUEUED", None),
                              queued_elsewhere: ("QUEUED", None)}

            # a sweep whose transaction rolls back sends nothing
            with db.session() as s:
                assert jobs.claim(s, retry, "dead-host:2:y", lease_s=0.05)
            time.sleep(0.1)
            with pytest.raises(RuntimeError), db.session() as s:
                assert reap_expired(s, enqueue_fn=send).requeued == [retry]
                raise RuntimeError
            assert sent == [(retry, "a100")]

            # a QUEUED job of this worker's queue whose message was lost is sent again, only when sent long enough
            # ago and missing from the broker; another pool's jobs are that pool's reapers' business
            has_it = QueueView(frozenset({str(queued), str(retry)}), 2, listed=True)
            empty = QueueView(frozenset(), 0, listed=True)
            with db.session() as s:
                assert resend_lost(s, 3600, lambda: empty, "prunery", confirm_s=0, enqueue_fn=send) == []
            with db.session() as s:
                assert resend_lost(s, 0, lambda: has_it, "prunery", confirm_s=0, enqueue_fn=send) == []
            # a broker that only counts its ready messages (AMQP): a resend only when the queue is empty
            with db.session() as s:
                counted = QueueView(frozenset(), 1, listed=False)
                assert resend_lost(s, 0, lambda: counted, "prunery", confirm_s=0, enqueue_fn=send) == []
            # missing once is not enough: missing again at least confirm_s later
            suspects: dict[uuid.UUID, float] = {}
            with db.session() as s:
                assert resend_lost(s, 0, lambda: empty, "prunery", missing_since=suspects, confirm_s=0.3,
                                   enqueue_fn=send) == []
            assert set(suspects) == {queued}
            with db.session() as s:  # seen with its message in between: suspicion dropped
                assert resend_lost(s, 0, lambda: has_it, "prunery", missing_since=suspects, confirm_s=0.3,
                                   enqueue_fn=send) == []
            assert suspects == {}
            with db.session() as s:
                assert resend_lost(s, 0, lambda: empty, "prunery", missing_since=suspects, confirm_s=0.3,
                                   enqueue_fn=send) == []
            time.sleep(0.35)
            with db.session() as s:
                assert resend_lost(s, 0, lambda: empty, "prunery", missing_since=suspects, confirm_s=0.3,
                                   enqueue_fn=send) == [queued]
                assert sent == [(retry, "a100")]  # not before the commit
            assert sent == [(retry, "a100"), (queued, "prunery")]
            with db.session() as s:
                job = jobs.get_job(s, queued)
                assert job is not None and job.state == "QUEUED"
                assert [e.message for e in list_events(s, queued)][-1] == jobs.RESENT
            # just sent: not a candidate again until older_than_s has passed once more
            with db.session() as s:
                assert resend_lost(s, 30, lambda: empty, "prunery", confirm_s=0, enqueue_fn=send) == []

            # two reapers at once: the second skips the row the first holds, and after the first's commit finds
            # it sent since its cutoff; a job resent once per loss
            time.sleep(0.05)
            with db.session() as first:
                assert resend_lost(first, 0, lambda: empty, "prunery", confirm_s=0, enqueue_fn=send) == [queued]
                with db.session() as second:
                    assert resend_lost(second, 0, lambda: empty, "prunery", confirm_s=0, enqueue_fn=send) == []
            assert sent[-1] == (queued, "prunery") and len(sent) == 3
        finally:
            db.dispose()
