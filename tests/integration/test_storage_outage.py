"""S3 outages: the store against moto_server behind a TCP proxy that goes down for N seconds
(open connections reset, new ones refused with ECONNREFUSED), then comes back.

Each test sets a short retry backoff; the deadline is set per test (long enough to ride out
the outage, or shorter than it to see the failure).
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from mmjobs import storage, storage_s3
from mmjobs.cli import main as cli_main
from mmjobs.storage import StoreUnavailableError
from tests.servers import OutageProxy
from tests.unit.test_storage_local import make_tree, read_tree

pytestmark = pytest.mark.integration
MiB = 1 << 20
OUTAGE_S = 3.0


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """The test S3 server behind an OutageProxy, with fast retries and small multipart parts."""
    monkeypatch.setenv("MMJOBS_STORE_RETRY_DEADLINE_S", "30")
    monkeypatch.setenv("MMJOBS_STORE_RETRY_BACKOFF_S", "0.05")
    monkeypatch.setenv("MMJOBS_STORE_RETRY_MAX_DELAY_S", "0.5")
    # botocore's own retries off: what rides out the outage must be mmjobs's retrying.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    # S3's smallest part is 5 MiB: a 16 MiB file goes up in 4 parts, and comes down in 4 ranges.
    monkeypatch.setattr(storage_s3, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(storage_s3, "PART_SIZE", 5 * MiB)
    with OutageProxy(s3_env.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        yield p


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_multipart_upload_rides_out_a_refused_outage_mid_upload(tmp_path, s3_bucket, s3_env,
                                                                 proxy):
    data = os.urandom(16 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    proxy.outage_after(upload_bytes=7 * MiB, seconds=OUTAGE_S)  # inside the second part
    started = time.monotonic()
    storage.put_file(tmp_path / "big.bin", f"s3://{s3_bucket}/up/big.bin")
    took = time.monotonic() - started
    assert proxy.outages == 1 and proxy.reset >= 1, "the outage cut connections in flight"
    assert took >= OUTAGE_S, "nothing can finish while the endpoint refuses connections"
    direct = s3_env.client()  # around the proxy: what S3 really holds
    obj = direct.get_object(Bucket=s3_bucket, Key="up/big.bin")
    assert sha(obj["Body"].read()) == sha(data) and obj["Metadata"]["sha256"] == sha(data)
    assert not direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_download_and_streaming_read_resume_after_an_outage_mid_body(tmp_path, s3_bucket,
                                                                     proxy):
    data = os.urandom(16 * MiB)
    uri = f"s3://{s3_bucket}/down/big.bin"
    (tmp_path / "big.bin").write_bytes(data)
    storage.put_file(tmp_path / "big.bin", uri)
    proxy.outage_after(download_bytes=7 * MiB, seconds=OUTAGE_S)
    started = time.monotonic()
    storage.get_file(uri, tmp_path / "got.bin")
    assert time.monotonic() - started >= OUTAGE_S and proxy.outages == 1
    assert sha((tmp_path / "got.bin").read_bytes()) == sha(data)
    proxy.outage_after(download_bytes=3 * MiB, seconds=1.0)
    with storage.open_read(uri) as f:
        streamed = b"".join(iter(lambda: f.read(256 * 1024), b""))
    assert proxy.outages == 2 and sha(streamed) == sha(data)


def _ops(tmp_path, bucket):
    """(name, operation) pairs covering every kind of store request."""
    src = tmp_path / "src"
    files = make_tree(src)
    base = f"s3://{bucket}/ops"
    storage.put_dir(src, f"{base}/dir")
    storage.write_bytes(f"{base}/one.txt", b"one")
    return files, {
        "head": lambda: storage.exists(f"{base}/one.txt"),
        "list": lambda: list(storage.list_objects(base)),
        "get": lambda: storage.read_bytes(f"{base}/one.txt"),
        "put": lambda: storage.write_bytes(f"{base}/two.txt", b"two"),
        "delete": lambda: storage.delete(f"{base}/two.txt"),
        "put_dir + manifest commit": lambda: storage.put_dir(src, f"{base}/dir2"),
        "get_dir": lambda: storage.get_dir(f"{base}/dir", tmp_path / "out"),
        "copy": lambda: storage.copy(f"{base}/dir/a.txt", f"{base}/copied.txt"),
        "check (store ls)": lambda: storage.check_dir(f"{base}/dir", checksums=True),
    }


def test_every_kind_of_operation_waits_out_an_outage_at_its_start(tmp_path, s3_bucket, proxy):
    files, ops = _ops(tmp_path, s3_bucket)
    for name, op in ops.items():
        proxy.outage(1.0)
        started = time.monotonic()
        op()
        assert time.monotonic() - started >= 1.0, f"{name} finished while the endpoint was down"
    assert proxy.outages == len(ops)
    assert read_tree(tmp_path / "out") == files
    assert storage.read_bytes(f"s3://{s3_bucket}/ops/copied.txt") == files["a.txt"]
    assert not storage.exists(f"s3://{s3_bucket}/ops/two.txt")
    assert storage.check_dir(f"s3://{s3_bucket}/ops/dir2").committed


def test_an_outage_longer_than_the_deadline_fails_saying_how_long_and_what_to_check(
        tmp_path, s3_bucket, s3_env, proxy, monkeypatch, capsys):
    monkeypatch.setenv("MMJOBS_STORE_RETRY_DEADLINE_S", "1.5")
    data = os.urandom(16 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    uri = f"s3://{s3_bucket}/late/big.bin"
    proxy.outage_after(upload_bytes=7 * MiB, seconds=600)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        storage.put_file(tmp_path / "big.bin", uri)
    took = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith(f"{uri}: could not upload part ")
    assert "still failing after" in message and "retry deadline of 1.5s" in message
    assert proxy.endpoint in message and "MMJOBS_STORE_RETRY_DEADLINE_S" in message
    assert took < 60, "the deadline bounds the wait"
    # The command line: the retry warnings, then one message, exit 1, no traceback.
    assert cli_main(["store", "cp", str(tmp_path / "big.bin"), uri]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mmjobs store: {uri}: could not ") and "still failing after" in last
    assert "Traceback" not in err and "Logging error" not in err
    proxy.restore()
    assert not storage.exists(uri), "a failed upload leaves no object behind"
    assert s3_env.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
