"""ChartWiz chart QA accuracy (`--metric chartwiz`): relaxed on numbers, exact otherwise, per task.

ChartWiz (allright2024/ChartWiz) publishes inference scripts (`scripts/infer.sh`: answers for
`validation-table-300.json`, `validation-summary-300.json`, ...) but no scorer, so this is the
chart-QA convention the seed would accept, stated here rather than borrowed silently:

- **Numeric gold answer** (a number, optionally with thousands commas, a sign, a trailing
  `%` or a one-word unit such as `억원`: `"1,234"`, `"-5%"`, `"15.5억원"`; `"2021년 매출"` is
  text): ChartQA's relaxed accuracy at 5 %
  (pix2struct `relaxed_correctness`): the prediction must be a number with the *same* suffix
  (unit compared case-insensitively; `%` is a suffix like any other, so `"12%"` does not
  equal `"0.12"`), and `|pred - gold| <= 0.05 * |gold|`; a gold of 0 needs exactly 0 (the
  relative change is undefined, pix2struct falls back to exact match there too).
- **Any other answer** (words, tables, descriptions): exact match after stripping
  surrounding whitespace and lower-casing (Korean has no case; English labels do).
- Several gold answers (`answers`): the best one counts.

Rows: `answers` (list of gold strings); optional `task` (the aihub-chart converter's `table`,
`description`, `summary`, `qa`; default `qa`) and `chart_type`.

Summary (percent): `accuracy` over all rows; `tasks`: per task its `count`, `numeric` (rows
with a numeric gold), `relaxed` (accuracy on those), `exact` (accuracy on the others) and
`accuracy`; `per_category` = per-task accuracy (for the report chart); `per_chart_type` when
rows name their chart type.
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
    is_str,
    is_str_list,
    markdown_table,
    ratio,
)

TOLERANCE = 0.05
DEFAULT_TASK = "qa"
# A number (digits with optional thousands commas and decimals, optional sign), then at most
# a unit: one word without spaces or digits (`%`, `억원`, `명`); "2021년 매출" is text.
_NUMBER = re.compile(r"^([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)"
                     r"\s*([^\s\d.,]*)$")


def parse_numeric(text: str) -> tuple[float, str] | None:
    """(value, lower-cased suffix) of an answer like "1,234", "15.5억원", "-5%"; else None."""
    match = _NUMBER.match(text.strip())
    if match is None:
        return None
    return float(match.group(1).replace(",", "")), match.group(2).strip().lower()


def is_correct(prediction: str, gold: str, tolerance: float = TOLERANCE) -> tuple[bool, bool]:
    """(correct, gold is numeric) for one prediction against one gold answer."""
    gold_num = parse_numeric(gold)
    if gold_num is None:
        return prediction.strip().lower() == gold.strip().lower(), False
    pred_num = parse_numeric(prediction)
    if pred_num is None or pred_num[1] != gold_num[1]:
        return False, True
    if gold_num[0] == 0:
        return pred_num[0] == 0, True
    return abs(pred_num[0] - gold_num[0]) <= tolerance * abs(gold_num[0]), True


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    results = [is_correct(row["prediction"], gold) for gold in row["answers"]]
    scores: dict[str, Any] = {
        "correct": float(any(ok for ok, _ in results)),
        # numeric when the first gold is (the golds of one question share a type in practice)
        "numeric": results[0][1],
        "task": row.get("task") or DEFAULT_TASK,
    }
    if row.get("chart_type"):
        scores["chart_type"] = row["chart_type"]
    return scores


def _accuracy(scores: Sequence[Mapping[str, Any]]) -> float | None:
    return ratio(sum(sc["correct"] for sc in scores), len(scores))


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    tasks: dict[str, dict[str, Any]] = {}
    for task in sorted({sc["task"] for sc in scores}):
        mine = [sc for sc in scores if sc["task"] == task]
        numeric = [sc for sc in mine if sc["numeric"]]
        other = [sc for sc in mine if not sc["numeric"]]
        tasks[task] = {"count": len(mine), "numeric": len(numeric),
                       "relaxed": _accuracy(numeric), "exact": _accuracy(other),
                       "accuracy": _accuracy(mine)}
    summary: dict[str, Any] = {
        "unit": "percent", "count": len(scores), "tolerance": TOLERANCE,
        "accuracy": _accuracy(scores), "tasks": tasks,
        "per_category": {task: t["accuracy"] for task, t in tasks.items()},
    }
    chart_types = sorted({sc["chart_type"] for sc in scores if "chart_type" in sc})
    if chart_types:
        summary["per_chart_type"] = {
            c: _accuracy([sc for sc in scores if sc.get("chart_type") == c]) for c in chart_types}
    return summary


def render(summary: Mapping[str, Any]) -> str:
    """One row per task and an Overall row: count, numeric rows, relaxed accuracy on them,
    exact match on the rest, accuracy."""
    rows = [[task, str(t["count"]), str(t["numeric"]), fmt(t["relaxed"]), fmt(t["exact"]),
             fmt(t["accuracy"])] for task, t in summary["tasks"].items()]
    rows.append(["Overall", str(summary["count"]),
                 str(sum(t["numeric"] for t in summary["tasks"].values())), "", "",
                 fmt(summary["accuracy"])])
    tol = f"{summary['tolerance']:.0%}"
    return markdown_table(["Task", "Count", "Numeric", f"Relaxed@{tol}", "Exact", "Accuracy"],
                          rows)


METRIC = Metric(
    name="chartwiz",
    title="ChartWiz chart QA accuracy",
    variants=("relaxed",),
    required_fields={"answers": is_str_list()},
    optional_fields={"task": is_str, "chart_type": is_str},
    score_row=score_row,
    summarize=summarize,
    render=render,
)
