"""The `import` stage end to end: archives and files over real HTTP on loopback (safe
extraction, resume after a cut, a server that never completes, sha256 checks, cache hits), the
Hugging Face hub from an offline cache in the official layout, store -> store copies including
s3:// (moto over HTTP), config errors, and the `mmjobs import` command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import stat
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.cli import main as cli_main
from mmjobs.config import ConfigError, load_config
from mmjobs.data.archives import UnsafeArchiveError
from mmjobs.data.fetch import ChecksumError, FetchError
from mmjobs.stages.import_ import ImportConfig, ImportResult, main
from tests.unit.data.test_fetch import FileServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PAYLOAD = random.Random(0).randbytes(200_000)  # incompressible: cuts land mid-member
FILES = {"data/a.bin": PAYLOAD, "data/sub/b.json": b'{"ok": true}\n'}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None,
              deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], links: dict[str, str] | None = None,
              mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run(source: str, to: str | Path, **fields) -> ImportResult:
    return main(ImportConfig(source=source, to=str(to), **fields))


def committed_files(out: str | Path) -> dict[str, bytes]:
    manifest = storage.verify_dir(out)
    return {f.path: storage.read_bytes(storage.join(out, f.path)) for f in manifest.files}


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Stage scratch space under tmp_path, so an escaping member would land in view."""
    path = tmp_path / "scratch" / "deeper"
    path.mkdir(parents=True)
    monkeypatch.setenv("MMJOBS_TMP", str(path))
    return path


# --------------------------------------------------------------------------- HTTP sources


@pytest.mark.parametrize("name,data", [("set.zip", zip_bytes(FILES)),
                                       ("set.tar.gz", tar_bytes(FILES))])
def test_archives_are_extracted_and_committed_with_source_and_sha256(server, tmp_path, name,
                                                                     data):
    server.files[name] = data
    out = tmp_path / "store" / "set"
    result = run(server.url(name), out, sha256=sha(data))
    assert committed_files(out) == FILES
    meta = storage.read_manifest(out).meta
    assert (meta["source"], meta["source_kind"], meta["sha256"], meta["extracted"]) == (
        server.url(name), "http", sha(data), True)
    assert (result.cached, result.files, result.sha256, result.revision) == (
        False, 2, sha(data), None)


def test_a_plain_file_is_stored_as_is_and_extract_never_keeps_an_archive(server, tmp_path):
    server.files["w/model.safetensors"] = PAYLOAD
    server.files["set.zip"] = zip_bytes(FILES)
    run(server.url("w/model.safetensors?download=true"), tmp_path / "a")
    assert committed_files(tmp_path / "a") == {"model.safetensors": PAYLOAD}
    run(server.url("set.zip"), tmp_path / "b", extract="never")
    assert committed_files(tmp_path / "b") == {"set.zip": server.files["set.zip"]}


@pytest.mark.parametrize("name,data,why", [
    ("slip.zip", zip_bytes({"ok.txt": b"x", "../evil.txt": b"pwned"}), "path traversal"),
    ("slip.tar.gz", tar_bytes({"ok.txt": b"x", "../evil.txt": b"pwned"}), "path traversal"),
    ("abs.tar", tar_bytes({"/tmp/evil-abs.txt": b"pwned"}, mode="w"), "absolute path"),
    ("link.tar.gz", tar_bytes({"link/evil.txt": b"pwned"}, links={"link": "../.."}),
     "symbolic link"),
    ("link.zip", zip_bytes({"link/evil.txt": b"pwned"}, symlinks={"link": "../.."}),
     "symbolic link"),
], ids=["zip-slip", "tar-dotdot", "tar-absolute", "tar-symlink-escape", "zip-symlink-escape"])
def test_unsafe_archives_are_refused_and_nothing_is_committed(server, tmp_path, scratch, name,
                                                             data, why):
    server.files[name] = data
    out = tmp_path / "store" / "bad"
    with pytest.raises(UnsafeArchiveError, match=why):
        run(server.url(name), out)
    assert not storage.is_committed(out)
    escaped = [*tmp_path.rglob("evil*.txt"), *Path("/tmp").glob("evil-abs.txt")]
    assert escaped == []
    assert list(scratch.iterdir()) == []  # the stage's scratch is cleaned up too


