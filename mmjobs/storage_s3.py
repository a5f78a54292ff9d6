"""The S3 side of `mmjobs.storage`: the client, and transfers that survive outages and verify.

Every request goes through `mmjobs.storage_errors.retry` (backoff up to a deadline), one
request at a time, so an outage costs the requests in flight rather than whole transfers:

- **Uploads** of up to 32 MiB are one PUT; larger files go up in parts of 16 MiB (4 at a
  time), each part retried on its own. Every object carries the sha256 of its bytes as user
  metadata (`x-amz-meta-sha256`), which downloads check.
- **Downloads** are ranged GETs pinned to the object's ETag (`If-Match`: an object replaced
  mid-download fails instead of splicing two versions), resumed from the last byte received
  when a connection breaks, in parallel ranges for large objects, until every byte of the
  object's length is in; `storage_objects.fetch_file` then checks the recorded sha256.
- **Streaming reads** (`ObjectReader`) resume the same way.

A multipart upload that fails is aborted when S3 answers; during an outage the abort itself may
fail, and the parts stay invisible but billed: a bucket lifecycle rule
(`AbortIncompleteMultipartUpload`) reaps them.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmjobs.logs import get_logger
from mmjobs.storage_errors import (
    StoreError,
    TransientError,
    is_transient,
    permanent_error,
    retry,
)

log = get_logger(__name__)
MiB = 1 << 20
MULTIPART_THRESHOLD = 32 * MiB
PART_SIZE = 16 * MiB  # S3's minimum is 5 MiB (except the last part), its maximum 10,000 parts
PART_WORKERS = 4
SHA256_META = "sha256"  # user metadata key: x-amz-meta-sha256
_CHUNK = MiB

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def client() -> Any:
    """A boto3 S3 client for the current environment (cached; boto3 clients are thread-safe).

    botocore makes at most `AWS_MAX_ATTEMPTS` (default 3) tries per request itself; the
    deadline-bounded retrying around every request is `storage_errors.retry`'s.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = os.environ.get("MMJOBS_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
    mode = os.environ.get("AWS_RETRY_MODE", "adaptive")
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "3"))
    key = (endpoint, style, mode, attempts, os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_PROFILE"))
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": mode, "max_attempts": attempts},
                s3={"addressing_style": style},
                connect_timeout=10, read_timeout=60, max_pool_connections=64,
            )
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                                           config=config)
        return _clients[key]


# --------------------------------------------------------------------------- upload


def upload(path: Path, bucket: str, key: str, uri: str, sha256: str) -> None:
    """Upload the local file `path` to `bucket`/`key`, recording `sha256` (its digest)."""
    size = path.stat().st_size
    meta = {SHA256_META: sha256}
    if size <= MULTIPART_THRESHOLD:
        def put() -> None:
            with open(path, "rb") as f:
                client().put_object(Bucket=bucket, Key=key, Body=f, Metadata=meta)

        retry(uri, "upload", put)
        return
    part_size = max(PART_SIZE, -(-size // 10_000 // MiB) * MiB)
    ranges = [(start, min(part_size, size - start)) for start in range(0, size, part_size)]
    upload_id = retry(uri, "start a multipart upload", lambda: client().create_multipart_upload(
        Bucket=bucket, Key=key, Metadata=meta)["UploadId"])

    def put_part(number: int) -> dict[str, Any]:
        start, length = ranges[number - 1]

        def send() -> str:
            from s3transfer.utils import ReadFileChunk

            with ReadFileChunk.from_filename(str(path), start, length,
                                             enable_callbacks=False) as body:
                return client().upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                            PartNumber=number, Body=body,
                                            ContentLength=length)["ETag"]

        etag = retry(uri, f"upload part {number}/{len(ranges)}", send)
        return {"PartNumber": number, "ETag": etag}

    try:
        with ThreadPoolExecutor(max_workers=min(PART_WORKERS, len(ranges))) as pool:
            parts = list(pool.map(put_part, range(1, len(ranges) + 1)))
        _complete(bucket, key, uri, upload_id, parts, size, sha256)
    except BaseException:
        with contextlib.suppress(Exception):  # one try: S3 may be the thing that is down
            client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _complete(bucket: str, key: str, uri: str, upload_id: str, parts: list[dict[str, Any]],
              size: int, sha256: str) -> None:
    tries = 0

    def complete() -> None:
        nonlocal tries
        tries += 1
        try:
            client().complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                               MultipartUpload={"Parts": parts})
        except Exception as e:
            # The answer to an earlier try was lost after S3 completed it: the upload id is gone
            # and the object is there, with our size and recorded sha256.
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code == "NoSuchUpload" and tries > 1:
                found = head(bucket, key, uri)
                if found and found["ContentLength"] == size and \
                        found.get("Metadata", {}).get(SHA256_META) == sha256:
                    return
            raise

    retry(uri, "complete the multipart upload", complete)


# --------------------------------------------------------------------------- download


