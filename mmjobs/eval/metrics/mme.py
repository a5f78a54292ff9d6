"""MME scores (`--metric mme`): per-task acc and acc+, perception and cognition totals.

Rows: `task` (one of the 14 MME subtasks below), `image` (the image the question is about:
every MME image has exactly two questions, one answered "yes" and one "no") and `gt`
(``yes``/``no``, any case).

Reproduces ``eval_tool/calculation.py`` of the MME release (distributed with the benchmark, not
on GitHub; read from the verbatim copy in zjunlp/Deco ``eval_tool/calculation.py``, which
matches the copies in LLaVA-style repos):

- ``parse_pred_ans``: the prediction is lower-cased (not stripped); exactly ``"yes"``/``"no"``
  is taken as is; otherwise its first 4 characters decide: containing "yes" -> yes, else
  containing "no" -> no (so "nope" and "none" read as no), else "other" (always wrong);
- acc: fraction of a task's questions answered right; acc+: fraction of its images whose two
  questions are both right;
- task score = 100·acc + 100·acc+ (0–200); perception = sum over its 10 tasks (max 2000),
  cognition = sum over its 4 tasks (max 800).

Upstream pairs the two questions of an image by their consecutive lines in the task file; here
rows are grouped by (`task`, `image`), and an image without exactly two questions is an input
error (upstream asserts the same). Tasks absent from the file are listed in ``missing_tasks``
and contribute nothing to the totals.
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
    is_str,
    markdown_table,
    one_of,
)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")


def parse_pred_ans(prediction: str) -> str:
    """calculation.py `parse_pred_ans` applied to the lower-cased prediction."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    pred = parse_pred_ans(row["prediction"])
    return {"task": row["task"], "image": row["image"], "parsed": pred,
            "correct": float(pred == row["gt"].lower())}


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    by_image: dict[tuple[str, str], list[float]] = defaultdict(list)
    for sc in scores:
        by_image[sc["task"], sc["image"]].append(sc["correct"])
    tasks: dict[str, dict[str, Any]] = {}
    for task in (*PERCEPTION, *COGNITION):
        answers = [sc for sc in scores if sc["task"] == task]
        if not answers:
            continue
        pairs = [v for (t, _), v in by_image.items() if t == task]
        acc = sum(sc["correct"] for sc in answers) / len(answers)
        acc_plus = sum(1 for v in pairs if sum(v) == 2) / len(pairs)
        tasks[task] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus,
                       "score": acc * 100 + acc_plus * 100, "questions": len(answers),
                       "other": sum(1 for sc in answers if sc["parsed"] == "other")}
    perception = sum(tasks[t]["score"] for t in PERCEPTION if t in tasks)
    cognition = sum(tasks[t]["score"] for t in COGNITION if t in tasks)
    return {"unit": "score", "count": len(scores), "tasks": tasks, "perception": perception,
            "cognition": cognition, "total": perception + cognition,
            "missing_tasks": [t for t in (*PERCEPTION, *COGNITION) if t not in tasks]}


def check_pairs(rows: Sequence[Row], where: Sequence[str]) -> list[str]:
    """Every (task, image) must have exactly two questions, as calculation.py asserts."""
    by_image: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row, label in zip(rows, where, strict=True):
        by_image[row["task"], row["image"]].append(label)
    return [f"{', '.join(ls)}: task {t!r} image {i!r} has {len(ls)} "
            f"question{'s' if len(ls) > 1 else ''}; MME pairs exactly 2 per image (one yes, "
            "one no)"
            for (t, i), ls in by_image.items() if len(ls) != 2]


def render(summary: Mapping[str, Any]) -> str:
    tasks = summary["tasks"]
    rows = [[t, fmt(v["acc"]), fmt(v["acc_plus"]), fmt(v["score"])] for t, v in tasks.items()]
    rows += [["Perception", "", "", fmt(summary["perception"])],
             ["Cognition", "", "", fmt(summary["cognition"])],
             ["Total", "", "", fmt(summary["total"])]]
    return markdown_table(["MME task", "acc", "acc+", "score"], rows)


METRIC = Metric(
    name="mme",
    title="MME",
    variants=("official",),
    required_fields={"task": one_of(*PERCEPTION, *COGNITION), "image": is_str,
                     "gt": one_of("yes", "no", lower=True)},
    score_row=score_row,
    summarize=summarize,
    render=render,
    check_dataset=check_pairs,
)
