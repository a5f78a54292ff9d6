"""JSON array reading: mmjobs' row reader vs ijson (yajl2_c), which it replaced.

Run: `.venv/bin/python -m tests.bench.bench_json_rows [--rows N] [--runs R]`.

The input is a generated LLaVA-style array (`id`, `image`, 1-4 rounds of human/gpt turns with
ASCII, accented and Hangul words), written without indentation like `llava_v1_5_mix665k.json`.
ijson streams it with its C backend (`ijson.items(f, "item")`), as `prepare` did before; the
row reader (`mmjobs.data.json_rows.iter_json_array`) decodes each row with Python's C `json`
scanner over 1 MiB windows and adds its checks (NaN/Infinity, number overflow, lone
surrogates). Both yield the same rows (checked); figures are medians of `--runs` full passes,
with the peak traced memory of one pass.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ijson

from mmjobs.data.json_rows import iter_json_array

WORDS = ["the", "bus", "is", "red", "and", "white", "on", "a", "street", "with", "people",
         "walking", "near", "building", "café", "naïve", "서울", "버스", "정류장"]


def write_array(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        conversations = []
        for t in range(rng.randint(1, 4)):
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            conversations += [{"from": "human", "value": ("<image>\n" if t == 0 else "") +
                               question},
                              {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(
                                  5, 60)))}]
        rows.append({"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg",
                     "conversations": conversations})
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def with_ijson(path: Path) -> Iterator[Any]:
    with path.open("rb") as f:
        yield from ijson.items(f, "item", use_float=True)


def with_row_reader(path: Path) -> Iterator[Any]:
    for row in iter_json_array(path):
        yield row.data


def measure(read: Callable[[Path], Iterator[Any]], path: Path, runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in read(path):
            pass
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    for _ in read(path):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mix.json"
        write_array(path, args.rows)
        size = path.stat().st_size / 1e6
        first = [r for r, _ in zip(with_ijson(path), range(1000), strict=False)]
        assert first == [r for r, _ in zip(with_row_reader(path), range(1000), strict=False)]
        print(f"{args.rows} rows, {size:.1f} MB, median of {args.runs} passes")
        for name, read in (("ijson (yajl2_c)", with_ijson), ("json_rows", with_row_reader)):
            seconds, peak = measure(read, path, args.runs)
            print(f"  {name:16s} {seconds:6.2f} s  {size / seconds:6.1f} MB/s  "
                  f"peak {peak:5.1f} MiB")


if __name__ == "__main__":
    main()
