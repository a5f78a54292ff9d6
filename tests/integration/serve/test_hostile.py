"""Hostile clients against the real server process: each attack is bounded in time and memory.

One `python -m mmjobs.stages.serve` subprocess (tiny LLaVA, context 4096) serves the module,
with short connection timeouts so the slow-client cases finish fast. Each attack runs while a
normal request is sent; the test checks the normal request is answered, the attack gets its
4xx (or its generation stops), and the server's RSS (sampled from /proc every 10 ms) grows by
at most a generous bound. The figures are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from tests.integration.serve.client import (
    Client,
    Reply,
    chart_png,
    chat_body,
    data_url,
    metric,
    open_request,
    striped_png,
)
from tests.integration.serve.conftest import MODEL_NAME
from tests.integration.serve.process import Peak, ServerProcess

pytestmark = pytest.mark.integration

T = TypeVar("T")
CONTEXT = 4096  # the tiny LLaVA's max_position_embeddings
SETTINGS = {"header_timeout_s": 1, "body_timeout_s": 2, "keep_alive_s": 1,
            "max_request_pixels": 160_000_000, "default_max_new_tokens": 8,
            "max_new_tokens_cap": 4000}
# Generous bounds that detect the failures (5.9 GB of held images; a worker held for 52 s),
# far above what the server needs; the measured figures are printed.
RSS_BOUND_MB = 300
IMAGE_RSS_BOUND_MB = 1200
HANG_S = 60


@pytest.fixture(scope="module")
def server(tiny_llava_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    with ServerProcess(tiny_llava_dir, SETTINGS, log) as process:
        normal(process.url)  # warm-up: first-call allocations are not the attack's
        yield process


def post(url: str, body: Any) -> Reply:
    """One request on its own connection (the server closes idle ones after 1 s)."""
    client = Client(url, timeout=HANG_S)
    try:
        return client.chat(body) if isinstance(body, dict) else client.request(
            "POST", "/v1/chat/completions", body)
    finally:
        client.close()


def normal(url: str) -> float:
    """A normal request with an image; returns its latency."""
    start = time.perf_counter()
    reply = post(url, chat_body(MODEL_NAME, image=chart_png(), max_tokens=4, temperature=0))
    assert reply.status == 200, reply.body
    return time.perf_counter() - start


def under_attack(server: ServerProcess, attack: Callable[[], T],
                 bound_mb: float = RSS_BOUND_MB) -> tuple[T, float, Peak]:
    """Run `attack` while a normal request is sent; returns its result, the normal request's
    latency and the server's RSS peak, after checking both bounds."""
    with server.peak_rss() as peak, ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(attack)
        time.sleep(0.2)
        latency = normal(server.url)
        result = hostile.result(timeout=HANG_S)
    assert peak.growth_mb < bound_mb, f"RSS grew {peak.growth_mb:.0f} MB"
    return result, latency, peak


def text_body(words: int, **extra: Any) -> dict[str, Any]:
    """A text prompt of `words` + 1 tokens (each "bar " is one token of the tiny tokenizer)."""
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "bar " * words}],
            "temperature": 0, **extra}


def report(name: str, latency: float, peak: Peak, extra: str = "") -> None:
    print(f"\n{name}: normal request {latency * 1000:.0f} ms, server RSS {peak.before / 1024:.0f}"
          f" MB -> peak +{peak.growth_mb:.0f} MB{extra}")


# --------------------------------------------------------------------------- prompt length


def test_an_80k_token_prompt_is_refused_before_it_queues(server):
    def attack() -> list[tuple[Reply, float]]:
        out = []
        for _ in range(4):
            start = time.perf_counter()
            out.append((post(server.url, text_body(80_000, max_tokens=64)),
                        time.perf_counter() - start))
        return out

    replies, latency, peak = under_attack(server, attack)
    for reply, _ in replies:
        assert reply.status == 400, reply.body
        error = reply.error
        assert error["code"] == "context_length_exceeded"
        # The limit (context minus max_tokens) and the count (a lower bound from the length).
        assert "at most 4,032" in error["message"] and "max_tokens=64" in error["message"]
        assert int(re.search(r"at least ([\d,]+) tokens", error["message"]).group(1)
                   .replace(",", "")) > 4032
    report("80k-token prompt", latency, peak,
           f"; refused in {max(s for _, s in replies) * 1000:.0f} ms at most")


