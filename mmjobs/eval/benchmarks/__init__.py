"""Benchmark loaders: official file layouts -> `BenchmarkItem`s for generation and scoring.

    from mmjobs.eval.benchmarks import load_benchmark
    for item in load_benchmark("chartqa", "s3://bench/ChartQA", pot=True, limit=100):
        item.id, item.prompt, item.images, item.fields

`load_benchmark(name, root, options=None, **options)` checks the layout under `root` (a local
folder or `s3://` prefix) at once — a missing file raises `MissingBenchmarkFilesError` naming
it and the official layout — and returns an iterator that streams the items. Each item's
`fields` are what `BENCHMARKS[name].metric` needs; the predictions row is
`{"id": item.id, "prediction": ..., **item.fields}`.

| name        | metric      | layout (under root)                                           |
|-------------|-------------|---------------------------------------------------------------|
| `chartqa`   | `chartqa`   | test/test_human.json, test/test_augmented.json, test/png/     |
| `scienceqa` | `scienceqa` | problems.json, pid_splits.json, images/<split>/<pid>/<image>  |
| `mme`       | `mme`       | <task>/questions_answers_YN/*.txt + images/, or <task>/*.txt  |
| `mmbench`   | `mmbench`   | mmbench_dev_20230712.tsv (base64 images; decoded to a cache)  |
| `gqa`       | `gqa`       | testdev_balanced_questions.json, images/<imageId>.jpg         |
| `vqav2`     | `vqav2`     | v2_OpenEnded_mscoco_<split>_questions.json + annotations, COCO |
| `seedbench` | `seedbench` | SEED-Bench.json, SEED-Bench-image/<data_id>                   |
| `jsonl`     | (any)       | a JSONL of id, question, image, answers/answer, extra fields  |
| `llava-questions` | (any) | LLaVA-1.5's eval question JSONL (question_id, image, text)  |

Options per loader are the fields of its `*Options` model (`BENCHMARKS[name].options`), all
taking `limit`; unknown options are errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from mmjobs.eval.benchmarks import (
    chartqa,
    gqa,
    jsonl,
    llava_questions,
    mmbench,
    mme,
    scienceqa,
    seedbench,
    vqav2,
)
from mmjobs.eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    MissingBenchmarkFilesError,
    root_uri,
)

BENCHMARKS: dict[str, Benchmark] = {m.BENCHMARK.name: m.BENCHMARK for m in
                                    (chartqa, scienceqa, mme, mmbench, gqa, vqav2, seedbench,
                                     jsonl, llava_questions)}

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "BenchmarkItem", "BenchmarkOptions",
           "MissingBenchmarkFilesError", "benchmark_options", "load_benchmark"]


def benchmark_options(name: str, options: Mapping[str, Any] | None = None,
                      **kwargs: Any) -> BenchmarkOptions:
    """Validate options for the loader `name` (all problems in one `BenchmarkError`)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    try:
        return spec.options.model_validate({**(options or {}), **kwargs})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}"
                             for err in e.errors())
        allowed = ", ".join(spec.options.model_fields)
        raise BenchmarkError(f"{spec.title} options: {problems} (options: {allowed})") from None


def load_benchmark(name: str, root: str | os.PathLike, options: Mapping[str, Any] | None = None,
                   **kwargs: Any) -> Iterator[BenchmarkItem]:
    """Load benchmark `name` from its official layout under `root` (local path or `s3://`).

    Args:
        name: a key of `BENCHMARKS`.
        root: the benchmark's folder or prefix (for mmbench, jsonl and llava-questions, also the
            file itself).
        options: loader options (see each module's docstring); `kwargs` are merged over them.

    Returns:
        An iterator over the items, streamed from the files (consume it once).

    Raises:
        MissingBenchmarkFilesError: a file of the official layout is missing (the message
            names every missing path and the expected layout).
        BenchmarkError: unknown name, invalid options, or a malformed file (also raised while
            iterating, naming the file and row).
        mmjobs.storage.StoreError: the store cannot be read.
    """
    opts = benchmark_options(name, options, **kwargs)
    return BENCHMARKS[name].load(root_uri(root), opts)
