"""Store locations and single objects: URIs, files and S3 objects, read, written, listed.

Part of `mmjobs.storage`, which re-exports everything public here; see its docstring. Local
writes are atomic (a temporary file beside the target, then a rename). S3 objects carry the
sha256 of their bytes (`x-amz-meta-sha256`), and every download and whole read is checked
against it and the object's length.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from mmjobs import storage_s3
from mmjobs.storage_errors import IntegrityError, StoreError, StoreNotFoundError, retry

_CHUNK = 1 << 20


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


def safe_relpath(rel: str, where: str) -> str:
    """Reject manifest or listing paths that would escape the target directory."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise IntegrityError(f"{where}: refusing unsafe relative path {rel!r}")
    return str(p)


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
    if storage_s3.head(loc.bucket, loc.key, str(loc)) is not None:
        return True
    return bool(storage_s3.list_prefix(loc.bucket, loc.key.rstrip("/") + "/", str(loc),
                                       limit=1))


def stat_object(uri: str | os.PathLike) -> dict[str, int | str] | None:
    """Size and identity of a single S3 object (`size`, `etag`, `sha256` when recorded), or
    None when `uri` is not an object (a prefix, or nothing). Local paths: None."""
    loc = parse(uri)
    if loc.scheme == "file":
        return None
    head = storage_s3.head(loc.bucket, loc.key, str(loc))
    if head is None:
        return None
    return {"size": int(head.get("ContentLength", -1)), "etag": head.get("ETag", ""),
            "sha256": head.get("Metadata", {}).get("sha256", "")}


def put_file(local: str | os.PathLike, uri: str | os.PathLike, *,
             sha256: str | None = None) -> None:
    """Copy a local file to `uri` (atomically for local targets; in parts for large S3 files).

    `sha256` (the file's, if the caller has it) saves hashing it again for S3's metadata.
    """
    loc, src = parse(uri), Path(local)
    if loc.scheme == "file":
        _atomic_copy(src, Path(loc.key))
        return
    if not src.is_file():
        raise StoreNotFoundError(f"{src}: not found (upload to {loc})")
    storage_s3.upload(src, loc.bucket, loc.key, str(loc), sha256 or sha256_file(src))


def get_file(uri: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy the object at `uri` to a local file, which appears only once complete.

    S3 downloads are checked against the object's length and its recorded sha256.
    """
    fetch_file(uri, local)


def fetch_file(uri: str | os.PathLike, local: str | os.PathLike) -> tuple[int, str, bool]:
    """`get_file`, returning (size, sha256, whether a sha256 recorded at upload vouched).

    Raises:
        StoreNotFoundError: no such object. IntegrityError: the bytes do not match the
            sha256 recorded at upload (nothing is left at `local`).
    """
    loc, dst = parse(uri), Path(local)
    if loc.scheme == "file":
        if not Path(loc.key).is_file():
            raise StoreNotFoundError(f"{loc}: not found (download)")
        _atomic_copy(Path(loc.key), dst)
        return dst.stat().st_size, sha256_file(dst), False
    with _temp_beside(dst) as tmp:
        size, recorded = storage_s3.download(loc.bucket, loc.key, tmp, str(loc))
        digest = sha256_file(tmp)
        if recorded and recorded != digest:
            raise IntegrityError(f"{loc}: sha256 {digest[:12]}… of the downloaded bytes != "
                                 f"{recorded[:12]}… recorded when it was uploaded (corrupt "
                                 "object)")
        os.replace(tmp, dst)
    return size, digest, bool(recorded)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Read a whole (small) object into memory (S3: checked against its recorded sha256)."""
    loc = parse(uri)
    if loc.scheme == "file":
        return retry(str(loc), "read", lambda: Path(loc.key).read_bytes())

    def read() -> tuple[bytes, str | None]:
        resp = storage_s3.client().get_object(Bucket=loc.bucket, Key=loc.key)
        with contextlib.closing(resp["Body"]) as body:  # botocore checks Content-Length
            return body.read(), resp.get("Metadata", {}).get(storage_s3.SHA256_META)

    data, recorded = retry(str(loc), "read", read)
    if recorded and recorded != hashlib.sha256(data).hexdigest():
        raise IntegrityError(f"{loc}: the bytes read do not match the sha256 recorded when it "
                             "was written (corrupt object)")
    return data


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
    meta = {storage_s3.SHA256_META: hashlib.sha256(data).hexdigest()}
    retry(str(loc), "write", lambda: storage_s3.client().put_object(
        Bucket=loc.bucket, Key=loc.key, Body=data, Metadata=meta))


def read_text(uri: str | os.PathLike) -> str:
    """Read a small UTF-8 text object."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write a small UTF-8 text object."""
    write_bytes(uri, text.encode("utf-8"))


@contextlib.contextmanager
def open_read(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open an object for streaming reads (never loads it whole).

    S3 streams that break are resumed where they broke (see `storage_s3.ObjectReader`).
    """
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            f = open(loc.key, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"{loc}: not found (open)") from e
    else:
        # Buffered like a local file, so callers can iterate lines, readline() and read().
        f = io.BufferedReader(storage_s3.ObjectReader(loc.bucket, loc.key, str(loc)),
                              buffer_size=_CHUNK)
    try:
        yield f
    finally:
        f.close()


def iter_lines(uri: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for every line of an object, streamed.

    Each line keeps its `b"\n"`; only the last can lack one, which for a line-per-record file
    means it was cut off (an interrupted write or download), so readers can tell the two apart.
    Memory is bounded by the longest line.
    """
    with open_read(uri) as f:
        yield from enumerate(f, start=1)


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
    for obj in storage_s3.list_prefix(loc.bucket, prefix, str(loc)):
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
    storage_s3.delete_keys(loc.bucket, keys, str(loc))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- helpers


def _current_umask() -> int:
    """The process umask (reading it means setting it; done once, at import)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
# What a plain `open()` / `mkdir()` would give: 0644 files and 0755 folders under the usual
# umask 022. mkstemp and mkdtemp create 0600 / 0700 (they are private scratch by design), and
# a rename keeps that mode, so files the store writes would be unreadable by other users and
# tools (a shared model folder, a web server over the store) without this.
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def private_to_shared(path: str | os.PathLike, *, tree: bool = False) -> None:
    """Give a file made by mkstemp (or a folder by mkdtemp) the read (and folder search) bits
    `open()`/`mkdir()` would have given it under the process umask (0644 / 0755 usually),
    before it is renamed into place; other bits are kept. `tree`: also everything under a
    folder (what a library saved there with mkstemp, e.g. safetensors shards)."""
    paths = [Path(path)]
    if tree:
        paths += sorted(Path(path).rglob("*"))
    for p in paths:
        if p.is_symlink():
            continue  # chmod would follow it
        wanted = (DIR_MODE & 0o555) if p.is_dir() else (FILE_MODE & 0o444)
        mode = p.stat().st_mode & 0o7777
        if mode | wanted != mode:
            os.chmod(p, mode | wanted)


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` (same filesystem, so os.replace is atomic), with the
    mode a plain `open()` gives (not mkstemp's 0600): the rename keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
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