def test_the_count_is_exact_and_the_context_is_shared_with_the_answer(server):
    reply = post(server.url, text_body(5000))
    assert reply.status == 400 and reply.error["code"] == "context_length_exceeded"
    message = reply.error["message"]
    count = int(re.search(r"the prompt is ([\d,]+) tokens", message).group(1).replace(",", ""))
    assert 5001 <= count < 5030 and "at most 4,095" in message  # context 4096, answer >= 1
    overhead = count - 5001  # the chat template's tokens
    # A prompt that fits with room for 3 tokens: max_tokens=64 does not fit; no max_tokens
    # shortens the default answer (8) to the room left.
    fits = text_body(CONTEXT - 3 - overhead - 1)
    refused = post(server.url, {**fits, "max_tokens": 64})
    assert refused.status == 400
    assert "max_tokens=64 leaves 4,032" in refused.error["message"]
    answered = post(server.url, fits)
    assert answered.status == 200, answered.body
    usage = answered.json()["usage"]
    assert usage["prompt_tokens"] == CONTEXT - 3 and usage["completion_tokens"] <= 3


# --------------------------------------------------------------------------- clients leaving


LONG_TOKENS = 4000  # about 4 s of the tiny model on an idle core; far longer than any wait


def start_long_request(url: str, *, stream: bool) -> socket.socket:
    """A request for LONG_TOKENS tokens on a raw socket (closing the socket is the client
    leaving). Its question is one the tiny model answers without ever emitting EOS."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user",
                                               "content": "What is the largest bar?"}],
            "temperature": 0, "max_tokens": LONG_TOKENS, "stream": stream}
    return open_request(url, body, timeout=HANG_S)


def wait_for(url: str, name: str, condition: Callable[[float], bool], what: str) -> float:
    """Poll the metric `name` until `condition` holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition(metric(url, name)):
        assert time.monotonic() - start < HANG_S, what
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_leaves_stops_its_generation(server, stream):
    tokens_before = metric(server.url, "mmjobs_serve_generated_tokens_total")
    cancelled_before = metric(server.url, "mmjobs_serve_cancelled_total")
    sock = start_long_request(server.url, stream=stream)
    running = "mmjobs_serve_running_requests"
    wait_for(server.url, running, lambda v: v == 1, "the long request never ran")
    time.sleep(0.3)  # a few hundred tokens on an idle core
    sock.close()
    freed = wait_for(server.url, running, lambda v: v == 0,
                     "the worker kept generating for a client that left")
    assert metric(server.url, "mmjobs_serve_cancelled_total") == cancelled_before + 1
    generated = metric(server.url, "mmjobs_serve_generated_tokens_total") - tokens_before
    assert generated < LONG_TOKENS, "the generation ran to max_tokens after the client left"
    latency = normal(server.url)
    print(f"\nclient left ({'stream' if stream else 'plain'}): its generation stopped after "
          f"{generated:.0f} of {LONG_TOKENS} tokens, the worker was free {freed * 1000:.0f} ms "
          f"after the close; the next request took {latency * 1000:.0f} ms")


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return striped_png()  # 20 MP


def test_big_images_are_decoded_once_and_wait_small(server, big_png):
    """Six requests of eight 20-megapixel images wait in the queue behind long generations:
    what they hold there is the scaled-down images, not 48 x 80 MB of pixels."""
    body = chat_body(MODEL_NAME, max_tokens=4, temperature=0)
    body["messages"][0]["content"][:0] = [
        {"type": "image_url", "image_url": {"url": data_url(big_png)}}] * 8
    # Three long streams (they run one at a time) keep the worker busy for many seconds, so
    # the image requests are all admitted and wait in the queue behind two of them.
    longs = [start_long_request(server.url, stream=True) for _ in range(3)]
    try:
        with server.peak_rss() as peak, ThreadPoolExecutor(6) as pool:
            replies = [pool.submit(post, server.url, body) for _ in range(6)]
            admitted = wait_for(server.url, "mmjobs_serve_queue_depth", lambda v: v >= 8,
                                "the image requests were never all queued")
            queued_mb = server.rss_mb() - peak.before / 1024
            for sock in longs:  # the long generations stop; the image requests run
                sock.close()
            statuses = [r.result(timeout=HANG_S).status for r in replies]
    finally:
        for sock in longs:
            sock.close()
    assert statuses == [200] * 6
    assert peak.growth_mb < IMAGE_RSS_BOUND_MB, f"RSS grew {peak.growth_mb:.0f} MB"
    assert queued_mb < RSS_BOUND_MB, f"{queued_mb:.0f} MB held by queued images"
    print(f"\n6 requests x 8 images of 20 MP: admitted in {admitted:.1f} s; server RSS "
          f"{peak.before / 1024:.0f} MB, {queued_mb:+.0f} MB while all six were queued, peak "
          f"+{peak.growth_mb:.0f} MB (decoding)")


