"""Score a predictions JSONL with an official metric: `score_file` and `mmjobs score`.

    mmjobs score --metric chartqa --predictions s3://bucket/run/infer/predictions.jsonl \\
        --output s3://bucket/run/score

Each line of the predictions file is one JSON object with `id`, `prediction` and the fields the
metric needs (see `METRICS[name].required_fields` and the metric module's docstring). Every row
is validated before anything is scored; all problems are reported together, with line numbers,
in one `ScoreInputError` — a bad row is never skipped. With an output directory, three files are
written there (through `mmjobs.storage`, so `s3://` works): `scores.jsonl` (one line per row:
`id` + its score fields), `summary.md` (the tables) and `summary.json` (last).

Answer files as other tools write them (the MME eval_tool's `<task>.txt`, LLaVA's answers
JSONL, the MMBench upload sheet, SEED-Bench/GQA/VQA result files) are read with `--format`,
joined with `--ground-truth` where they lack it (`mmjobs.eval.benchmarks.answers`):

    mmjobs score --format mme-eval-tool --predictions eval_tool/LaVIN
    mmjobs score --format llava-mme --predictions llava-v1.5-7b.jsonl --ground-truth MME_Benchmark
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mmjobs import storage
from mmjobs.eval.benchmarks.answers import AnswerFileError, answer_formats, read_answers
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


def read_rows(predictions: str | os.PathLike, spec: Metric, *, answer_format: str | None = None,
              ground_truth: Sequence[str] = ()) -> tuple[list[dict], list[str]]:
    """Read and validate every row of a predictions JSONL (or an answer file of `answer_format`).

    Returns:
        The rows and where each came from ("line 7"; for answer files "OCR.txt line 7").

    Raises:
        ScoreInputError: listing every bad line (unparseable JSON, missing or wrong fields,
            duplicate ids, answers without ground truth) and every problem between rows (e.g.
            MME pairs); also an answer file or ground truth that cannot be read at all.
        mmjobs.storage.StoreError: the file cannot be read.
    """
    source = os.fspath(predictions)
    if answer_format is None:
        items = _jsonl_items(predictions)
    else:
        try:
            items = ((a.where, a.row if a.error is None else a.error)
                     for a in read_answers(answer_format, source, ground_truth, spec.name))
        except AnswerFileError as e:
            raise ScoreInputError(source, [str(e)]) from None
    rows: list[dict] = []
    labels: list[str] = []
    errors: list[str] = []
    first_seen: dict[Any, str] = {}
    try:
        for where, row in items:
            if isinstance(row, str):  # the reader's reason this line cannot be scored
                errors.append(f"{where}: {row}")
                continue
            problems = spec.check_row(row)
            errors += [f"{where}: {p}" for p in problems]
            row_id = row.get("id")
            if isinstance(row_id, str | int) and not isinstance(row_id, bool):
                if row_id in first_seen:
                    errors.append(f"{where}: duplicate id {row_id!r} (first on "
                                  f"{first_seen[row_id]})")
                else:
                    first_seen[row_id] = where
            if not problems:
                rows.append(row)
                labels.append(where)
    except AnswerFileError as e:
        raise ScoreInputError(source, [str(e)]) from None
    if not errors and not rows:
        errors.append("no prediction rows (the file is empty)")
    if not errors and spec.check_dataset is not None:
        errors += spec.check_dataset(rows, labels)
    if errors:
        raise ScoreInputError(source, errors)
    return rows, labels


def _jsonl_items(predictions: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """("line N", the row or why it is not one) for every non-blank line of a JSONL."""
    with storage.open_read(predictions) as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"line {line_no}"
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").strip()
                if not text:
                    continue
                row = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield where, f"not a JSON object ({e})"
                continue
            if not isinstance(row, dict):
                yield where, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield where, row


def score_file(metric: str | None, predictions: str | os.PathLike, *,
               variant: str | None = None, tolerance: float | None = None,
               output: str | os.PathLike | None = None, answer_format: str | None = None,
               ground_truth: Sequence[str] = ()) -> dict[str, Any]:
    """Score a predictions JSONL (local path or `s3://` URI) with `metric`.

    Args:
        metric: a key of `METRICS` (chartqa, vqav2, scienceqa, mme, mmbench, gqa, seedbench);
            None: the default metric of `answer_format`.
        predictions: the predictions JSONL, or an answer file of `answer_format`.
        variant: a variant of the metric (default: its first, see the metric's docstring).
        tolerance: ChartQA only: score this relaxed-accuracy tolerance instead of 0.05, 0.1, 0.2.
        output: a directory (or prefix) to write `scores.jsonl`, `summary.md`, `summary.json`.
        answer_format: read `predictions` as this answer-file format
            (`mmjobs.eval.benchmarks.answers`) instead of a predictions JSONL.
        ground_truth: files/folders the answer format joins the ground truth from.

    Returns:
        The summary: `metric`, `variant`, `predictions`, `unit` and the metric's own numbers.

    Raises:
        ScoreInputError: bad options or bad rows (every problem, with line numbers).
        mmjobs.storage.StoreError: the predictions cannot be read or the outputs written.
    """
    source = os.fspath(predictions)
    if metric is None:
        if answer_format not in answer_formats():
            raise ScoreInputError(source, ["no metric: give --metric, or a --format (one of "
                                           f"{', '.join(answer_formats())})"])
        metric = answer_formats()[answer_format].metrics[0]
    spec, options = _resolve(metric, variant, tolerance, source)
    rows, _ = read_rows(predictions, spec, answer_format=answer_format,
                        ground_truth=ground_truth)
    scores = [{"id": row["id"], **spec.score_row(row, options)} for row in rows]
    summary = {"metric": spec.name, "variant": options.variant, "predictions": source,
               **({"format": answer_format, "ground_truth": list(ground_truth)}
                  if answer_format else {}),
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
    """`mmjobs score --metric NAME [--variant V] [--tolerance T] --predictions FILE [--output DIR]
    [--format F [--ground-truth URI ...]]`.

    Returns:
        0 on success; 1 (with the error on stderr) when the input or options are bad or the
        store cannot be reached.
    """
    parser = argparse.ArgumentParser(
        prog="mmjobs score", description="Score a predictions JSONL with an official metric.")
    formats = answer_formats()
    parser.add_argument("--metric", choices=list(METRICS),
                        help="benchmark metric (default with --format: the format's)")
    parser.add_argument("--variant", help="metric variant (default: the reference scorer; "
                        + "; ".join(f"{n}: {', '.join(m.variants)}" for n, m in METRICS.items())
                        + ")")
    parser.add_argument("--tolerance", type=float,
                        help="chartqa only: one relaxed-accuracy tolerance instead of 0.05/0.1/0.2")
    parser.add_argument("--predictions", required=True, help="predictions JSONL (path or s3://)")
    parser.add_argument("--output", help="directory for scores.jsonl, summary.md, summary.json")
    parser.add_argument("--format", choices=list(formats), dest="answer_format",
                        help="read --predictions as another tool's answer file: "
                        + "; ".join(f"{n}: {f.help}" for n, f in formats.items()))
    parser.add_argument("--ground-truth", action="append", default=[], metavar="URI",
                        help="with --format: a file or folder holding the ground truth "
                        "(repeatable)")
    args = parser.parse_args(argv)
    if args.metric is None and args.answer_format is None:
        parser.error("--metric is required (or give --format, whose metric is the default)")
    if args.ground_truth and args.answer_format is None:
        parser.error("--ground-truth goes with --format (a predictions JSONL carries its own)")
    try:
        summary = score_file(args.metric, args.predictions, variant=args.variant,
                             tolerance=args.tolerance, output=args.output,
                             answer_format=args.answer_format, ground_truth=args.ground_truth)
    except (ScoreInputError, storage.StoreError) as e:
        print(f"mmjobs score: {e}", file=sys.stderr)
        return 1
    print(summary_markdown(summary["metric"], summary))
    if args.output is not None:
        print(f"\nsummary: {storage.join(args.output, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(score_main())
