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
