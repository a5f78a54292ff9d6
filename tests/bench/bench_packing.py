"""Packing efficiency on a LLaVA-665k-like length distribution: packed vs length-grouped vs random.

Run: `.venv/bin/python -m tests.bench.bench_packing [--samples N] [--batch-size B]
[--max-length L]`.

Efficiency = real tokens / tokens each step is sized for. Padded modes compute on
batch_size x (longest sample in the batch) per batch. Packed mode fills a token budget of
batch_size x max_length per batch (one padding-free row; counted full, which is the figure for
fixed-shape kernels; varlen kernels only compute the real tokens). The named baseline is the
planner mmjobs used before: bins of max_length tokens, `batch_size` of them per batch — its
fill is capped by what whole samples allow, and the bench prints that cap (an LP bound, see
`packing_bound.py`).

Assumed length distribution (a model of LLaVA-1.5's llava_v1_5_mix665k with a Vicuna-style
tokenizer, 576 image tokens from CLIP ViT-L/14-336, max_length 2048 as in LLaVA-1.5's
finetune script; component shares follow the LLaVA-1.5 paper's data table; text lengths are
assumptions, not measurements):

| component                         | share | image | text tokens (incl. ~40 template)         |
|-----------------------------------|-------|-------|------------------------------------------|
| LLaVA-Instruct-158k conversations | 24 %  | 576   | lognormal, median 250, sigma 0.6, <=1400 |
| ShareGPT-40k (text-only)          |  6 %  | none  | lognormal, median 700, sigma 0.7, <=2048 |
| VQAv2/GQA/OKVQA/A-OKVQA/OCRVQA    | 47 %  | 576   | 40 + turns x U(12, 30), turns 1+Pois(3)  |
|   (questions on one image merged into one multi-turn conversation)                       |
| TextCaps                          |  3 %  | 576   | U(50, 90), single turn                   |
| RefCOCO / VG grounding            | 20 %  | 576   | 40 + turns x U(18, 34), turns 1+Pois(5)  |
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mmjobs.data.packing import pack_sequences
from mmjobs.data.sampler import ResumableBatchSampler

IMAGE_TOKENS = 576
COMPONENTS = (  # (name, share, has_image)
    ("llava_instruct", 0.24, True),
    ("sharegpt", 0.06, False),
    ("short_vqa", 0.47, True),
    ("textcaps", 0.03, True),
    ("grounding", 0.20, True),
)


def llava665k_like_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Sample `n` total sequence lengths (image + text tokens) from the table above."""
    rng = np.random.default_rng(seed)
    shares = np.array([c[1] for c in COMPONENTS])
    kinds = rng.choice(len(COMPONENTS), size=n, p=shares / shares.sum())
    lengths = np.zeros(n, dtype=np.int64)
    counts = {}
    for k, (name, _, has_image) in enumerate(COMPONENTS):
        m = int((kinds == k).sum())
        counts[name] = m
        if name == "llava_instruct":
            text = np.minimum(rng.lognormal(np.log(250), 0.6, m), 1400)
        elif name == "sharegpt":
            text = np.minimum(rng.lognormal(np.log(700), 0.7, m), 2048)
        elif name == "short_vqa":
            turns = 1 + rng.poisson(3, m)
            text = 40 + np.array([rng.integers(12, 31, t).sum() for t in turns])
        elif name == "textcaps":
            text = rng.integers(50, 91, m)
        else:
            turns = 1 + rng.poisson(5, m)
            text = 40 + np.array([rng.integers(18, 35, t).sum() for t in turns])
        lengths[kinds == k] = np.maximum(text, 8).astype(np.int64) + (IMAGE_TOKENS * has_image)
    return lengths, counts


def measure(lengths: np.ndarray, mode: str, batch_size: int, max_length: int) -> dict:
    """Plan one epoch in `mode` and count the tokens its steps are sized for."""
    sampler = ResumableBatchSampler(lengths, batch_size=batch_size, mode=mode, seed=0,
                                    max_length=max_length, on_overlong="drop")
    start = time.perf_counter()
    batches = sampler.global_batches(0)
    plan_s = time.perf_counter() - start
    if mode == "packed":
        computed = len(batches) * batch_size * max_length
    else:
        computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    real = int(sum(int(lengths[b].sum()) for b in batches))
    return {"mode": mode, "efficiency": real / computed, "computed": computed,
            "steps": len(batches), "plan_s": plan_s, "real": real}


def measure_bins(lengths: np.ndarray, batch_size: int, bin_tokens: int,
                 window: int = 8192) -> dict:
    """The baseline: best-fit decreasing into bins of `bin_tokens`, `batch_size` bins a step."""
    order = np.random.default_rng(0).permutation(len(lengths))
    start = time.perf_counter()
    bins = 0
    for at in range(0, len(order), window):
        bins += len(pack_sequences(lengths[order[at:at + window]], bin_tokens))
    plan_s = time.perf_counter() - start
    computed = bins * bin_tokens
    return {"mode": f"bins@{bin_tokens}", "efficiency": int(lengths.sum()) / computed,
            "computed": computed, "steps": -(-bins // batch_size), "plan_s": plan_s}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=665_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-bound", action="store_true",
                        help="skip the LP bound on max_length-token bins (~10 s)")
    args = parser.parse_args(argv)

    lengths, counts = llava665k_like_lengths(args.samples)
    print(f"bench_packing: {args.samples} samples, LLaVA-665k-like mix "
          + ", ".join(f"{k}={v}" for k, v in counts.items()))
    q = np.percentile(lengths, [10, 50, 90, 99])
    print(f"  lengths: mean {lengths.mean():.0f}, p10 {q[0]:.0f}, p50 {q[1]:.0f}, "
          f"p90 {q[2]:.0f}, p99 {q[3]:.0f}, max {lengths.max()}, "
          f"> max_length {int((lengths > args.max_length).sum())} (dropped)")
    lengths = lengths[lengths <= args.max_length]
    results = {m: measure(lengths, m, args.batch_size, args.max_length)
               for m in ("random", "length_grouped", "packed")}
    results["baseline"] = measure_bins(lengths, args.batch_size, args.max_length)
    base = results["random"]["computed"]
    print(f"  batch_size={args.batch_size}: samples (padded modes), x {args.max_length} tokens "
          f"(packed), {args.max_length}-token bins (baseline)")
    print(f"  {'mode':<15} {'non-pad %':>9} {'tokens computed':>16} {'vs random':>9} "
          f"{'steps':>7} {'plan s':>7}")
    for name, r in results.items():
        print(f"  {name:<15} {100 * r['efficiency']:>8.1f}% {r['computed']:>16,} "
              f"{r['computed'] / base:>8.2f}x {r['steps']:>7,} {r['plan_s']:>7.2f}")
    packed, baseline = results["packed"], results["baseline"]
    print(f"  packed vs baseline: {baseline['computed'] / packed['computed']:.3f}x fewer tokens "
          "computed")
    if not args.no_bound:
        from tests.bench.packing_bound import max_fill

        start = time.perf_counter()
        cap = max_fill(lengths, args.max_length)
        results["bound"] = {"efficiency": cap}
        print(f"  no packing of whole samples into {args.max_length}-token bins fills more than "
              f"{100 * cap:.1f}% (LP bound, {time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
