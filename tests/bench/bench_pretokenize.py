"""Pretokenize stage: throughput with 1 vs 2 workers, and peak memory at 10k vs 100k rows.

Run: `.venv/bin/python -m tests.bench.bench_pretokenize [--rows N] [--runs R]
[--memory-rows A,B] [--scale-rows A,B] [--skip-throughput] [--skip-memory] [--skip-scale]`
(or `python -m tests.bench.run bench_pretokenize`).

Both parts run the real stage entrypoint (`mmjobs.stages.pretokenize.main`: config, dataset
fingerprint, processor load, shards, card, commit, MLflow logging to a sqlite database in the
temp dir) on a tiny LLaVA built here with `build_tiny_llava` (56x56 images -> 16 image tokens;
nothing is downloaded). Every run gets a fresh `cache_root` and `force=True`, so none is a
cache hit.

1. Throughput: `--rows` chart conversations shaped like `tests.chart_dataset.chart_samples`
   (system + user `<image>` question + answer; every third row a second turn with a second
   image, so 4 images per 3 rows), whose images are drawn from a pool of 32 bar-chart PNGs
   (48x40, as in the unit tests): every row still reads and processes its PNGs, but only 32
   are generated. `shard_size` 250 so 2 workers have a dozen shards to share. Wall time of
   `main()` includes the fixed costs a real run pays (processor loads, spawning workers that
   import torch + transformers, MLflow), which weigh more on a small dataset; so the steady
   rate is printed too: rows of the shards finished after each worker's first shard, over the
   time between (from the shards' marker mtimes), i.e. encoding alone. Runs alternate 1/2
   workers (median of `--runs` each) so load from other jobs on the box hits both alike.
2. Memory: each size runs the stage in a fresh child process (`--child` mode of this module,
   workers=2, the default shard_size 1000). Reported per size:
   - stage process peak: the child's own `ru_maxrss` (RUSAGE_SELF, read in the child);
   - largest worker peak: the child's RUSAGE_CHILDREN `ru_maxrss` (max over its reaped
     workers, not a sum);
   - tree peak: the largest sum of RSS over the child and all its descendants, sampled with
     psutil every 0.2 s (RSS counts shared library pages once per process, and a spike shorter
     than the interval can be missed).
   `os.wait4` gives the parent the child's rusage directly, cross-checking the first two.
   Row mix (small rows so 100k finish in about a minute on 2 cores): 4 in 5 rows are
   text-only single-turn Q/A (~12 words, English or Korean); 1 in 5 asks about one of 4 tiny
   PNGs (48x40) shared by all rows.
3. End to end at scale (`--scale-rows`, default 3000 and 100000): the memory figure's row mix,
   one run per size with 1 and with 2 workers (shard_size 1000), each in a fresh child process
   as a pod would run it (`--child`: no fork server or module already warm), wall time of
   `main()` and the 2-worker / 1-worker ratio: how much of the workers' start-up (fork server
   preloading torch + transformers, then each worker loading the processor) a dataset of that
   size amortizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THROUGHPUT_POOL = 32  # distinct PNGs behind the throughput dataset's image paths
MEMORY_POOL = 4  # distinct PNGs behind the memory datasets' image rows
MEMORY_IMAGE_EVERY = 5  # one row in 5 has an image in the memory datasets
FLAT_RATIO = 1.5  # 100k/10k peak below this = memory does not grow with the dataset
POLL_SECONDS = 0.2


# --------------------------------------------------------------------------- datasets


def _write_card_and_commit(root: Path, rows: int) -> str:
    from mmjobs import storage

    card = {"kind": "sample", "image_root": "", "source": "bench",
            "counts": {"input": rows, "accepted": rows, "rejected": 0}}
    (root / "dataset.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
    storage.commit_dir(root)  # pretokenize reads committed datasets only
    return str(root)


def _write_pool(root: Path, n: int) -> None:
    from tests.chart_dataset import bar_chart_png

    (root / "images").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        png = bar_chart_png([(k * 7 + m * 11) % 30 + 1 for m in range(4)], seed=k)
        (root / "images" / f"pool-{k}.png").write_bytes(png)


def write_throughput_dataset(root: Path, rows: int) -> str:
    """`chart_samples(rows)` with image paths remapped onto a pool of PNGs; committed."""
    from tests.chart_dataset import chart_samples

    _write_pool(root, THROUGHPUT_POOL)
    with (root / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i, sample in enumerate(chart_samples(rows)):
            sample["images"] = [f"images/pool-{(i + 13 * j) % THROUGHPUT_POOL}.png"
                                for j in range(len(sample["images"]))]
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return _write_card_and_commit(root, rows)


def write_memory_dataset(root: Path, rows: int) -> str:
    """Small rows, streamed to disk (see the module docstring for the mix); committed."""
    _write_pool(root, MEMORY_POOL)
    metrics = ("sales", "exports", "population", "매출", "수출", "인구")
    with (root / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i in range(rows):
            metric, year, value = metrics[i % len(metrics)], 1990 + i % 36, (i * 37) % 1000
            if i % MEMORY_IMAGE_EVERY == 0:
                images = [f"images/pool-{i // MEMORY_IMAGE_EVERY % MEMORY_POOL}.png"]
                question = f"<image>\nWhat is the {metric} in {year}?"
            else:
                images, question = [], f"What was the {metric} in {year}? (#{i})"
            sample = {"id": f"r{i}", "images": images, "conversations": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"It was {value} in {year}."}]}
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return _write_card_and_commit(root, rows)


# --------------------------------------------------------------------------- stage runs


def run_stage(dataset: str, model: str, cache_root: str, workers: int,
              shard_size: int) -> tuple[float, Any]:
    """One forced stage run into a fresh cache root; returns (wall seconds, result)."""
    from mmjobs.stages.pretokenize import PretokenizeConfig
    from mmjobs.stages.pretokenize import main as stage_main

    cfg = PretokenizeConfig(dataset=dataset, model=model, cache_root=cache_root,
                            workers=workers, shard_size=shard_size, force=True)
    start = time.perf_counter()
    result = stage_main(cfg)
    wall = time.perf_counter() - start
    if result.cached or result.rows_rejected:
        raise RuntimeError(f"bench run was not a clean full run: {result}")
    return wall, result


def child_main(args: argparse.Namespace) -> None:
    """`--child`: one stage run, then this process's and its workers' peak RSS as JSON."""
    import resource

    wall, result = run_stage(args.dataset, args.model, args.cache_root, args.workers,
                             args.shard_size)
    print(json.dumps({
        "rows": result.rows_in, "shards": result.shards, "seconds": wall,
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "workers_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }), flush=True)


def _tree_rss(proc) -> tuple[int, int]:
    """(RSS of `proc`, summed RSS of `proc` and all its descendants), bytes."""
    import psutil

    own = total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            continue
        total += rss
        if p.pid == proc.pid:
            own = rss
    return own, total


def measure_child(dataset: str, model: str, cache_root: str, workers: int, shard_size: int,
                  env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run `--child` in a fresh process, polling its process tree's RSS until it exits."""
    import psutil

    cmd = [sys.executable, "-m", "tests.bench.bench_pretokenize", "--child",
           "--dataset", dataset, "--model", model, "--cache-root", cache_root,
           "--workers", str(workers), "--shard-size", str(shard_size)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        ps = psutil.Process(proc.pid)
        tree_peak = own_sampled = 0
        while True:
            # wait4 reaps the child and returns its own rusage (no RUSAGE_CHILDREN mixing
            # across the sizes measured in this process).
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            own, total = _tree_rss(ps)
            tree_peak, own_sampled = max(tree_peak, total), max(own_sampled, own)
            time.sleep(POLL_SECONDS)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout = proc.stdout.read()
        proc.stdout.close()
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"child exited with {proc.returncode}; stderr tail:\n{tail}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return {**report, "tree_peak_mb": tree_peak / 2**20, "own_sampled_mb": own_sampled / 2**20,
            "self_mb": report["self_maxrss_kb"] / 1024,
            "workers_mb": report["workers_maxrss_kb"] / 1024,
            "wait4_mb": rusage.ru_maxrss / 1024}