def test_a_cut_download_resumes_with_a_range_request_and_verifies(server, tmp_path):
    data = zip_bytes(FILES)
    server.files["set.zip"] = data
    server.truncate["set.zip"] = 1  # the first response stops half-way
    out = tmp_path / "store" / "set"
    result = run(server.url("set.zip"), out, sha256=sha(data))
    assert server.range_headers() == [None, f"bytes={len(data) // 2}-"]
    assert committed_files(out) == FILES and result.sha256 == sha(data)


def test_a_server_that_never_completes_fails_then_a_rerun_resumes(server, tmp_path):
    data = zip_bytes(FILES)
    server.files["set.zip"] = data
    server.stall_at["set.zip"] = 50_000
    out = tmp_path / "store" / "set"
    with pytest.raises(FetchError, match=r"download failed after 3 attempts.*50000 bytes are "
                       r"kept.*next run resumes"):
        run(server.url("set.zip"), out, retries=2)
    assert not storage.is_committed(out)
    del server.stall_at["set.zip"]
    server.requests.clear()
    run(server.url("set.zip"), out, retries=2, sha256=sha(data))
    assert server.range_headers() == ["bytes=50000-"]
    assert committed_files(out) == FILES


def test_sha256_mismatch_commits_nothing_and_uncommits_an_older_import(server, tmp_path):
    server.files["a.zip"] = zip_bytes({"a.txt": b"a"})
    server.files["b.zip"] = zip_bytes({"b.txt": b"b"})
    out = tmp_path / "store" / "x"
    run(server.url("a.zip"), out)
    with pytest.raises(ChecksumError, match=f"expected {'f' * 64}"):
        run(server.url("b.zip"), out, sha256="F" * 64)
    assert not storage.is_committed(out)


def test_reimport_is_a_cache_hit_without_any_request(server, tmp_path):
    data = zip_bytes(FILES)
    server.files["set.zip"] = data
    out = tmp_path / "store" / "set"
    first = run(server.url("set.zip"), out)
    assert len(server.requests) == 1 and not first.cached
    again = run(server.url("set.zip"), out, sha256=sha(data))  # the recorded sha256 matches
    assert again.cached and again.sha256 == sha(data) and again.files == 2
    assert len(server.requests) == 1
    assert not run(server.url("set.zip"), out, force=True).cached
    assert len(server.requests) == 2
    assert not run(server.url("set.zip"), out, extract="never").cached  # another output


