"""The Python client's retries: the backoff and budget as pure logic (a fake clock), and the client with its
default settings against a real `prunery serve` process on a throwaway Postgres database, SIGKILLed and
started again on the same port while calls, an upload, a download and watches are under way."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

import prunery.client as client_module
from prunery.client import Backoff, Client, PruneryError, call_with_retries, retryable, spec_from_options
from prunery.service.store import db, jobs, testing, tokens
from prunery.v1 import prunery_pb2 as pb

Code = grpc.StatusCode
OUTAGE_S = 6.0  # how long the API stays down: longer than gRPC's old retry policy lasted (3 s at most)
# transfers: longer than the old client's three attempts of that policy each, 0.5 s and 1 s apart (10.5 s at most)
LONG_OUTAGE_S = 12.0


# ---------------------------------------------------------------------------------------------------------
# Pure logic: backoff, budget, what is retried
# ---------------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


def test_backoff_is_exponential_with_full_jitter_up_to_the_cap() -> None:
    clock = FakeClock()
    top = Backoff(1e9, clock=clock, rand=lambda: 0.999999)
    assert [round(top.next_pause(), 3) for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    half = Backoff(1e9, clock=clock, rand=lambda: 0.5)
    assert [round(half.next_pause(), 3) for _ in range(3)] == [0.1, 0.2, 0.4]
    assert Backoff(1e9, clock=clock, rand=lambda: 0.0).next_pause() == 0.0  # full jitter: anywhere from 0
    rng = random.Random(0)
    draws = [Backoff(1e9, clock=clock, rand=rng.random).next_pause() for _ in range(2000)]
    assert 0 <= min(draws) < 0.01 and 0.19 < max(draws) <= 0.2  # uniform over [0, 0.2]
    assert 0.09 < sum(draws) / len(draws) < 0.11


def test_backoff_retry_info_is_a_floor_and_progress_restarts_the_budget_and_the_exponent() -> None:
    clock = FakeClock()
    b = Backoff(10.0, clock=clock, rand=lambda: 0.0)
    assert b.next_pause(at_least=2.5) == 2.5  # the server's RetryInfo beats a shorter backoff
    clock.now += 9.0
    assert b.next_pause(at_least=2.0) is None  # would end past the budget: give up now, not after sleeping
    b.progress()
    assert b.remaining() == 10.0 and b.ceiling() == pytest.approx(0.2)
    assert b.next_pause(at_least=2.0) == 2.0


def test_a_unary_budget_counts_from_the_call_and_a_stream_budget_from_its_first_failure() -> None:
    clock = FakeClock()
    unary, stream = Backoff(10.0, clock=clock), Backoff(10.0, clock=clock, started=False)
    clock.now += 8.0  # a first attempt that took 8 s, or a stream that worked for 8 s
    assert unary.remaining() == pytest.approx(2.0)
    assert stream.remaining() == 10.0
    stream.next_pause()
    clock.now += 3.0
    assert stream.remaining() == pytest.approx(7.0)


@pytest.mark.parametrize("seed", range(20))
def test_retries_stay_within_the_budget_and_use_most_of_it(seed: int) -> None:
    clock = FakeClock()
    start = clock.now
    backoff = Backoff(60.0, clock=clock, rand=random.Random(seed).random)
    attempts: list[tuple[float, float]] = []  # (when, deadline)

    def attempt(deadline: float) -> None:
        attempts.append((clock.now, deadline))
        clock.now += 0.01  # connection refused: fails at once
        raise PruneryError(Code.UNAVAILABLE, "down")

    with pytest.raises(PruneryError, match="^UNAVAILABLE: down$"):
        call_with_retries(attempt, 30.0, backoff, read=False, sleep=clock.sleep)
    elapsed = clock.now - start
    assert 60.0 - 5.0 - 1.0 <= elapsed <= 60.0  # gives up only when the next pause and attempt do not fit
    assert attempts[0][1] == 30.0
    assert all(when + deadline <= start + 60.0 + 1e-9 for when, deadline in attempts[1:])  # retries end in time
    assert max(clock.sleeps) <= 5.0 and len(attempts) > 15


def test_retry_deadlines_are_cut_to_what_is_left_of_the_budget() -> None:
    clock = FakeClock()
    deadlines: list[float] = []

    def attempt(deadline: float) -> str:
        deadlines.append(deadline)
        clock.now += deadline if len(deadlines) == 1 else 0.0  # the first attempt hangs to its deadline
        if len(deadlines) < 3:
            raise PruneryError(Code.DEADLINE_EXCEEDED if len(deadlines) == 1 else Code.UNAVAILABLE, "x")
        return "ok"

    assert call_with_retries(attempt, 8.0, Backoff(10.0, clock=clock, rand=lambda: 0.5), read=True,
                             sleep=clock.sleep) == "ok"
    assert deadlines[0] == 8.0 and deadlines[1] == pytest.approx(10.0 - 8.0 - 0.1)
    assert deadlines[2] == pytest.approx(10.0 - 8.0 - 0.1 - 0.2)


@pytest.mark.parametrize(("code", "reason", "read", "expected"), [
    (Code.UNAVAILABLE, "", False, True),
    (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE", False, True),
    (Code.UNAVAILABLE, "OVERLOADED", True, True),
    (Code.DEADLINE_EXCEEDED, "", True, True),
    (Code.DEADLINE_EXCEEDED, "", False, False),  # a write that timed out may have been done
    (Code.RESOURCE_EXHAUSTED, "TENANT_RATE_LIMIT", False, True),
    (Code.RESOURCE_EXHAUSTED, "TENANT_STREAM_LIMIT", True, True),
    (Code.RESOURCE_EXHAUSTED, "TENANT_JOB_LIMIT", False, False),
    (Code.RESOURCE_EXHAUSTED, "TENANT_CAP_EXCEEDED", False, False),
    (Code.RESOURCE_EXHAUSTED, "", True, False),  # gRPC's own (a message too large): retrying cannot help
    (Code.NOT_FOUND, "JOB_NOT_FOUND", True, False),
    (Code.INVALID_ARGUMENT, "INVALID_FIELD", False, False),
    (Code.UNAUTHENTICATED, "INVALID_TOKEN", True, False),
    (Code.INTERNAL, "", True, False),
])
def test_what_is_retried(code: Code, reason: str, read: bool, expected: bool) -> None:
    assert retryable(PruneryError(code, "m", reason), read) is expected


def _scripted(errors: list[PruneryError | None], clock: FakeClock) -> tuple[Callable[[float], str], list[float]]:
    """An attempt that fails with the given errors in turn (None: succeeds)."""
    calls: list[float] = []

    def attempt(deadline: float) -> str:
        calls.append(clock.now)
        error = errors[len(calls) - 1]
        if error is not None:
            raise error
        return "done"

    return attempt, calls


def test_rate_limits_wait_for_the_servers_delay_and_job_limits_are_not_retried() -> None:
    clock = FakeClock()
    limited = PruneryError(Code.RESOURCE_EXHAUSTED, "slow down", "TENANT_RATE_LIMIT", retry_delay_s=1.5)
    attempt, calls = _scripted([limited, limited, None], clock)
    assert call_with_retries(attempt, 30.0, Backoff(60.0, clock=clock), read=False, sleep=clock.sleep) == "done"
    assert len(calls) == 3 and all(s >= 1.5 for s in clock.sleeps)
    for reason in ("TENANT_JOB_LIMIT", "TENANT_CAP_EXCEEDED"):
        attempt, calls = _scripted([PruneryError(Code.RESOURCE_EXHAUSTED, "no", reason, retry_delay_s=1.0), None],
                                   clock)
        with pytest.raises(PruneryError) as e:
            call_with_retries(attempt, 30.0, Backoff(60.0, clock=clock), read=False, sleep=clock.sleep)
        assert e.value.reason == reason and len(calls) == 1
    # a RetryInfo delay longer than the budget left: give up at once rather than sleep past it
    attempt, calls = _scripted([PruneryError(Code.UNAVAILABLE, "busy", "OVERLOADED", retry_delay_s=120.0), None],
                               clock)
    with pytest.raises(PruneryError, match="OVERLOADED|busy"):
        call_with_retries(attempt, 30.0, Backoff(60.0, clock=clock), read=True, sleep=clock.sleep)
    assert len(calls) == 1


def test_a_delete_not_found_on_a_retry_is_done_but_not_on_the_first_attempt() -> None:
    clock = FakeClock()
    gone = PruneryError(Code.NOT_FOUND, "job 'jobs/x' not found", "JOB_NOT_FOUND")
    attempt, calls = _scripted([PruneryError(Code.UNAVAILABLE, "reset"), gone], clock)
    assert call_with_retries(attempt, 30.0, Backoff(60.0, clock=clock), read=False, missing_ok_on_retry=True,
                             sleep=clock.sleep) is None
    assert len(calls) == 2
    attempt, calls = _scripted([gone], clock)
    with pytest.raises(PruneryError, match="^NOT_FOUND: job 'jobs/x' not found$"):
        call_with_retries(attempt, 30.0, Backoff(60.0, clock=clock), read=False, missing_ok_on_retry=True,
                          sleep=clock.sleep)
    attempt, calls = _scripted([PruneryError(Code.UNAVAILABLE, "reset"), gone], clock)
    with pytest.raises(PruneryError, match="NOT_FOUND"):  # not a delete: NOT_FOUND stays an error
        call_with_retries(attempt, 30.0, Backoff(60.0, clock=clock), read=True, sleep=clock.sleep)


# ---------------------------------------------------------------------------------------------------------
# A real API process, killed and started again
# ---------------------------------------------------------------------------------------------------------

def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ApiServer:
    """`prunery serve` as a subprocess on a fixed loopback port: started, SIGKILLed, started again."""

    def __init__(self, database_url: str, data_dir: Path, port: int | None = None) -> None:
        self.port = port or testing.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
        self.env.update(PRUNERY_DATABASE_URL=database_url, PRUNERY_LISTEN_ADDRESS=self.address,
                        PRUNERY_DATA_DIR=str(data_dir), PRUNERY_STORE_URL=(data_dir / "objects").as_uri())
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "api.log"

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "prunery.cli", "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prunery serve exited {self.proc.returncode}: "
                                       + self.log.read_text(errors="replace")[-3000:])
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("prunery serve did not become SERVING: "
                                       + self.log.read_text(errors="replace")[-3000:])
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def start_after(self, delay_s: float) -> threading.Thread:
        """Start again `delay_s` seconds from now, in the background; join the thread to wait for it."""
        def later() -> None:
            time.sleep(delay_s)
            self.start()

        thread = threading.Thread(target=later, name="restart-api")
        thread.start()
        return thread

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def pg(tmp_path_factory) -> Iterator[tuple[str, db.Database]]:
    with testing.temporary_postgres_database(prefix="prunery_client") as url:
        db.upgrade(url)
        database = db.Database(url)
        try:
            yield url, database
        finally:
            database.dispose()


@pytest.fixture(scope="module")
def api(pg: tuple[str, db.Database], tmp_path_factory) -> Iterator[ApiServer]:
    server = ApiServer(pg[0], tmp_path_factory.mktemp("api"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tenant(pg: tuple[str, db.Database]) -> tuple[str, str]:
    """(tenant id, token) of a new tenant."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    return name, tokens.create(pg[0], name)


