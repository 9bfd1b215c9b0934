"""Object stores against real backends: a folder, and moto's S3-compatible HTTP server on a loopback port."""

from __future__ import annotations

import hashlib
import os
import sys
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prunery.service.store import objectstore, testing
from prunery.service.store.objectstore import (
    FolderStore,
    InvalidRange,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    TooLarge,
    open_store,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("moto", reason="moto[server] (dev extra) provides the S3 test server")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in testing.MOTO_CREDENTIALS.items():
            mp.setenv(k, v)
        with testing.moto_server() as endpoint:
            yield endpoint


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint: str) -> str:
    bucket = f"prunery-test-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, endpoint_url=s3_endpoint).ensure_bucket()
    return bucket


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "folder":
        return open_store(str(tmp_path / "objects"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/t-{uuid.uuid4().hex[:8]}/objects?endpoint_url={endpoint}")


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def no_leftovers(store: ObjectStore) -> None:
    """Nothing half-written is left: no temp files, no multipart uploads in progress."""
    if isinstance(store, FolderStore):
        tmp = store.root / ".tmp"
        assert not tmp.exists() or not any(tmp.iterdir())
    else:
        assert isinstance(store, S3Store)
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])
        assert uploads == []


def test_round_trip(store: ObjectStore) -> None:
    data = os.urandom(3 * MiB + 123)
    size, sha = store.put_stream("artifacts/t1/a", chunks_of(data, 64 * 1024))
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.exists("artifacts/t1/a") and store.size("artifacts/t1/a") == len(data)
    assert b"".join(store.open_range("artifacts/t1/a")) == data
    assert all(len(c) <= 1000 for c in store.open_range("artifacts/t1/a", chunk_size=1000))
    # empty chunks are fine; an empty object is an object
    assert store.put_stream("empty", [b"", b""]) == (0, hashlib.sha256(b"").hexdigest())
    assert store.exists("empty") and store.size("empty") == 0 and list(store.open_range("empty")) == []
    # overwrite
    store.put_bytes("artifacts/t1/a", b"new")
    assert store.get_bytes("artifacts/t1/a") == b"new"
    store.delete("artifacts/t1/a")
    store.delete("artifacts/t1/a")  # idempotent
    assert not store.exists("artifacts/t1/a")
    with pytest.raises(ObjectNotFound):
        store.size("artifacts/t1/a")
    with pytest.raises(ObjectNotFound):  # at the call, not at the first chunk
        store.open_range("artifacts/t1/a")


def test_multipart_sized_round_trip(store: ObjectStore) -> None:
    data = os.urandom(17 * MiB + 5)  # three S3 parts: 8 + 8 + 1
    size, sha = store.put_stream("big", chunks_of(data, 3 * MiB + 1))
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert hashlib.sha256(b"".join(store.open_range("big"))).hexdigest() == sha
    no_leftovers(store)


def test_resumable_range_read(store: ObjectStore) -> None:
    data = os.urandom(2 * MiB + 7)
    store.put_bytes("model.pt2", data)
    received = bytearray()
    stream = store.open_range("model.pt2", chunk_size=256 * 1024)
    for chunk in stream:  # the connection "drops" part way
        received += chunk
        if len(received) >= MiB:
            break
    stream.close()
    for chunk in store.open_range("model.pt2", offset=len(received)):
        received += chunk
    assert bytes(received) == data
    assert b"".join(store.open_range("model.pt2", offset=len(data) - 3)) == data[-3:]
    assert list(store.open_range("model.pt2", offset=len(data))) == []
    with pytest.raises(InvalidRange):
        store.open_range("model.pt2", offset=len(data) + 1)
    with pytest.raises(InvalidRange):
        store.open_range("model.pt2", offset=-1)


@pytest.mark.parametrize("total", [3 * MiB, 20 * MiB])  # below and above one S3 part
def test_size_cap_raises_too_large_and_stores_nothing(store: ObjectStore, total: int) -> None:
    store.put_bytes("capped", b"old")
    with pytest.raises(TooLarge) as info:
        store.put_stream("capped", chunks_of(bytes(total), MiB), max_bytes=total - 1)
    assert info.value.max_bytes == total - 1
    assert store.get_bytes("capped") == b"old"  # the previous object is untouched
    with pytest.raises(TooLarge):
        store.put_stream("capped-new", chunks_of(bytes(total), MiB), max_bytes=total - 1)
    assert not store.exists("capped-new")
    assert store.put_stream("exact", chunks_of(bytes(total), MiB), max_bytes=total)[0] == total
    no_leftovers(store)


@pytest.mark.parametrize("fail_after", [2 * MiB, 18 * MiB])  # before and after S3 parts were sent
def test_source_failing_mid_stream_leaves_no_object(store: ObjectStore, fail_after: int) -> None:
    def source() -> Iterator[bytes]:
        sent = 0
        while True:
            if sent >= fail_after:
                raise ConnectionResetError("client went away")
            yield bytes(MiB)
            sent += MiB

    with pytest.raises(ConnectionResetError):
        store.put_stream("half", source())
    assert not store.exists("half")
    no_leftovers(store)


