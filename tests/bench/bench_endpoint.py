"""Evaluation through a server vs in-process: `infer`'s endpoint path against `mmjobs serve`.

Run: `.venv/bin/python -m tests.bench.bench_endpoint [--prompts N] [--concurrency C]
[--batch-size B] [--max-new-tokens T] [--runs R]`.

The baseline is the in-process `Generator` (what `infer` does without `endpoint:`), batch B.
The other side is `EndpointGenerator` (what `infer` does with `endpoint:`) sending the same
prompts, C at a time, to the real `serve` entrypoint in a subprocess (`max_batch_size` B, so
the server batches concurrent requests as vLLM/SGLang would), both on the same tiny LLaVA
built here (random weights, 16 image tokens per image), greedy. Medians over `--runs` passes
after a warm-up; the answers must be identical. On a GPU cluster the server side is vLLM or
SGLang and the gap is theirs to win; here it measures what the HTTP path costs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmjobs.eval.endpoint import EndpointConfig, EndpointGenerator
from mmjobs.eval.generate import Generator, load_for_inference
from mmjobs.models.tiny import build_tiny_llava
from tests.bench.bench_generate import make_prompts
from tests.integration.serve.process import ServerProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_endpoint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        model = build_tiny_llava(Path(tmp) / "llava")
        prompts = make_prompts(args.prompts)
        local = Generator(load_for_inference(str(model), device="cpu"),
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        server = ServerProcess(model, {"max_batch_size": args.batch_size},
                               Path(tmp) / "serve.log").wait_ready()
        try:
            remote = EndpointGenerator(
                EndpointConfig(url=f"{server.url}/v1", concurrency=args.concurrency),
                batch_size=args.prompts, max_new_tokens=args.max_new_tokens)
            sides = {"in-process": local, f"endpoint x{args.concurrency}": remote}
            for gen in sides.values():
                gen.generate(prompts[:args.batch_size])  # warm-up
            times: dict[str, list[float]] = {name: [] for name in sides}
            answers: dict[str, list[str]] = {}
            for _ in range(args.runs):
                for name, gen in sides.items():
                    start = time.perf_counter()
                    answers[name] = gen.generate(prompts)
                    times[name].append(time.perf_counter() - start)
        finally:
            server.stop()

    print(f"infer: in-process vs endpoint (mmjobs serve subprocess, max_batch_size "
          f"{args.batch_size}), tiny LLaVA (CPU, {torch.get_num_threads()} threads), "
          f"{args.prompts} prompts with one image, greedy, max_new_tokens={args.max_new_tokens}, "
          f"median of {args.runs}")
    rates = {}
    for name, secs in times.items():
        rates[name] = args.prompts / statistics.median(secs)
        print(f"  {name:>14}: {rates[name]:7.1f} samples/s  "
              f"(runs: {', '.join(f'{s:.2f}s' for s in secs)})")
    baseline, endpoint = rates.values()
    print(f"  endpoint / in-process: {endpoint / baseline:.2f}x")
    a, b = answers.values()
    print(f"  answers identical: {sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