def zip_with_duplicates(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it writes
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def tar_with_duplicates(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("pack", [zip_with_duplicates, tar_with_duplicates], ids=["zip", "tar"])
@pytest.mark.parametrize("members,member,why", [
    ([("data/a.bin", b"first"), ("data/b.txt", b"b"), ("data/a.bin", b"second")], "data/a.bin",
     "appears more than once in the archive"),
    ([("data/a.bin", b"a"), ("_MANIFEST.json", b'{"files": []}')], "_MANIFEST.json",
     "is named _MANIFEST.json, which the store reserves"),
    ([("data/a.bin", b"a"), ("data/_MANIFEST.json", b"{}")], "data/_MANIFEST.json",
     "is named _MANIFEST.json, which the store reserves"),
    ([("data", b"a file"), ("data/a.bin", b"a")], "data/a.bin",
     "lies inside 'data', which is a file in this archive"),
], ids=["duplicate", "manifest", "nested-manifest", "file-as-folder"])
def test_archives_that_would_lose_members_are_refused_naming_the_member(server, tmp_path, pack,
                                                                       members, member, why):
    name = "set.zip" if pack is zip_with_duplicates else "set.tar.gz"
    server.files[name] = pack(members)
    out = tmp_path / "store" / "set"
    with pytest.raises(UnsafeArchiveError, match=f"member {re.escape(repr(member))} {why}"):
        run(server.url(name), out)
    assert not storage.is_committed(out) and not out.exists()


def test_limit_errors_name_options_the_import_command_takes(server, tmp_path, capsys):
    zeros = zip_bytes({"a.bin": bytes(1_000_000), "b.bin": b"b", "c.bin": b"c"}, deflate=True)
    server.files["set.zip"] = zeros
    url = server.url("set.zip")
    for limit, value, enough in (("--max-members", "2", "3"), ("--max-bytes", "100000",
                                                               "2000000")):
        out = str(tmp_path / limit)
        assert cli_main(["import", url, "--to", out, limit, value]) == 1
        err = capsys.readouterr().err
        assert f"if the archive is genuine, raise max_{limit[6:]} (mmjobs import {limit} N)" \
            in err, err
        assert not storage.is_committed(out)
        # Doing what the message says works.
        assert cli_main(["import", url, "--to", out, limit, enough]) == 0
        capsys.readouterr()
    out = str(tmp_path / "download")
    assert cli_main(["import", url, "--to", out, "--max-bytes", "1000"]) == 1
    assert "over the limit of 1,000 bytes; raise max_bytes (mmjobs import --max-bytes N)" in (
        capsys.readouterr().err)


def test_import_errors_escape_control_characters_in_member_names(server, tmp_path, capsys):
    evil = "x\n\x1b[2J\x1b]0;pwned\x07.txt"
    server.files["set.tar.gz"] = tar_with_duplicates([(evil, b"1"), (evil, b"2")])
    assert cli_main(["import", server.url("set.tar.gz"), "--to", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and err.count("\n") == 1
    assert "member 'x\\n\\x1b[2J\\x1b]0;pwned\\x07.txt' appears more than once" in err


# --------------------------------------------------------------------------- Hugging Face hub


def fake_hub_cache(root: Path, repo_id: str, repo_type: str, files: dict[str, bytes]) -> None:
    """A snapshot in huggingface_hub's cache layout: blobs, snapshot symlinks, refs/main."""
    folder = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = folder / "blobs" / sha(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any network access would be a test failure
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


MODEL_FILES = {"config.json": b'{"model_type": "llava"}', "model.safetensors": PAYLOAD,
               "tokenizer/vocab.txt": b"a\nb\n"}


def test_hub_model_from_the_offline_cache_records_the_commit_sha(hub_cache, tmp_path):
    fake_hub_cache(hub_cache, "org/tiny", "model", MODEL_FILES)
    out = tmp_path / "store" / "tiny"
    result = run("hf://org/tiny", out)
    assert committed_files(out) == MODEL_FILES  # real files, not the cache's symlinks
    meta = storage.read_manifest(out).meta
    assert (meta["source"], meta["revision"], meta["requested_revision"], meta["repo_type"]) == (
        "hf://org/tiny", COMMIT, "main", "model")
    assert (result.revision, result.source_kind, result.cached) == (COMMIT, "hf", False)
    # The same commit, named by sha or as a bare id, is the same import.
    assert run("org/tiny", out, revision=COMMIT).cached


def test_hub_patterns_and_dataset_repos(hub_cache, tmp_path):
    fake_hub_cache(hub_cache, "org/tiny", "model", MODEL_FILES)
    fake_hub_cache(hub_cache, "org/charts", "dataset", {"train.jsonl": b"{}\n"})
    run("hf://org/tiny", tmp_path / "cfg", include=["*.json", "tokenizer/*"],
        exclude=["tokenizer/*"])
    assert committed_files(tmp_path / "cfg") == {"config.json": MODEL_FILES["config.json"]}
    run("hf://org/charts", tmp_path / "ds", repo_type="dataset")
    assert committed_files(tmp_path / "ds") == {"train.jsonl": b"{}\n"}
    with pytest.raises(FetchError, match=r"not in the local hub cache.*HF_HUB_OFFLINE"):
        run("hf://org/charts", tmp_path / "wrong-type")  # a dataset asked for as a model
    with pytest.raises(FetchError, match="no files"):
        run("hf://org/tiny", tmp_path / "none", include=["*.gguf"])
    assert not storage.is_committed(tmp_path / "none")


# --------------------------------------------------------------------------- store sources


def test_store_to_store_copies_verify_and_restamp_the_manifest(s3_bucket, tmp_path):
    src = tmp_path / "committed"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(PAYLOAD)
    storage.commit_dir(src, meta={"stage": "prepare", "fingerprint": "from-prepare"})
    s3_out = f"s3://{s3_bucket}/imported/model"
    result = run(str(src), s3_out)
    assert committed_files(s3_out) == {"sub/w.bin": PAYLOAD} and not result.cached
    meta = storage.read_manifest(s3_out).meta
    assert (meta["source"], meta["store_kind"], meta["upstream"]) == (
        str(src), "committed", {"stage": "prepare"})
    assert meta["fingerprint"] != "from-prepare"
    assert run(str(src), s3_out).cached
    # s3:// -> local: verified against the manifest on the way down.
    run(s3_out, tmp_path / "back")
    assert committed_files(tmp_path / "back") == {"sub/w.bin": PAYLOAD}


def test_plain_folders_and_single_files_from_the_store(s3_bucket, tmp_path):
    raw = tmp_path / "raw"
    (raw / "imgs").mkdir(parents=True)
    (raw / "imgs" / "1.png").write_bytes(b"png")
    (raw / "ann.json").write_text("[]")
    s3_out = f"s3://{s3_bucket}/raw-copy"
    run(str(raw), s3_out)
    assert committed_files(s3_out) == {"ann.json": b"[]", "imgs/1.png": b"png"}
    assert storage.read_manifest(s3_out).meta["store_kind"] == "folder"
    data = zip_bytes(FILES)
    storage.write_bytes(f"s3://{s3_bucket}/archives/set.zip", data)
    run(f"s3://{s3_bucket}/archives/set.zip", tmp_path / "set", sha256=sha(data))
    assert committed_files(tmp_path / "set") == FILES
    with pytest.raises(ChecksumError):
        run(f"s3://{s3_bucket}/archives/set.zip", tmp_path / "bad", sha256="0" * 64)
    assert not storage.is_committed(tmp_path / "bad")
    with pytest.raises(storage.StoreNotFoundError, match="import source not found"):
        run(f"s3://{s3_bucket}/nothing-here", tmp_path / "none")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_plain_folder_with_a_link_out_of_it_is_refused_naming_the_link(tmp_path, capsys, kind):
    secret = tmp_path / "outside" / "credentials.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"AWS_SECRET_ACCESS_KEY=not-for-the-store")
    raw = tmp_path / "raw"
    (raw / "imgs").mkdir(parents=True)
    (raw / "ann.json").write_text("[]")
    link = raw / "imgs" / "1.png"
    link.symlink_to(secret if kind == "file" else secret.parent)
    out = tmp_path / "store" / "raw"
    with pytest.raises(storage.StoreError, match=f"{link}: is a symbolic link"):
        run(str(raw), out)
    assert cli_main(["import", str(raw), "--to", str(out)]) == 1
    assert f"mmjobs import: {link}: is a symbolic link" in capsys.readouterr().err
    assert not storage.is_committed(out)
    copies = [Path(d, f) for d, _, files in os.walk(tmp_path) for f in files
              if not Path(d, f).is_symlink() and Path(d, f) != secret
              and Path(d, f).read_bytes() == secret.read_bytes()]
    assert copies == [], "the outside file was copied"


def test_a_hub_repo_with_a_reserved_file_name_is_refused(hub_cache, tmp_path):
    fake_hub_cache(hub_cache, "org/odd", "model", {**MODEL_FILES, "_MANIFEST.json": b"{}"})
    with pytest.raises(FetchError, match=r"a file '_MANIFEST\.json', a name the store reserves.*"
                                         r"--exclude '_MANIFEST\.json'"):
        run("hf://org/odd", tmp_path / "odd")
    run("hf://org/odd", tmp_path / "odd", exclude=["_MANIFEST.json"])
    assert committed_files(tmp_path / "odd") == MODEL_FILES


# --------------------------------------------------------------------------- config + CLI


@pytest.mark.parametrize("overrides,message", [
    (["source=https://h/x.zip", "revision=main"], "revision apply to hub sources only"),
    (["source=s3://b/x", "include=['*.json']"], "include apply to hub sources only"),
    (["source=hf://org/x", "sha256=" + "ab" * 32], "pinned by its revision"),
    (["source=https://h/x.zip", "sha256=abc"], "expected 64 hex digits"),
    (["source=hf://datasets/org/x"], "repo_type=dataset"),
    (["source=ftp://h/x.zip"], "unsupported scheme"),
    (["source=https://h/x.zip", "to=/a", "output=/b"], "disagree"),
])
def test_bad_configs_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ImportConfig, {}, overrides)


def test_the_import_command(server, tmp_path, capsys):
    server.files["set.zip"] = zip_bytes(FILES)
    out = tmp_path / "store" / "set"
    proc = subprocess.run([sys.executable, "-m", "mmjobs.cli", "import", server.url("set.zip"),
                           "--to", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["files"] == 2
    assert committed_files(out) == FILES
    assert cli_main(["stage", "import", "--set", f"source={server.url('set.zip')}",
                     "--set", f"to={out}"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["cached"] is True
    assert cli_main(["import", server.url("set.zip"), "--to", str(tmp_path / "bad"),
                     "--sha256", "0" * 64]) == 1
    err = capsys.readouterr().err
    assert "mmjobs import:" in err and f"expected {'0' * 64}" in err
    assert not storage.is_committed(tmp_path / "bad")
