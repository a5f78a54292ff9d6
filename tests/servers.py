"""Real servers for integration tests, started as subprocesses on 127.0.0.1.

- `S3Server`: moto's standalone server speaking the S3 wire protocol over HTTP.
- `MLflowServer`: an MLflow tracking server (sqlite backend, artifacts proxied to an S3 server);
  it can be killed and restarted on the same port and database to simulate an outage.
- `FaultProxy`: a loopback HTTP proxy that drops connections, answers 503 or truncates bodies
  for a chosen fraction of requests, for reliability tests.
- `OutageProxy`: a loopback TCP proxy that goes down for N seconds (open connections reset, new
  ones refused), now or once N bytes went through, for outage tests.

Nothing here patches libraries in-process: clients talk to these servers over real sockets.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """Find a console script of the running venv (tests may run without the venv on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log:\n"
                               f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s; log:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    # Servers are started in their own process group so workers (gunicorn/uvicorn) die too.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class S3Server:
    """moto_server on a free loopback port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment a client (or a server like MLflow) needs to reach this S3."""
        return {
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> S3Server:
        log = self.workdir / "moto.log"
        self.proc = subprocess.Popen(
            [_bin("moto_server"), "-H", LOOPBACK, "-p", str(self.port)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait_http(f"{self.endpoint}/moto-api/", 30, self.proc, log)
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=TEST_REGION,
            aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        _stop(self.proc)


@dataclass
class MLflowServer:
    """`mlflow server` with a sqlite backend and artifacts proxied to an S3 bucket."""

    workdir: Path
    s3: S3Server
    bucket: str = "mlflow-artifacts"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 90) -> MLflowServer:
        """Start (or restart, on the same port and database) the server and wait for /health."""
        try:
            self.s3.create_bucket(self.bucket)
        except Exception as e:  # already exists after a restart
            if "BucketAlready" not in type(e).__name__ + str(e):
                raise
        log = self.workdir / "mlflow.log"
        env = {**os.environ, **self.s3.env()}
        self.proc = subprocess.Popen(
            [
                _bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{self.bucket}/",
                "--workers", "1",
            ],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
            cwd=self.workdir,
        )
        _wait_http(f"{self.uri}/health", timeout, self.proc, log)
        return self

    def kill(self) -> None:
        """Hard-kill the server (an outage), keeping its database for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        _stop(self.proc)


class FaultProxy:
    """HTTP proxy on loopback that injects faults into a fraction of requests.

    Each request is forwarded to `upstream` unless the seeded RNG picks it for a fault, chosen
    uniformly among: drop the connection without answering, answer 503 (S3's SlowDown), or send
    the upstream's headers and only half of its body before closing. `faults` counts each kind.
    """

    def __init__(self, upstream: str, fault_rate: float, seed: int = 0) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fault_rate = fault_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = {"drop": 0, "503": 0, "truncate": 0}
        self.port = free_port()
        self.server = ThreadingHTTPServer((LOOPBACK, self.port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _pick_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.rng.random() >= self.fault_rate:
                return None
            kind = self.rng.choice(sorted(self.faults))
            self.faults[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._pick_fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but announces the object's length: pass that on.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                if fault == "truncate" and len(data) > 1:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler


class OutageProxy:
    """TCP proxy on loopback that forwards to `upstream` and can go down for a while.

    `outage(seconds)` (or `outage_after(upload_bytes=..., download_bytes=..., seconds=...)`, which
    starts one when that many bytes have gone through) resets every open connection and closes
    the listening socket, so new connections are refused (ECONNREFUSED) like a server that went
    away; after `seconds` it listens again on the same port and forwards as before. It works
    below HTTP, so the client's own connection handling is what is exercised.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.lock = threading.Lock()
        self.down_until = 0.0
        self.outages = 0  # outages started
        self.reset = 0  # open connections cut by an outage
        self.accepted = 0  # connections forwarded
        self.bytes_up = self.bytes_down = 0
        self._trigger: tuple[int | None, int | None, float] | None = None
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> OutageProxy:
        self._listen()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._close_listener()
        self._reset_all()

    def outage(self, seconds: float) -> None:
        """Go down now for `seconds`: cut open connections, refuse new ones."""
        with self.lock:
            self.down_until = time.monotonic() + seconds
            self.outages += 1
            self._trigger = None
        self._close_listener()
        self._reset_all()

    def restore(self) -> None:
        """End an outage now (the listener comes back within a few milliseconds)."""
        with self.lock:
            self.down_until = 0.0

    def outage_after(self, *, upload_bytes: int | None = None, download_bytes: int | None = None,
                     seconds: float) -> None:
        """Start an outage of `seconds` once this many more bytes went up (or down)."""
        with self.lock:
            self._trigger = (None if upload_bytes is None else self.bytes_up + upload_bytes,
                             None if download_bytes is None else self.bytes_down + download_bytes,
                             seconds)

    @property
    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(64)
        sock.settimeout(0.05)
        self._listener = sock

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()

    def _reset_all(self) -> None:
        with self.lock:
            conns, self._conns = list(self._conns), set()
            self.reset += len(conns) // 2  # a client socket and its upstream socket each
        for sock in conns:
            with contextlib.suppress(OSError):  # RST, not FIN: the peer sees a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self.is_down:
                self._close_listener()
                time.sleep(0.01)
                continue
            listener = self._listener  # outage() may close and clear it at any moment
            if listener is None:
                try:
                    self._listen()
                except OSError:  # the port is not free again yet
                    time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except OSError:  # a timeout, or the listener closed by an outage
                continue
            if self.is_down:  # accepted in the instant the outage began
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.accepted += 1
                self._conns.update((client, upstream))
            done = threading.Semaphore(0)  # released by each direction as it ends
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up, done),
                                 daemon=True).start()
            threading.Thread(target=self._reap, args=(client, upstream, done),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool,
              done: threading.Semaphore) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                seconds = self._count(len(data), up)
                if seconds is not None:
                    self.outage(seconds)
                    break
            else:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on
        except OSError:
            pass
        done.release()

    def _reap(self, client: socket.socket, upstream: socket.socket,
              done: threading.Semaphore) -> None:
        done.acquire()
        done.acquire()
        with self.lock:
            live = client in self._conns
            self._conns.discard(client)
            self._conns.discard(upstream)
        if live:
            client.close()
            upstream.close()

    def _count(self, n: int, up: bool) -> float | None:
        """Add `n` bytes; the armed outage's seconds if that crossed its trigger (disarmed)."""
        with self.lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n
            if self._trigger is None:
                return None
            up_at, down_at, seconds = self._trigger
            if (up_at is not None and self.bytes_up >= up_at) or (
                    down_at is not None and self.bytes_down >= down_at):
                self._trigger = None
                return seconds
            return None