def test_delete_prefix(store: ObjectStore) -> None:
    for key in ["jobs/1/model.pt2", "jobs/1/report.json", "jobs/1/sub/x", "jobs/10/model.pt2", "jobs/2/model.pt2"]:
        store.put_bytes(key, key.encode())
    assert store.delete_prefix("jobs/1/") == 3
    assert [k for k in ["jobs/1/model.pt2", "jobs/10/model.pt2", "jobs/2/model.pt2"] if store.exists(k)] == [
        "jobs/10/model.pt2", "jobs/2/model.pt2"]
    assert store.delete_prefix("jobs/1/") == 0
    assert store.delete_prefix("jobs/") == 2
    assert not store.exists("jobs/2/model.pt2")


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", ".tmp/x", "a/.hidden", "a\\b", "a/b/",
                                 "a/b\n"])
def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.exists(key)


def test_fifty_megabytes_stream_with_bounded_memory(store: ObjectStore) -> None:
    block = os.urandom(MiB)
    total = 50 * MiB
    expected = hashlib.sha256()
    for _ in range(50):
        expected.update(block)

    tracemalloc.start()
    try:
        size, sha = store.put_stream("huge", (block for _ in range(50)))
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got = hashlib.sha256()
        n = 0
        for chunk in store.open_range("huge"):
            got.update(chunk)
            n += len(chunk)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (size, sha) == (total, expected.hexdigest())
    assert (n, got.hexdigest()) == (total, expected.hexdigest())
    limit = 4 * MiB if isinstance(store, FolderStore) else 16 * MiB  # S3: one 8 MiB part buffer
    assert put_peak < limit, f"upload peak {put_peak / MiB:.1f} MiB"
    assert get_peak < 4 * MiB, f"download peak {get_peak / MiB:.1f} MiB"


def test_folder_writer_starts_the_disk_writes_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each 8 MiB stretch written is handed to the kernel's writeback at once (Linux sync_file_range, not waiting),
    so the fsync at commit does not write a whole large upload after its transfer; the ranges follow each other
    from byte 0 and the object is whole."""
    if sys.platform.startswith("linux"):
        real = objectstore._sync_file_range
        assert real is not None  # the C library has it, and the declared signature works on a real file
        probe = tmp_path / "probe"
        probe.write_bytes(b"x" * 4096)
        with probe.open("rb+") as f:
            assert real(f.fileno(), 0, 4096, objectstore._SYNC_FILE_RANGE_WRITE) == 0
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(objectstore, "_sync_file_range", lambda *args: calls.append(args) or 0)
    store = FolderStore(tmp_path / "objects")
    writer = store.open_writer("big")
    data = os.urandom(20 * MiB + 123)
    for chunk in chunks_of(data, 700 * 1024):
        writer.write(chunk)
    assert isinstance(writer, objectstore._FolderWriter)
    fd = writer.file.fileno() if writer.file is not None else -1
    writer.commit()
    assert [c[0] for c in calls] == [fd] * len(calls) and {c[3] for c in calls} == {objectstore._SYNC_FILE_RANGE_WRITE}
    assert len(calls) == 2 and calls[0][1] == 0
    assert all(c[2] >= 8 * MiB for c in calls)
    assert all(a[1] + a[2] == b[1] for a, b in zip(calls, calls[1:], strict=False))
    assert b"".join(store.open_range("big")) == data


def test_s3_requests_carry_no_default_checksums(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "checksums", endpoint_url=s3_endpoint)
    seen: list[dict[str, str]] = []
    store.client.meta.events.register("before-send.s3.*", lambda request, **_: seen.append(dict(request.headers)))
    store.put_stream("small", [b"abc"])
    store.put_stream("multi", chunks_of(bytes(9 * MiB), MiB))
    assert b"".join(store.open_range("multi", offset=9 * MiB - 2)) == b"\0\0"
    assert len(seen) >= 5
    for headers in seen:
        assert not any(h.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum")) for h in headers), headers


def test_open_store_urls(tmp_path: Path) -> None:
    folder = open_store((tmp_path / "a").as_uri())
    assert isinstance(folder, FolderStore) and folder.root == tmp_path / "a"
    assert isinstance(open_store(str(tmp_path / "b")), FolderStore)
    s3 = open_store("s3://bucket/some/prefix/?endpoint_url=http://127.0.0.1:9&region=eu-west-1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9" and s3.client.meta.region_name == "eu-west-1"
    assert open_store("s3://bucket").prefix == ""
    for bad in ["ftp://x/y", "s3:///nobucket", "s3://b/p?bogus=1", "file://remote-host/x"]:
        with pytest.raises(ValueError):
            open_store(bad)
