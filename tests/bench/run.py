"""Run benchmarks: `python -m tests.bench.run [NAME ...]` (default: every tests/bench/bench_*.py,
then `gpu`: tests/bench/gpu/bench_gpu.py, which skips without a CUDA GPU).

Each bench module exposes `main(argv: list[str] | None)` and prints its own figures; pytest
never collects these files (they are not named test_*.py).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    known = [p.stem.removeprefix("bench_")
             for p in sorted(Path(__file__).parent.glob("bench_*.py"))] + ["gpu"]
    given = argv if argv is not None else sys.argv[1:]
    # `run packing`, `run bench_packing` and `run bench_packing.py` name the same bench.
    names = [n.removesuffix(".py").removeprefix("bench_") for n in given] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"usage: python -m tests.bench.run [NAME ...]; unknown {', '.join(unknown)}; "
              f"the benchmarks: {', '.join(known)}", file=sys.stderr)
        return 2
    for name in names:
        stem = f"bench_{name}"
        package = "tests.bench.gpu" if stem == "bench_gpu" else "tests.bench"
        module = importlib.import_module(f"{package}.{stem}")
        start = time.perf_counter()
        module.main([])
        print(f"[{name}: {time.perf_counter() - start:.1f}s]\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
