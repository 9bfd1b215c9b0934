"""Blob storage behind a URL: a local folder (the embedded default) or any S3-compatible store.

    open_store("file:///var/lib/prunery/objects")     # or a plain path
    open_store("s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1")

Bytes always stream: `open_writer` takes chunks pushed one at a time (and `put_stream`, built on it, an
iterable of chunks), holding at most one S3 part (8 MiB) in memory, hashing as it goes, all-or-nothing: on
any exception (the source failing, the size cap (`TooLarge`), the store failing) no object is left behind
under the key, and an existing object there is untouched. `open_range` streams an object from a byte
offset, so interrupted downloads resume.

A process killed in the middle of `put_stream` runs no cleanup. What it leaves depends on the store:
`FolderStore` leaves its temporary file under `root/.tmp/`, which `remove_stale_temp_files` deletes once
old enough (the workers' reaper calls it); `S3Store` leaves an incomplete multipart upload (for uploads
larger than one part), whose parts are billed but invisible to listings: these are left to a bucket
lifecycle rule, `AbortIncompleteMultipartUpload` (e.g. `DaysAfterInitiation: 1`), which production
buckets should carry.

S3 credentials and defaults come from the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3, ...). Recent boto3 adds CRC checksums to every request and validates
them on responses, which several S3-compatible servers reject: we ask for checksums only where an operation
requires them. Query options of an s3:// URL: endpoint_url, region, addressing_style (path|virtual|auto;
path by default when an endpoint is given).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["DEFAULT_CHUNK_SIZE", "FolderStore", "InvalidRange", "ObjectNotFound", "ObjectStore", "ObjectStoreError",
           "ObjectWriter",
           "S3_PART_SIZE", "S3Store", "TooLarge", "open_store", "validate_key"]

DEFAULT_CHUNK_SIZE = 1 << 20  # what open_range yields; below gRPC's 4 MiB default message limit
S3_PART_SIZE = 8 << 20  # multipart part size (S3's minimum is 5 MiB for all but the last part)

_SEGMENT = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*")  # a whole segment (fullmatch: `$` allows a newline)


class ObjectStoreError(Exception):
    pass


class TooLarge(ObjectStoreError):
    """The stream passed `max_bytes`; nothing was stored."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"object larger than the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


class ObjectNotFound(ObjectStoreError, LookupError):
    pass


class InvalidRange(ObjectStoreError, ValueError):
    pass


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Keys are '/'-separated segments of [A-Za-z0-9._=+-], none empty or starting with '.', so a key can
    never escape the store's folder. A prefix may end with '/'."""
    body = key[:-1] if prefix and key.endswith("/") else key
    if not body or len(key) > 1024 or not all(_SEGMENT.fullmatch(s) for s in body.split("/")):
        raise ValueError(f"invalid object {'prefix' if prefix else 'key'} {key!r}")
    return key


