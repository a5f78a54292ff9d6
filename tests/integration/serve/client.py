"""A small HTTP client for the serve tests and bench (stdlib only), and a load generator."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


class Client:
    """One keep-alive connection to `base_url` (not thread-safe: one per thread)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.api_key, self.timeout = api_key, timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> Reply:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        all_headers.update(headers or {})
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            reply = Reply(response.status, dict(response.headers), response.read())
        except (http.client.HTTPException, OSError):
            self.close()  # a fresh connection next time
            raise
        if reply.headers.get("connection", "").lower() == "close":
            self.close()
        return reply

    def chat(self, body: dict[str, Any]) -> Reply:
        return self.request("POST", "/v1/chat/completions", body)

    def stream(self, body: dict[str, Any]) -> tuple[Reply, list[Any]]:
        """POST with stream: true; returns the reply and its events (JSON, or "[DONE]")."""
        reply = self.chat({**body, "stream": True})
        events: list[Any] = []
        for block in reply.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
        return reply, events

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/readyz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.host}:{self.port} not ready after {timeout}s")


def chart_png(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small bar chart as PNG bytes."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for k in range(4):
        height = 5 + (seed * 7 + k * 11) % (size[1] - 8)
        draw.rectangle([4 + 15 * k, size[1] - 1 - height, 14 + 15 * k, size[1] - 1],
                       fill=((seed * 50 + k * 60) % 256, 90, 200 - k * 40))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def striped_png(width: int = 5472, height: int = 3648) -> bytes:
    """A big PNG of coloured stripes that compresses well (20 MP in about 70 kB by default):
    cheap to send, 4 bytes a pixel once decoded."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for k in range(width // 100):
        draw.rectangle([k * 100, height // 36, k * 100 + 50, height * 5 // 6],
                       fill=(k * 5 % 256, 90, 200))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def metric(url: str, name: str) -> float:
    """One unlabelled metric's value from the server's /metrics (0 if absent)."""
    text = Client(url).request("GET", "/metrics").body.decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def open_request(url: str, body: dict[str, Any], timeout: float = 60) -> socket.socket:
    """POST `body` on a raw socket and return it unread: closing it is the client leaving.
    For a stream, returns once the response has started (the job is queued or running)."""
    data = json.dumps(body).encode()
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(data)).encode() +
                 b"\r\n\r\n" + data)
    if body.get("stream"):
        head = sock.recv(65536)
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            sock.close()
            raise RuntimeError(f"the stream did not start: {head[:300]!r}")
    return sock


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def chat_body(model: str, question: str = "What is the largest bar?", *, image: bytes | None = None,
              **extra: Any) -> dict[str, Any]:
    """A chat-completions body with one user turn: an optional image, then the question."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    content.append({"type": "text", "text": question})
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class LoadReport:
    """What a load run measured."""

    requests: int
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    completion_tokens: int = 0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]

    def summary(self) -> str:
        return (f"{self.requests} requests, {self.concurrency} concurrent: "
                f"{self.throughput:.1f} req/s, {self.completion_tokens / self.seconds:.0f} "
                f"generated tok/s, latency p50 {self.percentile(50) * 1000:.0f} ms, "
                f"p95 {self.percentile(95) * 1000:.0f} ms, {len(self.errors)} errors "
                f"({self.seconds:.1f} s)")


def run_load(base_url: str, bodies: Callable[[int], dict[str, Any]], *, requests: int,
             concurrency: int, api_key: str | None = None,
             stream: bool = False) -> LoadReport:
    """Send `requests` chat requests from `concurrency` threads (keep-alive connections).

    A request counts as an error unless it answers 200 with a completion (for `stream`, a
    stream ending in `[DONE]` without an error event).
    """
    counter = iter(range(requests))
    lock = threading.Lock()
    report = LoadReport(requests, concurrency, 0.0)

    def next_index() -> Iterator[int]:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            yield i

    def worker() -> None:
        client = Client(base_url, api_key)
        try:
            for i in next_index():
                start = time.perf_counter()
                problem, tokens = _one(client, bodies(i), stream)
                elapsed = time.perf_counter() - start
                with lock:
                    report.latencies.append(elapsed)
                    report.completion_tokens += tokens
                    if problem:
                        report.errors.append(f"request {i}: {problem}")
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    report.seconds = time.perf_counter() - start
    return report


def _one(client: Client, body: dict[str, Any], stream: bool) -> tuple[str | None, int]:
    try:
        if stream:
            reply, events = client.stream({**body, "stream_options": {"include_usage": True}})
            if reply.status != 200 or events[-1:] != ["[DONE]"]:
                return f"HTTP {reply.status}: {reply.body[:200]!r}", 0
            if any("error" in e for e in events[:-1]):
                return f"error event: {events}", 0
            return None, events[-2]["usage"]["completion_tokens"]
        reply = client.chat(body)
        if reply.status != 200:
            return f"HTTP {reply.status}: {reply.body[:200]!r}", 0
        return None, reply.json()["usage"]["completion_tokens"]
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}", 0
