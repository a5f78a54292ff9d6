"""One API over `s3://bucket/prefix` and local paths (plain or `file://`).

Everything large (datasets, shards, checkpoints, models, predictions) moves through here.

S3 settings come from the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for MinIO or Ceph, `AWS_DEFAULT_REGION`), never from
recipes. `MMJOBS_S3_ADDRESSING_STYLE` (auto|path|virtual) defaults to `path` when a custom
endpoint is set, because MinIO and Ceph usually serve path-style only.

**Committed directories.** `put_dir` writes every object first and `_MANIFEST.json` (relative
path, size, sha256 of each file) last. Readers (`get_dir`, `read_manifest`) refuse a directory
without a manifest as incomplete and check sizes and checksums, so an interrupted upload or a
crashed stage is never mistaken for a complete output.

**Failures.** Transient errors (throttling, 5xx, dropped connections, truncated bodies,
timeouts) are retried: by botocore per request (`adaptive` retry mode) and again around every
whole operation here with exponential backoff, because a streamed download that breaks half-way
is not retried by botocore. Permanent errors (403, missing bucket or key) fail at once with a
`StoreError` naming the URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

from mmjobs.logs import get_logger

MANIFEST_NAME = "_MANIFEST.json"
_CHUNK = 1 << 20
log = get_logger(__name__)
T = TypeVar("T")


class StoreError(Exception):
    """A store operation failed for a reason retrying will not fix; the message names the URI."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The object, directory or bucket does not exist."""


class IncompleteDirectoryError(StoreError):
    """A directory has no `_MANIFEST.json`: its writer did not finish."""


class IntegrityError(StoreError):
    """An object is missing, or its size or sha256 differs from the manifest."""


# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class Location:
    """A parsed store URI: `bucket`/`key` for S3, `key` is an absolute path for local files."""

    scheme: str  # "s3" or "file"
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else self.key


def parse(uri: str | os.PathLike) -> Location:
    """Parse `s3://bucket/key`, `file:///abs/path` or a plain local path."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not bucket:
            raise StoreError(f"{text}: no bucket name in S3 URI (expected s3://bucket/prefix)")
        return Location("s3", bucket, key.strip("/"))
    if text.startswith("file://"):
        text = text[7:]
    elif "://" in text:
        raise StoreError(f"{text}: unsupported URI scheme (use s3://bucket/prefix or a local path)")
    return Location("file", "", str(Path(text).expanduser().absolute()))


def is_s3(uri: str | os.PathLike) -> bool:
    """True for `s3://` URIs."""
    return os.fspath(uri).startswith("s3://")


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a store URI (`/`-separated for S3)."""
    text = os.fspath(uri)
    if is_s3(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(text, *parts))


def _safe_relpath(rel: str, where: str) -> str:
    """Reject manifest or listing paths that would escape the target directory."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise IntegrityError(f"{where}: refusing unsafe relative path {rel!r}")
    return str(p)


# --------------------------------------------------------------------------- retries


def _is_retryable(exc: BaseException) -> bool:
    import botocore.exceptions as be
    import urllib3.exceptions

    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or err.get("Code") in {
            "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
            "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
        }
    retryable = (be.HTTPClientError, be.IncompleteReadError, urllib3.exceptions.HTTPError,
                 ConnectionError, TimeoutError)
    with contextlib.suppress(ImportError):
        from s3transfer.exceptions import RetriesExceededError

        retryable = (*retryable, RetriesExceededError)
    return isinstance(exc, retryable)


def _permanent(exc: BaseException, uri: str, action: str) -> StoreError:
    import botocore.exceptions as be

    if isinstance(exc, be.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"} or status == 404:
            what = "bucket does not exist" if code == "NoSuchBucket" else "not found"
            return StoreNotFoundError(f"{uri}: {what} ({action})")
        if status == 403 or code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return StoreError(f"{uri}: access denied ({code}) while trying to {action}; check the "
                              "S3 credentials in the environment / Kubernetes Secret")
        return StoreError(f"{uri}: {code or status} while trying to {action}: {exc}")
    if isinstance(exc, be.NoCredentialsError):
        return StoreError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return StoreError(f"{uri}: failed to {action}: {type(exc).__name__}: {exc}")


def _retry(uri: str, action: str, fn: Callable[[], T]) -> T:
    """Run `fn`, retrying transient failures with exponential backoff and jitter."""
    attempts = int(os.environ.get("MMJOBS_STORE_RETRIES", "8"))
    for attempt in range(attempts):
        try:
            return fn()
        except StoreError:
            raise
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"{uri}: not found ({action})") from e
        except Exception as e:
            if not _is_retryable(e) or attempt == attempts - 1:
                raise _permanent(e, uri, action) from e
            delay = min(10.0, 0.2 * 2**attempt) * (0.5 + random.random())
            log.debug("%s: %s failed (%s), retry %d in %.1fs", uri, action, e, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- S3 client

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _s3():
    """A boto3 S3 client for the current environment (cached; boto3 clients are thread-safe)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = os.environ.get("MMJOBS_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
    key = (endpoint, style, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": os.environ.get("AWS_RETRY_MODE", "adaptive"),
                         "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))},
                s3={"addressing_style": style},
                connect_timeout=10, read_timeout=60, max_pool_connections=32,
            )
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                                           config=config)
        return _clients[key]