class ObjectWriter(ABC):
    """An object being written, pushed chunk by chunk (the API writes each chunk as it arrives, off its event
    loop, without a thread held for the whole upload): `write` each chunk, then `commit` (the object appears
    whole under its key) or `abort` (nothing appears; an existing object under the key is untouched)."""

    def __init__(self, max_bytes: int | None) -> None:
        self._counter = _Counter(max_bytes)
        self.committed = False  # the object is visible under its key

    def write(self, chunk: bytes) -> None:
        """Add a chunk; TooLarge once the cap is passed (the caller then aborts)."""
        if chunk:
            self._counter.add(chunk)
            self._write(chunk)

    def sha256_hex(self) -> str:
        """The SHA-256 of what was written so far (before `commit`: to check it first)."""
        return self._counter.hash.hexdigest()

    def commit(self) -> tuple[int, str]:
        """Make the object visible; return (size, sha256 hex)."""
        self._commit()
        self.committed = True
        return self._counter.size, self._counter.hash.hexdigest()

    @abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written (idempotent; never raises for a store that is away)."""


class ObjectStore(ABC):
    url: str

    @abstractmethod
    def open_writer(self, key: str, max_bytes: int | None = None) -> ObjectWriter:
        """A writer of a new object under `key` (see ObjectWriter)."""

    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> tuple[int, str]:
        """Store the concatenated chunks under `key`; return (size, sha256 hex). All or nothing."""
        writer = self.open_writer(key, max_bytes)
        try:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    @abstractmethod
    def open_range(self, key: str, offset: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Chunks of the object from byte `offset` on. Raises ObjectNotFound / InvalidRange at the call, not
        at the first chunk. An offset equal to the size yields nothing."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFound if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object if it exists (idempotent)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix` (e.g. "jobs/{id}/"); return how many."""

    def put_bytes(self, key: str, data: bytes, max_bytes: int | None = None) -> tuple[int, str]:
        return self.put_stream(key, [data], max_bytes)

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory: for small objects only (reports)."""
        return b"".join(self.open_range(key))

    def remove_stale_temp_files(self, older_than_s: float) -> int:
        """Delete what `put_stream` calls killed mid-write left behind, untouched for `older_than_s`;
        return how many. Nothing by default (S3: a bucket lifecycle rule, see the module doc)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class _Counter:
    """Counts and hashes a stream, raising TooLarge as soon as it passes the cap."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes, self.size, self.hash = max_bytes, 0, hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLarge(self.max_bytes)
        self.hash.update(chunk)


# ---------------------------------------------------------------------------------------------------------
# A local folder
# ---------------------------------------------------------------------------------------------------------

def _iter_file(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_size):
            yield chunk


_WRITEBACK_BYTES = 8 << 20  # a folder writer asks the kernel to start writing each such stretch to disk


def _load_sync_file_range() -> Any:
    """Linux's sync_file_range(2) from the C library, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range of a file to disk without waiting (as RocksDB's `bytes_per_sync`), so the fsync at
    commit finds little left to write and a large upload's disk writes overlap its transfer instead of following
    it. Nothing where the call does not exist; a failure only loses the head start."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FolderWriter(ObjectWriter):
    def __init__(self, dest: Path, tmp_dir: Path, max_bytes: int | None) -> None:
        super().__init__(max_bytes)
        self.dest = dest
        tmp_dir.mkdir(exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self.file: BinaryIO | None = os.fdopen(fd, "wb")
        self.written = self.written_back = 0  # bytes written; bytes whose writeback has been started

    def _write(self, chunk: bytes) -> None:
        assert self.file is not None, "write after commit or abort"
        self.file.write(chunk)
        self.written += len(chunk)
        if self.written - self.written_back >= _WRITEBACK_BYTES:
            self.file.flush()
            _start_writeback(self.file.fileno(), self.written_back, self.written - self.written_back)
            self.written_back = self.written

    def _commit(self) -> None:
        assert self.file is not None, "commit after commit or abort"
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, self.dest)
            _fsync_dir(self.dest.parent)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class FolderStore(ObjectStore):
    """Objects are files under `root`; uploads go to `root/.tmp/` and are renamed into place when complete
    (fsynced first), so readers never see a partial object, even across a crash."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._tmp = self.root / ".tmp"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def open_writer(self, key: str, max_bytes: int | None = None) -> ObjectWriter:
        return _FolderWriter(self._path(key), self._tmp, max_bytes)

    def open_range(self, key: str, offset: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by _iter_file
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        size = os.fstat(f.fileno()).st_size
        if not 0 <= offset <= size:
            f.close()
            raise InvalidRange(f"offset {offset} outside 0..{size} of {key!r}")
        f.seek(offset)
        return _iter_file(f, chunk_size)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
        self._prune_empty_dirs(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        validate_key(prefix, prefix=True)
        parent_key, _, start = prefix.rpartition("/")
        parent = self.root / parent_key if parent_key else self.root
        if not parent.is_dir():
            return 0
        count = 0
        for entry in parent.iterdir():
            if not entry.name.startswith(start) or entry == self._tmp:
                continue
            if entry.is_dir() and not entry.is_symlink():
                count += sum(1 for p in entry.rglob("*") if p.is_file())
                shutil.rmtree(entry)
            else:
                entry.unlink()
                count += 1
        self._prune_empty_dirs(parent)
        return count

    def remove_stale_temp_files(self, older_than_s: float) -> int:
        """Delete the temporary files of `.tmp/` not written for `older_than_s` (a live upload writes to
        its file all along, so only those of killed processes get that old); return how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._tmp.glob("upload-*") if self._tmp.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def _prune_empty_dirs(self, path: Path) -> None:
        while path != self.root and self.root in path.parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent


# ---------------------------------------------------------------------------------------------------------
# S3-compatible stores
# ---------------------------------------------------------------------------------------------------------

