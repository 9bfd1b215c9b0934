"""The gRPC API end to end on real parts: an in-process server on a loopback port, talked to through a real
channel, over a throwaway Postgres database, with a folder store and moto's S3-compatible HTTP server.
A worker is simulated by driving the job state machine (`prunery.service.store.jobs`) from the test."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from prunery.service.api.errors import DOMAIN
from prunery.service.api.server import PruneryServer, build_server
from prunery.service.api.settings import Settings
from prunery.service.store import db, jobs, testing, tokens
from prunery.service.store.db import Artifact, Database, Job
from prunery.service.store.objectstore import FolderStore, ObjectStore, S3Store, open_store
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc
from tests.workers import list_events

KiB, MiB = 1 << 10, 1 << 20
ROOT = Path(__file__).resolve().parents[2]
Code = grpc.StatusCode


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one Postgres database per module (and xdist worker), one server per store
# ---------------------------------------------------------------------------------------------------------

class Recorder:
    """An injected `enqueue`: records the job ids sent, and their queues."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.queues: dict[str, str] = {}
        self.lock = threading.Lock()

    def __call__(self, job_id: str, queue: str) -> None:
        with self.lock:
            self.ids.append(job_id)
            self.queues[job_id] = queue


@dataclass
class Api:
    kind: str
    server: PruneryServer
    channel: grpc.Channel
    store: ObjectStore
    database: Database
    url: str
    enqueued: Recorder
    big: int  # an upload size that takes the store's multi-part path (S3: above one 8 MiB part)
    artifacts: pb_grpc.ArtifactServiceStub = field(init=False)
    jobs: pb_grpc.JobServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.artifacts = pb_grpc.ArtifactServiceStub(self.channel)
        self.jobs = pb_grpc.JobServiceStub(self.channel)

    @property
    def cap(self) -> int:
        return self.server.settings.tenant_cap_bytes

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture(scope="module")
def database(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


def _start(kind: str, pg_url: str, database: Database, store: ObjectStore, cap: int, big: int) -> Iterator[Api]:
    settings = Settings(database_url=pg_url, store_url=store.url, listen_address="127.0.0.1:0", metrics_port=0,
                        metrics_addr="127.0.0.1", tenant_cap_bytes=cap, watch_poll_s=0.05, auth_cache_s=0,
                        grpc_workers=16)
    recorder = Recorder()
    server = build_server(settings, database=database, store=store, enqueue=recorder)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Api(kind, server, channel, store, database, pg_url, recorder, big)
    finally:
        channel.close()
        server.stop(0).wait(10)


@pytest.fixture(scope="module")
def folder_api(pg_url: str, database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    store = open_store(str(tmp_path_factory.mktemp("objects")))
    yield from _start("folder", pg_url, database, store, cap=4 * MiB, big=int(1.5 * MiB))


@pytest.fixture(scope="module")
def s3_api(pg_url: str, database: Database) -> Iterator[Api]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in testing.MOTO_CREDENTIALS.items():
            mp.setenv(k, v)
        with testing.moto_server() as endpoint:
            bucket = f"prunery-api-{uuid.uuid4().hex[:12]}"
            store = open_store(f"s3://{bucket}/api?endpoint_url={endpoint}")
            assert isinstance(store, S3Store)
            store.ensure_bucket()
            yield from _start("s3", pg_url, database, store, cap=24 * MiB, big=9 * MiB)


@pytest.fixture(params=["folder", "s3"])
def api(request: pytest.FixtureRequest) -> Api:
    return request.getfixturevalue(f"{request.param}_api")


@dataclass
class Tenant:
    name: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def new_tenant(url: str) -> Tenant:
    name = f"t-{uuid.uuid4().hex[:10]}"
    return Tenant(name, tokens.create(url, name))


@pytest.fixture
def tenant(pg_url: str) -> Tenant:
    return new_tenant(pg_url)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def upload_requests(data: bytes, *, kind: int = pb.MODEL, labels: dict[str, str] | None = None,
                    size: int | None = None, sha256: str | None = None, chunk: int = 256 * KiB,
                    display_name: str = "model.pt2", sha256_last: str | None = None
                    ) -> Iterator[pb.UploadArtifactRequest]:
    """The messages of an upload: `sha256` (default: the data's) in the metadata, or with `sha256_last` set,
    none there (unless `sha256` is given too) and `sha256_last` as the last message ("data": the data's)."""
    if sha256 is None:
        sha256 = "" if sha256_last is not None else hashlib.sha256(data).hexdigest()
    yield pb.UploadArtifactRequest(metadata=pb.Artifact(
        display_name=display_name, kind=kind, labels=labels or {},
        size_bytes=len(data) if size is None else size, sha256=sha256))
    for i in range(0, len(data), chunk):
        yield pb.UploadArtifactRequest(chunk=data[i:i + chunk])
    if sha256_last is not None:
        yield pb.UploadArtifactRequest(sha256=hashlib.sha256(data).hexdigest() if sha256_last == "data"
                                       else sha256_last)


def upload(api: Api, t: Tenant, data: bytes, **kw: Any) -> pb.Artifact:
    return api.artifacts.UploadArtifact(upload_requests(data, **kw), metadata=t.md, timeout=60)


def download(api: Api, t: Tenant, name: str, offset: int = 0) -> tuple[pb.ArtifactChunk, bytes]:
    msgs = list(api.artifacts.DownloadArtifact(pb.DownloadArtifactRequest(name=name, offset=offset),
                                               metadata=t.md, timeout=60))
    assert msgs and msgs[0].HasField("artifact")
    assert not any(m.HasField("artifact") for m in msgs[1:])
    pos = offset
    for m in msgs:  # each chunk says where it starts
        assert m.offset == pos
        pos += len(m.data)
    return msgs[0], b"".join(m.data for m in msgs)


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    return info.value


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    reason: str | None
    domain: str | None
    metadata: dict[str, str]
    fields: dict[str, str]


def details(err: grpc.RpcError) -> Details:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status details on {err}"
    reason = domain = None
    metadata: dict[str, str] = {}
    fields: dict[str, str] = {}
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            fields.update({v.field: v.description for v in bad.field_violations})
    return Details(err.code(), status.message, reason, domain, metadata, fields)


def expect(err: grpc.RpcError, code: grpc.StatusCode, reason: str, field: str | None = None) -> Details:
    d = details(err)
    assert (d.code, d.reason, d.domain) == (code, reason, DOMAIN), (d, err)
    if field is not None:
        assert field in d.fields, d.fields
    return d


def store_keys(store: ObjectStore) -> set[str]:
    if isinstance(store, FolderStore):
        return {p.relative_to(store.root).as_posix() for p in store.root.rglob("*")
                if p.is_file() and ".tmp" not in p.relative_to(store.root).parts}
    assert isinstance(store, S3Store)
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.prefix)
    return {o["Key"][len(store.prefix):] for page in pages for o in page.get("Contents", [])}


def assert_nothing_left(api: Api, t: Tenant) -> None:
    """No row of this tenant, no object without a row, no half-written upload."""
    with api.database.session() as s:
        assert s.scalars(select(Artifact).where(Artifact.tenant_id == t.name)).all() == []
        known = set(s.scalars(select(Artifact.storage_key)))
    assert store_keys(api.store) - known == set()
    if isinstance(api.store, FolderStore):
        tmp = api.store.root / ".tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []
    else:
        assert isinstance(api.store, S3Store)
        assert api.store.client.list_multipart_uploads(
            Bucket=api.store.bucket, Prefix=api.store.prefix).get("Uploads", []) == []


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def create_job(api: Api, t: Tenant, model: str, request_id: str = "", queue: str = "", **spec: Any) -> pb.Job:
    spec.setdefault("ratio", 0.5)
    job = pb.Job(spec=pb.PruneSpec(model=model, **spec), labels={"team": "vision"}, queue=queue)
    return api.jobs.CreateJob(pb.CreateJobRequest(job=job, request_id=request_id), metadata=t.md, timeout=30)


def job_id_of(job: pb.Job) -> str:
    return job.name.split("/", 1)[1]


# ---------------------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------------------

def test_upload_download_round_trip(api: Api, tenant: Tenant) -> None:
    data = os.urandom(api.big + 12345)
    before = api.metric("prunery_artifact_bytes_total", {"direction": "in"})
    art = upload(api, tenant, data, labels={"team": "vision"}, chunk=300 * KiB)
    assert re.fullmatch(r"artifacts/[0-9a-f-]{36}", art.name)
    assert (art.kind, art.size_bytes, art.sha256) == (pb.MODEL, len(data), hashlib.sha256(data).hexdigest())
    assert art.display_name == "model.pt2" and dict(art.labels) == {"team": "vision"}
    assert art.create_time.seconds > 0 and art.producer_job == ""
    assert api.metric("prunery_artifact_bytes_total", {"direction": "in"}) - before == len(data)
    assert api.store.exists(art.name)  # stored under artifacts/{id}
    assert api.artifacts.GetArtifact(pb.GetArtifactRequest(name=art.name), metadata=tenant.md) == art

    first, got = download(api, tenant, art.name)
    assert first.artifact == art and got == data
    # resume from an offset, as after a dropped connection
    offset = MiB + 123
    first, rest = download(api, tenant, art.name, offset)
    assert first.offset == offset and rest == data[offset:]
    first, rest = download(api, tenant, art.name, len(data))  # nothing left: one message, the metadata
    assert first.artifact == art and rest == b""
    expect(rpc_error(api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=art.name, offset=len(data) + 1),
                     metadata=tenant.md), Code.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE")
    expect(rpc_error(api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=art.name, offset=-1),
                     metadata=tenant.md), Code.INVALID_ARGUMENT, "INVALID_FIELD", "offset")

    api.artifacts.DeleteArtifact(pb.DeleteArtifactRequest(name=art.name), metadata=tenant.md)
    expect(rpc_error(api.artifacts.GetArtifact, pb.GetArtifactRequest(name=art.name), metadata=tenant.md),
           Code.NOT_FOUND, "ARTIFACT_NOT_FOUND")
    expect(rpc_error(api.artifacts.DeleteArtifact, pb.DeleteArtifactRequest(name=art.name), metadata=tenant.md),
           Code.NOT_FOUND, "ARTIFACT_NOT_FOUND")
    assert not api.store.exists(art.name)
    assert_nothing_left(api, tenant)