def _transfer_config(concurrency: int = 4):
    from boto3.s3.transfer import TransferConfig

    # Parts of 16 MiB above 32 MiB: large checkpoints go up in parallel parts.
    return TransferConfig(multipart_threshold=32 * _CHUNK, multipart_chunksize=16 * _CHUNK,
                          max_concurrency=concurrency, use_threads=concurrency > 1)


# --------------------------------------------------------------------------- single objects


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a listed prefix."""

    uri: str
    relpath: str
    size: int


def exists(uri: str | os.PathLike) -> bool:
    """True if `uri` names an existing object/file or a non-empty prefix/directory."""
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.key).exists()

    def check() -> bool:
        import botocore.exceptions as be

        try:
            _s3().head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except be.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise
        resp = _s3().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/",
                                     MaxKeys=1)
        return resp.get("KeyCount", 0) > 0

    return _retry(str(loc), "check existence", check)


def put_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file to `uri` (atomically for local targets; multipart for large S3 files)."""
    loc, src = parse(uri), Path(local)
    if loc.scheme == "file":
        _atomic_copy(src, Path(loc.key))
        return
    _retry(str(loc), "upload", lambda: _s3().upload_file(str(src), loc.bucket, loc.key,
                                                         Config=_transfer_config()))


def get_file(uri: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy the object at `uri` to a local file, which appears only once complete."""
    loc, dst = parse(uri), Path(local)
    if loc.scheme == "file":
        if not Path(loc.key).is_file():
            raise StoreNotFoundError(f"{loc}: not found (download)")
        _atomic_copy(Path(loc.key), dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _temp_beside(dst) as tmp:
        _retry(str(loc), "download", lambda: _s3().download_file(
            loc.bucket, loc.key, str(tmp), Config=_transfer_config()))
        os.replace(tmp, dst)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Read a whole (small) object into memory."""
    loc = parse(uri)
    if loc.scheme == "file":
        return _retry(str(loc), "read", lambda: Path(loc.key).read_bytes())
    return _retry(str(loc), "read",
                  lambda: _s3().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole (small) object; local writes are atomic."""
    loc = parse(uri)
    if loc.scheme == "file":
        path = Path(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temp_beside(path) as tmp:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return
    _retry(str(loc), "write",
           lambda: _s3().put_object(Bucket=loc.bucket, Key=loc.key, Body=data))


def read_text(uri: str | os.PathLike) -> str:
    """Read a small UTF-8 text object."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write a small UTF-8 text object."""
    write_bytes(uri, text.encode("utf-8"))


@contextlib.contextmanager
def open_read(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open an object for streaming reads (never loads it whole).

    Opening is retried; a stream that breaks later raises, and the caller re-opens.
    """
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            f = open(loc.key, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"{loc}: not found (open)") from e
    else:
        body = _retry(str(loc), "open",
                      lambda: _s3().get_object(Bucket=loc.bucket, Key=loc.key)["Body"])
        # Buffered like a local file, so callers can iterate lines, readline() and read().
        f = io.BufferedReader(_BodyReader(body), buffer_size=_CHUNK)
    try:
        yield f
    finally:
        f.close()


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw binary stream (it iterates chunks, not lines)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


@contextlib.contextmanager
def open_write(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open `uri` for streaming writes; the object appears only when the block exits cleanly.

    S3 writes go to a local temporary file first, then up in one (multipart) transfer.
    """
    loc = parse(uri)
    target = Path(loc.key) if loc.scheme == "file" else Path(tempfile.gettempdir()) / "mmjobs"
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temp_beside(target) as tmp:
        with open(tmp, "wb") as f:
            yield f
        if loc.scheme == "file":
            os.replace(tmp, target)
        else:
            put_file(tmp, uri)


def list_objects(uri: str | os.PathLike) -> Iterator[ObjectInfo]:
    """List every object under the prefix/directory `uri`, recursively, sorted by path."""
    loc = parse(uri)
    if loc.scheme == "file":
        root = Path(loc.key)
        if root.is_file():
            yield ObjectInfo(str(root), root.name, root.stat().st_size)
            return
        # os.walk skips directories that vanish mid-walk (a writer may be renaming files).
        walked = (Path(d) / f for d, _, files in os.walk(root) for f in files)
        for path in sorted(walked):
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # renamed or deleted by a writer since the walk saw it
                continue
            yield ObjectInfo(str(path), path.relative_to(root).as_posix(), size)
        return
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""

    def page_all() -> list[dict]:
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]

    for obj in sorted(_retry(str(loc), "list", page_all), key=lambda o: o["Key"]):
        rel = obj["Key"][len(prefix):]
        yield ObjectInfo(f"s3://{loc.bucket}/{obj['Key']}", rel, obj["Size"])


def delete(uri: str | os.PathLike) -> None:
    """Delete an object or everything under a prefix/directory (no error if absent)."""
    loc = parse(uri)
    if loc.scheme == "file":
        path = Path(loc.key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    keys = [loc.key] + [parse(o.uri).key for o in list_objects(uri)]
    for i in range(0, len(keys), 1000):  # S3 deletes at most 1000 keys per request
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        _retry(str(loc), "delete", lambda b=batch: _s3().delete_objects(
            Bucket=loc.bucket, Delete={"Objects": b, "Quiet": True}))


# --------------------------------------------------------------------------- committed dirs


@dataclass
class FileEntry:
    """One file of a committed directory."""

    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """Contents of `_MANIFEST.json`: what a complete directory holds, plus free metadata."""

    files: list[FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    version: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "total_bytes": self.total_bytes}, indent=1,
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            files = [FileEntry(_safe_relpath(f["path"], where), int(f["size"]), str(f["sha256"]))
                     for f in raw["files"]]
            return cls(files=files, meta=raw.get("meta", {}), created=raw.get("created", ""),
                       version=int(raw.get("version", 1)))
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{where}: unreadable {MANIFEST_NAME}: {e}") from e


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_committed(uri: str | os.PathLike) -> bool:
    """True if the directory at `uri` has a manifest (its writer finished)."""
    return exists(join(uri, MANIFEST_NAME))


def read_manifest(uri: str | os.PathLike) -> Manifest:
    """Read a committed directory's manifest; `IncompleteDirectoryError` if there is none."""
    where = os.fspath(uri)
    try:
        text = read_text(join(uri, MANIFEST_NAME))
    except StoreNotFoundError as e:
        raise IncompleteDirectoryError(
            f"{where}: no {MANIFEST_NAME}, so the directory is incomplete (its upload or stage was "
            "interrupted); re-run the step that writes it") from e
    return Manifest.from_json(text, where)


def put_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, *,
            meta: dict[str, Any] | None = None, workers: int = 8) -> Manifest:
    """Upload a local directory tree to `uri` as a committed directory.

    Any previous manifest at `uri` is removed first, so a half-overwritten directory is never
    read as complete. Files go up in parallel; the manifest is written last.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise StoreNotFoundError(f"{src}: not a directory (upload)")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    delete(join(uri, MANIFEST_NAME))

    def upload(path: Path) -> FileEntry:
        rel = path.relative_to(src).as_posix()
        entry = FileEntry(rel, path.stat().st_size, sha256_file(path))
        put_file(path, join(uri, rel))
        return entry

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = list(pool.map(upload, files))
    manifest = Manifest(files=entries, meta=meta or {})
    write_text(join(uri, MANIFEST_NAME), manifest.to_json())
    return manifest


def commit_dir(uri: str | os.PathLike, *, meta: dict[str, Any] | None = None) -> Manifest:
    """Write the manifest for objects already written under `uri` (checksums them in place).

    For stages that write their outputs straight into a local store directory.
    """
    loc = parse(uri)
    if loc.scheme != "file":
        raise StoreError(f"{loc}: commit_dir works on local directories; use put_dir for S3")
    root = Path(loc.key)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    entries = [FileEntry(p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p))
               for p in files]
    manifest = Manifest(files=entries, meta=meta or {})
    write_text(join(uri, MANIFEST_NAME), manifest.to_json())
    return manifest


def get_dir(uri: str | os.PathLike, local_dir: str | os.PathLike, *,
            workers: int = 8) -> Manifest:
    """Download a committed directory, verifying every file's size and sha256.

    Raises:
        IncompleteDirectoryError: `uri` has no manifest.
        IntegrityError: an object is missing, or its size or checksum differs.
    """
    manifest = read_manifest(uri)
    dst = Path(local_dir)

    def fetch(entry: FileEntry) -> None:
        target = dst / entry.path
        source = join(uri, entry.path)
        for attempt in range(2):  # one re-download: a checksum error may be a bad transfer
            try:
                get_file(source, target)
            except StoreNotFoundError as e:
                raise IntegrityError(f"{source}: listed in the manifest but missing") from e
            problem = _check_file(target, entry)
            if problem is None:
                return
            if attempt == 1 or not is_s3(uri):
                target.unlink(missing_ok=True)
                raise IntegrityError(f"{source}: {problem}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fetch, manifest.files))
    return manifest


def verify_dir(uri: str | os.PathLike) -> Manifest:
    """Check a committed directory in place: every listed object exists with the right size.

    Local directories are also checksummed; S3 objects are checksummed by `get_dir` on download.
    """
    manifest = read_manifest(uri)
    sizes = {o.relpath: o.size for o in list_objects(uri)}
    for entry in manifest.files:
        if entry.path not in sizes:
            raise IntegrityError(f"{join(uri, entry.path)}: listed in the manifest but missing")
        if sizes[entry.path] != entry.size:
            raise IntegrityError(f"{join(uri, entry.path)}: size {sizes[entry.path]} != "
                                 f"manifest {entry.size}")
        if not is_s3(uri):
            problem = _check_file(Path(parse(join(uri, entry.path)).key), entry)
            if problem:
                raise IntegrityError(f"{join(uri, entry.path)}: {problem}")
    return manifest


def copy(src: str | os.PathLike, dst: str | os.PathLike, *, workers: int = 8) -> str:
    """Copy a file or a committed directory between any two store locations.

    Directories must be committed at `src` and are committed at `dst`. Returns a summary line.
    """
    if is_committed(src):
        with tempfile.TemporaryDirectory(prefix="mmjobs-copy-") as tmp:
            manifest = get_dir(src, tmp, workers=workers)
            put_dir(tmp, dst, meta=manifest.meta, workers=workers)
        return f"copied {len(manifest.files)} files ({manifest.total_bytes} bytes) {src} -> {dst}"
    loc = parse(src)
    if (loc.scheme == "file" and Path(loc.key).is_dir()) or (
            loc.scheme == "s3" and exists(src) and not _is_object(loc)):
        raise IncompleteDirectoryError(f"{src}: directory has no {MANIFEST_NAME}; only committed "
                                       "directories are copied")
    with tempfile.TemporaryDirectory(prefix="mmjobs-copy-") as tmp:
        local = Path(tmp) / "object"
        get_file(src, local)
        put_file(local, dst)
        return f"copied 1 file ({local.stat().st_size} bytes) {src} -> {dst}"


def copy_uncommitted(src: str | os.PathLike, dst: str | os.PathLike, *, workers: int = 8) -> str:
    """Copy a plain folder or prefix with no manifest (raw data from elsewhere) and commit it.

    Nothing vouches for the source's completeness: use this only for data you put there.
    """
    with tempfile.TemporaryDirectory(prefix="mmjobs-copy-") as tmp:
        objects = [o for o in list_objects(src) if o.relpath != MANIFEST_NAME]
        if not objects:
            raise StoreNotFoundError(f"{src}: nothing to copy")

        def fetch(obj: ObjectInfo) -> None:
            get_file(obj.uri, Path(tmp) / _safe_relpath(obj.relpath, os.fspath(src)))

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(fetch, objects))
        manifest = put_dir(tmp, dst, workers=workers)
    return (f"copied {len(manifest.files)} files ({manifest.total_bytes} bytes) {src} -> {dst} "
            "and committed it")


# --------------------------------------------------------------------------- helpers


def _is_object(loc: Location) -> bool:
    import botocore.exceptions as be

    try:
        _retry(str(loc), "stat", lambda: _s3().head_object(Bucket=loc.bucket, Key=loc.key))
        return True
    except (StoreNotFoundError, be.ClientError):
        return False


def _check_file(path: Path, entry: FileEntry) -> str | None:
    size = path.stat().st_size
    if size != entry.size:
        return f"size {size} != manifest {entry.size} (corrupt or truncated)"
    digest = sha256_file(path)
    if digest != entry.sha256:
        return f"sha256 {digest[:12]}… != manifest {entry.sha256[:12]}… (corrupt)"
    return None


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(src: Path, dst: Path) -> None:
    with _temp_beside(dst) as tmp:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