# --------------------------------------------------------------------------- the two figures


def shard_timing(out: str, started: float, workers: int, shard_size: int,
                 rows: int) -> tuple[float, float]:
    """(seconds from the run's start to its first finished shard, steady rows/s).

    A shard's marker is written the moment the shard is done, so the marker mtimes time the
    shards. Steady rate = rows of the shards finished after the first `workers` ones (one per
    worker, which carry the start-up) over the time between: encoding alone, no fixed costs.
    """
    from mmjobs.data import pretokenized as fmt

    times = sorted(p.stat().st_mtime for p in (Path(out) / fmt.MARKER_DIR).glob("*.json"))
    if len(times) <= workers:
        raise ValueError(f"{len(times)} shards: too few for a steady rate with {workers} "
                         "workers; lower shard_size")
    return times[0] - started, (rows - workers * shard_size) / (times[-1] - times[workers - 1])


def bench_throughput(root: Path, model: str, rows: int, runs: int) -> dict[str, float]:
    shard_size = 250
    if rows % shard_size:
        raise ValueError(f"--rows={rows} must be a multiple of the shard size {shard_size}")
    dataset = write_throughput_dataset(root / "throughput-ds", rows)
    # Warm-up (not timed): creates the MLflow database, loads modules, fills the page cache.
    run_stage(dataset, model, str(root / "cache-warmup"), 1, shard_size)
    figures: dict[int, dict[str, list[float]]] = {w: {"wall": [], "first": [], "steady": []}
                                                  for w in (1, 2)}
    for r in range(runs):
        for workers in (1, 2):  # alternated, so load from other jobs hits both alike
            started = time.time()
            wall, result = run_stage(dataset, model, str(root / f"cache-w{workers}-{r}"),
                                     workers, shard_size)
            first, steady = shard_timing(result.output, started, workers, shard_size, rows)
            for key, value in (("wall", wall), ("first", first), ("steady", steady)):
                figures[workers][key].append(value)
    med = {w: {k: statistics.median(v) for k, v in f.items()} for w, f in figures.items()}
    rate = {w: rows / m["wall"] for w, m in med.items()}
    print(f"  throughput: {rows} rows (chart Q/A, 4 images per 3 rows from a pool of "
          f"{THROUGHPUT_POOL} PNGs), shard_size {shard_size} ({rows // shard_size} shards), "
          f"median of {runs} runs each")
    for w in (1, 2):
        spread = ", ".join(f"{s:.1f}" for s in figures[w]["wall"])
        print(f"    workers={w}: {rate[w]:7.1f} rows/s end to end (median {med[w]['wall']:.1f}s;"
              f" runs {spread}s) | first shard done after {med[w]['first']:.1f}s | steady "
              f"{med[w]['steady']:7.1f} rows/s")
    ratio = rate[2] / rate[1]
    steady_ratio = med[2]["steady"] / med[1]["steady"]
    print(f"    ratio workers=2 / workers=1: end to end {ratio:.2f}x, steady {steady_ratio:.2f}x"
          f"  ({_cores()}, shared with other jobs)")
    print("    (end to end = wall of the stage's main(): processor loads, spawning workers that "
          "import torch + transformers, MLflow; steady = shards after each worker's first, "
          "from shard marker times)")
    return {"rows_per_s_w1": rate[1], "rows_per_s_w2": rate[2], "ratio": ratio,
            "steady_rows_per_s_w1": med[1]["steady"], "steady_rows_per_s_w2": med[2]["steady"],
            "steady_ratio": steady_ratio}


