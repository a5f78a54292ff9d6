"""Real servers for integration tests, started as subprocesses on 127.0.0.1.

- `S3Server`: moto's standalone server speaking the S3 wire protocol over HTTP.
- `MLflowServer`: an MLflow tracking server (sqlite backend, artifacts proxied to an S3 server);
  it can be killed and restarted on the same port and database to simulate an outage.
- `FaultProxy`: a loopback HTTP proxy that drops connections, answers 503 or truncates bodies
  for a chosen fraction of requests, for reliability tests.

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
                self.send_header("Content-Length", str(len(data)))
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
