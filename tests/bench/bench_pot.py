"""PoT sandbox cost: wall time per program under bubblewrap vs `isolation: none`.

Run: `.venv/bin/python -m tests.bench.bench_pot [--programs N] [--workers W] [--runs R]`.

Both run the same ChartQA-style programs (a few lines of arithmetic, as the model writes them;
one in four imports numpy) through `run_programs`, the evaluate stage's path. Figures are the
median over `--runs` batches of the batch's wall time divided by the number of programs, after
one warm-up batch; the answers of both must agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mmjobs.eval.pot import Isolation, run_programs

PROGRAMS = (
    "values = [12.5, 30.1, 7.4]\nprint(round(max(values) - min(values), 2))",
    "import numpy as np\nprint(float(np.mean([3, 5, 7, 9])))",
    "sales = {'2020': 41, '2021': 57}\nprint(sales['2021'] > sales['2020'])",
    "share = 23.4 / 78.0 * 100\nprint(f'{share:.1f}')",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_pot", description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    codes = [PROGRAMS[i % len(PROGRAMS)] for i in range(args.programs)]
    answers = {}
    print(f"{args.programs} programs, {args.workers} workers, median of {args.runs} runs")
    for kind in ("none", "bubblewrap"):
        isolation = Isolation(kind=kind)
        run_programs(codes[:args.workers], isolation=isolation, workers=args.workers)  # warm-up
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            results = run_programs(codes, isolation=isolation, workers=args.workers)
            times.append((time.perf_counter() - start) / len(codes))
        answers[kind] = [r.answer for r in results]
        print(f"  isolation {kind:<10} {statistics.median(times) * 1000:7.1f} ms per program "
              f"({', '.join(sorted({r.status for r in results}))})")
    if answers["none"] != answers["bubblewrap"]:
        raise SystemExit("the two isolations printed different answers")


if __name__ == "__main__":
    main()