def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _iter_body(body: Any, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()


class _S3Writer(ObjectWriter):
    """Holds at most one part in memory: up to one part goes up in one PUT, more as a multipart upload
    (aborted on failure)."""

    def __init__(self, store: S3Store, s3key: str, max_bytes: int | None) -> None:
        super().__init__(max_bytes)
        self.store, self.s3key = store, s3key
        self.client, self.bucket, self.part_size = store.client, store.bucket, store.part_size
        self.buf: bytearray | None = None  # one part, allocated once the stream has data; sent when full
        self.filled = 0
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def _send_part(self, data: bytearray | bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.s3key)["UploadId"]
        number = len(self.parts) + 1
        resp = self.client.upload_part(Bucket=self.bucket, Key=self.s3key, UploadId=self.upload_id,
                                       PartNumber=number, Body=data, ContentLength=len(data))
        self.parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk).cast("B")
        while view:
            if self.buf is None:
                self.buf = bytearray(self.part_size)
            if self.filled == self.part_size:  # full, and more data follows: it is not the last part
                self._send_part(self.buf)
                self.filled = 0
            n = min(len(view), self.part_size - self.filled)
            self.buf[self.filled:self.filled + n] = view[:n]
            self.filled += n
            view = view[n:]

    def _commit(self) -> None:
        last: bytearray | bytes = b""
        if self.buf is not None:
            del self.buf[self.filled:]  # the last part, trimmed in place
            last, self.buf = self.buf, None
        try:
            if self.upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=self.s3key, Body=last, ContentLength=len(last))
            else:
                self._send_part(last)
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.s3key, UploadId=self.upload_id,
                                                      MultipartUpload={"Parts": self.parts})
                self.upload_id = None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.buf = None
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.s3key, UploadId=self.upload_id)
            self.upload_id = None


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix/`. Uploads up to one part go up in one PUT; larger ones as a
    multipart upload of `part_size` parts, aborted on any failure."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 addressing_style: str | None = None, part_size: int = S3_PART_SIZE, client: Any = None) -> None:
        if part_size < 5 << 20:
            raise ValueError("S3 parts must be at least 5 MiB")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.url = f"s3://{bucket}/{self.prefix}"
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": addressing_style or ("path" if endpoint_url else "auto")},
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=config)
        self.client = client

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for development stacks; production provisions it)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _error_code(e) not in _NOT_FOUND | {"NoSuchBucket"}:
                raise
            region = self.client.meta.region_name
            kwargs: dict[str, Any] = {}
            if region and region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self.client.create_bucket(Bucket=self.bucket, **kwargs)

    def open_writer(self, key: str, max_bytes: int | None = None) -> ObjectWriter:
        return _S3Writer(self, self._key(key), max_bytes)

    def open_range(self, key: str, offset: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        if offset < 0:
            raise InvalidRange(f"negative offset {offset}")
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except ClientError as e:
            code = _error_code(e)
            if code in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            if code in ("InvalidRange", "416"):
                size = self.size(key)
                if offset == size:
                    return iter(())
                raise InvalidRange(f"offset {offset} outside 0..{size} of {key!r}") from None
            raise
        return _iter_body(resp["Body"], chunk_size)

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as e:
            if _error_code(e) in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        from botocore.exceptions import ClientError

        full = self.prefix + validate_key(prefix, prefix=True)
        count = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys = [obj["Key"] for obj in page.get("Contents", [])]
            if not keys:
                continue
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys], "Quiet": True})
                if resp.get("Errors"):
                    raise ObjectStoreError(f"could not delete {len(resp['Errors'])} objects under {full!r}: "
                                           f"{resp['Errors'][0]}")
            except ClientError:  # some S3-compatible servers lack DeleteObjects: one by one
                for k in keys:
                    self.client.delete_object(Bucket=self.bucket, Key=k)
            count += len(keys)
        # uploads interrupted by a crash (no abort ran) hold storage until aborted
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
            for up in page.get("Uploads", []):
                with contextlib.suppress(ClientError):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        return count


# ---------------------------------------------------------------------------------------------------------

def open_store(url: str) -> ObjectStore:
    """`file:///dir`, a plain path, or `s3://bucket/prefix?endpoint_url=...&region=...&addressing_style=...`."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"no bucket in {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_url", "region", "addressing_style"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in {url!r}")
        return S3Store(parts.netloc, unquote(parts.path), endpoint_url=query.get("endpoint_url"),
                       region=query.get("region"), addressing_style=query.get("addressing_style"))
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URLs must be local: {url!r}")
        return FolderStore(unquote(parts.path))
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
        return FolderStore(url)
    raise ValueError(f"unsupported object store URL {url!r} (use file:///dir, a path, or s3://bucket/prefix)")
