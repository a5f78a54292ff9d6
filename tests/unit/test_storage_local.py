"""Store semantics on local paths: committed directories, integrity checks, safe paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.storage import IncompleteDirectoryError, IntegrityError, StoreError


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": os.urandom(3000),
        "sub/deeper/c.json": b'{"k": 1}',
        "empty.dat": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


def test_parse_and_join_cover_s3_file_and_plain_paths(tmp_path):
    assert storage.parse("s3://bkt/a/b/").key == "a/b"
    assert storage.parse("s3://bkt").key == ""
    assert storage.parse(f"file://{tmp_path}/x").key == f"{tmp_path}/x"
    assert storage.join("s3://bkt/a/", "/b", "c") == "s3://bkt/a/b/c"
    with pytest.raises(StoreError, match="no bucket name"):
        storage.parse("s3:///key")
    with pytest.raises(StoreError, match="unsupported URI scheme"):
        storage.parse("gs://bkt/key")


def test_put_get_dir_round_trip_is_byte_identical_with_manifest(tmp_path):
    src, store, out = tmp_path / "src", tmp_path / "store" / "ds", tmp_path / "out"
    files = make_tree(src)
    manifest = storage.put_dir(src, store, meta={"kind": "test"})
    assert {f.path for f in manifest.files} == set(files)
    assert storage.is_committed(store)
    got = storage.get_dir(store, out)
    assert read_tree(out) == files
    assert got.meta == {"kind": "test"}
    assert storage.verify_dir(store).total_bytes == sum(len(v) for v in files.values())


def test_directory_without_manifest_is_refused_as_incomplete(tmp_path):
    store = tmp_path / "store" / "partial"
    make_tree(store)  # objects written, writer died before the manifest
    assert not storage.is_committed(store)
    with pytest.raises(IncompleteDirectoryError, match=r"no _MANIFEST\.json.*incomplete"):
        storage.get_dir(store, tmp_path / "out")
    with pytest.raises(IncompleteDirectoryError):
        storage.copy(store, tmp_path / "elsewhere")


def test_reupload_removes_old_manifest_before_writing_objects(tmp_path, monkeypatch):
    src, store = tmp_path / "src", tmp_path / "store" / "ds"
    make_tree(src)
    storage.put_dir(src, store)
    (src / "a.txt").write_bytes(b"changed")

    def die(*_a, **_k):
        raise KeyboardInterrupt("killed mid-upload")

    monkeypatch.setattr(storage, "put_file", die)
    with pytest.raises(KeyboardInterrupt):
        storage.put_dir(src, store)
    assert not storage.is_committed(store), "stale manifest would vouch for mixed contents"


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_corrupted_object_is_detected_on_read(tmp_path, damage):
    src, store = tmp_path / "src", tmp_path / "store" / "ds"
    make_tree(src)
    storage.put_dir(src, store)
    victim = store / "sub" / "b.bin"
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
        expected = "sha256 .* != manifest"
    elif damage == "truncate":
        victim.write_bytes(data[:100])
        expected = "size 100 != manifest 3000"
    else:
        victim.unlink()
        expected = "listed in the manifest but missing"
    with pytest.raises(IntegrityError, match=expected):
        storage.get_dir(store, tmp_path / "out")
    with pytest.raises(IntegrityError, match=expected):
        storage.verify_dir(store)


@pytest.mark.parametrize("bad", ["../escape.txt", "/etc/passwd", "a/../../b"])
def test_manifest_paths_escaping_the_directory_are_refused(tmp_path, bad):
    store = tmp_path / "store"
    store.mkdir()
    (store / "_MANIFEST.json").write_text(json.dumps(
        {"files": [{"path": bad, "size": 1, "sha256": "0" * 64}]}))
    with pytest.raises(IntegrityError, match="unsafe relative path"):
        storage.get_dir(store, tmp_path / "out")


def test_open_write_appears_only_after_clean_exit(tmp_path):
    target = tmp_path / "store" / "preds.jsonl"
    with pytest.raises(RuntimeError), storage.open_write(target) as f:
        f.write(b"half")
        raise RuntimeError("crash while writing")
    assert not target.exists()
    with storage.open_write(target) as f:
        f.write(b"line1\nline2\n")
    with storage.open_read(target) as f:
        assert f.read() == b"line1\nline2\n"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".part")]


def test_iter_lines_numbers_lines_and_shows_a_cut_off_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\r\n{"c"')
    assert list(storage.iter_lines(path)) == [
        (1, b'{"a": 1}\n'), (2, b"\n"), (3, b'{"b": 2}\r\n'), (4, b'{"c"')]
    path.write_bytes(b"one\n")
    assert list(storage.iter_lines(path)) == [(1, b"one\n")]  # no phantom empty line
    path.write_bytes(b"")
    assert list(storage.iter_lines(path)) == []


def test_missing_objects_raise_not_found_naming_the_uri(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        storage.get_file(missing, tmp_path / "x")


def test_list_objects_is_recursive_and_sorted(tmp_path):
    files = make_tree(tmp_path / "t")
    listed = list(storage.list_objects(tmp_path / "t"))
    assert [o.relpath for o in listed] == sorted(files)
    assert {o.relpath: o.size for o in listed} == {k: len(v) for k, v in files.items()}


def test_overwrite_with_a_smaller_tree_deletes_the_old_files_and_folders(tmp_path):
    big, small, store = tmp_path / "big", tmp_path / "small", tmp_path / "store" / "ds"
    make_tree(big)
    small.mkdir()
    (small / "a.txt").write_bytes(b"new")
    storage.put_dir(big, store)
    (store / ".a.txt.x1y2.part").write_bytes(b"left by a killed writer")
    storage.put_dir(small, store)
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) == [
        "_MANIFEST.json", "a.txt"]
    assert storage.check_dir(store, checksums=True).committed


def test_check_dir_reports_missing_wrong_and_extra_objects(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store" / "ds"
    make_tree(src)
    storage.put_dir(src, store)
    (store / "a.txt").unlink()
    (store / "sub" / "b.bin").write_bytes(b"short")
    (store / "sub" / "deeper" / "c.json").write_bytes(b'{"k": 2}')  # same size, other bytes
    (store / "new.txt").write_bytes(b"added later")
    check = storage.check_dir(store)
    assert check.problems == {"a.txt": "listed in the manifest but missing",
                              "sub/b.bin": "size 5 != manifest 3000 (truncated or corrupt)"}
    assert check.extras == ["new.txt"] and not check.committed
    assert "sha256" in storage.check_dir(store, checksums=True).problems["sub/deeper/c.json"]
    assert storage.check_dir(tmp_path / "src").manifest is None


@pytest.mark.parametrize("kind", ["file-link", "dir-link", "fifo"])
def test_links_and_special_files_are_never_copied_out_of_a_folder(tmp_path, kind):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not yours")
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "ok.txt").write_text("fine")
    bad = raw / "sub" / "innocent.txt"
    if kind == "file-link":
        bad.symlink_to(secret)
    elif kind == "dir-link":
        bad.symlink_to(secret.parent, target_is_directory=True)
    else:
        os.mkfifo(bad)
    why = "is a symbolic link" if kind != "fifo" else "is a device, FIFO or socket"
    with pytest.raises(StoreError, match=f"{bad}: {why}"):
        storage.copy_uncommitted(raw, tmp_path / "copy")
    with pytest.raises(StoreError, match=f"{bad}: {why}"):
        storage.put_dir(raw, tmp_path / "put")
    assert not (tmp_path / "copy").exists() and not (tmp_path / "put").exists()


def test_a_nested_manifest_name_is_refused_not_dropped(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "sub" / "_MANIFEST.json").write_text("{}")
    with pytest.raises(StoreError, match=r"sub/_MANIFEST\.json: _MANIFEST\.json is a name the "
                                         "store reserves"):
        storage.copy_uncommitted(raw, tmp_path / "copy")
    assert not storage.is_committed(tmp_path / "copy")


def test_a_name_no_manifest_can_hold_is_refused_before_writing(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "back\\slash").write_text("x")
    with pytest.raises(StoreError, match=r"back\\slash: has a backslash in its name"):
        storage.put_dir(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_single_file_copy_checks_the_enclosing_manifest(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store" / "ds"
    make_tree(src)
    storage.put_dir(src, store)
    summary = storage.copy(store / "sub" / "deeper" / "c.json", tmp_path / "c.json")
    assert summary.endswith(f"size and sha256 match the manifest of {store}")
    (store / "sub" / "deeper" / "c.json").write_bytes(b'{"k": 2}')
    with pytest.raises(IntegrityError, match=f"sha256 .* != manifest .* of {store}; not copied"):
        storage.copy(store / "sub" / "deeper" / "c.json", tmp_path / "c2.json")
    assert not (tmp_path / "c2.json").exists()
    (store / "late.txt").write_text("added after the commit")
    assert "WARNING: not listed in the manifest" in storage.copy(store / "late.txt",
                                                                 tmp_path / "late.txt")


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_retry_setting_names_the_variable(monkeypatch, tmp_path, value):
    monkeypatch.setenv("MMJOBS_STORE_RETRY_DEADLINE_S", value)
    with pytest.raises(StoreError, match=f"MMJOBS_STORE_RETRY_DEADLINE_S='{value}': expected"):
        storage.read_bytes(tmp_path / "x")


def test_stored_files_get_the_modes_open_would_give_not_mkstemps(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); what lands in the store must be
    readable by other users and tools as a plain open()/mkdir() would make it."""
    from mmjobs import local_cache

    umask = os.umask(0o022)
    os.umask(umask)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert (file_mode, dir_mode) == (storage.FILE_MODE, storage.DIR_MODE)

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/a.bin").write_bytes(b"a" * 10)
    (src / "b.txt").write_text("b")
    storage.put_dir(src, tmp_path / "store/dir")
    storage.write_text(tmp_path / "store/one.txt", "x")
    with storage.open_write(tmp_path / "store/streamed.bin") as f:
        f.write(b"y")
    storage.get_dir(tmp_path / "store/dir", tmp_path / "copy")
    entry = local_cache.cached(tmp_path / "cache/entry",
                               lambda scratch: (scratch / "f").write_text("z"))
    made = [tmp_path / "store", tmp_path / "copy", entry]
    files = {p: p.stat().st_mode & 0o777 for root in made for p in root.rglob("*")
             if p.is_file()}
    folders = {p: p.stat().st_mode & 0o777 for root in made for p in [root, *root.rglob("*")]
               if p.is_dir()}
    assert len(files) >= 8 and set(files.values()) == {file_mode}, files
    assert set(folders.values()) == {dir_mode}, folders
    # No temporary files are left beside the targets.
    assert not [p for p in files if p.name.endswith(".part")]


def test_private_to_shared_adds_read_bits_and_keeps_the_rest(tmp_path):
    script = tmp_path / "tree/run.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    weights = tmp_path / "tree/model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o600)
    (tmp_path / "tree").chmod(0o700)
    storage.private_to_shared(tmp_path / "tree", tree=True)
    assert oct(script.stat().st_mode & 0o777) == oct(0o700 | (storage.FILE_MODE & 0o444))
    assert oct(weights.stat().st_mode & 0o777) == oct(0o600 | (storage.FILE_MODE & 0o444))
    assert oct((tmp_path / "tree").stat().st_mode & 0o777) == oct(
        0o700 | (storage.DIR_MODE & 0o555))
