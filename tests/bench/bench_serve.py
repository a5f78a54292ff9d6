"""Serving throughput and latency on loopback: the real `serve` entrypoint under concurrent load.

Run: `.venv/bin/python -m tests.bench.bench_serve [--requests N] [--concurrency C]
[--max-tokens T] [--batch-sizes 1,8] [--stream-requests S]`.

For each `max_batch_size` a fresh server runs as a subprocess (`python -m mmjobs.stages.serve`,
tiny LLaVA built here from configs, random weights, 16 image tokens per image) so clients and
server do not share a GIL. `--requests` non-streaming chat completions (one small chart image
each, greedy, `max_tokens` T) are sent from C threads with keep-alive connections, after a
warm-up; the figures are throughput, p50/p95 latency, errors and the mean batch the server
formed (from its /metrics). `max_batch_size=1` is the no-batching baseline. Then
`--stream-requests` streamed requests (which run one at a time) on the last server.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mmjobs.models.tiny import build_tiny_llava
from tests.integration.serve.client import Client, LoadReport, chart_png, chat_body, run_load
from tests.servers import free_port

MODEL = "bench-llava"
ROOT = Path(__file__).resolve().parents[2]


def start_server(model_dir: Path, max_batch_size: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmjobs.stages.serve", "--set", f"model={model_dir}",
         "--set", f"port={port}", "--set", f"served_model_name={MODEL}",
         "--set", f"max_batch_size={max_batch_size}", "--set", "log_level=warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


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
            proc, url = start_server(model_dir, size, Path(tmp) / f"serve-{size}.log")
            try:
                Client(url).wait_ready(300)
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
                stop_server(proc)
    if len(results) > 1:
        first, last = results[sizes[0]], results[sizes[-1]]
        print(f"  throughput max_batch_size={sizes[-1]} vs {sizes[0]}: "
              f"{last.throughput / first.throughput:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
