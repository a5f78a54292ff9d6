"""Safe extraction of downloaded dataset archives (zip, tar, tar.gz/.bz2/.xz).

Archives from the internet are untrusted. `extract_archive` refuses, with an
`UnsafeArchiveError` naming the archive and the member, anything that could write outside the
target directory or fill the disk:

- member names that are absolute (`/x`, `C:x`, `\\\\x`), contain `..`, backslashes or NUL bytes;
- symbolic links (all of them: a link that looks internal can still escape through another
  link, and datasets do not need them) and hard links, except a tar hard link to a regular
  file extracted earlier from the same archive, which is written as a plain copy;
- device files, FIFOs and other special members;
- more than `max_members` members, or more than `max_total_bytes` uncompressed bytes. Bytes are
  counted as they are written, not taken from the headers, so a zip bomb with lying headers
  stops at the limit. The message names the caller's option that raises the limit;
- the same path twice (extraction would silently keep the last copy), or a member inside a path
  that is a file in the archive;
- names the caller reserves (`reserved_names`; the import stage passes the store's
  `_MANIFEST.json`), which would otherwise be dropped or misread downstream.

Tar members additionally pass Python's `tarfile.data_filter` (defence in depth). Files are
written with plain permissions (0644, 0755 if executable in the archive); owners, setuid bits
and timestamps are not restored. A truncated or corrupt archive raises `ArchiveError`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

DEFAULT_MAX_TOTAL_BYTES = 100 * 2**30  # 100 GiB: the largest public VLM image sets fit
DEFAULT_MAX_MEMBERS = 2_000_000
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_CHUNK = 1 << 20
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(Exception):
    """An archive cannot be read (truncated, corrupt, unknown format); the message names it."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would escape the target, is a link or special file, or a limit is hit."""


@dataclass(frozen=True)
class ExtractResult:
    """What was extracted: regular files, directories and total bytes written."""

    target: Path
    files: int
    dirs: int
    bytes: int


def is_archive(name: str | os.PathLike) -> bool:
    """True if `name` ends in a supported archive suffix (`.zip`, `.tar`, `.tar.gz`, ...)."""
    lower = os.fspath(name).lower()
    return lower.endswith(ZIP_SUFFIXES + TAR_SUFFIXES)


def extract_archive(archive: str | os.PathLike, target: str | os.PathLike, *,
                    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                    max_members: int = DEFAULT_MAX_MEMBERS,
                    bytes_option: str = "max_archive_bytes",
                    members_option: str = "max_archive_members",
                    reserved_names: frozenset[str] = frozenset()) -> ExtractResult:
    """Extract a local zip or tar archive into `target` (created; must be empty if it exists).

    On any error the partly extracted `target` is removed, so a failed extraction never
    looks like a dataset. `bytes_option` / `members_option` name the caller's settings for the
    two limits (the defaults are the prepare stage's), so the error says what to raise.
    `reserved_names` are file names refused wherever they appear in the archive.

    Raises:
        UnsafeArchiveError: a member is unsafe or a limit is exceeded (names archive + member).
        ArchiveError: the archive is truncated, corrupt or not a zip/tar file.
    """
    src, dst = Path(archive), Path(target)
    if dst.exists() and any(dst.iterdir()):
        raise ArchiveError(f"{src}: extraction target {dst} is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    sink = _Sink(src, dst.resolve(), max_total_bytes, max_members, bytes_option,
                 members_option, reserved_names)
    try:
        if src.name.lower().endswith(ZIP_SUFFIXES) or (
                not src.name.lower().endswith(TAR_SUFFIXES) and zipfile.is_zipfile(src)):
            _extract_zip(src, sink)
        else:
            _extract_tar(src, sink)
    except UnsafeArchiveError:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        shutil.rmtree(dst, ignore_errors=True)
        if isinstance(e, FileNotFoundError) and not src.exists():
            raise ArchiveError(f"{src}: archive not found") from e
        at = f" at member {sink.current!r}" if sink.current else ""
        raise ArchiveError(f"{src}: cannot read or extract the archive{at} "
                           f"({type(e).__name__}: {e}); if it is truncated or corrupt, "
                           "download it again") from e
    return ExtractResult(dst, sink.files, sink.dirs, sink.total)


