"""SEED-Bench accuracy (`--metric seedbench`) per question type and overall.

Rows: `answer` (``A``–``D``); optional `question_type_id` (1–12 in SEED-Bench-1) adds the
per-question-type accuracy (SEED-Bench's own result files carry only the answer: their types
come from SEED-Bench.json), and `data_type` (``image``/``video``) per-data-type accuracy, as
LLaVA's script prints.

Aggregation reproduces AILab-CVC/SEED-Bench ``eval.py::run_inference`` and haotian-liu/LLaVA
``scripts/convert_seed_for_submission.py::eval_single``: accuracy per ``question_type_id`` =
right / questions of that type, and the total = all right / all questions (pooled, not a mean
of the per-type accuracies). Upstream raises KeyError for a type with no right answer; here it
is 0.

Option extraction (SEED-Bench's own eval ranks the four options by likelihood, so it has none;
generation-based scorers differ):

- ``llava`` (default): LLaVA's rule: right only when the prediction *equals* the answer letter
  (``row['text'] == question_data['answer']``; LLaVA prompts "Answer with the option's letter
  from the given choices directly").
- ``lmms``: EvolvingLMMs-Lab/lmms-eval ``tasks/seedbench/utils.py::seed_process_result``: the
  prediction is stripped and, if longer than one character, cut to its first character.

Summary: percentages ``accuracy`` and ``per_question_type`` (keys are the type ids as strings;
``question_types`` maps them to SEED-Bench-1 names).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from mmjobs.eval.metrics.base import (
    Metric,
    Row,
    ScoreOptions,
    fmt,
    is_int,
    is_str,
    markdown_table,
    one_of,
    ratio,
)

# SEED-Bench-1 `question_type` (name -> id) from SEED-Bench.json, inverted.
QUESTION_TYPES = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes",
    4: "Instance Location", 5: "Instances Counting", 6: "Spatial Relation",
    7: "Instance Interaction", 8: "Visual Reasoning", 9: "Text Understanding",
    10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding",
}


def extract_option(prediction: str, variant: str = "llava") -> str:
    """The letter compared with the answer."""
    if variant == "lmms":
        pred = prediction.strip()
        return pred[0] if len(pred) > 1 else pred
    return prediction


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    pred = extract_option(row["prediction"], options.variant)
    scores: dict[str, Any] = {"pred": pred, "correct": float(pred == row["answer"])}
    for key in ("question_type_id", "data_type"):
        if row.get(key) is not None:
            scores[key] = row[key]
    return scores


def _grouped(scores: Sequence[Mapping[str, Any]], key: str) -> dict[Any, float | None]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for sc in scores:
        if key in sc:
            groups[sc[key]].append(sc["correct"])
    return {str(k): ratio(sum(v), len(v)) for k, v in sorted(groups.items())}


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    per_type = _grouped(scores, "question_type_id")
    summary: dict[str, Any] = {
        "unit": "percent", "count": len(scores),
        "accuracy": ratio(sum(sc["correct"] for sc in scores), len(scores)),
        "per_question_type": per_type,
        "question_types": {k: QUESTION_TYPES.get(int(k), f"type {k}") for k in per_type},
    }
    if per_data_type := _grouped(scores, "data_type"):
        summary["per_data_type"] = per_data_type
    return summary


def render(summary: Mapping[str, Any]) -> str:
    names = summary["question_types"]
    rows = [[f"{k}. {names[k]}", fmt(v)] for k, v in summary["per_question_type"].items()]
    rows += [[f"{k.capitalize()} (all)", fmt(v)]
             for k, v in summary.get("per_data_type", {}).items()]
    rows.append(["Total", fmt(summary["accuracy"])])
    return markdown_table(["SEED-Bench question type", "accuracy"], rows)


METRIC = Metric(
    name="seedbench",
    title="SEED-Bench accuracy",
    variants=("llava", "lmms"),
    required_fields={"answer": one_of("A", "B", "C", "D")},
    optional_fields={"question_type_id": is_int, "data_type": is_str},
    score_row=score_row,
    summarize=summarize,
    render=render,
)