def head(bucket: str, key: str, uri: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None if it does not exist."""
    def stat() -> dict[str, Any] | None:
        import botocore.exceptions as be

        try:
            return client().head_object(Bucket=bucket, Key=key)
        except be.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    return retry(uri, "stat", stat)


def download(bucket: str, key: str, dest: Path, uri: str) -> tuple[int, str | None]:
    """Download `bucket`/`key` into the local file `dest` (every byte range checked in).

    Returns:
        (size, the sha256 recorded at upload or None); the caller checks the bytes against it.

    Raises:
        StoreNotFoundError: no such object.
    """
    info = retry(uri, "stat", lambda: client().head_object(Bucket=bucket, Key=key))
    size, etag = int(info["ContentLength"]), info.get("ETag")
    ranges = [(start, min(start + PART_SIZE, size)) for start in range(0, size, PART_SIZE)]
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)

        def fetch(span: tuple[int, int]) -> None:
            _fetch_range(bucket, key, etag, fd, span[0], span[1], uri)

        with ThreadPoolExecutor(max_workers=max(1, min(PART_WORKERS, len(ranges)))) as pool:
            list(pool.map(fetch, ranges))
    finally:
        os.close(fd)
    return size, info.get("Metadata", {}).get(SHA256_META)


def _fetch_range(bucket: str, key: str, etag: str | None, fd: int, start: int, end: int,
                 uri: str) -> None:
    """Write bytes [start, end) of the object at their offsets in `fd`, resuming after breaks."""
    pos = start

    def attempt() -> None:
        nonlocal pos
        before = pos
        try:
            extra = {"IfMatch": etag} if etag else {}
            body = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={pos}-{end - 1}",
                                       **extra)["Body"]
            with contextlib.closing(body):
                while pos < end:
                    chunk = body.read(min(_CHUNK, end - pos))
                    if not chunk:
                        raise TransientError(f"the body ended at byte {pos} of {end}")
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
        except Exception as e:
            if pos > before and is_transient(e):
                return  # progress was made: resume at once, with a fresh retry deadline
            raise

    while pos < end:
        retry(uri, f"download bytes {pos}-{end - 1}", attempt)


class ObjectReader(io.RawIOBase):
    """A raw binary stream over an S3 object that resumes (Range + If-Match) after breaks."""

    def __init__(self, bucket: str, key: str, uri: str) -> None:
        self._bucket, self._key, self._uri = bucket, key, uri
        resp = retry(uri, "open", lambda: client().get_object(Bucket=bucket, Key=key))
        self._body, self._etag = resp["Body"], resp.get("ETag")
        self._size, self._pos = int(resp["ContentLength"]), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        want = min(len(buffer), self._size - self._pos)
        try:
            data = self._body.read(want)
            if not data:
                raise TransientError(f"the body ended at byte {self._pos} of {self._size}")
        except Exception as e:
            if not is_transient(e):
                raise permanent_error(e, self._uri, "read") from e
            log.info("%s: stream broke at byte %d (%s); resuming", self._uri, self._pos, e)
            data = retry(self._uri, "resume reading", lambda: self._reopen_and_read(want))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _reopen_and_read(self, want: int) -> bytes:
        with contextlib.suppress(Exception):
            self._body.close()
        extra = {"IfMatch": self._etag} if self._etag else {}
        self._body = client().get_object(Bucket=self._bucket, Key=self._key,
                                         Range=f"bytes={self._pos}-", **extra)["Body"]
        data = self._body.read(want)
        if not data:
            raise TransientError(f"the body ended at byte {self._pos} of {self._size}")
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


# --------------------------------------------------------------------------- list, delete


def list_prefix(bucket: str, prefix: str, uri: str, *,
                limit: int | None = None) -> list[dict[str, Any]]:
    """Every object (`Key`, `Size`, ...) under `prefix`, sorted by key (the first `limit`)."""
    def page_all() -> list[dict[str, Any]]:
        if limit is not None:
            resp = client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=limit)
            return resp.get("Contents", [])
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]

    return sorted(retry(uri, "list", page_all), key=lambda o: o["Key"])


def delete_keys(bucket: str, keys: list[str], uri: str) -> None:
    """Delete `keys` (no error for absent ones); keys S3 fails to delete are retried."""
    for i in range(0, len(keys), 1000):  # S3 deletes at most 1000 keys per request
        _delete_batch(bucket, list(keys[i:i + 1000]), uri)


def _delete_batch(bucket: str, pending: list[str], uri: str) -> None:
    def batch() -> None:
        resp = client().delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in pending], "Quiet": True})
        errors = resp.get("Errors") or []  # Quiet: only the keys that failed are reported
        pending[:] = [e["Key"] for e in errors]
        permanent = [e for e in errors if e.get("Code") not in _RETRY_DELETE_CODES]
        if permanent:
            first = permanent[0]
            raise StoreError(f"s3://{bucket}/{first['Key']}: cannot delete it "
                             f"({first.get('Code')}: {first.get('Message')}); "
                             f"{len(permanent) - 1} more keys failed too")
        if pending:
            raise TransientError(f"{len(pending)} keys not deleted yet ({errors[0].get('Code')})")

    retry(uri, "delete", batch)


_RETRY_DELETE_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable",
                                 "RequestTimeout", "OperationAborted"})
