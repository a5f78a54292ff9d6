"""Serving throughput and latency on loopback: the real `serve` entrypoint under concurrent load.

Run: `.venv/bin/python -m tests.bench.bench_serve [--requests N] [--concurrency C]
[--max-tokens T] [--batch-sizes 1,8] [--stream-requests S] [--hostile]
[--server-root DIR --server-python PY]`.

For each `max_batch_size` a fresh server runs as a subprocess (`python -m mmjobs.stages.serve`,
tiny LLaVA built here from configs, random weights, 16 image tokens per image) so clients and
server do not share a GIL. `--requests` non-streaming chat completions (one small chart image
each, greedy, `max_tokens` T) are sent from C threads with keep-alive connections, after a
warm-up; the figures are throughput, p50/p95 latency, errors and the mean batch the server
formed (from its /metrics). `max_batch_size=1` is the no-batching baseline. Then
`--stream-requests` streamed requests (which run one at a time) on the last server.

`--hostile` then measures the attacks the server's limits are for, on a fresh server with
default limits: the RSS held by `--image-requests` requests of `--images` 20-megapixel images
queued behind a long generation; how long a normal request waits after a client leaves a
2000-token request; the latency of an 80k-token prompt and of a normal request sent during it;
the time of requests with new maximum-size stop strings against none. `--server-root` and
`--server-python` run another checkout's server (e.g. `/work/main` and its venv) to compare.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmjobs.models.tiny import build_tiny_llava
from tests.integration.serve.client import (
    Client,
    LoadReport,
    chart_png,
    chat_body,
    data_url,
    metric,
    open_request,
    run_load,
    striped_png,
)
from tests.integration.serve.process import ServerProcess

MODEL = "bench-llava"
ROOT = Path(__file__).resolve().parents[2]


def mean_batch(url: str) -> float:
    text = Client(url).request("GET", "/metrics").body.decode()
    count = re.search(r"^mmjobs_serve_batch_size_count (\S+)$", text, re.MULTILINE)
    total = re.search(r"^mmjobs_serve_batch_size_sum (\S+)$", text, re.MULTILINE)
    return float(total.group(1)) / float(count.group(1)) if count and total else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_serve",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8",
                        help="max_batch_size values to compare, comma-separated")
    parser.add_argument("--stream-requests", type=int, default=32)
    parser.add_argument("--hostile", action="store_true", help="also measure the attacks")
    parser.add_argument("--image-requests", type=int, default=6)
    parser.add_argument("--images", type=int, default=3,
                        help="20 MP images per request (3 fit the default max_request_pixels)")
    parser.add_argument("--server-root", type=Path, default=ROOT)
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args(argv)
    images = [chart_png(seed) for seed in range(8)]

    def body(i: int) -> dict:
        return chat_body(MODEL, f"Question {i}: which bar is largest?",
                         image=images[i % len(images)], max_tokens=args.max_tokens,
                         temperature=0)

    print(f"serving, tiny LLaVA on loopback (server subprocess, {os.cpu_count()} cores), "
          f"{args.requests} requests x {args.concurrency} concurrent, one image each, greedy, "
          f"max_tokens={args.max_tokens}")
    results: dict[int, LoadReport] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = build_tiny_llava(Path(tmp) / "llava")
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        for k, size in enumerate(sizes):
            server = ServerProcess(model_dir, {"max_batch_size": size},
                                   Path(tmp) / f"serve-{size}.log", MODEL,
                                   python=args.server_python, cwd=args.server_root)
            url = server.url
            try:
                server.wait_ready(300)
                run_load(url, body, requests=args.concurrency, concurrency=args.concurrency)
                report = run_load(url, body, requests=args.requests,
                                  concurrency=args.concurrency)
                results[size] = report
                print(f"  max_batch_size={size:<3} {report.summary()}; mean batch "
                      f"{mean_batch(url):.1f}")
                for error in report.errors[:3]:
                    print(f"    error: {error}")
                if k == len(sizes) - 1 and args.stream_requests:
                    streams = run_load(url, body, requests=args.stream_requests,
                                       concurrency=min(args.concurrency, args.stream_requests),
                                       stream=True)
                    print(f"  streamed (one at a time)  {streams.summary()}")
            finally:
                server.stop()
        if args.hostile:
            with ServerProcess(model_dir, {}, Path(tmp) / "serve-hostile.log", MODEL,
                               python=args.server_python, cwd=args.server_root) as server:
                print(f"hostile clients, default limits (server from {args.server_root})")
                hostile(server, args.image_requests, args.images)
            stop_string_cost(model_dir)
    if len(results) > 1:
        first, last = results[sizes[0]], results[sizes[-1]]
        print(f"  throughput max_batch_size={sizes[-1]} vs {sizes[0]}: "
              f"{last.throughput / first.throughput:.1f}x")
    return 0


def text_body(words: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "bar " * words}],
            "temperature": 0, **extra}


def timed(url: str, body: dict[str, Any]) -> tuple[int, float]:
    client = Client(url, timeout=600)
    start = time.perf_counter()
    try:
        return client.chat(body).status, time.perf_counter() - start
    finally:
        client.close()


def hostile(server: ServerProcess, image_requests: int, images: int) -> None:
    """The attacks of the module docstring, one after another; prints what each cost."""
    url = server.url
    normal = chat_body(MODEL, image=chart_png(), max_tokens=4, temperature=0)
    timed(url, normal)  # warm-up

    body = chat_body(MODEL, max_tokens=4, temperature=0)
    body["messages"][0]["content"][:0] = [
        {"type": "image_url", "image_url": {"url": data_url(striped_png())}}] * images
    # A question the tiny model answers without EOS, so it runs to max_tokens.
    long_body = chat_body(MODEL, max_tokens=2000, temperature=0)
    long = open_request(url, {**long_body, "stream": True}, timeout=600)
    with server.peak_rss() as peak, ThreadPoolExecutor(image_requests) as pool:
        start = time.perf_counter()
        futures = [pool.submit(timed, url, body) for _ in range(image_requests)]
        while metric(url, "mmjobs_serve_queue_depth") < image_requests and not all(
                f.done() for f in futures):
            time.sleep(0.05)
        queued_s, queued_mb = time.perf_counter() - start, server.rss_mb() - peak.before / 1024
        long.close()
        statuses = [f.result()[0] for f in futures]
    print(f"  {image_requests} requests x {images} images of 20 MP queued in {queued_s:.1f} s: "
          f"RSS {queued_mb:+.0f} MB while queued, peak +{peak.growth_mb:.0f} MB "
          f"(from {peak.before / 1024:.0f} MB); statuses {sorted(set(statuses))}")

    sock = open_request(url, long_body, timeout=600)
    time.sleep(1.0)
    sock.close()
    status, seconds = timed(url, normal)
    print(f"  a client left a 2000-token request after 1 s: the next request took "
          f"{seconds:.2f} s (HTTP {status})")

    with ThreadPoolExecutor(1) as pool:
        attack = pool.submit(timed, url, text_body(80_000, max_tokens=64))
        time.sleep(0.2)
        status, seconds = timed(url, normal)
        attack_status, attack_s = attack.result()
    print(f"  80k-token prompt: HTTP {attack_status} after {attack_s:.2f} s; a normal request "
          f"sent meanwhile took {seconds:.2f} s (HTTP {status})")

    plain, with_stops = [], []
    for k in range(9):  # interleaved, so a busy machine slows both alike
        plain.append(timed(url, text_body(4, max_tokens=16))[1])
        stops = [f"{k}{j}{time.time_ns()}" + "가" * 100 for j in range(4)]  # new every time
        with_stops.append(timed(url, text_body(4, max_tokens=16, stop=stops))[1])
    print(f"  16-token answers: {statistics.median(plain) * 1000:.0f} ms without stop strings, "
          f"{statistics.median(with_stops) * 1000:.0f} ms with 4 new stop strings of ~120 "
          "characters (medians of 9)")


def stop_string_cost(model_dir: Path) -> None:
    """In this process, interleaved: a 16-token answer with no stop strings, with 4 new ones
    matched by transformers' StopStringCriteria (what the server used before), and by the
    server's RowStops; then one 20,000-character stop string each way."""
    from mmjobs.eval.generate import Generator, PromptInput, load_for_inference
    from mmjobs.serve.engine import ServeGenerator

    loaded = load_for_inference(str(model_dir))
    prompt = [PromptInput([{"role": "user", "content": "What is the largest bar?"}])]
    times: dict[str, list[float]] = {"none": [], "transformers": [], "RowStops": []}

    def once(name: str, stops: list[str]) -> float:
        kind = Generator if name == "transformers" else ServeGenerator
        gen = kind(loaded, max_new_tokens=16, stop_strings=stops)
        start = time.perf_counter()
        gen.generate(prompt)
        return time.perf_counter() - start

    for k in range(15):
        stops = [f"{k}{j}{time.time_ns()}" + "가" * 100 for j in range(4)]  # new every time
        for name in times:
            times[name].append(once(name, [] if name == "none" else stops))
    medians = ", ".join(f"{name} {statistics.median(t) * 1000:.0f} ms" for name, t in times.items())
    print(f"stop strings, in-process (vocabulary {len(loaded.processor.tokenizer)}): 16-token "
          f"answers with 4 new ~120-character stop strings: {medians} (medians of 15)")
    big = ["x" * 20_000]
    print(f"  one 20,000-character stop string: transformers {once('transformers', big):.2f} s, "
          f"RowStops {once('RowStops', big):.2f} s (the server now refuses it: max_stop_chars)")


if __name__ == "__main__":
    raise SystemExit(main())