@pytest.fixture
def client(api: ApiServer, tenant: tuple[str, str]) -> Iterator[Client]:
    with Client(api.address, tenant[1]) as c:  # the default timeout and retry budget
        yield c
    if not api.running:  # a test that failed while the API was down: the next one needs it
        api.start()


def _model(tmp_path: Path, size: int = 4096) -> Path:
    path = tmp_path / f"model-{uuid.uuid4().hex[:6]}.pt2"
    path.write_bytes(os.urandom(size))  # the API never opens an upload: any bytes make a MODEL artifact
    return path


def _job_id(job: pb.Job) -> uuid.UUID:
    return uuid.UUID(job.name.split("/", 1)[1])


def test_errors_carry_the_code_the_reason_and_the_servers_message(client: Client, tmp_path: Path) -> None:
    missing = f"jobs/{uuid.uuid4()}"
    with pytest.raises(PruneryError) as e:
        client.get_job(missing)
    assert e.value.code == Code.NOT_FOUND and e.value.reason == "JOB_NOT_FOUND"
    assert e.value.message == f"job {missing!r} not found" and str(e.value) == f"NOT_FOUND: {e.value.message}"
    with pytest.raises(PruneryError) as e:
        client.delete_job(missing)  # NOT_FOUND on the first attempt of a delete is an error
    assert e.value.reason == "JOB_NOT_FOUND"
    artifact = client.upload(_model(tmp_path))
    started = time.monotonic()
    with pytest.raises(PruneryError) as e:
        client.create_job(spec_from_options(artifact.name, 1.5))
    assert e.value.code == Code.INVALID_ARGUMENT and e.value.reason == "INVALID_FIELD" and "ratio" in e.value.message
    assert time.monotonic() - started < 5  # not retried
    client.delete_artifact(artifact.name)
    assert list(client.list_artifacts()) == []