BAD_UPLOADS = {
    # name: (declared size, declared sha (None: the data's), bytes sent, code, reason, field)
    "sha256 mismatch": (None, "0" * 64, None, Code.INVALID_ARGUMENT, "SHA256_MISMATCH", "metadata.sha256"),
    "more than declared": (-1, None, None, Code.INVALID_ARGUMENT, "SIZE_MISMATCH", "metadata.size_bytes"),
    "less than declared": (+1, None, None, Code.INVALID_ARGUMENT, "SIZE_MISMATCH", "metadata.size_bytes"),
    "declared past the cap": ("cap+1", None, 100, Code.RESOURCE_EXHAUSTED, "TENANT_CAP_EXCEEDED", None),
    "bad metadata": (None, "xyz", 100, Code.INVALID_ARGUMENT, "INVALID_FIELD", "metadata.sha256"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_leaves_nothing(api: Api, tenant: Tenant, case: str) -> None:
    size_delta, sha, sent, code, reason, field_ = BAD_UPLOADS[case]
    data = os.urandom(sent if sent is not None else api.big)
    if size_delta == "cap+1":
        size = api.cap + 1
    else:
        size = len(data) + (size_delta or 0)
    err = rpc_error(upload, api, tenant, data, size=size, sha256=sha)
    d = expect(err, code, reason, field_)
    assert d.message  # a sentence a person can act on
    assert_nothing_left(api, tenant)


def test_upload_with_its_sha256_last(api: Api, tenant: Tenant) -> None:
    """A client that hashes as it sends leaves metadata.sha256 empty and sends the digest as the last message:
    stored and described as when declared first."""
    data = os.urandom(api.big + 777)
    art = upload(api, tenant, data, sha256_last="data")
    assert (art.size_bytes, art.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert download(api, tenant, art.name)[1] == data
    api.artifacts.DeleteArtifact(pb.DeleteArtifactRequest(name=art.name), metadata=tenant.md)
    assert_nothing_left(api, tenant)


BAD_LAST_SHA256 = {
    # name: (upload_requests' arguments, reason, field)
    "mismatch": ({"sha256_last": "0" * 64}, "SHA256_MISMATCH", "sha256"),
    "nowhere": ({"sha256": ""}, "INVALID_UPLOAD", "sha256"),
    "twice": ({"sha256_last": "data", "sha256": None}, "INVALID_UPLOAD", "sha256"),
    "not hex": ({"sha256_last": "z" * 64}, "INVALID_FIELD", "sha256"),
    "a chunk after it": ({"sha256_last": "data", "then": b"more"}, "INVALID_UPLOAD", "sha256"),
}


@pytest.mark.parametrize("case", list(BAD_LAST_SHA256))
def test_bad_last_sha256_leaves_nothing(folder_api: Api, tenant: Tenant, case: str) -> None:
    kwargs, reason, field_ = BAD_LAST_SHA256[case]
    data = os.urandom(300 * KiB)
    kwargs = dict(kwargs)
    then = kwargs.pop("then", None)
    if "sha256" in kwargs and kwargs["sha256"] is None:  # declared in the metadata and sent last
        kwargs["sha256"] = hashlib.sha256(data).hexdigest()
    reqs = list(upload_requests(data, **kwargs))
    if then is not None:
        reqs.append(pb.UploadArtifactRequest(chunk=then))
    d = expect(rpc_error(folder_api.artifacts.UploadArtifact, iter(reqs), metadata=tenant.md, timeout=60),
               Code.INVALID_ARGUMENT, reason, field_)
    assert d.message
    assert_nothing_left(folder_api, tenant)


def test_upload_must_start_with_metadata(folder_api: Api, tenant: Tenant) -> None:
    def chunks_only() -> Iterator[pb.UploadArtifactRequest]:
        yield pb.UploadArtifactRequest(chunk=b"abc")

    expect(rpc_error(folder_api.artifacts.UploadArtifact, chunks_only(), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_UPLOAD", "metadata")
    data = b"x" * 1000
    reqs = list(upload_requests(data))
    reqs.insert(2, reqs[0])  # metadata again mid-stream
    expect(rpc_error(folder_api.artifacts.UploadArtifact, iter(reqs), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_UPLOAD")
    expect(rpc_error(upload, folder_api, tenant, data, kind=pb.ARTIFACT_KIND_UNSPECIFIED),
           Code.INVALID_ARGUMENT, "INVALID_FIELD", "metadata.kind")
    assert_nothing_left(folder_api, tenant)


def test_tenant_cap_counts_stored_bytes(folder_api: Api, tenant: Tenant) -> None:
    cap = folder_api.cap
    first = upload(folder_api, tenant, os.urandom(cap * 6 // 10))
    err = rpc_error(upload, folder_api, tenant, os.urandom(cap * 6 // 10))
    d = expect(err, Code.RESOURCE_EXHAUSTED, "TENANT_CAP_EXCEEDED")
    assert d.metadata["cap_bytes"] == str(cap)
    with folder_api.database.session() as s:
        assert s.scalars(select(Artifact.id).where(Artifact.tenant_id == tenant.name)).all() == [
            uuid.UUID(first.name.split("/")[1])]
    # another tenant has its own cap
    other = new_tenant(folder_api.url)
    upload(folder_api, other, os.urandom(cap * 6 // 10))


def test_client_cancel_mid_upload_leaves_nothing(api: Api, tenant: Tenant) -> None:
    chunk = 512 * KiB
    sent_before_block = api.big  # S3: past one part, so a multipart upload is under way
    release = threading.Event()

    def slow() -> Iterator[pb.UploadArtifactRequest]:
        yield pb.UploadArtifactRequest(metadata=pb.Artifact(kind=pb.MODEL, size_bytes=api.cap - 1,
                                                            sha256="a" * 64))
        sent = 0
        while sent < sent_before_block:
            yield pb.UploadArtifactRequest(chunk=os.urandom(chunk))
            sent += chunk
        release.wait(30)

    method = "prunery.v1.ArtifactService/UploadArtifact"

    def finished_uploads() -> float:
        # the code the handler ends with depends on where the cancel reaches it (CANCELLED, or UNKNOWN when the
        # request stream breaks inside the store's write): count them all
        return sum(api.metric("prunery_grpc_requests_total", {"method": method, "code": code.name})
                   for code in grpc.StatusCode)

    finished_before = finished_uploads()
    bytes_before = api.metric("prunery_artifact_bytes_total", {"direction": "in"})
    future = api.artifacts.UploadArtifact.future(slow(), metadata=tenant.md)
    wait_for(lambda: api.metric("prunery_artifact_bytes_total", {"direction": "in"}) - bytes_before
             >= sent_before_block, what="the server to receive the first chunks")
    future.cancel()
    release.set()
    # the handler has ended (and cleaned up) once the call is counted
    wait_for(lambda: finished_uploads() > finished_before, what="the server to finish the cancelled upload")
    assert_nothing_left(api, tenant)


def test_upload_in_progress_is_invisible_but_counts_toward_the_cap(api: Api, tenant: Tenant) -> None:
    data = os.urandom(api.cap * 6 // 10)
    release = threading.Event()

    def blocked() -> Iterator[pb.UploadArtifactRequest]:
        requests = upload_requests(data, labels={"team": "vision"})
        yield next(requests)  # the metadata
        yield next(requests)  # the first chunk
        release.wait(30)
        yield from requests

    def pending() -> list[Artifact]:
        with api.database.session() as s:
            return list(s.scalars(select(Artifact).where(Artifact.tenant_id == tenant.name)))

    future = api.artifacts.UploadArtifact.future(blocked(), metadata=tenant.md, timeout=60)
    try:
        wait_for(lambda: len(pending()) == 1, what="the upload to reserve its row")
        [row] = pending()
        assert (row.state, row.size_bytes, row.storage_key) == ("PENDING", len(data), f"artifacts/{row.id}")
        name = f"artifacts/{row.id}"

        # invisible to every read
        expect(rpc_error(api.artifacts.GetArtifact, pb.GetArtifactRequest(name=name), metadata=tenant.md),
               Code.NOT_FOUND, "ARTIFACT_NOT_FOUND")
        listed = api.artifacts.ListArtifacts(pb.ListArtifactsRequest(), metadata=tenant.md)
        assert list(listed.artifacts) == []
        expect(rpc_error(api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=name), metadata=tenant.md),
               Code.NOT_FOUND, "ARTIFACT_NOT_FOUND")
        expect(rpc_error(create_job, api, tenant, name), Code.INVALID_ARGUMENT, "INVALID_FIELD", "job.spec.model")
        expect(rpc_error(api.artifacts.DeleteArtifact, pb.DeleteArtifactRequest(name=name), metadata=tenant.md),
               Code.NOT_FOUND, "ARTIFACT_NOT_FOUND")

        # but its declared size counts toward the tenant's cap: a second upload that would pass it together
        # with the pending one is refused before sending a byte to the store
        d = expect(rpc_error(upload, api, tenant, os.urandom(api.cap * 6 // 10)), Code.RESOURCE_EXHAUSTED,
                   "TENANT_CAP_EXCEEDED")
        assert d.metadata["used_bytes"] == str(len(data))
        assert [r.id for r in pending()] == [row.id]
    finally:
        release.set()

    art = future.result(timeout=60)
    assert (art.name, art.size_bytes, art.sha256) == (name, len(data), hashlib.sha256(data).hexdigest())
    assert dict(art.labels) == {"team": "vision"}
    [row] = pending()
    assert (row.state, row.sha256) == ("READY", art.sha256)
    assert api.artifacts.GetArtifact(pb.GetArtifactRequest(name=name), metadata=tenant.md) == art
    assert list(api.artifacts.ListArtifacts(pb.ListArtifactsRequest(), metadata=tenant.md).artifacts) == [art]
    assert download(api, tenant, name)[1] == data
    api.artifacts.DeleteArtifact(pb.DeleteArtifactRequest(name=name), metadata=tenant.md)
    assert_nothing_left(api, tenant)


def test_list_artifacts_pages_and_filters(folder_api: Api, tenant: Tenant) -> None:
    api = folder_api
    made = []
    for i in range(7):
        made.append(upload(api, tenant, f"artifact {i}".encode(), kind=pb.DATASET if i % 3 == 0 else pb.MODEL,
                           labels={"team": "a" if i % 2 else "b", "idx": str(i)}))
    newest_first = [a.name for a in reversed(made)]

    def list_all(filter_: str = "", page_size: int = 3) -> tuple[list[str], int]:
        names, token, pages = [], "", 0
        while True:
            resp = api.artifacts.ListArtifacts(pb.ListArtifactsRequest(page_size=page_size, page_token=token,
                                                                       filter=filter_), metadata=tenant.md)
            pages += 1
            assert len(resp.artifacts) <= page_size
            names += [a.name for a in resp.artifacts]
            token = resp.next_page_token
            if not token:
                return names, pages

    assert list_all() == (newest_first, 3)  # 3 + 3 + 1
    first = api.artifacts.ListArtifacts(pb.ListArtifactsRequest(page_size=3), metadata=tenant.md)
    assert [a.name for a in first.artifacts] == newest_first[:3] and first.next_page_token
    # defaults: 50 per page; larger sizes are capped at 1000, not refused
    assert len(api.artifacts.ListArtifacts(pb.ListArtifactsRequest(), metadata=tenant.md).artifacts) == 7
    assert len(api.artifacts.ListArtifacts(pb.ListArtifactsRequest(page_size=5000), metadata=tenant.md).artifacts) == 7

    datasets = [a.name for a in reversed(made) if a.kind == pb.DATASET]
    assert list_all("kind=DATASET")[0] == datasets
    assert list_all("labels.team=a")[0] == [a.name for a in reversed(made) if a.labels["team"] == "a"]
    assert list_all('kind=MODEL AND labels.team="b"', page_size=1)[0] == [
        a.name for a in reversed(made) if a.kind == pb.MODEL and a.labels["team"] == "b"]
    assert list_all("labels.idx=4 AND labels.team=b")[0] == [made[4].name]
    assert list_all("labels.nope=x")[0] == []

    for bad in ("kind=BANANA", "kind", "size=3", "kind=MODEL OR kind=DATASET", "labels.=x", "kind=MODEL AND"):
        err = rpc_error(api.artifacts.ListArtifacts, pb.ListArtifactsRequest(filter=bad), metadata=tenant.md)
        expect(err, Code.INVALID_ARGUMENT, "INVALID_FILTER", "filter")
    expect(rpc_error(api.artifacts.ListArtifacts, pb.ListArtifactsRequest(page_token="garbage!"), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")
    expect(rpc_error(api.artifacts.ListArtifacts, pb.ListArtifactsRequest(
        page_token=first.next_page_token, filter="kind=MODEL"), metadata=tenant.md),
        Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    expect(rpc_error(api.artifacts.ListArtifacts, pb.ListArtifactsRequest(page_size=-1), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_FIELD", "page_size")


# ---------------------------------------------------------------------------------------------------------
# Authentication, tenants, names
# ---------------------------------------------------------------------------------------------------------

def test_missing_invalid_and_revoked_tokens(folder_api: Api, tenant: Tenant) -> None:
    api = folder_api
    req = pb.ListArtifactsRequest()
    expect(rpc_error(api.artifacts.ListArtifacts, req), Code.UNAUTHENTICATED, "MISSING_TOKEN")
    expect(rpc_error(api.artifacts.ListArtifacts, req, metadata=(("authorization", "Basic abc"),)),
           Code.UNAUTHENTICATED, "MISSING_TOKEN")
    expect(rpc_error(api.jobs.ListJobs, pb.ListJobsRequest(), metadata=(("authorization", "Bearer nope"),)),
           Code.UNAUTHENTICATED, "INVALID_TOKEN")
    expect(rpc_error(upload, api, Tenant("x", "prn_wrong"), b"abc"), Code.UNAUTHENTICATED, "INVALID_TOKEN")
    expect(rpc_error(api.jobs.WatchJob, pb.WatchJobRequest(name=f"jobs/{uuid.uuid4()}")),
           Code.UNAUTHENTICATED, "MISSING_TOKEN")
    api.artifacts.ListArtifacts(req, metadata=(("authorization", f"bearer {tenant.token}"),))  # scheme: any case

    extra = tokens.create(api.url, tenant.name)
    api.artifacts.ListArtifacts(req, metadata=(("authorization", f"Bearer {extra}"),))
    assert tokens.revoke(api.url, extra) is True
    assert tokens.revoke(api.url, extra) is False
    expect(rpc_error(api.artifacts.ListArtifacts, req, metadata=(("authorization", f"Bearer {extra}"),)),
           Code.UNAUTHENTICATED, "INVALID_TOKEN")
    api.artifacts.ListArtifacts(req, metadata=tenant.md)  # the tenant's other token still works


def test_tokens_are_stored_hashed(pg_url: str, database: Database) -> None:
    name = f"t-{uuid.uuid4().hex[:10]}"
    token_id, token = tokens.create_with_id(pg_url, name, "ci")
    assert token.startswith("prn_")
    with database.session() as s:
        rows = s.scalars(select(db.ApiToken).where(db.ApiToken.tenant_id == name)).all()
        assert [str(r.id) for r in rows] == [token_id]
        assert rows[0].token_sha256 == hashlib.sha256(token.encode()).hexdigest() != token
    assert tokens.revoke(pg_url, token_id) is True  # by id
    with database.session() as s:
        assert db.authenticate(s, token) is None


def test_tenant_isolation(folder_api: Api, tenant: Tenant) -> None:
    api = folder_api
    other = new_tenant(api.url)
    art = upload(api, tenant, b"weights")
    job = create_job(api, tenant, art.name)
    md = other.md
    nf = Code.NOT_FOUND
    expect(rpc_error(api.artifacts.GetArtifact, pb.GetArtifactRequest(name=art.name), metadata=md),
           nf, "ARTIFACT_NOT_FOUND")
    expect(rpc_error(api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=art.name), metadata=md),
           nf, "ARTIFACT_NOT_FOUND")
    expect(rpc_error(api.artifacts.DeleteArtifact, pb.DeleteArtifactRequest(name=art.name), metadata=md),
           nf, "ARTIFACT_NOT_FOUND")
    for call, req in [(api.jobs.GetJob, pb.GetJobRequest(name=job.name)),
                      (api.jobs.CancelJob, pb.CancelJobRequest(name=job.name)),
                      (api.jobs.DeleteJob, pb.DeleteJobRequest(name=job.name)),
                      (api.jobs.WatchJob, pb.WatchJobRequest(name=job.name)),
                      (api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=f"{job.name}/model"))]:
        expect(rpc_error(call, req, metadata=md), nf, "JOB_NOT_FOUND")
    # another tenant's model is, for this tenant, no model at all
    expect(rpc_error(create_job, api, other, art.name), Code.INVALID_ARGUMENT, "INVALID_FIELD", "job.spec.model")
    assert not api.artifacts.ListArtifacts(pb.ListArtifactsRequest(), metadata=md).artifacts
    assert not api.jobs.ListJobs(pb.ListJobsRequest(), metadata=md).jobs
    # and nothing changed for the owner
    assert api.jobs.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant.md).state == pb.QUEUED


FIXED_UUID = "0b6f3c52-5f0e-4d8e-9a59-6f4c2d1e8a77"  # parameters must be the same in every xdist worker


@pytest.mark.parametrize("name", ["", "artifacts/", "artifacts/123", f"jobs/{FIXED_UUID}",
                                  f"artifacts/{FIXED_UUID}/x", "../../etc/passwd"])
def test_malformed_artifact_names(folder_api: Api, tenant: Tenant, name: str) -> None:
    expect(rpc_error(folder_api.artifacts.GetArtifact, pb.GetArtifactRequest(name=name), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_NAME", "name")


def test_malformed_job_names(folder_api: Api, tenant: Tenant) -> None:
    for name in ["", "jobs/abc", f"artifacts/{uuid.uuid4()}", f"jobs/{uuid.uuid4()}/model"]:
        expect(rpc_error(folder_api.jobs.GetJob, pb.GetJobRequest(name=name), metadata=tenant.md),
               Code.INVALID_ARGUMENT, "INVALID_NAME", "name")
    expect(rpc_error(folder_api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name="jobs/x/model"),
                     metadata=tenant.md), Code.INVALID_ARGUMENT, "INVALID_NAME", "name")


# ---------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def model(folder_api: Api, tenant: Tenant) -> pb.Artifact:
    return upload(folder_api, tenant, os.urandom(4 * KiB))


MISSING = f"artifacts/{FIXED_UUID}"
INVALID_SPECS = [
    ({"ratio": 0.0}, "job.spec.ratio"),
    ({"ratio": 1.0}, "job.spec.ratio"),
    ({"ratio": 1.5}, "job.spec.ratio"),
    ({"ratio": -0.2}, "job.spec.ratio"),
    ({"ratio": math.nan}, "job.spec.ratio"),
    ({"importance": 42}, "job.spec.importance"),
    ({"round_to": -8}, "job.spec.round_to"),
    ({"max_ratio": 1.5}, "job.spec.max_ratio"),
    ({"max_ratio": -0.1}, "job.spec.max_ratio"),
    ({"model": MISSING}, "job.spec.model"),
    ({"model": "artifacts/not-a-uuid"}, "job.spec.model"),
    ({"model": ""}, "job.spec.model"),
    ({"model": "dataset"}, "job.spec.model"),
    ({"ignore": [""]}, "job.spec.ignore[0]"),
    ({"attention": 42}, "job.spec.attention"),
    ({"sparse_steps": 10}, "job.spec.dataset"),  # data-driven options need a dataset
    ({"importance": pb.TAYLOR}, "job.spec.dataset"),
    ({"dataset": "MODEL", "finetune_steps": 5}, "job.spec.dataset"),  # a model is not a dataset
    ({"ratio": 0.0, "target_macs": 0.5, "target_params": 0.5}, "job.spec.target_params"),  # one target
    ({"held_out": 1.5}, "job.spec.held_out"),
    ({"finetune_steps": -1}, "job.spec.finetune_steps"),
    ({"warmup": 1.0}, "job.spec.warmup"),
    ({"clip_grad": -1.0}, "job.spec.clip_grad"),
    ({"teacher_weight": 2.0}, "job.spec.teacher_weight"),
    ({"hidden_weight": float("nan")}, "job.spec.hidden_weight"),
    ({"optimizer": 9}, "job.spec.optimizer"),
    ({"distill_loss": 9}, "job.spec.distill_loss"),
]


@pytest.mark.parametrize(("spec", "field_"), INVALID_SPECS, ids=[f for _, f in INVALID_SPECS])
def test_create_job_rejects_invalid_specs(folder_api: Api, tenant: Tenant, model: pb.Artifact,
                                          spec: dict[str, Any], field_: str) -> None:
    api = folder_api
    spec = dict(spec)
    if spec.get("model") == "dataset":
        spec["model"] = upload(api, tenant, b"inputs", kind=pb.DATASET).name
    spec.setdefault("model", model.name)
    if spec.get("dataset") == "MODEL":
        spec["dataset"] = model.name
    sent = len(api.enqueued.ids)
    d = expect(rpc_error(create_job, api, tenant, request_id=uuid.uuid4().hex, **spec),
               Code.INVALID_ARGUMENT, "INVALID_FIELD", field_)
    assert len(d.fields) == 1, d.fields  # only the field at fault
    assert field_.split(".")[-1].split("[")[0] in d.message
    assert not api.jobs.ListJobs(pb.ListJobsRequest(), metadata=tenant.md).jobs
    assert len(api.enqueued.ids) == sent


def test_create_job_reports_every_bad_field(folder_api: Api, tenant: Tenant) -> None:
    d = expect(rpc_error(create_job, folder_api, tenant, MISSING, ratio=2.0, importance=9, round_to=-1),
               Code.INVALID_ARGUMENT, "INVALID_FIELD")
    assert set(d.fields) == {"job.spec.model", "job.spec.ratio", "job.spec.importance", "job.spec.round_to"}
    expect(rpc_error(folder_api.jobs.CreateJob, pb.CreateJobRequest(), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_FIELD", "job")


def test_create_job_is_idempotent(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    created_before = api.metric("prunery_jobs_created_total")
    rid = uuid.uuid4().hex
    first = create_job(api, tenant, model.name, rid, ratio=0.25, round_to=8, ignore=["fc.*"])
    again = create_job(api, tenant, model.name, rid, ratio=0.25, round_to=8, ignore=["fc.*"])
    assert first == again
    assert first.state == pb.QUEUED and first.create_time.seconds > 0 and first.progress == 0
    assert re.fullmatch(r"jobs/[0-9a-f-]{36}", first.name)
    assert api.enqueued.ids.count(job_id_of(first)) == 1  # one message for one job
    assert api.enqueued.queues[job_id_of(first)] == first.queue == "prunery"
    # the stored spec has its defaults filled in
    assert first.spec == pb.PruneSpec(model=model.name, ratio=0.25, importance=pb.L2, round_to=8, max_ratio=1.0,
                                      ignore=["fc.*"], attention=pb.ATTENTION_HEADS, prune_hidden=False,
                                      held_out=0.1, batch_size=64, reg=1e-4, alpha=4.0, target_steps=4,
                                      warmup=0.05, clip_grad=1.0, teacher_weight=0.5,
                                      hidden_weight=1.0)  # learning rates 0: from the architecture
    assert dict(first.labels) == {"team": "vision"}
    # the same request_id for a different job is a client bug: refused, nothing created
    with pytest.raises(grpc.RpcError) as err:
        create_job(api, tenant, model.name, rid, ratio=0.3)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and first.name in err.value.details()
    assert details(err.value).reason == "REQUEST_ID_REUSED"
    other = create_job(api, tenant, model.name, uuid.uuid4().hex)
    plain = create_job(api, tenant, model.name)  # no request id: a new job each time
    assert len({first.name, other.name, plain.name}) == 3
    assert api.metric("prunery_jobs_created_total") - created_before == 3
    # the row was committed before its message was sent
    with api.database.session() as s:
        assert s.get(Job, uuid.UUID(job_id_of(first))).request_id == rid


def test_cancel_queued_job(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    job = create_job(api, tenant, model.name)
    cancelled = api.jobs.CancelJob(pb.CancelJobRequest(name=job.name), metadata=tenant.md)
    assert cancelled.state == pb.CANCELLED and cancelled.end_time.seconds > 0
    assert api.jobs.CancelJob(pb.CancelJobRequest(name=job.name), metadata=tenant.md).state == pb.CANCELLED
    assert api.jobs.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant.md).state == pb.CANCELLED
    # a finished job can be deleted; its events go with it
    api.jobs.DeleteJob(pb.DeleteJobRequest(name=job.name), metadata=tenant.md)
    expect(rpc_error(api.jobs.GetJob, pb.GetJobRequest(name=job.name), metadata=tenant.md),
           Code.NOT_FOUND, "JOB_NOT_FOUND")
    with api.database.session() as s:
        assert list_events(s, job_id_of(job)) == []


def _simulate_worker(api: Api, tenant: Tenant, job: pb.Job, model_bytes: bytes, report: dict[str, Any]) -> list[str]:
    """What a worker does: claim, progress, store results under jobs/{id}/, succeed."""
    jid = uuid.UUID(job_id_of(job))
    worker = "test-worker:1"
    with api.database.session() as s:
        assert jobs.claim(s, jid, worker, lease_s=60)
    with api.database.session() as s:
        assert jobs.set_progress(s, jid, worker, 0.5, stage="prune")
    results = []
    for kind, key, data in [("MODEL", f"jobs/{jid}/model.pt2", model_bytes),
                            ("REPORT", f"jobs/{jid}/report.json", json.dumps(report).encode())]:
        size, sha = api.store.put_bytes(key, data)
        art_id = uuid.uuid4()
        with api.database.session() as s:
            s.add(Artifact(id=art_id, tenant_id=tenant.name, display_name=key.rsplit("/", 1)[1], kind=kind,
                           state="READY", size_bytes=size, sha256=sha, labels={}, storage_key=key,
                           producer_job_id=jid))
        results.append(str(art_id))
    api.store.put_bytes(f"jobs/{jid}/scratch/tmp.bin", b"scratch")
    with api.database.session() as s:
        assert jobs.succeed(s, jid, worker, results, report)
    return results


def test_watch_job_to_the_end_then_download_and_delete(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    job = create_job(api, tenant, model.name)
    seen: list[pb.JobEvent] = []
    done = threading.Event()

    def watch() -> None:
        for ev in api.jobs.WatchJob(pb.WatchJobRequest(name=job.name), metadata=tenant.md, timeout=30):
            seen.append(ev)
        done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(lambda: len(seen) >= 1, what="the first event")
    assert seen[0].state == pb.QUEUED and seen[0].sequence == 1 and seen[0].job.name == job.name

    # downloading results before the job succeeded is a precondition failure
    for which in ("model", "report"):
        d = expect(rpc_error(api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=f"{job.name}/{which}"),
                             metadata=tenant.md), Code.FAILED_PRECONDITION, "JOB_NOT_SUCCEEDED")
        assert d.metadata["state"] == "QUEUED"
    expect(rpc_error(api.jobs.DeleteJob, pb.DeleteJobRequest(name=job.name), metadata=tenant.md),
           Code.FAILED_PRECONDITION, "JOB_NOT_FINISHED")
    expect(rpc_error(api.artifacts.DeleteArtifact, pb.DeleteArtifactRequest(name=model.name), metadata=tenant.md),
           Code.FAILED_PRECONDITION, "ARTIFACT_IN_USE")

    pruned = os.urandom(3 * KiB)
    report = {"params_before": 1000, "params_after": 400, "groups": [{"size": 8, "pruned": 4}]}
    results = _simulate_worker(api, tenant, job, pruned, report)
    watcher.join(10)
    assert done.is_set(), "WatchJob did not end after the terminal event"
    assert [e.sequence for e in seen] == [1, 2, 3, 4]
    assert [e.state for e in seen] == [pb.QUEUED, pb.RUNNING, pb.RUNNING, pb.SUCCEEDED]
    assert seen[2].stage == "prune" and seen[2].progress == 0.5 and seen[2].job.progress == 0.5
    assert not seen[2].job.result_artifacts and not seen[2].job.HasField("end_time")
    final = seen[-1].job
    assert final.state == pb.SUCCEEDED and list(final.result_artifacts) == [f"artifacts/{r}" for r in results]
    assert final.report["params_after"] == 400 and final.report["groups"][0]["pruned"] == 4
    assert final.attempt_count == 1 and final.start_time.seconds > 0 and final.end_time.seconds > 0

    # from a given event on, and past the end: no waiting
    tail = list(api.jobs.WatchJob(pb.WatchJobRequest(name=job.name, after_sequence=2), metadata=tenant.md,
                                  timeout=10))
    assert [e.sequence for e in tail] == [3, 4]
    assert list(api.jobs.WatchJob(pb.WatchJobRequest(name=job.name, after_sequence=4), metadata=tenant.md,
                                  timeout=10)) == []

    got = api.jobs.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant.md)
    assert got == final and not got.HasField("error")
    first, data = download(api, tenant, f"{job.name}/model")
    assert data == pruned and first.artifact.kind == pb.MODEL and first.artifact.producer_job == job.name
    assert json.loads(download(api, tenant, f"{job.name}/report")[1]) == report
    assert download(api, tenant, final.result_artifacts[0])[1] == pruned
    assert [j.name for j in api.jobs.ListJobs(pb.ListJobsRequest(filter="state=SUCCEEDED"),
                                              metadata=tenant.md).jobs] == [job.name]

    # deleting the job deletes its results and everything under jobs/{id}/
    api.jobs.DeleteJob(pb.DeleteJobRequest(name=job.name), metadata=tenant.md)
    assert not [k for k in store_keys(api.store) if k.startswith(f"jobs/{job_id_of(job)}/")]
    for name in final.result_artifacts:
        expect(rpc_error(api.artifacts.GetArtifact, pb.GetArtifactRequest(name=name), metadata=tenant.md),
               Code.NOT_FOUND, "ARTIFACT_NOT_FOUND")
    api.artifacts.GetArtifact(pb.GetArtifactRequest(name=model.name), metadata=tenant.md)  # the input stays


def test_failed_job_carries_a_status(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    job = create_job(api, tenant, model.name)
    with api.database.session() as s:
        assert jobs.fail(s, job_id_of(job), 3, "UNSAFE_ARCHIVE", "the archive holds a pickled custom object")
    got = api.jobs.GetJob(pb.GetJobRequest(name=job.name), metadata=tenant.md)
    assert got.state == pb.FAILED and got.error.code == 3
    assert got.error.message == "the archive holds a pickled custom object"
    info = error_details_pb2.ErrorInfo()
    assert got.error.details[0].Unpack(info) and (info.reason, info.domain) == ("UNSAFE_ARCHIVE", DOMAIN)
    expect(rpc_error(api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=f"{job.name}/model"),
                     metadata=tenant.md), Code.FAILED_PRECONDITION, "JOB_NOT_SUCCEEDED")
    expect(rpc_error(api.jobs.CancelJob, pb.CancelJobRequest(name=job.name), metadata=tenant.md),
           Code.FAILED_PRECONDITION, "JOB_ALREADY_FINISHED")
    events = list(api.jobs.WatchJob(pb.WatchJobRequest(name=job.name), metadata=tenant.md, timeout=10))
    assert [e.state for e in events] == [pb.QUEUED, pb.FAILED] and events[-1].job.error.code == 3


def test_watch_ends_when_the_client_goes_away(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    job = create_job(api, tenant, model.name)
    labels = {"method": "prunery.v1.JobService/WatchJob", "code": "CANCELLED"}
    before = api.metric("prunery_grpc_requests_total", labels)
    call = api.jobs.WatchJob(pb.WatchJobRequest(name=job.name), metadata=tenant.md)
    assert next(call).state == pb.QUEUED
    call.cancel()
    wait_for(lambda: api.metric("prunery_grpc_requests_total", labels) > before, timeout=5,
             what="the server to end the abandoned watch")


def test_list_jobs_pages_and_filters(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    made = [create_job(api, tenant, model.name) for _ in range(5)]
    api.jobs.CancelJob(pb.CancelJobRequest(name=made[1].name), metadata=tenant.md)
    names, token = [], ""
    while True:
        resp = api.jobs.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token), metadata=tenant.md)
        names += [j.name for j in resp.jobs]
        token = resp.next_page_token
        if not token:
            break
    assert names == [j.name for j in reversed(made)]
    listed = api.jobs.ListJobs(pb.ListJobsRequest(filter="state=CANCELLED AND labels.team=vision"),
                               metadata=tenant.md)
    assert [j.name for j in listed.jobs] == [made[1].name]
    assert len(api.jobs.ListJobs(pb.ListJobsRequest(filter="state=QUEUED"), metadata=tenant.md).jobs) == 4
    assert not api.jobs.ListJobs(pb.ListJobsRequest(filter="labels.team=nlp"), metadata=tenant.md).jobs
    expect(rpc_error(api.jobs.ListJobs, pb.ListJobsRequest(filter="state=DONE"), metadata=tenant.md),
           Code.INVALID_ARGUMENT, "INVALID_FILTER", "filter")


# ---------------------------------------------------------------------------------------------------------
# Queue, health, reflection, metrics, imports, settings
# ---------------------------------------------------------------------------------------------------------

def test_create_job_sends_one_celery_message_through_redis_to_its_queue(pg_url: str, database: Database,
                                                                        tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"prunery-test-{uuid.uuid4().hex[:8]}:"
    settings = Settings(database_url=pg_url, store_url=str(tmp_path / "objects"), listen_address="127.0.0.1:0",
                        broker_url="redis://127.0.0.1:6379/0", queue="jobs", extra_queues=("a100",),
                        broker_keyprefix=prefix, auth_cache_s=0)
    server = build_server(settings, database=database)
    server.start()
    t = new_tenant(pg_url)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            api = Api("folder", server, channel, server.backend.store, database, pg_url, Recorder(), 0)
            model = upload(api, t, b"model bytes")
            rid = uuid.uuid4().hex
            job = create_job(api, t, model.name, rid)
            assert create_job(api, t, model.name, rid) == job and job.queue == "jobs"  # the default queue
            gpu = create_job(api, t, model.name, queue="a100")
            assert gpu.queue == "a100"
            assert api.jobs.GetJob(pb.GetJobRequest(name=gpu.name), metadata=t.md).queue == "a100"
            d = expect(rpc_error(create_job, api, t, model.name, queue="h100"), Code.INVALID_ARGUMENT, "INVALID_FIELD",
                       "job.queue")
            assert "jobs, a100" in d.message
        for queue, created in (("jobs", job), ("a100", gpu)):
            assert client.llen(f"{prefix}{queue}") == 1
            message = json.loads(client.lindex(f"{prefix}{queue}", 0))
            assert message["headers"]["task"] == "prunery.run_job"
            assert job_id_of(created) in message["headers"]["argsrepr"]
        assert client.llen(f"{prefix}h100") == 0
    finally:
        server.stop(0).wait(10)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def test_broker_options_match_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker_app = pytest.importorskip("prunery.worker.app", reason="the worker package is not installed")
    from prunery.service.store.queue import transport_options
    from prunery.worker.settings import WorkerSettings

    for url, prefix in [("filesystem://", ""), ("redis://127.0.0.1:6379/3", "pfx:")]:
        monkeypatch.setenv("PRUNERY_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("PRUNERY_BROKER_URL", url)
        monkeypatch.setenv("PRUNERY_BROKER_KEYPREFIX", prefix)
        ours = transport_options(Settings.from_env())
        theirs = worker_app.broker_transport_options(WorkerSettings.from_env())
        assert {k: v for k, v in theirs.items() if k in ours or "folder" in k or k == "global_keyprefix"} == ours


def test_health_and_reflection_need_no_token(folder_api: Api) -> None:
    health = health_pb2_grpc.HealthStub(folder_api.channel)
    for service in ("", "prunery.v1.ArtifactService", "prunery.v1.JobService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(folder_api.channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    services = {s.name for s in responses[0].list_services_response.service}
    assert {"prunery.v1.ArtifactService", "prunery.v1.JobService", "grpc.health.v1.Health"} <= services


def test_metrics_endpoint(folder_api: Api, tenant: Tenant, model: pb.Artifact) -> None:
    api = folder_api
    api.artifacts.GetArtifact(pb.GetArtifactRequest(name=model.name), metadata=tenant.md)
    rpc_error(api.artifacts.GetArtifact, pb.GetArtifactRequest(name=f"artifacts/{uuid.uuid4()}"), metadata=tenant.md)
    create_job(api, tenant, model.name)
    assert api.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{api.server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = [(smp.name, smp.labels, smp.value) for fam in text_string_to_metric_families(text)
               for smp in fam.samples]

    def value(name: str, **labels: str) -> float:
        return sum(v for n, lab, v in samples if n == name and lab == labels)

    requests = "prunery_grpc_requests_total"
    assert value(requests, method="prunery.v1.ArtifactService/GetArtifact", code="OK") >= 1
    assert value(requests, method="prunery.v1.ArtifactService/GetArtifact", code="NOT_FOUND") >= 1
    assert value(requests, method="prunery.v1.ArtifactService/UploadArtifact", code="OK") >= 1
    assert value(requests, method="prunery.v1.JobService/CreateJob", code="OK") >= 1
    assert value("prunery_grpc_request_duration_seconds_count", method="prunery.v1.JobService/CreateJob") >= 1
    assert value("prunery_grpc_request_duration_seconds_bucket", method="prunery.v1.JobService/CreateJob",
                 le="+Inf") >= 1
    assert value("prunery_jobs_created_total") >= 1
    assert value("prunery_artifact_bytes_total", direction="in") > 0
    assert value("prunery_jobs_queued") >= 1
    assert ("prunery_jobs_running", {}) in [(n, lab) for n, lab, _ in samples]


def test_service_never_imports_torch() -> None:
    code = ("import prunery.service.api.server, prunery.service.api.servicers, prunery.service.store.tokens, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in list(os.environ):
        if k.startswith("PRUNERY_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PRUNERY_DATA_DIR", str(tmp_path))
    s = Settings.from_env()
    assert s.database_url == f"sqlite:///{tmp_path / 'prunery.db'}"
    assert s.store_url == (tmp_path / "objects").as_uri()
    assert (s.broker_url, s.listen_address, s.metrics_port) == ("filesystem://", "127.0.0.1:50051", None)
    assert (s.tenant_cap_bytes, s.chunk_size) == (8 << 30, 1 << 20)
    monkeypatch.setenv("PRUNERY_DATABASE_URL", "postgresql://db/prunery")
    monkeypatch.setenv("PRUNERY_STORE_URL", "s3://bucket/p")
    monkeypatch.setenv("PRUNERY_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("PRUNERY_LISTEN_ADDRESS", "0.0.0.0:7000")
    monkeypatch.setenv("PRUNERY_METRICS_PORT", "9464")
    monkeypatch.setenv("PRUNERY_TENANT_CAP_BYTES", str(1 << 30))
    monkeypatch.setenv("PRUNERY_CHUNK_SIZE", str(512 * KiB))
    s = Settings.from_env()
    assert (s.database_url, s.store_url, s.broker_url) == ("postgresql://db/prunery", "s3://bucket/p",
                                                           "redis://redis:6379/0")
    assert (s.listen_address, s.metrics_port, s.tenant_cap_bytes, s.chunk_size) == ("0.0.0.0:7000", 9464, 1 << 30,
                                                                                     512 * KiB)
    monkeypatch.setenv("PRUNERY_CHUNK_SIZE", str(64 * MiB))
    with pytest.raises(ValueError, match="PRUNERY_CHUNK_SIZE"):
        Settings.from_env()
    monkeypatch.delenv("PRUNERY_CHUNK_SIZE")
    # the admission limits (issue 10): defaults, overrides, and refusals naming the variable
    s = Settings.from_env()
    assert (s.tenant_rate, s.tenant_streams, s.tenant_max_queued, s.max_pending, s.max_message_bytes) == \
        (2000.0, 1000, 1000, 256, 16 << 20)
    for name, value in (("PRUNERY_TENANT_RATE", "0"), ("PRUNERY_TENANT_STREAMS", "500"),
                        ("PRUNERY_TENANT_MAX_QUEUED", "3"), ("PRUNERY_MAX_PENDING", "8")):
        monkeypatch.setenv(name, value)
    s = Settings.from_env()
    assert (s.tenant_rate, s.tenant_streams, s.tenant_max_queued, s.max_pending) == (0.0, 500, 3, 8)
    for name, bad in (("PRUNERY_TENANT_RATE", "-1"), ("PRUNERY_TENANT_STREAMS", "many"), ("PRUNERY_MAX_PENDING", "0"),
                      ("PRUNERY_MAX_MESSAGE_BYTES", str(1 << 20)), ("PRUNERY_MAX_STREAMS", "0")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            Settings.from_env()
        monkeypatch.delenv(name)


def test_embedded_defaults_sqlite_folder_and_filesystem_broker(tmp_path: Path) -> None:
    """What `prunery up` runs: SQLite, a folder store and the filesystem broker, all under one data dir."""
    settings = Settings(data_dir=tmp_path, listen_address="127.0.0.1:0", auth_cache_s=0, watch_poll_s=0.05)
    db.upgrade(settings.database_url)
    t = Tenant("local", tokens.create(settings.database_url, "local"))
    server = build_server(settings)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            api = Api("folder", server, channel, server.backend.store, server.backend.database,
                      settings.database_url, Recorder(), 0)
            data = os.urandom(100 * KiB)
            model = upload(api, t, data)
            assert download(api, t, model.name)[1] == data
            rid = uuid.uuid4().hex
            job = create_job(api, t, model.name, rid)
            assert create_job(api, t, model.name, rid) == job
            messages = list((tmp_path / "broker" / "queue").iterdir())
            assert len(messages) == 1 and job_id_of(job) in messages[0].read_text()
            api.jobs.CancelJob(pb.CancelJobRequest(name=job.name), metadata=t.md)
            events = list(api.jobs.WatchJob(pb.WatchJobRequest(name=job.name), metadata=t.md, timeout=10))
            assert [e.state for e in events] == [pb.QUEUED, pb.CANCELLED]
        assert (tmp_path / "objects" / model.name).is_file()
    finally:
        server.stop(0).wait(10)


# ---------------------------------------------------------------------------------------------------------
# Hostile input: every refusal is INVALID_ARGUMENT with its reason, small, and stores nothing
# ---------------------------------------------------------------------------------------------------------

REPLY_LIMIT = 4 * KiB


def reply_size(err: grpc.RpcError) -> int:
    """Bytes of the error as it travels: its message and its trailing metadata (the Status details)."""
    meta = err.trailing_metadata() or ()
    return len((err.details() or "").encode()) + sum(len(k) + len(v) for k, v in meta)


def small_refusal(err: grpc.RpcError, reason: str, field: str | None = None) -> Details:
    d = expect(err, Code.INVALID_ARGUMENT, reason, field)
    assert reply_size(err) < REPLY_LIMIT, reply_size(err)
    return d


def jobs_of(api: Api, t: Tenant) -> list[Job]:
    with api.database.session() as s:
        return list(s.scalars(select(Job).where(Job.tenant_id == t.name)))


@pytest.mark.parametrize("make_name", [
    lambda n: n + "\n", lambda n: n + " ", lambda n: " " + n, lambda n: n + "\x00", lambda n: n.upper().replace(
        "ARTIFACTS", "Artifacts"), lambda n: n + "/", lambda n: "x" * (1 << 20)],
    ids=["trailing newline", "trailing space", "leading space", "NUL", "wrong case", "trailing slash", "1 MB"])
def test_names_must_match_whole(folder_api: Api, tenant: Tenant, make_name: Callable[[str], str]) -> None:
    api = folder_api
    artifact = upload(api, tenant, b"some bytes")
    bad = make_name(artifact.name)
    for call, request in ((api.artifacts.GetArtifact, pb.GetArtifactRequest(name=bad)),
                          (api.artifacts.DeleteArtifact, pb.DeleteArtifactRequest(name=bad)),
                          (api.artifacts.DownloadArtifact, pb.DownloadArtifactRequest(name=bad)),
                          (api.jobs.GetJob, pb.GetJobRequest(name=bad.replace("artifacts/", "jobs/"))),
                          (api.jobs.WatchJob, pb.WatchJobRequest(name=bad.replace("artifacts/", "jobs/")))):
        d = small_refusal(rpc_error(call, request, metadata=tenant.md, timeout=30), "INVALID_NAME", "name")
        assert len(d.message) < 600 and ("characters)" in d.message) == (len(bad) > 200)
    assert api.artifacts.GetArtifact(pb.GetArtifactRequest(name=artifact.name), metadata=tenant.md).name \
        == artifact.name  # the artifact itself is untouched


def test_huge_inputs_are_refused_with_their_reason_in_a_small_reply(folder_api: Api, tenant: Tenant) -> None:
    api = folder_api
    model = upload(api, tenant, b"a model")
    # a 1 MB model name in a job spec
    job = pb.Job(spec=pb.PruneSpec(model="artifacts/" + "x" * (1 << 20), ratio=0.5))
    d = small_refusal(rpc_error(api.jobs.CreateJob, pb.CreateJobRequest(job=job), metadata=tenant.md, timeout=30),
                      "INVALID_FIELD", "job.spec.model")
    assert "(1048586 characters)" in d.fields["job.spec.model"]
    # a 100 KB list filter
    for call, request in ((api.jobs.ListJobs, pb.ListJobsRequest(filter="state=" + "Q" * 100_000)),
                          (api.artifacts.ListArtifacts, pb.ListArtifactsRequest(filter="labels.a=" + "b" * 100_000))):
        d = small_refusal(rpc_error(call, request, metadata=tenant.md, timeout=30), "INVALID_FILTER", "filter")
        assert "at most 4096 characters" in d.message
    # a 10 MB label map: 1,000 labels of 10 KB, on a job and on an upload
    labels = {f"k{i}": "v" * 10_000 for i in range(1000)}
    job = pb.Job(spec=pb.PruneSpec(model=model.name, ratio=0.5), labels=labels)
    d = small_refusal(rpc_error(api.jobs.CreateJob, pb.CreateJobRequest(job=job), metadata=tenant.md, timeout=30),
                      "INVALID_FIELD", "job.labels")
    assert "at most 64 labels; got 1000" in d.fields["job.labels"]
    one_huge = {"big": "v" * (10 << 20)}
    small_refusal(rpc_error(upload, api, tenant, b"data", labels=one_huge), "INVALID_FIELD")
    many_bad = {f"bad key {i}" + "k" * 1000: "v" for i in range(60)}  # 60 violations: 5 listed, the rest counted
    d = small_refusal(rpc_error(upload, api, tenant, b"data", labels=many_bad), "INVALID_FIELD")
    assert len(d.fields) == 6 and "55 more violation(s) not listed" in d.fields[""]
    # a 1 MB request_id and queue name
    job = pb.Job(spec=pb.PruneSpec(model=model.name, ratio=0.5), queue="q" * (1 << 20))
    small_refusal(rpc_error(api.jobs.CreateJob, pb.CreateJobRequest(job=job), metadata=tenant.md, timeout=30),
                  "INVALID_FIELD", "job.queue")
    small_refusal(rpc_error(api.jobs.CreateJob, pb.CreateJobRequest(job=job, request_id="r" * (1 << 20)),
                            metadata=tenant.md, timeout=30), "INVALID_FIELD", "request_id")
    # nothing was stored: no job, and no artifact but the model
    assert jobs_of(api, tenant) == []
    with api.database.session() as s:
        assert [a.id for a in s.scalars(select(Artifact).where(Artifact.tenant_id == tenant.name))] \
            == [uuid.UUID(model.name.split("/")[1])]