# --------------------------------------------------------------------------- stop strings


def test_stop_strings_are_bounded_and_cheap(server):
    huge = post(server.url, text_body(4, stop="x" * 1_000_000))
    assert huge.status == 400 and huge.error["code"] == "stop_too_long"
    assert "1,000,000 characters" in huge.error["message"] and "at most 128" in huge.error[
        "message"]
    many = post(server.url, text_body(4, stop=["a", "b", "c", "d", "e"]))
    assert many.status == 400 and "at most 4" in many.error["message"]

    def attack() -> list[tuple[int, float]]:
        # The largest stop strings allowed, new ones each request (no cache can help).
        out = []
        for k in range(6):
            stops = [f"{k}{j}" + chr(0x4E00 + 7 * k + j) * 126 for j in range(4)]
            start = time.perf_counter()
            reply = post(server.url, text_body(4, max_tokens=32, stop=stops))
            out.append((reply.status, time.perf_counter() - start))
        return out

    results, latency, peak = under_attack(server, attack)
    assert [status for status, _ in results] == [200] * 6
    report("max-size stop strings", latency, peak,
           f"; each such request took {max(s for _, s in results) * 1000:.0f} ms at most")


# --------------------------------------------------------------------------- malformed input

MALFORMED: list[tuple[str, bytes, str]] = [
    ("nested arrays", b"[" * 5_000_000, "nested too deeply"),
    ("nested objects", b'{"a":' * 1_000_000, "nested too deeply"),
    ("seed >= 2**64", json.dumps({**text_body(2), "seed": 2**64}).encode(), "seed="),
    ("seed < -2**63", json.dumps({**text_body(2), "seed": -2**63 - 1}).encode(), "seed="),
    ("int too long", b'{"model": "tiny-llava", "max_tokens": ' + b"9" * 5000 + b"}",
     "malformed JSON"),
    ("lone surrogate in text", b'{"model": "tiny-llava", "messages": [{"role": "user", '
     b'"content": "hi \\ud800 there"}]}', "lone UTF-16 surrogate"),
    ("lone surrogate in stop", json.dumps(text_body(2)).encode()[:-1] + b', "stop": "\\udfff"}',
     "lone UTF-16 surrogate"),
    ("lone surrogate in model", b'{"model": "\\ud83d", "messages": []}', "lone UTF-16"),
    ("role is a list", json.dumps({"model": MODEL_NAME, "messages": [
        {"role": ["user"], "content": "q"}]}).encode(), "role must be one of"),
    ("content is a number", json.dumps({"model": MODEL_NAME, "messages": [
        {"role": "user", "content": 5}]}).encode(), "content must be a string"),
    ("max_tokens is a float", json.dumps({**text_body(2), "max_tokens": 1.5}).encode(),
     "max_tokens must be an integer"),
    ("max_tokens is 1e400", b'{"model": "tiny-llava", "messages": [{"role": "user", "content":'
     b' "q"}], "max_tokens": 1e400}', "max_tokens must be an integer"),
    ("temperature is text", json.dumps({**text_body(2), "temperature": "hot"}).encode(),
     "temperature must be a number"),
    ("stop is an object", json.dumps({**text_body(2), "stop": {"a": 1}}).encode(),
     "stop must be a string or a list"),
    ("image url is a number", json.dumps({"model": MODEL_NAME, "messages": [{"role": "user",
     "content": [{"type": "image_url", "image_url": {"url": 7}}]}]}).encode(), "image_url.url"),
]