def bench_memory(root: Path, model: str, sizes: list[int], env: dict[str, str]
                 ) -> dict[int, dict[str, Any]]:
    workers, shard_size = 2, 1000
    print(f"  memory: fresh child process per size, workers={workers}, shard_size "
          f"{shard_size}; rows 4/5 text-only, 1/5 one of {MEMORY_POOL} shared 48x40 PNGs")
    results = {}
    for n in sizes:
        dataset = write_memory_dataset(root / f"memory-ds-{n}", n)
        results[n] = measure_child(dataset, model, str(root / f"cache-mem-{n}"), workers,
                                   shard_size, env, root / f"child-{n}.log")
        m = results[n]
        print(f"    {n:>7} rows: {m['seconds']:6.1f}s ({n / m['seconds']:.0f} rows/s) | "
              f"stage process peak {m['self_mb']:6.1f} MB | largest worker peak "
              f"{m['workers_mb']:6.1f} MB | tree peak (sum, sampled) {m['tree_peak_mb']:6.1f} MB"
              f" | wait4 maxrss {m['wait4_mb']:6.1f} MB")
    if len(sizes) >= 2:
        small, big = results[sizes[0]], results[sizes[-1]]
        ratios = {k: big[k] / small[k] for k in ("self_mb", "workers_mb", "tree_peak_mb")}
        print(f"    ratio {sizes[-1]}/{sizes[0]}: stage process {ratios['self_mb']:.2f}x, "
              f"worker {ratios['workers_mb']:.2f}x, tree {ratios['tree_peak_mb']:.2f}x")
        flat = all(r < FLAT_RATIO for r in ratios.values())
        print(f"    memory stayed flat (every ratio < {FLAT_RATIO}): {'yes' if flat else 'NO'}")
    return results


