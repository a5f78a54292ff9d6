"""Score a predictions file: validate its rows for a metric, run PoT programs, score, judge.

The evaluate stage reads its `predictions` through `predictions_file` (a JSONL, or a committed
infer output folder holding `predictions.jsonl`) and calls `evaluate`, which writes into a
local folder: `scores.jsonl` (per row: `id`, the metric's score fields, and `pot` with the
sandbox status), `summary.json` (the metric's summary + `label`, `pot`, `judge`), `summary.md`
(`mmjobs.eval.report.evaluation_markdown`) and `categories.png`; with PoT
`predictions_pot.jsonl`; with a judge `judge/judgments.jsonl` and `judge/summary.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from mmjobs import storage
from mmjobs.eval.judging import JudgeSettings, judge_file
from mmjobs.eval.metrics import METRICS, ScoreOptions
from mmjobs.eval.metrics.chartqa import TOLERANCES
from mmjobs.eval.pot.settings import PotSettings
from mmjobs.eval.report import category_bar_chart, evaluation_markdown
from mmjobs.eval.score import read_rows
from mmjobs.layout import EVAL_SUMMARY, PREDICTIONS_FILE, SCORES_FILE
from mmjobs.stage_contract import input_fingerprint


class EvaluationSettings(Protocol):
    """What `evaluate` is asked to do (the evaluate stage's config has these fields)."""

    metric: str | None
    variant: str | None
    tolerances: list[float] | None
    pot: PotSettings
    judge: JudgeSettings | None
    label: str | None


def evaluate(cfg: EvaluationSettings, source: str, out_dir: Path, *,
             baseline: str | None = None, pod_step: str = "") -> dict[str, Any]:
    """Score `source` as `cfg` says and write the output files into the local `out_dir`.

    `pod_step` names the PoT Job (`pot.executor: pod`) after the step's output folder.

    Returns:
        The summary (also written to `out_dir/summary.json`).
    """
    summary: dict[str, Any] = {"metric": cfg.metric, "label": cfg.label, "predictions": source}
    if cfg.metric is not None:
        summary.update(_score(cfg, source, out_dir, pod_step))
    if cfg.judge is not None:
        summary["judge"] = judge_file(cfg.judge, source, baseline, out_dir)
    markdown = evaluation_markdown(summary)
    (out_dir / "summary.md").write_text(markdown + "\n", encoding="utf-8")
    figure = category_bar_chart(summary)
    figure.savefig(out_dir / "categories.png", dpi=120)
    (out_dir / EVAL_SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
    return summary


def _score(cfg: EvaluationSettings, source: str, out_dir: Path, pod_step: str) -> dict[str, Any]:
    spec = METRICS[cfg.metric]  # type: ignore[index]  # checked by the config
    tolerances = tuple(cfg.tolerances or TOLERANCES) if spec.name == "chartqa" else ()
    options = ScoreOptions(cfg.variant or spec.default_variant, tolerances)
    rows, _ = read_rows(source, spec)
    pot_records: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = {}
    if cfg.pot.enabled:
        from mmjobs.eval.pot.batch import run_rows

        rows, pot_records, extra["pot"] = run_rows(cfg.pot, rows,
                                                   out_dir / "predictions_pot.jsonl",
                                                   pod_runner=_pod_runner(pod_step))
    scores = [{"id": row["id"], **spec.score_row(row, options)} for row in rows]
    with open(out_dir / SCORES_FILE, "w", encoding="utf-8") as f:
        for i, sc in enumerate(scores):
            if pot_records is not None:
                sc = {**sc, "pot": pot_records[i]}
            f.write(json.dumps(sc, ensure_ascii=False) + "\n")
    return {"variant": options.variant, **spec.summarize(rows, scores, options), **extra}


# --------------------------------------------------------------------------- PoT


def _pod_runner(step: str) -> Any:
    """Runs the programs in a credential-less Job (`pot.executor: pod`), named after the step."""
    import functools

    from mmjobs.eval.pot import pod

    return functools.partial(pod.run_in_pod, step=step)


# --------------------------------------------------------------------------- inputs


def predictions_file(uri: str) -> str:
    """The predictions JSONL a `predictions` value names (a file, or an infer output folder).

    Raises:
        mmjobs.storage.IncompleteDirectoryError: a folder with predictions but no manifest
            (its infer stage did not finish).
        mmjobs.storage.StoreNotFoundError: nothing there.
    """
    if storage.is_committed(uri):
        inside = storage.join(uri, PREDICTIONS_FILE)
        if not storage.exists(inside):
            raise storage.StoreNotFoundError(f"{uri}: committed folder without "
                                             f"{PREDICTIONS_FILE}; is it an infer output?")
        return inside
    inside = storage.join(uri, PREDICTIONS_FILE)
    if storage.exists(inside):
        raise storage.IncompleteDirectoryError(
            f"{uri}: has {PREDICTIONS_FILE} but no {storage.MANIFEST_NAME}, so the infer stage "
            "that writes it did not finish; re-run it (or point predictions at the file)")
    loc = storage.parse(uri)
    is_file = Path(loc.key).is_file() if loc.scheme == "file" else (
        storage.exists(uri) and next(storage.list_objects(uri), None) is None)
    if not is_file:
        raise storage.StoreNotFoundError(f"{uri}: no predictions (expected a JSONL file or an "
                                         f"infer output folder holding {PREDICTIONS_FILE})")
    return str(loc)


def predictions_fingerprint(given: str, source: str) -> str:
    """Committed folders by manifest; files by their bytes (streamed, also on S3)."""
    if source != str(storage.parse(given)) and storage.is_committed(given):
        return input_fingerprint(given)
    digest = hashlib.sha256()
    with storage.open_read(source) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:20]
