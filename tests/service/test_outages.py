"""A database outage reaches callers as UNAVAILABLE with a stable reason and a RetryInfo, never INTERNAL or
UNKNOWN and never the driver's text, from every method and from the authentication in front of them; the
server keeps serving (health included) and answers normally as soon as the database is back. On a Postgres
cluster of the test's own (random port, temporary folder), so stopping it disturbs nothing else."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prunery.client import error_of
from prunery.service.api.errors import Reason
from prunery.service.api.server import PruneryServer, build_server
from prunery.service.api.settings import Settings
from prunery.service.store import db, tokens
from prunery.service.store.objectstore import open_store
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc
from tests.workers import PostgresCluster, postgres_cluster

Code = grpc.StatusCode
DRIVER_WORDS = ("psycopg", "connection to server", "OperationalError", "port ", "sqlalchemy", "Traceback")


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with postgres_cluster() as c:
        db.upgrade(c.url)
        yield c


@pytest.fixture(scope="module")
def server(cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PruneryServer]:
    store = open_store(str(tmp_path_factory.mktemp("objects")))
    settings = Settings(database_url=cluster.url, store_url=store.url, listen_address="127.0.0.1:0",
                        auth_cache_s=30)
    server = build_server(settings, store=store, enqueue=lambda _job, _queue: None)
    server.start()
    yield server
    server.stop(0).wait(10)


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def outage_answer(err: grpc.RpcError) -> tuple[Code, str, float | None, str]:
    """Code, ErrorInfo reason, RetryInfo delay and message, read as the client reads them."""
    error = error_of(err)
    return error.code, error.reason, error.retry_delay_s, error.message


def test_every_call_answers_a_database_outage_with_unavailable_and_recovers(
        cluster: PostgresCluster, server: PruneryServer) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    known = tokens.create(cluster.url, tenant)
    unseen = tokens.create(cluster.url, tenant)  # never used before the outage: its lookup needs the database
    data = b"a model"
    with grpc.insecure_channel(server.address) as channel:
        artifacts, jobs = pb_grpc.ArtifactServiceStub(channel), pb_grpc.JobServiceStub(channel)
        meta = pb.Artifact(display_name="m", kind=pb.MODEL, size_bytes=len(data),
                           sha256=hashlib.sha256(data).hexdigest())

        def upload() -> pb.Artifact:
            return artifacts.UploadArtifact(iter([pb.UploadArtifactRequest(metadata=meta),
                                                  pb.UploadArtifactRequest(chunk=data)]), metadata=md(known),
                                            timeout=30)

        model = upload()

        def create() -> pb.Job:
            return jobs.CreateJob(pb.CreateJobRequest(job=pb.Job(spec=pb.PruneSpec(model=model.name, ratio=0.5)),
                                                      request_id=uuid.uuid4().hex), metadata=md(known), timeout=30)

        job = create()
        calls = {
            "CreateJob": create,
            "GetJob of an uncached job": lambda: jobs.GetJob(pb.GetJobRequest(
                name=f"jobs/{uuid.uuid4()}"), metadata=md(known), timeout=30),
            "ListJobs": lambda: jobs.ListJobs(pb.ListJobsRequest(), metadata=md(known), timeout=30),
            "CancelJob": lambda: jobs.CancelJob(pb.CancelJobRequest(name=job.name), metadata=md(known), timeout=30),
            "WatchJob": lambda: list(jobs.WatchJob(pb.WatchJobRequest(name=job.name), metadata=md(known),
                                                   timeout=30)),
            "GetArtifact": lambda: artifacts.GetArtifact(pb.GetArtifactRequest(name=model.name), metadata=md(known),
                                                         timeout=30),
            "ListArtifacts": lambda: artifacts.ListArtifacts(pb.ListArtifactsRequest(), metadata=md(known),
                                                             timeout=30),
            "DownloadArtifact": lambda: list(artifacts.DownloadArtifact(pb.DownloadArtifactRequest(
                name=model.name), metadata=md(known), timeout=30)),
            "UploadArtifact": upload,
            "authentication (a token not yet cached)": lambda: jobs.ListJobs(
                pb.ListJobsRequest(), metadata=md(unseen), timeout=30),
        }
        cluster.stop()
        try:
            answers = {}
            for what, call in calls.items():
                with pytest.raises(grpc.RpcError) as info:
                    call()
                answers[what] = outage_answer(info.value)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        finally:
            cluster.start()
        for what, (code, reason, delay, message) in answers.items():
            assert (code, reason) == (Code.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE), (what, code, message)
            assert delay is not None and delay > 0, what
            assert not any(w in message for w in DRIVER_WORDS), (what, message)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # the process is fine: keep the pod

        # the database is back: the first calls may still meet a dropped pooled connection (UNAVAILABLE,
        # retryable); within a few seconds every call answers normally
        t0 = time.monotonic()
        while True:
            try:
                create()
                break
            except grpc.RpcError as e:
                assert outage_answer(e)[:2] == (Code.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE), e
                assert time.monotonic() - t0 < 15, "the API did not recover within 15 s of the database"
                time.sleep(0.2)
        assert jobs.ListJobs(pb.ListJobsRequest(), metadata=md(unseen), timeout=30).jobs
        assert upload().name