def bench_scale(root: Path, model: str, sizes: list[int], env: dict[str, str]
                ) -> dict[int, dict[str, float]]:
    """End-to-end wall time with 1 and 2 workers per dataset size (see the module docstring)."""
    shard_size = 1000
    print(f"  end to end: shard_size {shard_size}, rows as in the memory figure, one run per "
          "size and worker count, each in a fresh process")
    results = {}
    for n in sizes:
        dataset = write_memory_dataset(root / f"scale-ds-{n}", n)
        wall = {w: measure_child(dataset, model, str(root / f"cache-scale-{n}-w{w}"), w,
                                 shard_size, env, root / f"scale-{n}-{w}.log")["seconds"]
                for w in (1, 2)}
        ratio = wall[1] / wall[2]
        results[n] = {"seconds_w1": wall[1], "seconds_w2": wall[2], "ratio": ratio}
        print(f"    {n:>7} rows: workers=1 {wall[1]:6.1f}s ({n / wall[1]:6.0f} rows/s) | "
              f"workers=2 {wall[2]:6.1f}s ({n / wall[2]:6.0f} rows/s) | ratio workers=2 / "
              f"workers=1 end to end {ratio:.2f}x")
    return results


def _cores() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{usable} usable cores ({os.cpu_count()} CPUs)"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="throughput dataset rows")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per worker count")
    parser.add_argument("--memory-rows", default="10000,100000",
                        help="comma-separated dataset sizes for the memory figure")
    parser.add_argument("--scale-rows", default="3000,100000",
                        help="comma-separated dataset sizes for the end-to-end figure")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--dataset", "--model", "--cache-root"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--shard-size", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return {}

    from mmjobs.models.tiny import build_tiny_llava

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pretokenize-") as tmp:
        root = Path(tmp)
        # Keep the stage's store, MLflow database and spool inside the temp dir.
        env = {**os.environ, "MMJOBS_HOME": str(root / "home"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "MMJOBS_LOG_LEVEL": "WARNING"}
        for name in ("MMJOBS_STORE", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
            env.pop(name, None)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        mmjobs_log = logging.getLogger("mmjobs")
        level = mmjobs_log.level
        try:
            mmjobs_log.setLevel(logging.WARNING)  # per-run INFO lines would bury the figures
            model = str(build_tiny_llava(root / "tiny-llava"))
            print(f"bench_pretokenize: tiny LLaVA, {_cores()}, shared with other jobs "
                  f"(load average {_load()})")
            if not args.skip_throughput:
                results["throughput"] = bench_throughput(root, model, args.rows, args.runs)
            if not args.skip_memory:
                sizes = [int(s) for s in args.memory_rows.split(",")]
                results["memory"] = bench_memory(root, model, sizes, env)
            if not args.skip_scale:
                sizes = [int(s) for s in args.scale_rows.split(",")]
                results["scale"] = bench_scale(root, model, sizes, env)
            print(f"  load average at the end: {_load()}")
        finally:
            mmjobs_log.setLevel(level)
            os.environ.clear()
            os.environ.update(saved)
    return results


if __name__ == "__main__":
    # The child prints its JSON line from main(); the parent's figures are printed as it goes.
    main()
