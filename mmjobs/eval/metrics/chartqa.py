"""ChartQA relaxed accuracy (`--metric chartqa`) per split and tolerance (ChartMoE @AP table).

Rows: `answers` (list of gold strings; a row is right if it matches any of them) and `split`
(`human` or `augmented`, the two ChartQA test sets).

Variants:

- ``pix2struct`` (default) reproduces google-research/pix2struct
  ``pix2struct/metrics.py::relaxed_correctness`` (the ChartQA metric of the pix2struct/MatCha/
  DePlot papers, copied by lmms-eval and most VLM repos). Both strings are parsed with
  ``float()`` after a trailing ``%`` is turned into ``/100`` (``"12%"`` equals ``"0.12"``).
  When both parse *and the gold value is non-zero*, the prediction is right if
  ``|pred - gold| / |gold| <= tolerance``. Otherwise — including a gold of ``0``, which upstream
  tests with ``and target_float`` — the prediction must equal the gold case-insensitively
  (no stripping: ``float()`` tolerates surrounding spaces, the exact-match path does not).
  Over several golds the maximum is taken (``aggregate_metrics``).
- ``chartmoe`` reproduces IDEA-FinAI/ChartMoE ``chartmoe/eval_ChartQA.py::relaxed_acc`` and
  ``evaluate_relaxed_accuracy``: the prediction is stripped; each side's number is the *first*
  run of digits and dots after removing commas (so signs, ``%`` and surrounding words are
  ignored: ``"-5%"`` reads as 5); a gold of 0 uses the absolute difference. If either side has no
  number: right when both contain ``"yes"``, or both contain ``"no"`` (``"none"`` and
  ``"Nokia"`` both contain "no"), or the prediction is a substring of the gold (an empty
  prediction is therefore right), or they are equal, all lower-cased.

Summary (fractions 0–1, as in ChartMoE's table): for each tolerance, accuracy on ``human``,
on ``augmented``, their unweighted ``average`` (ChartMoE's "Averaged" row; None unless both
splits are present) and ``overall`` (pooled over all rows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mmjobs.eval.metrics.base import (
    Metric,
    Row,
    ScoreOptions,
    fmt,
    is_str_list,
    markdown_table,
    one_of,
    ratio,
)

TOLERANCES = (0.05, 0.1, 0.2)
SPLITS = ("human", "augmented")


def tolerance_key(tolerance: float) -> str:
    """The summary/score key of a tolerance: 0.05 -> "0.05", 0.1 -> "0.1"."""
    return f"{tolerance:g}"


# --------------------------------------------------------------------------- pix2struct


def _pix2struct_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def pix2struct_relaxed_correctness(target: str, prediction: str,
                                   max_relative_change: float = 0.05) -> bool:
    """pix2struct's relaxed correctness of one prediction against one gold answer."""
    pred, gold = _pix2struct_float(prediction), _pix2struct_float(target)
    if pred is not None and gold:  # a gold of 0 is falsy upstream: exact match below
        return abs(pred - gold) / abs(gold) <= max_relative_change
    return prediction.lower() == target.lower()


# --------------------------------------------------------------------------- ChartMoE

_FIRST_NUMBER = re.compile(r"[\d.]+")


def _chartmoe_float(text: str) -> float | None:
    match = _FIRST_NUMBER.search(text.replace(",", ""))
    if match is None:
        return None
    try:
        return float(match.group())
    except ValueError:  # e.g. "." or "1.2.3"
        return None


def chartmoe_relaxed_acc(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartMoE's `relaxed_acc` of one (already stripped) prediction against one gold answer."""
    pred, gold = _chartmoe_float(prediction), _chartmoe_float(target)
    if pred is not None and gold is not None:
        change = abs(pred - gold) if gold == 0 else abs(pred - gold) / abs(gold)
        return change <= max_relative_change
    lp, tp = prediction.lower(), target.lower()
    if ("yes" in lp and "yes" in tp) or ("no" in lp and "no" in tp):
        return True
    return lp in tp or lp == tp


# --------------------------------------------------------------------------- metric


def is_correct(prediction: str, answers: Sequence[str], tolerance: float, variant: str) -> bool:
    """Relaxed correctness against the best of several gold answers."""
    if variant == "chartmoe":
        pred = prediction.strip()
        return max(chartmoe_relaxed_acc(pred, gold, tolerance) for gold in answers)
    return max(pix2struct_relaxed_correctness(gold, prediction, tolerance) for gold in answers)


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    scores: dict[str, Any] = {"split": row["split"].lower()}
    for tol in options.tolerances:
        correct = is_correct(row["prediction"], row["answers"], tol, options.variant)
        scores[f"correct@{tolerance_key(tol)}"] = float(correct)
    return scores


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    counts = {s: sum(1 for sc in scores if sc["split"] == s) for s in SPLITS}
    accuracy: dict[str, dict[str, float | None]] = {}
    for tol in options.tolerances:
        key = f"correct@{tolerance_key(tol)}"
        per_split = {s: ratio(sum(sc[key] for sc in scores if sc["split"] == s), counts[s], 1.0)
                     for s in SPLITS}
        human, augmented = per_split["human"], per_split["augmented"]
        accuracy[tolerance_key(tol)] = {
            **per_split,
            "average": None if human is None or augmented is None else (human + augmented) / 2,
            "overall": ratio(sum(sc[key] for sc in scores), len(scores), 1.0),
        }
    return {"unit": "fraction", "count": len(scores), "counts": counts,
            "tolerances": [tolerance_key(t) for t in options.tolerances], "accuracy": accuracy}


AP_ROWS = (("Human", "human"), ("Augmented", "augmented"), ("Averaged", "average"))


def ap_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """ChartMoE's @AP table (`eval_ChartQA.py`'s PrettyTable) as headers and rows: Human /
    Augmented / Averaged, one column per tolerance, fractions with 4 decimals."""
    tols = summary["tolerances"]
    acc = summary["accuracy"]
    rows = [[label, *(fmt(acc.get(t, {}).get(key), 4) for t in tols)] for label, key in AP_ROWS]
    return ["@AP", *tols], rows


def render(summary: Mapping[str, Any]) -> str:
    """The @AP table: Human / Augmented / Averaged rows, one column per tolerance."""
    return markdown_table(*ap_rows(summary))


METRIC = Metric(
    name="chartqa",
    title="ChartQA relaxed accuracy",
    variants=("pix2struct", "chartmoe"),
    required_fields={"answers": is_str_list(), "split": one_of(*SPLITS, lower=True)},
    score_row=score_row,
    summarize=summarize,
    render=render,
)