def test_malformed_requests_are_4xx_json_errors(server):
    def attack() -> list[tuple[str, Reply, str]]:
        return [(name, post(server.url, body), fragment) for name, body, fragment in MALFORMED]

    results, latency, peak = under_attack(server, attack)
    for name, reply, fragment in results:
        assert reply.status == 400, (name, reply.body[:300])
        assert fragment in reply.error["message"], (name, reply.error)
        assert len(reply.body) < 2000, (name, "the error echoes the input")
    report(f"{len(MALFORMED)} malformed requests", latency, peak)


# --------------------------------------------------------------------------- slow clients


def slow_client(port: int, first: bytes, drip: bytes) -> tuple[float, bytes]:
    """Send `first`, then one byte of `drip` every 0.2 s; returns when the server closes the
    connection: (seconds until then, what the server sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
    start, received = time.monotonic(), b""
    try:
        sock.sendall(first)
        sock.settimeout(0.2)
        for k in range(int(HANG_S / 0.2)):
            try:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
            except TimeoutError:
                pass
            except ConnectionResetError:  # closed with our dripped bytes still unread
                break
            try:
                sock.sendall(drip[k % len(drip):k % len(drip) + 1] if drip else b"")
            except OSError:  # closed by the server while we were sending
                break
        return time.monotonic() - start, received
    finally:
        sock.close()


def test_slow_and_half_sent_connections_are_closed(server):
    port = int(server.url.rsplit(":", 1)[1])
    headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    kinds = {
        "idle": (b"", b""),
        "headers one byte at a time": (b"POST /v1/chat/completions HTTP/1.1\r\n", b"X-Slow: y"),
        "half a body": (headers + b'{"model": ', b""),
        "body dripped": (headers + b'{"model": ', b" "),
        "body to a route that does not read it": (headers.replace(b"chat/completions",
                                                                  b"nothing"), b" "),
    }

    def attack() -> dict[str, list[tuple[float, bytes]]]:
        with ThreadPoolExecutor(20) as pool:
            futures = {kind: [pool.submit(slow_client, port, *sends) for _ in range(4)]
                       for kind, sends in kinds.items()}
            return {kind: [f.result() for f in fs] for kind, fs in futures.items()}

    results, latency, peak = under_attack(server, attack)
    for kind, outcomes in results.items():
        for seconds, received in outcomes:
            assert seconds < 10, f"{kind}: held for {seconds:.1f} s"
            if kind == "half a body":  # (a dripped body may see a reset instead)
                assert b" 408 " in received.split(b"\r\n", 1)[0], (kind, received[:200])
                assert b"request_timeout" in received
    closes = ", ".join(f"{kind} {max(s for s, _ in o):.1f} s" for kind, o in results.items())
    report("20 slow connections", latency, peak, f"; closed after at most: {closes}")


def test_oversized_headers_are_refused(server):
    port = int(server.url.rsplit(":", 1)[1])
    _, received = slow_client(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64_000 + b"\r\n\r\n", b"")
    # h11 refuses headers that arrive in pieces (400); whole ones are checked by the app (431).
    assert received.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), received[:200]
    assert received.startswith(b"HTTP/1.1 400") or b'"headers_too_large"' in received
    normal(server.url)


def test_a_keep_alive_connection_left_idle_is_closed(server):
    client = Client(server.url)
    assert client.request("GET", "/healthz").status == 200
    sock = client._conn.sock  # the connection the request used
    sock.settimeout(HANG_S)
    start = time.monotonic()
    assert sock.recv(1) == b""  # closed by the server
    assert time.monotonic() - start < 10
    client.close()


# --------------------------------------------------------------------------- limits shown


def test_limits_are_reported_by_the_models_route(server):
    card = Client(server.url).request("GET", "/v1/models").json()["data"][0]
    assert card["max_model_len"] == CONTEXT
    limits = card["limits"]
    assert limits["context_length"] == CONTEXT and limits["max_prompt_tokens"] == CONTEXT
    assert limits["max_request_pixels"] == 160_000_000 and limits["max_stop_chars"] == 128
    assert limits["body_timeout_s"] == 2 and limits["header_timeout_s"] == 1

