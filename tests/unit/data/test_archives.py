"""Safe archive extraction: good archives extract; every escape, link, special file, limit
breach and truncation is refused with a message naming the archive and the member."""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from mmjobs.data.archives import (
    ArchiveError,
    UnsafeArchiveError,
    extract_archive,
    is_archive,
)


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
             mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def make_zip(path: Path, files: dict[str, bytes],
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_is_archive():
    assert all(is_archive(n) for n in ("a.zip", "a.tar", "a.tar.gz", "a.TGZ", "a.tar.bz2",
                                       "a.tar.xz", "s3://b/k/a.zip"))
    assert not any(is_archive(n) for n in ("a.json", "a.jsonl", "a.gz", "dir/"))


def test_good_zip_extracts(tmp_path):
    archive = make_zip(tmp_path / "d.zip", {"data/a.json": b"[]", "data/img/1.png": b"png",
                                            "data/empty/": b""})
    result = extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out/data/a.json").read_bytes() == b"[]"
    assert (tmp_path / "out/data/img/1.png").read_bytes() == b"png"
    assert (tmp_path / "out/data/empty").is_dir()
    assert (result.files, result.bytes) == (2, 5)


@pytest.mark.parametrize("mode,suffix", [("w", "tar"), ("w:gz", "tar.gz"),
                                         ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")])
def test_good_tar_extracts(tmp_path, mode, suffix):
    d = tarfile.TarInfo("d")
    d.type = tarfile.DIRTYPE
    exe = tarfile.TarInfo("d/run.sh")
    exe.mode = 0o4755  # setuid is dropped, the exec bit kept
    archive = make_tar(tmp_path / f"d.{suffix}", [(d, None), file_member("d/a.txt", b"hello"),
                                                  (exe, b"#!/bin/sh\n")], mode)
    result = extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out/d/a.txt").read_text() == "hello"
    assert (tmp_path / "out/d/run.sh").stat().st_mode & 0o7777 == 0o755
    assert (result.files, result.dirs, result.bytes) == (2, 1, 15)


def test_tar_internal_hardlink_is_copied(tmp_path):
    archive = make_tar(tmp_path / "d.tar", [file_member("a/x.png", b"img"),
                                            link_member("a/y.png", "a/x.png", tarfile.LNKTYPE)])
    extract_archive(archive, tmp_path / "out")
    y = tmp_path / "out/a/y.png"
    assert y.read_bytes() == b"img" and not y.is_symlink()
    assert y.stat().st_nlink == 1  # a copy, not a link into anything


def test_zip_slip_refused(tmp_path):
    archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"1", "../../evil.txt": b"2"})
    with pytest.raises(UnsafeArchiveError) as e:
        extract_archive(archive, tmp_path / "out")
    assert str(e.value) == (f"{archive}: member '../../evil.txt' has '..' in its path (path "
                            "traversal); refusing to extract this archive")
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out").exists()  # partial extraction removed


@pytest.mark.parametrize("name,why", [
    ("/abs/evil.txt", "has an absolute path"),
    ("C:/evil.txt", "has an absolute path"),
    ("..\\evil.txt", "has a backslash in its name"),
])
def test_zip_absolute_and_windows_paths_refused(tmp_path, name, why):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("placeholder"), b"")
        info = zipfile.ZipInfo("x")
        info.filename = name  # ZipInfo() would normalise these; an attacker's zip would not
        zf.writestr(info, b"2")
    with pytest.raises(UnsafeArchiveError, match=f"member {name!r} {why}".replace("\\", "\\\\")):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.parametrize("name,why", [("../evil.txt", "has '..' in its path"),
                                      ("a/../../evil.txt", "has '..' in its path"),
                                      ("/etc/evil.txt", "has an absolute path")])
def test_tar_traversal_and_absolute_refused(tmp_path, name, why):
    archive = make_tar(tmp_path / "evil.tar.gz", [file_member("ok"), file_member(name)], "w:gz")
    with pytest.raises(UnsafeArchiveError, match=f"evil.tar.gz: member {name!r} {why}"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "inside.txt"])
def test_tar_symlinks_refused(tmp_path, target):
    archive = make_tar(tmp_path / "l.tar", [file_member("inside.txt"),
                                            link_member("link", target, tarfile.SYMTYPE)])
    with pytest.raises(UnsafeArchiveError,
                       match=f"member 'link' is a symbolic link to {target!r}"):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "not-extracted-yet"])
def test_tar_hardlink_escape_refused(tmp_path, target):
    archive = make_tar(tmp_path / "h.tar", [link_member("h", target, tarfile.LNKTYPE)])
    with pytest.raises(UnsafeArchiveError, match=f"member 'h' is a hard link to {target!r}, "
                                                 "which is not a regular file extracted"):
        extract_archive(archive, tmp_path / "out")


