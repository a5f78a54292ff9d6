"""The store against a real S3-protocol server (moto_server) over HTTP, and through faults."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.cli import main as cli_main
from mmjobs.storage import IncompleteDirectoryError, IntegrityError, StoreError
from tests.servers import FaultProxy
from tests.unit.test_storage_local import make_tree, read_tree

pytestmark = pytest.mark.integration


def test_directory_round_trip_local_to_s3_and_back(tmp_path, s3_bucket):
    src, out = tmp_path / "src", tmp_path / "out"
    files = make_tree(src)
    big = os.urandom(40 * 1024 * 1024)  # above the multipart threshold
    (src / "weights.bin").write_bytes(big)
    files["weights.bin"] = big
    uri = f"s3://{s3_bucket}/runs/r1/train"
    manifest = storage.put_dir(src, uri)
    assert storage.is_committed(uri)
    assert {f.path: f.sha256 for f in manifest.files} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    storage.get_dir(uri, out)
    assert read_tree(out) == files
    assert storage.verify_dir(uri).total_bytes == sum(map(len, files.values()))


def test_copy_between_s3_and_local_keeps_committed_state(tmp_path, s3_bucket):
    src = tmp_path / "src"
    files = make_tree(src)
    storage.put_dir(src, tmp_path / "store" / "ds")
    uri = f"s3://{s3_bucket}/copied"
    summary = storage.copy(tmp_path / "store" / "ds", uri)
    assert summary.startswith(f"copied {len(files)} files")
    storage.copy(uri, tmp_path / "back")
    assert storage.is_committed(tmp_path / "back")
    assert {k: v for k, v in read_tree(tmp_path / "back").items()
            if k != "_MANIFEST.json"} == files


def _upload_then_die(src: str, uri: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    from mmjobs import storage as st

    real_put = st.put_file
    done = 0

    def put_and_count(local, target, **kwargs):
        nonlocal done
        real_put(local, target, **kwargs)
        done += 1
        if done == 2:
            os._exit(9)  # SIGKILL-like: no cleanup, no manifest

    st.put_file = put_and_count
    st.put_dir(src, uri, workers=1)


def test_upload_killed_midway_is_refused_as_incomplete(tmp_path, s3_bucket, s3_env):
    src = tmp_path / "src"
    make_tree(src)
    uri = f"s3://{s3_bucket}/killed"
    proc = multiprocessing.get_context("spawn").Process(
        target=_upload_then_die, args=(str(src), uri, s3_env.env()))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    assert len(list(storage.list_objects(uri))) == 2, "some objects made it up"
    assert not storage.is_committed(uri)
    with pytest.raises(IncompleteDirectoryError, match=f"{uri}: no _MANIFEST.json"):
        storage.get_dir(uri, tmp_path / "out")


def test_corrupted_s3_object_is_detected_on_read(tmp_path, s3_bucket, s3_env):
    src = tmp_path / "src"
    make_tree(src)
    uri = f"s3://{s3_bucket}/corrupt"
    storage.put_dir(src, uri)
    client = s3_env.client()
    key = "corrupt/sub/b.bin"
    data = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"X" + data[1:])  # same size, other bytes
    with pytest.raises(IntegrityError, match=f"s3://{s3_bucket}/{key}: sha256 .* != manifest"):
        storage.get_dir(uri, tmp_path / "out")


def test_permanent_errors_fail_fast_naming_the_uri(s3_env):
    started = time.monotonic()
    with pytest.raises(StoreError, match="s3://no-such-bucket-xyz/k: bucket does not exist"):
        storage.read_bytes("s3://no-such-bucket-xyz/k")
    bucket = s3_env.create_bucket("permanent-errors")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/missing.txt: not found"):
        storage.read_bytes(f"s3://{bucket}/missing.txt")
    assert time.monotonic() - started < 20, "permanent errors must not be retried for long"


def test_streaming_read_and_write(s3_bucket):
    uri = f"s3://{s3_bucket}/stream/data.jsonl"
    lines = [f'{{"i": {i}}}\n'.encode() for i in range(5000)]
    with storage.open_write(uri) as f:
        for line in lines:
            f.write(line)
    with storage.open_read(uri) as f:  # iterates lines like a local file
        assert list(f) == lines
    assert list(storage.iter_lines(uri)) == list(enumerate(lines, start=1))
    with storage.open_read(uri) as f:
        assert f.readline() == lines[0] and f.read(3) == lines[1][:3]


def test_hundred_operations_through_ten_percent_faults_all_succeed(tmp_path, s3_bucket,
                                                                   monkeypatch):
    rng = random.Random(7)
    # Fast backoff, and botocore's standard mode: the default adaptive mode rate-limits the
    # client after the injected SlowDowns, which only makes this test ~25 s slower.
    monkeypatch.setenv("MMJOBS_STORE_RETRY_BACKOFF_S", "0.05")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], fault_rate=0.10, seed=11) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        expected: dict[str, bytes] = {}
        for i in range(100):
            kind = i % 5
            if kind in (0, 1):  # put then get a small object
                data = rng.randbytes(rng.randint(1, 200_000))
                uri = f"s3://{s3_bucket}/flaky/obj-{i}"
                storage.write_bytes(uri, data)
                expected[uri] = data
                assert storage.read_bytes(uri) == data
            elif kind == 2:  # a committed directory round trip
                src = tmp_path / f"src{i}"
                files = make_tree(src)
                uri = f"s3://{s3_bucket}/flaky/dir-{i}"
                storage.put_dir(src, uri, workers=4)
                storage.get_dir(uri, tmp_path / f"out{i}", workers=4)
                assert read_tree(tmp_path / f"out{i}") == files
            elif kind == 3:  # listing and existence
                assert storage.exists(f"s3://{s3_bucket}/flaky")
                listed = {o.uri for o in storage.list_objects(f"s3://{s3_bucket}/flaky")}
                assert set(expected) <= listed
            else:  # file transfer via a local path
                local = Path(tmp_path / f"f{i}.bin")
                local.write_bytes(rng.randbytes(50_000))
                uri = f"s3://{s3_bucket}/flaky/file-{i}"
                storage.put_file(local, uri)
                storage.get_file(uri, tmp_path / f"g{i}.bin")
                assert (tmp_path / f"g{i}.bin").read_bytes() == local.read_bytes()
        for uri, data in expected.items():
            assert storage.read_bytes(uri) == data
    assert proxy.requests > 300
    assert all(count > 5 for count in proxy.faults.values()), proxy.faults


# --------------------------------------------------------------------------- ls, cp, overwrite


def test_store_ls_flags_deleted_and_truncated_objects_and_leftovers(tmp_path, s3_bucket, s3_env,
                                                                    capsys):
    src = tmp_path / "src"
    make_tree(src)
    uri = f"s3://{s3_bucket}/damaged"
    storage.put_dir(src, uri)
    assert cli_main(["store", "ls", uri]) == 0
    assert "— committed: all 4 files its manifest lists are there" in capsys.readouterr().out
    client = s3_env.client()
    client.delete_object(Bucket=s3_bucket, Key="damaged/a.txt")
    body = client.get_object(Bucket=s3_bucket, Key="damaged/sub/b.bin")["Body"].read()
    client.put_object(Bucket=s3_bucket, Key="damaged/sub/b.bin", Body=body[:100])
    client.put_object(Bucket=s3_bucket, Key="damaged/stray.txt", Body=b"?")
    assert cli_main(["store", "ls", uri]) == 1
    out = capsys.readouterr().out
    assert "           -  a.txt  <- listed in the manifest but missing" in out
    assert "         100  sub/b.bin  <- size 100 != manifest 3000 (truncated or corrupt)" in out
    assert "stray.txt  <- not in the manifest: a leftover" in out
    assert "DAMAGED: 2 of the 4 files" in out and "committed:" not in out
    check = storage.check_dir(uri)
    assert not check.committed and set(check.problems) == {"a.txt", "sub/b.bin"}


def test_store_ls_verify_catches_a_same_size_corruption(tmp_path, s3_bucket, s3_env, capsys):
    src = tmp_path / "src"
    make_tree(src)
    uri = f"s3://{s3_bucket}/flipped"
    storage.put_dir(src, uri)
    client = s3_env.client()
    data = client.get_object(Bucket=s3_bucket, Key="flipped/sub/b.bin")["Body"].read()
    client.put_object(Bucket=s3_bucket, Key="flipped/sub/b.bin", Body=b"X" + data[1:])
    assert cli_main(["store", "ls", uri]) == 0  # sizes only: cannot see it
    assert cli_main(["store", "ls", "--verify", uri]) == 1
    assert "sub/b.bin  <- sha256 " in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_single_file_copy_of_a_damaged_object_fails_and_writes_nothing(tmp_path, s3_bucket,
                                                                       s3_env, capsys, damage):
    src = tmp_path / "src"
    make_tree(src)
    uri = f"s3://{s3_bucket}/single"
    storage.put_dir(src, uri)
    assert cli_main(["store", "cp", f"{uri}/sub/b.bin", str(tmp_path / "good.bin")]) == 0
    assert "size and sha256 match the manifest of " + uri in capsys.readouterr().out
    client = s3_env.client()
    data = client.get_object(Bucket=s3_bucket, Key="single/sub/b.bin")["Body"].read()
    bad = b"X" + data[1:] if damage == "flip" else data[:100]
    client.put_object(Bucket=s3_bucket, Key="single/sub/b.bin", Body=bad)  # no sha256 metadata
    for dst in (tmp_path / "copy.bin", f"s3://{s3_bucket}/elsewhere/b.bin"):
        assert cli_main(["store", "cp", f"{uri}/sub/b.bin", str(dst)]) == 1
        err = capsys.readouterr().err
        assert f"{uri}/sub/b.bin: " in err and f"of {uri}; not copied" in err
        assert ("sha256" if damage == "flip" else "size 100 != manifest 3000") in err
        assert not storage.exists(dst)


def test_a_single_object_is_checked_against_its_recorded_sha256(tmp_path, s3_bucket, s3_env):
    uri = f"s3://{s3_bucket}/loose/blob.bin"
    storage.write_bytes(uri, b"payload")
    assert "match those recorded when it was uploaded" in storage.copy(uri, tmp_path / "ok")
    good = s3_env.client().head_object(Bucket=s3_bucket, Key="loose/blob.bin")["Metadata"]
    s3_env.client().put_object(Bucket=s3_bucket, Key="loose/blob.bin", Body=b"paylXad",
                               Metadata=good)  # bytes rotted under an intact record
    with pytest.raises(IntegrityError, match=f"{uri}: sha256 .* recorded when it was uploaded"):
        storage.copy(uri, tmp_path / "bad")
    with pytest.raises(IntegrityError, match="recorded when it was written"):
        storage.read_bytes(uri)
    assert not (tmp_path / "bad").exists()


def test_overwriting_with_a_smaller_directory_leaves_no_stale_objects(tmp_path, s3_bucket,
                                                                      capsys):
    big, small = tmp_path / "big", tmp_path / "small"
    make_tree(big)
    (small / "sub").mkdir(parents=True)
    (small / "sub" / "b.bin").write_bytes(b"new")
    uri = f"s3://{s3_bucket}/overwrite"
    storage.put_dir(big, uri)
    storage.put_dir(small, uri)
    assert [o.relpath for o in storage.list_objects(uri)] == ["_MANIFEST.json", "sub/b.bin"]
    assert cli_main(["store", "ls", uri]) == 0
    out = capsys.readouterr().out
    assert out.endswith("1 objects, 3 bytes — committed: all 1 files its manifest lists are "
                        "there, checked by size (--verify also checks sha256)\n")


def test_a_crash_mid_overwrite_never_reads_as_committed(tmp_path, s3_bucket, s3_env):
    big, small = tmp_path / "big", tmp_path / "small"
    make_tree(big)
    small.mkdir()
    (small / "a.txt").write_bytes(b"new")
    uri = f"s3://{s3_bucket}/crash"
    storage.put_dir(big, uri)
    # Killed after the new files went up and the old ones were deleted, before the manifest.
    proc = multiprocessing.get_context("spawn").Process(
        target=_overwrite_then_die, args=(str(small), uri, s3_env.env()))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    check = storage.check_dir(uri)
    assert check.manifest is None and not check.committed
    assert [o.relpath for o in check.objects] == ["a.txt"]
    storage.put_dir(small, uri)  # the re-run commits exactly the new contents
    assert storage.check_dir(uri, checksums=True).committed


def _overwrite_then_die(src: str, uri: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    from mmjobs import storage as st

    def die(*_args, **_kwargs):
        os._exit(9)

    st.write_text = die  # the manifest is the only text put_dir writes
    st.put_dir(src, uri)


def test_writing_over_a_prefix_that_holds_another_committed_directory_is_refused(tmp_path,
                                                                                 s3_bucket):
    src = tmp_path / "src"
    files = make_tree(src)
    storage.put_dir(src, f"s3://{s3_bucket}/models/llava")
    with pytest.raises(StoreError, match=f"s3://{s3_bucket}/models: holds another committed "
                                         f"directory, s3://{s3_bucket}/models/llava"):
        storage.put_dir(src, f"s3://{s3_bucket}/models")
    assert storage.check_dir(f"s3://{s3_bucket}/models/llava", checksums=True).committed
    assert len(list(storage.list_objects(f"s3://{s3_bucket}/models"))) == len(files) + 1


def test_control_characters_in_names_are_escaped_in_store_ls(tmp_path, s3_bucket, capsys):
    # moto cannot store a newline in a key (real S3 can): the local test covers newlines.
    names = ["ansi\x1b[31mred\x1b[0m.txt", "cr\rfake.txt", "csi\x9b2J.txt", "bidi\u202etxt.exe"]
    for name in names:
        storage.write_bytes(f"s3://{s3_bucket}/odd/{name}", b"x")
    assert cli_main(["store", "ls", f"s3://{s3_bucket}/odd"]) == 0
    out = capsys.readouterr().out
    for raw in ("\x1b", "\r", "\x9b", "\u202e"):
        assert raw not in out
    for shown in ("ansi\\x1b[31mred\\x1b[0m.txt", "cr\\rfake.txt", "csi\\x9b2J.txt",
                  "bidi\\u202etxt.exe"):
        assert f"  {shown}\n" in out


def test_a_changed_single_s3_input_file_changes_the_stage_input_fingerprint(s3_bucket):
    # A stage whose input is one S3 object must not reuse outputs made from its old content.
    from mmjobs.stage_contract import input_fingerprint

    uri = f"s3://{s3_bucket}/raw/mix.json"
    storage.write_bytes(uri, b'[{"id": "a"}]')
    before = input_fingerprint(uri)
    assert input_fingerprint(uri) == before
    storage.write_bytes(uri, b'[{"id": "b"}]')  # same size, other bytes
    assert input_fingerprint(uri) != before
