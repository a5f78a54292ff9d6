"""Score a predictions JSONL with an official metric: `score_file` and `mmjobs score`.

    mmjobs score --metric chartqa --predictions s3://bucket/run/infer/predictions.jsonl \\
        --output s3://bucket/run/score

Each line of the predictions file is one JSON object with `id`, `prediction` and the fields the
metric needs (see `METRICS[name].required_fields` and the metric module's docstring). Every row
is validated before anything is scored; all problems are reported together, with line numbers,
in one `ScoreInputError` — a bad row is never skipped. With an output directory, three files are
written there (through `mmjobs.storage`, so `s3://` works): `scores.jsonl` (one line per row:
`id` + its score fields), `summary.md` (the tables) and `summary.json` (last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mmjobs import storage
from mmjobs.eval.metrics import METRICS, Metric, ScoreInputError, ScoreOptions
from mmjobs.eval.metrics.chartqa import TOLERANCES

__all__ = ["METRICS", "ScoreInputError", "score_file", "score_main", "summary_markdown"]


def _resolve(metric: str, variant: str | None, tolerance: float | None,
             source: str) -> tuple[Metric, ScoreOptions]:
    """Check the metric name and options together; every problem in one error."""
    if metric not in METRICS:
        raise ScoreInputError(source, [f"unknown metric {metric!r}; choose one of "
                                       f"{', '.join(METRICS)}"])
    spec = METRICS[metric]
    problems = []
    if variant is not None and variant not in spec.variants:
        problems.append(f"unknown variant {variant!r} for {metric}; choose one of "
                        f"{', '.join(spec.variants)} (default {spec.default_variant})")
    tolerances: tuple[float, ...] = ()
    if metric == "chartqa":
        tolerances = TOLERANCES
        if tolerance is not None:
            if not math.isfinite(tolerance) or tolerance < 0:
                problems.append(f"tolerance {tolerance} must be a non-negative number, e.g. 0.05")
            tolerances = (tolerance,)
    elif tolerance is not None:
        problems.append(f"--tolerance applies only to chartqa, not {metric}; drop it")
    if problems:
        raise ScoreInputError(source, problems)
    return spec, ScoreOptions(variant or spec.default_variant, tolerances)


def read_rows(predictions: str | os.PathLike, spec: Metric) -> tuple[list[dict], list[int]]:
    """Read and validate every row of a predictions JSONL.

    Returns:
        The rows and their 1-based line numbers (blank lines are not rows).

    Raises:
        ScoreInputError: listing every bad line (unparseable JSON, missing or wrong fields,
            duplicate ids) and every problem between rows (e.g. MME pairs).
        mmjobs.storage.StoreError: the file cannot be read.
    """
    source = os.fspath(predictions)
    rows: list[dict] = []
    lines: list[int] = []
    errors: list[str] = []
    first_line_of: dict[Any, int] = {}
    with storage.open_read(predictions) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").strip()
                if not text:
                    continue
                row = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                errors.append(f"line {line_no}: not a JSON object ({e})")
                continue
            if not isinstance(row, dict):
                errors.append(f"line {line_no}: expected a JSON object, got {type(row).__name__}")
                continue
            problems = spec.check_row(row)
            errors += [f"line {line_no}: {p}" for p in problems]
            row_id = row.get("id")
            if isinstance(row_id, str | int) and not isinstance(row_id, bool):
                if row_id in first_line_of:
                    errors.append(f"line {line_no}: duplicate id {row_id!r} "
                                  f"(first on line {first_line_of[row_id]})")
                else:
                    first_line_of[row_id] = line_no
            if not problems:
                rows.append(row)
                lines.append(line_no)
    if not errors and not rows:
        errors.append("no prediction rows (the file is empty)")
    if not errors and spec.check_dataset is not None:
        errors += spec.check_dataset(rows, lines)
    if errors:
        raise ScoreInputError(source, errors)
    return rows, lines


def score_file(metric: str, predictions: str | os.PathLike, *, variant: str | None = None,
               tolerance: float | None = None, output: str | os.PathLike | None = None
               ) -> dict[str, Any]:
    """Score a predictions JSONL (local path or `s3://` URI) with `metric`.

    Args:
        metric: a key of `METRICS` (chartqa, vqav2, scienceqa, mme, mmbench, gqa, seedbench).
        predictions: the predictions JSONL.
        variant: a variant of the metric (default: its first, see the metric's docstring).
        tolerance: ChartQA only: score this relaxed-accuracy tolerance instead of 0.05, 0.1, 0.2.
        output: a directory (or prefix) to write `scores.jsonl`, `summary.md`, `summary.json`.

    Returns:
        The summary: `metric`, `variant`, `predictions`, `unit` and the metric's own numbers.

    Raises:
        ScoreInputError: bad options or bad rows (every problem, with line numbers).
        mmjobs.storage.StoreError: the predictions cannot be read or the outputs written.
    """
    source = os.fspath(predictions)
    spec, options = _resolve(metric, variant, tolerance, source)
    rows, _ = read_rows(predictions, spec)
    scores = [{"id": row["id"], **spec.score_row(row, options)} for row in rows]
    summary = {"metric": spec.name, "variant": options.variant, "predictions": source,
               **spec.summarize(rows, scores, options)}
    if output is not None:
        with storage.open_write(storage.join(output, "scores.jsonl")) as f:
            for sc in scores:
                f.write((json.dumps(sc, ensure_ascii=False) + "\n").encode("utf-8"))
        storage.write_text(storage.join(output, "summary.md"),
                           summary_markdown(spec.name, summary) + "\n")
        storage.write_text(storage.join(output, "summary.json"),
                           json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def summary_markdown(metric: str, summary: Mapping[str, Any]) -> str:
    """The summary as markdown: a title line and the metric's table(s) (seed-README style)."""
    spec = METRICS[metric]
    unit = {"percent": "%", "fraction": "fraction 0-1", "score": "points"}[summary["unit"]]
    n = summary["count"]
    title = f"**{spec.title}** (variant `{summary['variant']}`, {n} row{'s' * (n != 1)}, {unit})"
    return f"{title}\n\n{spec.render(summary)}"


def score_main(argv: Sequence[str] | None = None) -> int:
    """`mmjobs score --metric NAME [--variant V] [--tolerance T] --predictions FILE [--output DIR]`.

    Returns:
        0 on success; 1 (with the error on stderr) when the input or options are bad or the
        store cannot be reached.
    """
    parser = argparse.ArgumentParser(
        prog="mmjobs score", description="Score a predictions JSONL with an official metric.")
    parser.add_argument("--metric", required=True, choices=list(METRICS),
                        help="benchmark metric")
    parser.add_argument("--variant", help="metric variant (default: the reference scorer; "
                        + "; ".join(f"{n}: {', '.join(m.variants)}" for n, m in METRICS.items())
                        + ")")
    parser.add_argument("--tolerance", type=float,
                        help="chartqa only: one relaxed-accuracy tolerance instead of 0.05/0.1/0.2")
    parser.add_argument("--predictions", required=True, help="predictions JSONL (path or s3://)")
    parser.add_argument("--output", help="directory for scores.jsonl, summary.md, summary.json")
    args = parser.parse_args(argv)
    try:
        summary = score_file(args.metric, args.predictions, variant=args.variant,
                             tolerance=args.tolerance, output=args.output)
    except (ScoreInputError, storage.StoreError) as e:
        print(f"mmjobs score: {e}", file=sys.stderr)
        return 1
    print(summary_markdown(args.metric, summary))
    if args.output is not None:
        print(f"\nsummary: {storage.join(args.output, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(score_main())