@pytest.mark.slow
def test_create_job_calls_survive_an_api_restart_without_duplicates(api: ApiServer, client: Client,
                                                                    tmp_path: Path) -> None:
    model = client.upload(_model(tmp_path)).name
    done: list[tuple[pb.Job, float]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def create_jobs() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                job = client.create_job(spec_from_options(model, 0.5), labels={"n": str(len(done))})
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)
                return
            done.append((job, time.monotonic() - started))

    thread = threading.Thread(target=create_jobs)
    thread.start()
    try:
        wait_for(lambda: len(done) >= 10 or errors, what="the first jobs")
        api.kill()  # most likely with a CreateJob in flight: its retry must not make a second job
        before = len(done)
        time.sleep(OUTAGE_S)
        api.start()
        wait_for(lambda: len(done) >= before + 10 or errors, what="jobs after the restart")
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    names = [job.name for job, _ in done]
    assert len(set(names)) == len(names)
    assert max(seconds for _, seconds in done) >= OUTAGE_S - 1  # one call waited out the outage
    assert sorted(j.name for j in client.list_jobs(page_size=100)) == sorted(names)  # no job nobody asked for


@pytest.mark.slow
def test_an_upload_cut_by_an_api_restart_is_sent_again(api: ApiServer, client: Client, tenant: tuple[str, str],
                                                       pg: tuple[str, db.Database], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.pt2"
    path.write_bytes(os.urandom(4 << 20))
    real = client_module._file_chunks

    def slow(p: Path, size: int = client_module.CHUNK) -> Iterator[bytes]:
        for block in real(p, 256 << 10):  # 16 chunks, 0.1 s apart: the upload takes about 1.6 s
            time.sleep(0.1)
            yield block

    monkeypatch.setattr(client_module, "_file_chunks", slow)
    result: list[pb.Artifact] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            result.append(client.upload(path))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def artifacts(state: str) -> int:
        with pg[1].session() as s:
            return s.scalar(select(func.count()).select_from(db.Artifact).where(
                db.Artifact.tenant_id == tenant[0], db.Artifact.state == state))

    thread = threading.Thread(target=upload)
    started = time.monotonic()
    thread.start()
    wait_for(lambda: artifacts("PENDING") == 1 or errors, what="the upload to start streaming")
    time.sleep(0.4)
    assert not result and not errors, "the upload ended before the API was killed"
    api.kill()
    api.start_after(LONG_OUTAGE_S).join()
    thread.join(120)
    assert not errors, errors
    artifact = result[0]
    assert time.monotonic() - started > LONG_OUTAGE_S
    assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and artifact.size_bytes == 4 << 20
    assert artifacts("READY") == 1
    assert [a.name for a in client.list_artifacts()] == [artifact.name]
    monkeypatch.undo()
    assert client.download(artifact.name, tmp_path / "back.pt2").read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_a_download_started_while_the_api_is_down_completes_after_the_restart(api: ApiServer, client: Client,
                                                                             tmp_path: Path) -> None:
    path = _model(tmp_path, 3 << 20)
    artifact = client.upload(path)
    api.kill()
    restart = api.start_after(LONG_OUTAGE_S)
    started = time.monotonic()
    out = client.download(artifact.name, tmp_path / "out.pt2")
    restart.join()
    assert time.monotonic() - started >= LONG_OUTAGE_S - 0.5
    assert out.read_bytes() == path.read_bytes() and not (tmp_path / "out.pt2.partial").exists()


class _Worker:
    """Writes a job's events straight into the database, as a worker would (`service/store/jobs.py`)."""

    def __init__(self, database: db.Database, job: pb.Job) -> None:
        self.database, self.job_id, self.id = database, _job_id(job), f"test-worker-{uuid.uuid4().hex[:6]}"
        with database.session() as s:
            assert jobs.claim(s, self.job_id, self.id, lease_s=600)

    def progress(self, fraction: float) -> None:
        with self.database.session() as s:
            assert jobs.set_progress(s, self.job_id, self.id, fraction, stage="prune")

    def succeed(self) -> None:
        with self.database.session() as s:
            assert jobs.succeed(s, self.job_id, self.id, [], {"params_after": 1})


def _watch(client: Client, job: pb.Job, **kwargs: float) -> tuple[threading.Thread, list[pb.JobEvent],
                                                                    list[BaseException]]:
    events: list[pb.JobEvent] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for event in client.watch_job(job.name, **kwargs):
                events.append(event)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)  # daemon: a watch that never ends fails, not hangs
    thread.start()
    return thread, events, errors


