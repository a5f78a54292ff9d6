"""Resumable, verified HTTP downloads against a real HTTP server on loopback.

`FileServer` (also used by tests/integration/test_import_stage.py) serves in-memory files with
Range/If-Range support and injects the faults under test: bodies cut short, a server that never
gets past a byte offset, error statuses, and content that changes between requests.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mmjobs.data.fetch import ChecksumError, FetchError, SizeLimitError, download

LOOPBACK = "127.0.0.1"


class FileServer:
    """A threaded HTTP/1.1 server on a free loopback port serving `files` (path -> bytes).

    Faults, per path:
    - `truncate[path] = n`: the next n responses announce their full length but send only half
      of the body, then close the connection;
    - `stall_at[path] = k`: never send any byte at or beyond offset k (a download that cannot
      complete);
    - `statuses[path] = [503, ...]`: answer these statuses first, one per request.
    `etag=False` sends no ETag/Last-Modified (a server whose files cannot be validated);
    `before_request(i)` runs before the i-th request (0-based) is answered. Every request's
    path and headers are recorded in `requests`.
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.truncate: dict[str, int] = {}
        self.stall_at: dict[str, int] = {}
        self.statuses: dict[str, list[int]] = {}
        self.etag = True
        self.before_request: Callable[[int], None] | None = None
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{path.lstrip('/')}"

    def range_headers(self) -> list[str | None]:
        """The Range header of each request, in order (None where absent)."""
        return [headers.get("Range") for _, headers in self.requests]

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].lstrip("/")
                with owner._lock:
                    index = len(owner.requests)
                    owner.requests.append((path, dict(self.headers.items())))
                if owner.before_request is not None:
                    owner.before_request(index)
                self.close_connection = True
                if path not in owner.files:
                    return self._status(404)
                if owner.statuses.get(path):
                    return self._status(owner.statuses[path].pop(0))
                data = owner.files[path]
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                start = self._range_start(etag)
                if start is not None and start >= len(data):
                    return self._status(416, {"Content-Range": f"bytes */{len(data)}"})
                if start is None:
                    self.send_response(200)
                    start = 0
                else:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if owner.etag:
                    self.send_header("ETag", etag)
                self.send_header("Connection", "close")
                self.end_headers()
                if owner.truncate.get(path, 0) > 0:
                    owner.truncate[path] -= 1
                    body = body[: len(body) // 2]
                if path in owner.stall_at:
                    body = body[: max(0, owner.stall_at[path] - start)]
                self.wfile.write(body)
                self.wfile.flush()

            def _range_start(self, etag: str) -> int | None:
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                if not match or (if_range is not None and (not owner.etag or if_range != etag)):
                    return None  # no range, or the file changed since: send it whole (RFC 9110)
                return int(match.group(1))

            def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

        return Handler


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DATA = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable


@pytest.fixture
def server():
    with FileServer({"data.bin": DATA}) as srv:
        yield srv


def test_plain_download_verifies_and_leaves_no_part_file(server, tmp_path):
    got = download(server.url("data.bin"), tmp_path / "d" / "data.bin", sha256=sha(DATA))
    assert got.path.read_bytes() == DATA
    assert (got.size, got.sha256, got.attempts, got.resumed) == (len(DATA), sha(DATA), 1, False)
    assert server.range_headers() == [None]
    assert sorted(p.name for p in got.path.parent.iterdir()) == ["data.bin"]


def test_a_body_cut_short_is_resumed_with_a_range_request(server, tmp_path):
    server.truncate["data.bin"] = 1
    got = download(server.url("data.bin"), tmp_path / "data.bin", sha256=sha(DATA), backoff=0)
    assert got.path.read_bytes() == DATA
    assert got.resumed and got.attempts == 2
    half = len(DATA) // 2
    assert server.range_headers() == [None, f"bytes={half}-"]
    etag = f'"{sha(DATA)[:16]}"'
    assert server.requests[1][1]["If-Range"] == etag  # resumes only the same file


def test_a_server_that_never_completes_fails_clearly_and_the_next_call_resumes(server, tmp_path):
    server.stall_at["data.bin"] = 300_000
    dest = tmp_path / "data.bin"
    with pytest.raises(FetchError, match=r"after 3 attempts.*300000 bytes are kept in .*"
                       r"data\.bin\.part.*resumes"):
        download(server.url("data.bin"), dest, retries=2, backoff=0)
    assert not dest.exists() and (tmp_path / "data.bin.part").stat().st_size == 300_000
    del server.stall_at["data.bin"]
    server.requests.clear()
    got = download(server.url("data.bin"), dest, sha256=sha(DATA), backoff=0)
    assert got.path.read_bytes() == DATA and got.resumed
    assert server.range_headers() == ["bytes=300000-"]


def test_sha256_mismatch_deletes_everything(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"is {sha(DATA)}, expected {'0' * 64}"):
        download(server.url("data.bin"), tmp_path / "dl" / "data.bin", sha256="0" * 64)
    assert list((tmp_path / "dl").iterdir()) == []


def test_a_spliced_resume_is_downloaded_again_whole(server, tmp_path):
    """Without validators the server cannot refuse a stale range: the checksum catches the
    splice and one fresh download fixes it."""
    new = DATA[::-1]
    server.etag = False
    server.truncate["data.bin"] = 1

    def change_file(index: int) -> None:
        if index == 1:
            server.files["data.bin"] = new

    server.before_request = change_file
    got = download(server.url("data.bin"), tmp_path / "data.bin", sha256=sha(new), backoff=0)
    assert got.path.read_bytes() == new
    assert server.range_headers() == [None, f"bytes={len(DATA) // 2}-", None]


def test_if_range_makes_a_changed_file_come_whole(server, tmp_path):
    new = DATA[::-1]
    server.truncate["data.bin"] = 1
    server.before_request = lambda i: server.files.update({"data.bin": new}) if i == 1 else None
    got = download(server.url("data.bin"), tmp_path / "data.bin", backoff=0)
    assert got.path.read_bytes() == new  # 200 to the If-Range request: no splice
    assert len(server.requests) == 2 and "If-Range" in server.requests[1][1]


def test_transient_statuses_are_retried_and_others_fail_at_once(server, tmp_path):
    server.statuses["data.bin"] = [503, 429]
    got = download(server.url("data.bin"), tmp_path / "a.bin", backoff=0)
    assert got.attempts == 3 and got.path.read_bytes() == DATA
    server.requests.clear()
    with pytest.raises(FetchError, match="HTTP 404"):
        download(server.url("missing.bin"), tmp_path / "b.bin", backoff=0)
    assert len(server.requests) == 1
    server.statuses["data.bin"] = [403]
    with pytest.raises(FetchError, match=r"HTTP 403.*no credentials"):
        download(server.url("data.bin"), tmp_path / "c.bin", backoff=0)


def test_max_bytes_refuses_a_large_file_before_reading_it(server, tmp_path):
    with pytest.raises(SizeLimitError, match="over the limit of 1,000 bytes; raise max_bytes if"):
        download(server.url("data.bin"), tmp_path / "data.bin", max_bytes=1000)


def test_a_part_file_from_another_url_is_not_resumed(server, tmp_path):
    dest = tmp_path / "data.bin"
    Path(f"{dest}.part").write_bytes(b"junk from somewhere else")
    got = download(server.url("data.bin"), dest, sha256=sha(DATA))
    assert got.path.read_bytes() == DATA and server.range_headers() == [None]
