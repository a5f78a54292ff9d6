"""Generation throughput: batched (left-padded, length-sorted) vs one prompt at a time.

Run: `.venv/bin/python -m tests.bench.bench_generate [--prompts N] [--batch-size B]
[--max-new-tokens T] [--runs R]`.

One at a time is what the seeds' eval scripts do (LLaVA's `model_vqa.py`, ChartMoE's and
LaVIN's eval loops): process one question and its image, `generate`, decode, next. Batched is
`mmjobs.eval.generate.Generator` with `batch_size` prompts per `generate` call. Both run the
same tiny LLaVA (built here from configs, random weights, 16 image tokens per image), the same
prompts (one chart image each, questions of different lengths), greedy decoding, and are
timed end to end (chat template, image processing, generation, decoding). Figures are medians
over `--runs` passes after one warm-up batch; the answers of both must agree.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmjobs.eval.generate import Generator, PromptInput, load_for_inference
from mmjobs.models.tiny import build_tiny_llava

WORDS = ("chart", "value", "largest", "bar", "year", "sales", "Seoul", "total", "growth",
         "compare", "line", "2021", "share", "series", "label", "axis")


def make_prompts(n: int, seed: int = 0) -> list[PromptInput]:
    """`n` chart questions of 3-40 words, each with its own small bar chart."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        image = Image.new("RGB", (64, 48), "white")
        draw = ImageDraw.Draw(image)
        for k in range(4):
            height = rng.randint(5, 45)
            draw.rectangle([4 + 15 * k, 47 - height, 14 + 15 * k, 47],
                           fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        prompts.append(PromptInput(f"<image>\nQuestion {i}: {words}?", [image]))
    return prompts


def time_run(gen: Generator, prompts: list[PromptInput]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = gen.generate(prompts)
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        loaded = load_for_inference(str(build_tiny_llava(Path(tmp) / "llava")), device="cpu")
        prompts = make_prompts(args.prompts)
        batched = Generator(loaded, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens)
        single = Generator(loaded, batch_size=1, max_new_tokens=args.max_new_tokens)
        batched.generate(prompts[:args.batch_size])  # warm-up: first-call allocations
        times: dict[str, list[float]] = {"one at a time": [], f"batch {args.batch_size}": []}
        answers: dict[str, list[str]] = {}
        for _ in range(args.runs):
            for name, gen in zip(times, (single, batched), strict=True):
                seconds, answers[name] = time_run(gen, prompts)
                times[name].append(seconds)

    print(f"generation, tiny LLaVA (CPU, {torch.get_num_threads()} threads), {args.prompts} "
          f"prompts with one image each, greedy, max_new_tokens={args.max_new_tokens}, "
          f"median of {args.runs}")
    rates = {}
    for name, secs in times.items():
        rates[name] = args.prompts / statistics.median(secs)
        print(f"  {name:>14}: {rates[name]:7.1f} samples/s  "
              f"(runs: {', '.join(f'{s:.2f}s' for s in secs)})")
    single_rate, batched_rate = rates.values()
    print(f"  speed-up: {batched_rate / single_rate:.1f}x")
    a, b = answers.values()
    same = sum(x == y for x, y in zip(a, b, strict=True))
    print(f"  answers identical: {same}/{len(a)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