def test_zip_symlink_refused(tmp_path):
    archive = tmp_path / "l.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)  # S_IFLNK, as `zip --symlinks` writes it
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="member 'link' is a symbolic link"):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_device_and_fifo_refused(tmp_path, kind):
    info = tarfile.TarInfo("dev/thing")
    info.type = kind
    archive = make_tar(tmp_path / "d.tar", [(info, None)])
    with pytest.raises(UnsafeArchiveError,
                       match="member 'dev/thing' is a device, FIFO or other special file"):
        extract_archive(archive, tmp_path / "out")


def test_too_many_members_refused(tmp_path):
    zip_archive = make_zip(tmp_path / "m.zip", {f"f{i}": b"" for i in range(6)})
    with pytest.raises(UnsafeArchiveError, match="member 'f5' exceeds the limit of 5 members"):
        extract_archive(zip_archive, tmp_path / "out", max_members=5)
    tar_archive = make_tar(tmp_path / "m.tar", [file_member(f"f{i}") for i in range(6)])
    with pytest.raises(UnsafeArchiveError, match="member 'f5' exceeds the limit of 5 members"):
        extract_archive(tar_archive, tmp_path / "out2", max_members=5)


def test_zip_bomb_stops_at_size_limit(tmp_path):
    # 50 MB of zeros compress to ~50 KB; the limit is 10 MB.
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(50_000_000)})
    assert archive.stat().st_size < 100_000
    with pytest.raises(UnsafeArchiveError, match=re.escape(
            "member 'zeros.bin' takes the extracted size over the limit of 10,000,000 bytes")):
        extract_archive(archive, tmp_path / "out", max_total_bytes=10_000_000)
    assert not (tmp_path / "out").exists()


def test_zip_with_lying_size_header_is_refused(tmp_path):
    """The headers claim 1 KB; the real stream is 5 MB. zipfile stops at the claim and the CRC
    fails; either way nothing larger than the limit is written and nothing is left behind."""
    archive = make_zip(tmp_path / "liar.zip", {"zeros.bin": bytes(5_000_000)})
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("zeros.bin")
    # Patch the uncompressed size in the local header (offset 22) and central directory.
    cd = data.rfind(b"PK\x01\x02")
    for at in (info.header_offset + 22, cd + 24):
        data[at:at + 4] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as e:
        extract_archive(archive, tmp_path / "out", max_total_bytes=100_000)
    assert "zeros.bin" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix,mode", [("tar", "w"), ("tar.gz", "w:gz"), ("zip", None)])
def test_truncated_archive_is_a_clear_error(tmp_path, suffix, mode):
    path = tmp_path / f"cut.{suffix}"
    payload = bytes(range(256)) * 400
    if mode is None:
        make_zip(path, {"a.bin": payload, "b.bin": payload}, zipfile.ZIP_STORED)
    else:
        make_tar(path, [file_member("a.bin", payload), file_member("b.bin", payload)], mode)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ArchiveError, match=r"cut\..*: cannot read or extract the archive.*"
                                           "download it again"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tar_cut_at_member_boundary_is_detected(tmp_path):
    """tarfile alone stops silently when a plain tar ends exactly between two members."""
    path = make_tar(tmp_path / "cut.tar", [file_member("a", b"x" * 512),
                                           file_member("b", b"y" * 512)])
    path.write_bytes(path.read_bytes()[:1024])  # header + data of "a"
    with pytest.raises(ArchiveError, match="no end-of-archive marker"):
        extract_archive(path, tmp_path / "out")


def test_not_an_archive(tmp_path):
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(b"this is not an archive" * 10)
    with pytest.raises(ArchiveError, match=re.escape(
            "junk.tar.gz: cannot read or extract the archive")):
        extract_archive(path, tmp_path / "out")


def test_limit_errors_name_the_callers_option_and_repeated_folders_are_fine(tmp_path):
    folder = tarfile.TarInfo("data")
    folder.type = tarfile.DIRTYPE
    archive = make_tar(tmp_path / "d.tar", [(folder, None), (folder, None),
                                            file_member("data/a"), file_member("data/b")])
    assert extract_archive(archive, tmp_path / "ok").files == 2  # `tar -r` repeats folders
    # The default hint names the prepare stage's option.
    with pytest.raises(UnsafeArchiveError, match="raise max_archive_members; refusing"):
        extract_archive(archive, tmp_path / "out", max_members=3)
    with pytest.raises(UnsafeArchiveError, match=r"raise --limit-bytes \(the caller's\); "):
        extract_archive(archive, tmp_path / "out", max_total_bytes=1,
                        bytes_option="--limit-bytes (the caller's)")
