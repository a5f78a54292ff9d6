"""One API over `s3://bucket/prefix` and local paths (plain or `file://`).

Everything large (datasets, shards, checkpoints, models, predictions) moves through here.

S3 settings come from the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for MinIO or Ceph, `AWS_DEFAULT_REGION`), never from
recipes. `MMJOBS_S3_ADDRESSING_STYLE` (auto|path|virtual) defaults to `path` when a custom
endpoint is set, because MinIO and Ceph usually serve path-style only.

**Committed directories.** `put_dir` writes every object first and `_MANIFEST.json` (relative
path, size, sha256 of each file) last. Readers (`get_dir`, `read_manifest`) refuse a directory
without a manifest as incomplete and check sizes and checksums, so an interrupted upload or a
crashed stage is never mistaken for a complete output. A committed directory owns its whole
prefix: writing one un-commits the old version first, then uploads, then deletes every object
the new manifest does not list, and only then writes the manifest — a crash at any point leaves
either no manifest or exactly the new contents. `check_dir` compares a directory with its
manifest (sizes, optionally sha256) without downloading it. Only regular files are stored:
symbolic links and special files are refused, never followed, and `_MANIFEST.json` is a name
the store reserves (a nested one is refused).

**Single objects** carry the sha256 of their bytes (`x-amz-meta-sha256` on S3); downloads check
it and the object's length, and `copy` of one file also checks it against the manifest of the
committed directory it belongs to.

**Failures.** Every request is retried on transient errors (refused or reset connections,
timeouts, throttling, 5xx) with backoff up to a deadline (`MMJOBS_STORE_RETRY_DEADLINE_S`,
default 120 s); permanent errors (403, missing bucket or key) fail at once with a `StoreError`
naming the URI.

Modules: this one (committed directories, checks, copies; re-exports the rest),
`storage_objects` (URIs and single objects), `storage_s3` (the S3 client and transfers),
`storage_errors` (error types and the retry policy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from mmjobs import storage_s3
from mmjobs.logs import get_logger
from mmjobs.storage_errors import (  # noqa: F401 - re-exported: the store's public errors
    IncompleteDirectoryError,
    IntegrityError,
    StoreError,
    StoreNotFoundError,
    StoreUnavailableError,
    retry,
)
from mmjobs.storage_objects import (  # noqa: F401 - re-exported: the store's public API
    DIR_MODE,
    FILE_MODE,
    Location,
    ObjectInfo,
    delete,
    exists,
    fetch_file,
    get_file,
    is_s3,
    iter_lines,
    join,
    list_objects,
    open_read,
    open_write,
    parse,
    private_to_shared,
    put_file,
    read_bytes,
    read_text,
    safe_relpath,
    sha256_file,
    stat_object,
    write_bytes,
    write_text,
)

MANIFEST_NAME = "_MANIFEST.json"
# Names the store gives a meaning to: a file called so inside a directory would be dropped or
# misread, so it is refused wherever a directory is written.
RESERVED_NAMES = frozenset({MANIFEST_NAME})
_CHUNK = 1 << 20
log = get_logger(__name__)


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
            files = [FileEntry(safe_relpath(f["path"], where), int(f["size"]), str(f["sha256"]))
                     for f in raw["files"]]
            return cls(files=files, meta=raw.get("meta", {}), created=raw.get("created", ""),
                       version=int(raw.get("version", 1)))
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{where}: unreadable {MANIFEST_NAME}: {e}") from e


def is_committed(uri: str | os.PathLike) -> bool:
    """True if the directory at `uri` has a manifest (its writer finished)."""
    loc = parse(join(uri, MANIFEST_NAME))
    if loc.scheme == "file":
        return Path(loc.key).is_file()
    return storage_s3.head(loc.bucket, loc.key, str(loc)) is not None  # one HEAD, no LIST


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
    """Upload a local directory tree to `uri` as a committed directory, replacing what is there.

    Order (crash-safe: a reader sees no manifest, or exactly the new contents): remove the old
    manifest; upload the files in parallel; delete every other object under `uri` (a previous
    version's leftovers); write the manifest.

    Raises:
        StoreError: `local_dir` holds a symbolic link, a special file or a nested
            `_MANIFEST.json`; or `uri` holds another committed directory (which this would
            delete). Nothing at `uri` is changed then.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise StoreNotFoundError(f"{src}: not a directory (upload)")
    files = regular_files(src)
    nested = next((o for o in list_objects(uri) if o.relpath != MANIFEST_NAME
                   and PurePosixPath(o.relpath).name == MANIFEST_NAME), None)
    if nested is not None:
        inner = join(uri, str(PurePosixPath(nested.relpath).parent))
        raise StoreError(f"{uri}: holds another committed directory, {inner}, which writing a "
                         f"committed directory at {uri} would delete; write it to an empty place "
                         "(or delete the inner one first if it is no longer needed)")
    delete(join(uri, MANIFEST_NAME))

    def upload(rel: str) -> FileEntry:
        path = src / rel
        entry = FileEntry(rel, path.stat().st_size, sha256_file(path))
        put_file(path, join(uri, rel), sha256=entry.sha256)
        return entry

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = list(pool.map(upload, files))
    _delete_others(uri, {e.path for e in entries})
    manifest = Manifest(files=entries, meta=meta or {})
    write_text(join(uri, MANIFEST_NAME), manifest.to_json())
    return manifest


def regular_files(root: Path) -> list[str]:
    """Relative paths of the regular files under `root`, sorted; a top-level `_MANIFEST.json`
    (the one a new commit replaces) is left out.

    Raises:
        StoreError: a symbolic link (never followed: it may point outside `root`), a device,
            FIFO or socket, or a nested file with a reserved name; the message names it.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise StoreError(f"{path}: is a symbolic link (to {os.readlink(path)!r}); the "
                                 "store copies regular files only and never follows links, which "
                                 "may point outside the folder: replace it by a copy of its "
                                 "target, or remove it")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise StoreError(f"{path}: is a device, FIFO or socket, not a regular file; "
                                 "remove it")
            rel = path.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if "\\" in name:  # a manifest cannot hold it: readers refuse Windows separators
                raise StoreError(f"{path}: has a backslash in its name, which the store refuses "
                                 "in paths; rename it")
            if name in RESERVED_NAMES:
                raise StoreError(f"{path}: {name} is a name the store reserves (it marks a "
                                 "committed directory), so it cannot be stored inside one; "
                                 "rename it, or copy that folder on its own")
            found.append(rel)
    return sorted(found)


def _delete_others(uri: str | os.PathLike, keep: set[str]) -> None:
    """Delete every object under `uri` except the manifest and `keep` (relative paths)."""
    stale = [o for o in list_objects(uri) if o.relpath != MANIFEST_NAME and o.relpath not in keep]
    if not stale:
        return
    log.info("%s: deleting %d object(s) of an earlier version that the new manifest does not "
             "list", uri, len(stale))
    loc = parse(uri)
    if loc.scheme == "s3":
        storage_s3.delete_keys(loc.bucket, [parse(o.uri).key for o in stale], str(loc))
        return
    root = Path(loc.key)
    for obj in stale:
        Path(obj.uri).unlink(missing_ok=True)
        for parent in Path(obj.uri).parents:  # folders the deletions emptied
            if parent == root or not parent.is_relative_to(root):
                break
            with contextlib.suppress(OSError):
                parent.rmdir()


def commit_dir(uri: str | os.PathLike, *, meta: dict[str, Any] | None = None) -> Manifest:
    """Write the manifest for objects already written under `uri` (checksums them in place).

    For stages that write their outputs straight into a local store directory.
    """
    loc = parse(uri)
    if loc.scheme != "file":
        raise StoreError(f"{loc}: commit_dir works on local directories; use put_dir for S3")
    root = Path(loc.key)
    entries = [FileEntry(rel, (root / rel).stat().st_size, sha256_file(root / rel))
               for rel in regular_files(root)]
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
                size, digest, _ = fetch_file(source, target)
                problem = _mismatch(size, digest, entry)
            except StoreNotFoundError as e:
                raise IntegrityError(f"{source}: listed in the manifest but missing") from e
            except IntegrityError as e:
                problem = str(e).removeprefix(f"{source}: ")
            if problem is None:
                return
            if attempt == 1 or not is_s3(uri):
                target.unlink(missing_ok=True)
                raise IntegrityError(f"{source}: {problem}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fetch, manifest.files))
    return manifest


@dataclass
class DirCheck:
    """A directory compared with its manifest (see `check_dir`)."""

    uri: str
    manifest: Manifest | None
    objects: list[ObjectInfo]  # what is there, the manifest itself left out
    problems: dict[str, str]  # manifest path (or _MANIFEST.json) -> what is wrong with it
    extras: list[str]  # objects there that the manifest does not list
    checksums: bool  # whether sha256s were compared, not only sizes

    @property
    def committed(self) -> bool:
        """True if the manifest is there and everything it lists is present and intact."""
        return self.manifest is not None and not self.problems


def check_dir(uri: str | os.PathLike, *, checksums: bool = False) -> DirCheck:
    """Compare the directory at `uri` with its manifest in place, without downloading it
    (with `checksums`, every listed object is read and hashed as well).

    Missing objects, wrong sizes/checksums and an unreadable manifest are `problems`; objects
    the manifest does not list are `extras` (left over, or added by someone else).
    """
    where = os.fspath(uri)
    objects = [o for o in list_objects(uri) if o.relpath != MANIFEST_NAME]
    try:
        manifest: Manifest | None = read_manifest(uri)
    except IncompleteDirectoryError:
        return DirCheck(where, None, objects, {}, [], checksums)
    except IntegrityError as e:
        return DirCheck(where, None, objects, {MANIFEST_NAME: str(e)}, [], checksums)
    sizes = {o.relpath: o.size for o in objects}
    problems: dict[str, str] = {}
    for entry in manifest.files:
        if entry.path not in sizes:
            problems[entry.path] = "listed in the manifest but missing"
        elif sizes[entry.path] != entry.size:
            problems[entry.path] = (f"size {sizes[entry.path]} != manifest {entry.size} "
                                    "(truncated or corrupt)")
        elif checksums:
            digest = _sha256_of(join(uri, entry.path))
            if digest != entry.sha256:
                problems[entry.path] = (f"sha256 {digest[:12]}… != manifest "
                                        f"{entry.sha256[:12]}… (corrupt)")
    listed = {e.path for e in manifest.files}
    extras = [o.relpath for o in objects if o.relpath not in listed]
    return DirCheck(where, manifest, objects, problems, extras, checksums)


def verify_dir(uri: str | os.PathLike) -> Manifest:
    """Check a committed directory in place: every listed object exists with the right size.

    Local directories are also checksummed; S3 objects are checksummed by `get_dir` on download.

    Raises:
        IncompleteDirectoryError: no manifest. IntegrityError: the first problem found.
    """
    read_manifest(uri)  # IncompleteDirectoryError / unreadable manifest, as before
    check = check_dir(uri, checksums=not is_s3(uri))
    for path, problem in check.problems.items():
        raise IntegrityError(f"{join(uri, path)}: {problem}")
    assert check.manifest is not None  # read above
    return check.manifest


def copy(src: str | os.PathLike, dst: str | os.PathLike, *, workers: int = 8) -> str:
    """Copy a file or a committed directory between any two store locations.

    Directories must be committed at `src` and are committed at `dst`. A single file is checked
    against the manifest of the committed directory it belongs to (if any) and its recorded
    sha256 (S3), and not copied if either disagrees. Returns a summary line.

    Raises:
        IntegrityError: the source is corrupt or truncated (nothing is written at `dst`).
    """
    if is_committed(src):
        with tempfile.TemporaryDirectory(prefix="mmjobs-copy-") as tmp:
            manifest = get_dir(src, tmp, workers=workers)
            put_dir(tmp, dst, meta=manifest.meta, workers=workers)
        return (f"copied {len(manifest.files)} files ({manifest.total_bytes} bytes) {src} -> "
                f"{dst}; sha256 of every file checked against the manifest")
    loc = parse(src)
    if (loc.scheme == "file" and Path(loc.key).is_dir()) or (
            loc.scheme == "s3" and exists(src)
            and storage_s3.head(loc.bucket, loc.key, str(loc)) is None):
        raise IncompleteDirectoryError(f"{src}: directory has no {MANIFEST_NAME}; only committed "
                                       "directories are copied")
    with tempfile.TemporaryDirectory(prefix="mmjobs-copy-") as tmp:
        local = Path(tmp) / "object"
        size, digest, recorded = fetch_file(src, local)
        how = _vouch(src, size, digest, recorded)
        put_file(local, dst, sha256=digest)
    return f"copied 1 file ({size} bytes) {src} -> {dst}; {how}"


def _vouch(uri: str | os.PathLike, size: int, digest: str, recorded: bool) -> str:
    """How the copied bytes of the single file `uri` were checked (raises if they are bad)."""
    found = _enclosing_manifest(uri)
    if found is not None:
        root, rel, manifest = found
        entry = next((f for f in manifest.files if f.path == rel), None)
        if entry is not None:
            problem = _mismatch(size, digest, entry)
            if problem:
                raise IntegrityError(f"{uri}: {problem} of {root}; not copied. The object is "
                                     "damaged: copy it from a good source or re-run the step "
                                     "that wrote it")
            return f"size and sha256 match the manifest of {root}"
        if rel != MANIFEST_NAME:
            return (f"WARNING: not listed in the manifest of {root} (a leftover or a later "
                    f"addition), so only {'its recorded sha256 and ' if recorded else ''}its "
                    "size vouch for it")
    if recorded:
        return "size and sha256 match those recorded when it was uploaded"
    return "size checked (no manifest or recorded sha256 vouches for the content)"


def _enclosing_manifest(uri: str | os.PathLike, depth: int = 16
                        ) -> tuple[str, str, Manifest] | None:
    """(directory, path of `uri` in it, its manifest) for the nearest committed directory
    above `uri`, looking at most `depth` folders up."""
    loc = parse(uri)
    parts = PurePosixPath(loc.key).parts
    for cut in range(len(parts) - 1, max(len(parts) - 1 - depth, 0), -1):
        rel = "/".join(parts[cut:])
        root = (f"s3://{loc.bucket}/" + "/".join(parts[:cut]) if loc.scheme == "s3"
                else str(PurePosixPath(*parts[:cut])))
        if is_committed(root):
            return root, rel, read_manifest(root)
    return None


def copy_uncommitted(src: str | os.PathLike, dst: str | os.PathLike, *, workers: int = 8) -> str:
    """Copy a plain folder or prefix with no manifest (raw data from elsewhere) and commit it.

    Nothing vouches for the source's completeness: use this only for data you put there.
    Local folders are copied as regular files only: symbolic links and special files are
    refused (never followed), as are nested files with a reserved name.
    """
    loc = parse(src)
    with tempfile.TemporaryDirectory(prefix="mmjobs-copy-") as tmp:
        if loc.scheme == "file" and Path(loc.key).is_dir():
            root = Path(loc.key)
            rels = regular_files(root)
            fetch_one = lambda rel: _copy_regular(root / rel, Path(tmp) / rel)  # noqa: E731
        else:
            objects = {o.relpath: o.uri for o in list_objects(src) if o.relpath != MANIFEST_NAME}
            rels = [safe_relpath(rel, os.fspath(src)) for rel in objects]
            reserved = [r for r in rels if PurePosixPath(r).name in RESERVED_NAMES]
            if reserved:
                raise StoreError(f"{join(src, reserved[0])}: {MANIFEST_NAME} is a name the store "
                                 "reserves (it marks a committed directory), so it cannot be "
                                 "stored inside one; copy that folder on its own")
            fetch_one = lambda rel: get_file(objects[rel], Path(tmp) / rel)  # noqa: E731
        if not rels:
            raise StoreNotFoundError(f"{src}: nothing to copy")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(fetch_one, rels))
        manifest = put_dir(tmp, dst, workers=workers)
    return (f"copied {len(manifest.files)} files ({manifest.total_bytes} bytes) {src} -> {dst} "
            "and committed it")


# --------------------------------------------------------------------------- helpers


def _mismatch(size: int, digest: str, entry: FileEntry) -> str | None:
    if size != entry.size:
        return f"size {size} != manifest {entry.size} (corrupt or truncated)"
    if digest != entry.sha256:
        return f"sha256 {digest[:12]}… != manifest {entry.sha256[:12]}… (corrupt)"
    return None


def _sha256_of(uri: str | os.PathLike) -> str:
    """sha256 of an object, streamed (local files are hashed in place)."""
    loc = parse(uri)
    if loc.scheme == "file":
        return sha256_file(loc.key)
    h = hashlib.sha256()
    with open_read(uri) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy `src` only if it is still a regular file (not swapped for a link since it was
    listed: O_NOFOLLOW), without blocking on a FIFO."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise StoreError(f"{src}: cannot open it as a regular file ({e}); a symbolic link or "
                         "special file is never copied") from e
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StoreError(f"{src}: not a regular file; remove it")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as out:
            shutil.copyfileobj(f, out, _CHUNK)


