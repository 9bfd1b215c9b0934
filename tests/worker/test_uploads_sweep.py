"""The sweep of unfinished uploads (`prunery.worker.reaper.sweep_pending_uploads`) on real parts: a throwaway
Postgres database, a folder store and moto's S3-compatible HTTP server, and for the race with a live upload,
the gRPC API on a loopback port.

A crash of the API mid-upload is simulated by writing what it leaves directly: a PENDING artifact row,
with or without its object, and a folder store's temporary file."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from prunery.service.api.server import build_server
from prunery.service.api.settings import Settings
from prunery.service.store import testing, tokens
from prunery.service.store.db import Artifact, ArtifactKind, ArtifactState, Database, ensure_tenant, upgrade, utcnow
from prunery.service.store.objectstore import FolderStore, ObjectStore, S3Store, open_store
from prunery.v1 import prunery_pb2 as pb
from prunery.v1 import prunery_pb2_grpc as pb_grpc
from prunery.worker.reaper import Reaper, sweep_pending_uploads
from prunery.worker.settings import WorkerSettings

TTL_S = 3600.0
TENANT = "acme"


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with testing.temporary_postgres_database(prefix="prunery_sweep_test") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    with database.session() as s:
        ensure_tenant(s, TENANT)
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def s3_store() -> Iterator[S3Store]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in testing.MOTO_CREDENTIALS.items():
            mp.setenv(k, v)
        with testing.moto_server() as endpoint:
            store = open_store(f"s3://prunery-sweep-{uuid.uuid4().hex[:12]}/objects?endpoint_url={endpoint}")
            assert isinstance(store, S3Store)
            store.ensure_bucket()
            yield store


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "folder":
        return FolderStore(tmp_path / "objects")
    return request.getfixturevalue("s3_store")


def leftover(database: Database, store: ObjectStore, *, age_s: float, state: str = ArtifactState.PENDING.value,
             stored: bool = True) -> uuid.UUID:
    """An artifact row created `age_s` ago, with its object when `stored`."""
    artifact_id = uuid.uuid4()
    key = f"artifacts/{artifact_id}"
    data = os.urandom(1000)
    if stored:
        store.put_bytes(key, data)
    with database.session() as s:
        s.add(Artifact(id=artifact_id, tenant_id=TENANT, display_name="model.pt2", kind=ArtifactKind.MODEL.value,
                       state=state, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), labels={},
                       storage_key=key, create_time=utcnow() - timedelta(seconds=age_s)))
    return artifact_id


def states(database: Database, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    with database.session() as s:
        return {i: st for i, st in s.execute(select(Artifact.id, Artifact.state).where(Artifact.id.in_(ids)))}


def stale_temp_file(store: FolderStore, age_s: float) -> Path:
    """A temporary file like those `put_stream` writes, last written `age_s` ago."""
    tmp = store.root / ".tmp"
    tmp.mkdir(exist_ok=True)
    path = tmp / f"upload-{uuid.uuid4().hex[:8]}"
    path.write_bytes(b"half an upload")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------

def test_sweep_deletes_what_a_crash_left(database: Database, store: ObjectStore) -> None:
    crashed_after_store = leftover(database, store, age_s=2 * TTL_S)  # killed before the row became READY
    crashed_mid_stream = leftover(database, store, age_s=2 * TTL_S, stored=False)  # killed before the object
    in_progress = leftover(database, store, age_s=60)  # an upload still streaming
    ready = leftover(database, store, age_s=2 * TTL_S, state=ArtifactState.READY.value)  # finished long ago
    if isinstance(store, FolderStore):
        old_tmp, fresh_tmp = stale_temp_file(store, 2 * TTL_S), stale_temp_file(store, 60)

    with database.session() as s:
        swept = sweep_pending_uploads(s, store, TTL_S)
    assert sorted(swept.artifacts) == sorted([crashed_after_store, crashed_mid_stream])
    assert states(database, [crashed_after_store, crashed_mid_stream, in_progress, ready]) == {
        in_progress: "PENDING", ready: "READY"}
    assert not store.exists(f"artifacts/{crashed_after_store}")
    assert store.exists(f"artifacts/{in_progress}") and store.exists(f"artifacts/{ready}")
    if isinstance(store, FolderStore):
        assert swept.temp_files == 1
        assert not old_tmp.exists() and fresh_tmp.exists()
        fresh_tmp.unlink()
    else:
        assert swept.temp_files == 0  # S3: a bucket lifecycle rule aborts incomplete multipart uploads

    with database.session() as s:  # nothing left to do
        again = sweep_pending_uploads(s, store, TTL_S)
    assert (again.artifacts, again.temp_files) == ([], 0)

    with database.session() as s:  # tidy up the module's shared tenant
        for artifact_id in (in_progress, ready):
            s.delete(s.get(Artifact, artifact_id))
    store.delete(f"artifacts/{in_progress}")
    store.delete(f"artifacts/{ready}")


def test_sweep_skips_rows_another_reaper_holds(database: Database, tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "objects")
    artifact_id = leftover(database, store, age_s=2 * TTL_S)
    with database.session() as other:
        other.scalars(select(Artifact).where(Artifact.id == artifact_id).with_for_update()).one()
        with database.session() as s:
            assert sweep_pending_uploads(s, store, TTL_S).artifacts == []  # skipped, not waited for
        assert store.exists(f"artifacts/{artifact_id}")
    with database.session() as s:
        assert sweep_pending_uploads(s, store, TTL_S).artifacts == [artifact_id]
    assert states(database, [artifact_id]) == {}
    assert not store.exists(f"artifacts/{artifact_id}")


def test_reaper_sweeps_unfinished_uploads(database_url: str, database: Database, tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "objects")
    old, fresh = leftover(database, store, age_s=2 * TTL_S), leftover(database, store, age_s=60)
    settings = WorkerSettings(data_dir=tmp_path, database_url=database_url, store_url=store.url,
                              broker_url="redis://127.0.0.1:6379/0", reaper_interval_s=0.1, resend_queued_s=0,
                              pending_upload_ttl_s=TTL_S, tmp_dir=tmp_path / "tmp")

    def swept_total() -> float:
        return REGISTRY.get_sample_value("prunery_uploads_swept_total") or 0.0

    before = swept_total()
    reaper = Reaper(settings, celery=None)  # no job to send: the broker is never used
    reaper.start()
    try:
        wait_for(lambda: swept_total() - before >= 1, what="the reaper to sweep the unfinished upload")
    finally:
        reaper.stop()
    assert swept_total() - before == 1
    assert states(database, [old, fresh]) == {fresh: "PENDING"}
    assert not store.exists(f"artifacts/{old}") and store.exists(f"artifacts/{fresh}")
    with database.session() as s:
        s.delete(s.get(Artifact, fresh))


def test_pending_upload_ttl_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("PRUNERY_")]:
        monkeypatch.delenv(k)
    assert WorkerSettings.from_env().pending_upload_ttl_s == 6 * 3600
    monkeypatch.setenv("PRUNERY_PENDING_UPLOAD_TTL_S", "600")
    assert WorkerSettings.from_env().pending_upload_ttl_s == 600
    monkeypatch.setenv("PRUNERY_PENDING_UPLOAD_TTL_S", "0")
    with pytest.raises(ValueError, match="PRUNERY_PENDING_UPLOAD_TTL_S"):
        WorkerSettings.from_env()


# ---------------------------------------------------------------------------------------------------------
# A live upload whose reservation was swept (it outlived the TTL)
# ---------------------------------------------------------------------------------------------------------

def test_upload_outliving_the_ttl_fails_and_leaves_nothing(database_url: str, database: Database,
                                                           tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "objects")
    settings = Settings(database_url=database_url, store_url=store.url, listen_address="127.0.0.1:0",
                        metrics_port=0, tenant_cap_bytes=1 << 20, auth_cache_s=0, grpc_workers=4)
    server = build_server(settings, database=database, store=store, enqueue=lambda _job_id, _queue: None)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    md = (("authorization", f"Bearer {tokens.create(database_url, tenant)}"),)
    data = os.urandom(100_000)
    release = threading.Event()

    def blocked() -> Iterator[pb.UploadArtifactRequest]:
        yield pb.UploadArtifactRequest(metadata=pb.Artifact(kind=pb.MODEL, size_bytes=len(data),
                                                            sha256=hashlib.sha256(data).hexdigest()))
        yield pb.UploadArtifactRequest(chunk=data[:1000])
        release.wait(30)
        yield pb.UploadArtifactRequest(chunk=data[1000:])

    def rows() -> list[Artifact]:
        with database.session() as s:
            return list(s.scalars(select(Artifact).where(Artifact.tenant_id == tenant)))

    try:
        future = pb_grpc.ArtifactServiceStub(channel).UploadArtifact.future(blocked(), metadata=md, timeout=60)
        try:
            wait_for(lambda: len(rows()) == 1, what="the upload to reserve its row")
            [row] = rows()
            with database.session() as s:  # the upload has been going on for longer than the TTL
                s.execute(update(Artifact).where(Artifact.id == row.id)
                          .values(create_time=utcnow() - timedelta(seconds=2 * TTL_S)))
            with database.session() as s:
                swept = sweep_pending_uploads(s, store, TTL_S)
            assert (swept.artifacts, swept.temp_files) == ([row.id], 0)  # its temporary file is being written
        finally:
            release.set()
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=60)
        status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
        assert status is not None and info.value.code() == grpc.StatusCode.ABORTED
        reasons = []
        for d in status.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error = error_details_pb2.ErrorInfo()
                d.Unpack(error)
                reasons.append(error.reason)
        assert reasons == ["UPLOAD_EXPIRED"]
        assert rows() == []
        assert not store.exists(f"artifacts/{row.id}")
        assert list((store.root / ".tmp").iterdir()) == []
    finally:
        channel.close()
        server.stop(0).wait(10)
