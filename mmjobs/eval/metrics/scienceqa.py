"""ScienceQA accuracy by category (`--metric scienceqa`): NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg.

Rows: `choices` (option texts), `answer` (index of the right choice), `subject`
(``natural science`` | ``social science`` | ``language science``), `grade` (``grade1`` ..
``grade12``), `hint` (the context text, possibly empty) and `has_image` (bool).

Categories reproduce lupantech/ScienceQA ``tools/evaluate_acc.py::get_scores``: NAT/SOC/LAN by
subject; TXT = non-empty hint; IMG = has an image; NO = neither (a question with both a hint and
an image counts in TXT *and* IMG); G1-6 / G7-12 by grade; Average over all rows. Values are
percentages (upstream prints them with 2 decimals).

Answer extraction reproduces haotian-liu/LLaVA ``llava/eval/eval_science_qa.py`` (LLaVA-1.5):
the raw text (not stripped) is taken as the answer when it is exactly one of ``A``–``E``; else
its first letter when it starts with ``"X. "`` (letter, period, space); else the letter of
``The answer is ([A-Z]).`` when that regex (whose ``.`` matches any character) matches exactly
once. A letter beyond the number of choices, or no letter, is wrong. LLaVA's first release
picked a random choice for unparseable answers (``random.choice``); its current
``get_pred_idx`` returns -1, i.e. wrong — we keep that deterministic rule.

Variants:

- ``llava`` (default): exactly the rules above — a bare ``"B."`` is *not* parsed (its
  ``pred_text[1:3]`` is ``"."``, not ``". "``).
- ``llava-dot``: also accepts a bare ``"X."`` (two characters), a rule several LLaVA-derived
  copies of eval_science_qa.py add before the regex.
- ``lavin``: luogen1996/LaVIN ``eval.py``: the letter of the *first* match of
  ``The answer is ([A-Z]).`` (LaVIN generates "The answer is A. BECAUSE: ..." and may repeat
  it); no other rule. No match ("FAILED"), or a letter beyond the choices, gets
  ``random.choice`` over the choices (``get_pred_idx``), as LaVIN scores it: a guess that is
  right about 1 time in the number of choices. Here the guess is drawn from a generator
  seeded with the row id, so a score is reproducible. LaVIN searches the decoded prompt and
  answer together; mmjobs' predictions hold the answer only (LaVIN's ScienceQA prompt never
  contains the phrase, so the first match is the same).
- ``lavin-strict``: LaVIN's parsing, but a failure is wrong (no guess).

``unparsed`` counts the rows with no letter; ``guessed`` the rows scored by a guess.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mmjobs.eval.metrics.base import (
    Metric,
    Row,
    ScoreOptions,
    fmt,
    is_bool,
    is_int,
    is_str,
    is_str_list,
    markdown_table,
    one_of,
    ratio,
)

OPTIONS = ("A", "B", "C", "D", "E")
SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
GRADES = tuple(f"grade{i}" for i in range(1, 13))
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_answer(text: str, variant: str = "llava") -> str | None:
    """The option letter the variant's eval script (LLaVA's eval_science_qa.py, LaVIN's
    eval.py) reads from a prediction, or None (FAILED)."""
    if variant.startswith("lavin"):
        found = _ANSWER_IS.findall(text)
        return found[0] if found else None
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    if variant == "llava-dot" and len(text) == 2 and text[0] in OPTIONS and text[1] == ".":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def predicted_index(letter: str | None, n_choices: int) -> int:
    """LLaVA `get_pred_idx`: the choice index, or -1 when the letter is not among the choices."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def categories(row: Row) -> list[str]:
    """The evaluate_acc.py categories a question belongs to."""
    cats = [code for code, subject in SUBJECTS.items() if row["subject"] == subject]
    if row["hint"]:
        cats.append("TXT")
    if row["has_image"]:
        cats.append("IMG")
    if not row["hint"] and not row["has_image"]:
        cats.append("NO")
    cats.append("G1-6" if GRADES.index(row["grade"]) < 6 else "G7-12")
    return cats


def lavin_guess(row_id: Any, n_choices: int) -> int:
    """LaVIN's `random.choice(range(len(choices)))` for a failed parse, drawn from a generator
    seeded with the row id (the same guess on every scoring run)."""
    return random.Random(f"lavin-guess:{row_id}").randrange(n_choices)


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    letter = parse_answer(row["prediction"], options.variant)
    n_choices = len(row["choices"])
    pred = predicted_index(letter, n_choices)
    guessed = options.variant == "lavin" and pred == -1
    if guessed:
        pred = lavin_guess(row["id"], n_choices)
    return {"parsed": letter, "pred": pred, "correct": float(pred == row["answer"]),
            "categories": categories(row), **({"guessed": True} if guessed else {})}


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    def acc(keep: Callable[[Mapping[str, Any]], bool]) -> tuple[float | None, int]:
        chosen = [sc["correct"] for sc in scores if keep(sc)]
        return ratio(sum(chosen), len(chosen)), len(chosen)

    accuracy: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for cat in CATEGORIES:
        accuracy[cat], counts[cat] = acc(lambda sc, c=cat: c in sc["categories"])
    accuracy["Avg"], counts["Avg"] = acc(lambda sc: True)
    return {"unit": "percent", "count": len(scores), "accuracy": accuracy, "counts": counts,
            "unparsed": sum(1 for sc in scores if sc["parsed"] is None),
            "guessed": sum(1 for sc in scores if sc.get("guessed"))}


def render(summary: Mapping[str, Any]) -> str:
    acc = summary["accuracy"]
    return markdown_table(["ScienceQA", *CATEGORIES, "Avg"],
                          [["Accuracy", *(fmt(acc[c]) for c in (*CATEGORIES, "Avg"))]])


def _consistency(row: Row) -> list[str]:
    n = len(row["choices"])
    if not 0 <= row["answer"] < n:
        return [f"field 'answer': index {row['answer']} is not a valid index of the {n} choices"]
    if n > len(OPTIONS):
        return [f"field 'choices': {n} choices, but answers are parsed as letters A-E"]
    return []


METRIC = Metric(
    name="scienceqa",
    title="ScienceQA accuracy",
    variants=("llava", "llava-dot", "lavin", "lavin-strict"),
    required_fields={
        "choices": is_str_list(), "answer": is_int, "subject": one_of(*SUBJECTS.values()),
        "grade": one_of(*GRADES), "hint": is_str, "has_image": is_bool,
    },
    score_row=score_row,
    summarize=summarize,
    render=render,
    check_consistency=_consistency,
)