class _Sink:
    """Writes members under the target, enforcing the path rules and the limits."""

    def __init__(self, archive: Path, root: Path, max_total_bytes: int, max_members: int,
                 bytes_option: str, members_option: str, reserved_names: frozenset[str]):
        self.archive, self.root = archive, root
        self.max_total_bytes, self.max_members = max_total_bytes, max_members
        self.bytes_option, self.members_option = bytes_option, members_option
        self.reserved_names = reserved_names
        self.total = self.files = self.dirs = self.members = 0
        self.current = ""
        self.written: dict[str, Path] = {}  # member name -> file, for tar hard links
        self.seen: dict[tuple[str, ...], bool] = {}  # path parts -> is a directory

    def refuse(self, member: str, why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.archive}: member {member!r} {why}; refusing to "
                                  "extract this archive")

    def too_many(self, name: str) -> UnsafeArchiveError:
        return self.refuse(name, f"exceeds the limit of {self.max_members:,} members; if the "
                           f"archive is genuine, raise {self.members_option}")

    def begin(self, name: str, is_dir: bool) -> Path | None:
        """Count the member and return its safe destination (None for the root itself)."""
        self.current = name
        self.members += 1
        if self.members > self.max_members:
            raise self.too_many(name)
        problem = _unsafe_name(name)
        if problem:
            raise self.refuse(name, problem)
        rel = PurePosixPath(name)
        if not rel.parts:
            return None
        self._check_path(name, rel.parts, is_dir)
        dest = self.root.joinpath(*rel.parts)
        # Lexically safe names can still land outside through a pre-existing symlink.
        if not dest.resolve().is_relative_to(self.root):
            raise self.refuse(name, f"resolves outside the target directory {self.root}")
        return dest

    def mkdir(self, dest: Path | None) -> None:
        if dest is not None:
            dest.mkdir(parents=True, exist_ok=True)
            self.dirs += 1

    def write(self, name: str, dest: Path, stream: IO[bytes], claimed: int, mode: int) -> None:
        """Copy `stream` to `dest`, counting the bytes actually written against the limit."""
        if self.total + claimed > self.max_total_bytes:
            raise self._too_big(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as out:
            while chunk := stream.read(_CHUNK):
                self.total += len(chunk)
                if self.total > self.max_total_bytes:
                    raise self._too_big(name)
                out.write(chunk)
        dest.chmod(0o755 if mode & 0o111 else 0o644)
        self.files += 1
        self.written[name.rstrip("/")] = dest

    def _check_path(self, name: str, parts: tuple[str, ...], is_dir: bool) -> None:
        """Refuse reserved names, a path seen before (unless both are folders), and a path
        inside one that is a file: each would silently lose or misplace data."""
        if not is_dir and parts[-1] in self.reserved_names:
            raise self.refuse(name, f"is named {parts[-1]}, which the store reserves (it marks "
                              "a committed directory); re-pack the archive without it")
        before = self.seen.get(parts)
        if before is not None and not (before and is_dir):
            raise self.refuse(name, "appears more than once in the archive (a duplicate "
                              "member: extracting would silently keep only the last copy); "
                              "re-pack it with one copy")
        for i in range(1, len(parts)):
            if self.seen.get(parts[:i]) is False:
                raise self.refuse(name, f"lies inside {'/'.join(parts[:i])!r}, which is a file "
                                  "in this archive")
        self.seen[parts] = is_dir

    def _too_big(self, name: str) -> UnsafeArchiveError:
        return self.refuse(name, f"takes the extracted size over the limit of "
                           f"{self.max_total_bytes:,} bytes (a zip bomb?); if the archive is "
                           f"genuine, raise {self.bytes_option}")


def _unsafe_name(name: str) -> str | None:
    if "\x00" in name:
        return "has a NUL byte in its name"
    if "\\" in name:
        return "has a backslash in its name (a Windows path; re-pack it with '/' separators)"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "has '..' in its path (path traversal)"
    return None


def _extract_zip(src: Path, sink: _Sink) -> None:
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        if len(infos) > sink.max_members:
            raise sink.too_many(infos[sink.max_members].filename)
        for info in infos:
            dest = sink.begin(info.filename, info.is_dir())
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix mode, when made on unix
            if kind == stat.S_IFLNK:
                raise sink.refuse(info.filename, "is a symbolic link (links are not allowed)")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise sink.refuse(info.filename, "is a device, FIFO or other special file")
            if info.is_dir() or dest is None:
                sink.mkdir(dest)
                continue
            with zf.open(info) as stream:
                sink.write(info.filename, dest, stream, info.file_size, info.external_attr >> 16)


class _TarInfo(tarfile.TarInfo):
    """Records why header reading stopped: tarfile ends iteration *silently* on a truncated
    or empty header after the first member, so a cut-off plain tar would look complete."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.mmjobs_end = type(e).__name__  # type: ignore[attr-defined]
            raise


def _extract_tar(src: Path, sink: _Sink) -> None:
    with tarfile.open(src, "r:*", tarinfo=_TarInfo) as tf:
        for member in tf:  # streams: compressed tars are read once, front to back
            dest = sink.begin(member.name, member.isdir())
            _check_tar_member(member, sink)
            try:
                tarfile.data_filter(member, str(sink.root))
            except tarfile.FilterError as e:
                raise sink.refuse(member.name, f"is refused by tarfile's data filter ({e})") from e
            if member.isdir() or dest is None:
                sink.mkdir(dest)
            elif member.islnk():
                # Checked in _check_tar_member: the target is a regular file we extracted.
                source = sink.written[member.linkname.rstrip("/")]
                with open(source, "rb") as stream:
                    sink.write(member.name, dest, stream, source.stat().st_size, member.mode)
            else:
                stream = tf.extractfile(member)
                if stream is None:  # pragma: no cover - regular files always have data
                    raise sink.refuse(member.name, "has no data")
                with stream:
                    sink.write(member.name, dest, stream, member.size, member.mode)
        # A complete tar ends with zero blocks (EOFHeaderError); anything else is a cut.
        if getattr(tf, "mmjobs_end", None) != "EOFHeaderError":
            raise tarfile.ReadError("no end-of-archive marker after the last member (truncated)")
    sink.current = ""


def _check_tar_member(member: tarfile.TarInfo, sink: _Sink) -> None:
    if member.issym():
        raise sink.refuse(member.name, f"is a symbolic link to {member.linkname!r} (links are "
                          "not allowed; re-pack with `tar --dereference`)")
    if member.islnk():
        target = member.linkname.rstrip("/")
        if _unsafe_name(target) or target not in sink.written:
            raise sink.refuse(member.name, f"is a hard link to {member.linkname!r}, which is not "
                              "a regular file extracted earlier from this archive")
        return
    if not (member.isreg() or member.isdir()):
        raise sink.refuse(member.name, "is a device, FIFO or other special file")