def _assert_every_event_once(events: list[pb.JobEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].state == pb.SUCCEEDED


@pytest.mark.slow
def test_a_watch_resumes_after_an_api_restart_without_repeating_or_missing_events(
        api: ApiServer, client: Client, pg: tuple[str, db.Database], tmp_path: Path) -> None:
    job = client.create_job(spec_from_options(client.upload(_model(tmp_path)).name, 0.5))
    seen: list[pb.JobEvent] = []
    ended: list[pb.Job] = []
    thread = threading.Thread(target=lambda: ended.append(client.wait(job.name, on_event=seen.append)), daemon=True)
    thread.start()
    worker = _Worker(pg[1], job)
    worker.progress(0.1)
    wait_for(lambda: len(seen) == 3, what="the first events")  # queued, running, 10 %
    api.kill()
    for fraction in (0.2, 0.3, 0.4):  # while the API is down
        worker.progress(fraction)
    restart = api.start_after(OUTAGE_S)
    started = time.monotonic()
    assert client.get_job(job.name).progress == pytest.approx(0.4)  # a read waits out the outage too
    assert time.monotonic() - started >= OUTAGE_S - 0.5
    restart.join()
    wait_for(lambda: len(seen) == 6, what="the events written while the API was down")
    worker.progress(0.9)
    worker.succeed()
    thread.join(60)
    _assert_every_event_once(seen)
    assert [round(e.progress, 1) for e in seen[2:7]] == [0.1, 0.2, 0.3, 0.4, 0.9]
    assert ended and ended[0].state == pb.SUCCEEDED  # Client.wait


def test_a_watch_reconnects_after_each_connections_deadline(client: Client, pg: tuple[str, db.Database],
                                                            tmp_path: Path) -> None:
    job = client.create_job(spec_from_options(client.upload(_model(tmp_path)).name, 0.5))
    thread, events, errors = _watch(client, job, timeout=1.0)
    worker = _Worker(pg[1], job)
    for fraction in (0.25, 0.5):
        time.sleep(1.3)  # longer than a connection's deadline: the watch reconnects in between
        worker.progress(fraction)
    time.sleep(1.3)
    worker.succeed()
    thread.join(30)
    assert not errors, errors
    _assert_every_event_once(events)
    assert len(events) == 5
    # a watch from a sequence: what follows it, and nothing (at once) past the job's last event
    assert [e.sequence for e in client.watch_job(job.name, after_sequence=3)] == [4, 5]
    started = time.monotonic()
    assert list(client.watch_job(job.name, after_sequence=5)) == []
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_a_watch_budget_restarts_with_each_event_and_ends_when_the_api_stays_down(
        api: ApiServer, tenant: tuple[str, str], pg: tuple[str, db.Database], tmp_path: Path) -> None:
    budget = 12.0
    with Client(api.address, tenant[1], retry_budget_s=budget) as client:
        job = client.create_job(spec_from_options(client.upload(_model(tmp_path)).name, 0.5))
        thread, events, errors = _watch(client, job)
        worker = _Worker(pg[1], job)
        wait_for(lambda: len(events) == 2, what="the first events")
        # two outages of 3 s (plus the API's start), 4 s apart: more than the budget together, each within it
        for n in (3, 4):
            api.kill()
            worker.progress(n / 10)
            api.start_after(3.0).join()
            wait_for(lambda n=n: len(events) == n, what="the event written while the API was down")
            time.sleep(4.0)
        assert thread.is_alive() and not errors
        api.kill()  # and now it stays down
        killed = time.monotonic()
        thread.join(budget + 10)
        gave_up = time.monotonic() - killed
        api.start()
    assert not thread.is_alive(), "the watch retried past its budget"
    assert len(errors) == 1 and isinstance(errors[0], PruneryError) and errors[0].code == Code.UNAVAILABLE
    assert budget - 5.0 - 1.0 <= gave_up <= budget + 2.0
    assert [e.sequence for e in events] == [1, 2, 3, 4]
