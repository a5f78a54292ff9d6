"""GQA accuracy (`--metric gqa`): exact match over the balanced questions.

Rows: `answer` (the gold answer); optional `is_balanced` (bool, default true: GQA's eval.py
scores accuracy over balanced questions only, so rows marked false are excluded from every
number and counted in ``unbalanced``) and `structural_type` (GQA's ``types.structural``:
``query`` questions are "open", the rest "binary", adding those two accuracies).

Reproduces the accuracy part of the official GQA ``eval.py`` (gqadataset.org; the same file is
LLaVA's ``llava/eval/eval_gqa.py``, read from PKU-YuanGroup/Video-LLaVA's copy): a question is
right when ``prediction == answer`` — no normalisation at all. Consistency, validity,
plausibility, grounding and distribution need the scene graphs / choices files and are not
computed.

Variants:

- ``official`` (default): the prediction exactly as given.
- ``llava``: LLaVA-1.5's preprocessing before eval.py, haotian-liu/LLaVA
  ``scripts/convert_gqa_for_eval.py``: ``prediction.rstrip('.').lower()`` (trailing periods
  removed, lower-cased; not stripped of spaces). No other ``process``-style normalisation
  exists in LLaVA's GQA path that we could find; the gold answer is left as is.

Summary: percentages ``accuracy`` (and ``binary`` / ``open`` when `structural_type` is given).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmjobs.eval.metrics.base import (
    Metric,
    Row,
    ScoreOptions,
    fmt,
    is_bool,
    is_str,
    markdown_table,
    ratio,
)


def llava_preprocess(prediction: str) -> str:
    """LLaVA convert_gqa_for_eval.py: drop trailing periods, lower-case."""
    return prediction.rstrip(".").lower()


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    pred = row["prediction"]
    if options.variant == "llava":
        pred = llava_preprocess(pred)
    scores: dict[str, Any] = {"correct": float(pred == row["answer"]),
                              "balanced": row.get("is_balanced", True) is not False}
    if row.get("structural_type") is not None:
        scores["kind"] = "open" if row["structural_type"] == "query" else "binary"
    return scores


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    balanced = [sc for sc in scores if sc["balanced"]]
    summary: dict[str, Any] = {
        "unit": "percent", "count": len(balanced), "unbalanced": len(scores) - len(balanced),
        "accuracy": ratio(sum(sc["correct"] for sc in balanced), len(balanced)),
    }
    if any("kind" in sc for sc in balanced):
        for kind in ("binary", "open"):
            chosen = [sc["correct"] for sc in balanced if sc.get("kind") == kind]
            summary[kind] = ratio(sum(chosen), len(chosen))
    return summary


def render(summary: Mapping[str, Any]) -> str:
    kinds = [k for k in ("binary", "open") if k in summary]
    return markdown_table(["GQA", *(k.capitalize() for k in kinds), "Accuracy"],
                          [["Balanced", *(fmt(summary[k]) for k in kinds),
                            fmt(summary["accuracy"])]])


METRIC = Metric(
    name="gqa",
    title="GQA accuracy",
    variants=("official", "llava"),
    required_fields={"answer": is_str},
    optional_fields={"is_balanced": is_bool, "structural_type": is_str},
    score_row=score_row,
    summarize=summarize,
    render=render,
)
