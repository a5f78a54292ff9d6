"""A bounded load test on loopback: 200 requests, 16 concurrent, tiny model, zero errors."""

from __future__ import annotations

import re

from tests.integration.serve.client import Client, chart_png, chat_body, run_load
from tests.integration.serve.conftest import MODEL_NAME

REQUESTS, CONCURRENCY, MAX_TOKENS = 200, 16, 4


def batch_count(url: str) -> float:
    """How many generate calls the server has made (its batch-size histogram's count)."""
    metrics = Client(url).request("GET", "/metrics").body.decode()
    return float(re.search(r"^mmjobs_serve_batch_size_count (\S+)$", metrics,
                           re.MULTILINE).group(1))


def test_load_200_requests_16_concurrent(start_server):
    server = start_server(max_batch_size=8, batch_wait_ms=10)
    images = [chart_png(seed) for seed in range(8)]

    def body(i: int) -> dict:
        return chat_body(MODEL_NAME, f"Question {i}: which bar is largest?",
                         image=images[i % len(images)], max_tokens=MAX_TOKENS, temperature=0)

    # Warm-up (first-call allocations), so the figures describe the steady state.
    assert run_load(server.url, body, requests=CONCURRENCY, concurrency=CONCURRENCY).errors == []
    before = batch_count(server.url)
    report = run_load(server.url, body, requests=REQUESTS, concurrency=CONCURRENCY)
    batches = batch_count(server.url) - before
    mean_batch = REQUESTS / batches
    print(f"\nserve load: {report.summary()}; mean batch {mean_batch:.1f} requests")
    assert report.errors == []
    assert len(report.latencies) == REQUESTS
    metrics = Client(server.url).request("GET", "/metrics").body.decode()
    assert f'mmjobs_serve_requests_total{{route="/v1/chat/completions",status="200"}} ' \
           f"{REQUESTS + CONCURRENCY}" in metrics
    # 16 clients against batches of up to 8: requests must have shared generate calls.
    assert mean_batch > 1.5, f"batching did not happen: {batches:.0f} generate calls"


def test_streaming_under_concurrency(start_server):
    server = start_server()
    report = run_load(server.url, lambda i: chat_body(MODEL_NAME, image=chart_png(i % 4),
                                                      max_tokens=MAX_TOKENS),
                      requests=32, concurrency=8, stream=True)
    print(f"\nserve stream load: {report.summary()}")
    assert report.errors == []
