"""MMBench circular accuracy (`--metric mmbench`), with VLMEvalKit's exact-matching extraction.

Rows: `index` (int; VLMEvalKit's circular copies of question ``i`` with rotated options have
index ``i + k * 1_000_000``), `options` (letter -> option text; null texts are skipped like
VLMEvalKit's ``build_choices`` skips NaN) and `gt` (the right letter *for that row's options*);
optional `category` for a per-category breakdown.

Reproduces open-compass/VLMEvalKit ``vlmeval/dataset/utils/multiple_choice.py``
``mcq_circular_eval`` / ``prefetch_circular_group`` in exact-matching mode (no LLM judge):
the rows whose ``index % 1_000_000`` equals a main row's index (``index < 1_000_000``) form
its group, and the group scores 1 only when the option extracted from *every* row equals that
row's `gt`; a row with no extractable option fails the group ("no GPT-based answer matching
under exact_matching policy"). Rows without a main row are ignored by VLMEvalKit; they are
counted in ``ignored_rows`` here. A dataset without copies is scored as plain accuracy.

Option extraction is ``vlmeval/utils/matching_util.py::can_infer``: ``can_infer_option`` then,
if that fails, ``can_infer_text``:

- can_infer_option: "Failed to obtain answer via API" -> no answer; one of four refusal phrases
  -> ``Z`` (always wrong); characters ``.()[],:;!*#{}`` become spaces and the text is split on
  whitespace; exactly one option letter among the tokens -> that letter; no option letter but
  a ``Z`` token -> ``Z``. (The "A might be a quantifier" rejection only runs with the
  ``VERBOSE`` environment variable set, and is not reproduced.)
- can_infer_text: the lower-cased prediction contains exactly one option's lower-cased text
  -> that letter.

Variants (VLMEvalKit changed this function over time; both are in its history):

- ``vlmeval`` (default): the long-standing version (VLMEvalKit commit 18fc37a): a single option
  letter anywhere in the text is accepted.
- ``vlmeval-tail``: the later version: the letter must also be among the last 5 tokens
  (``splits.index(ch) > len(splits) - 5``), and ``can_infer_text`` gives up on predictions
  longer than twice the total length of the option texts. (One stored VLMEvalKit commit,
  134b4ea, has ``<`` instead of ``>``; the ``>`` form is the one VLMEvalKit's users copy.)

Summary: ``accuracy`` in percent over groups (VLMEvalKit reports fractions; LLaVA and the
MMBench leaderboard print percentages), ``per_category`` when rows carry `category` (the
main row's category is the group's).
"""

from __future__ import annotations

import string
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
    ratio,
    show,
)

CIRCULAR_OFFSET = 1_000_000
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SEPARATORS = ".()[],:;!*#{}"


def can_infer_option(answer: str, choices: Mapping[str, str], variant: str = "vlmeval") -> str:
    """The option letter (or "Z") named in `answer`, or "" when none can be told apart."""
    if "Failed to obtain answer via API" in answer:
        return ""
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    for c in _SEPARATORS:
        answer = answer.replace(c, " ")
    splits = [x.strip() for x in answer.split()]
    named = [ch for ch in choices if ch in splits]
    if len(named) == 1:
        ch = named[0]
        if variant != "vlmeval-tail" or splits.index(ch) > len(splits) - 5:
            return ch
    elif not named and ("Z" in splits) + ("" in splits) == 1:  # "" never appears after split()
        return "Z"
    return ""


def can_infer_text(answer: str, choices: Mapping[str, str], variant: str = "vlmeval") -> str:
    """The single option whose text appears in `answer` (case-insensitive), or ""."""
    answer = answer.lower()
    if variant == "vlmeval-tail" and len(answer) > 2 * sum(len(v) for v in choices.values()):
        return ""
    found = [k for k, text in choices.items() if text.lower() in answer]
    return found[0] if len(found) == 1 else ""


def can_infer(answer: str, choices: Mapping[str, str], variant: str = "vlmeval") -> str:
    """VLMEvalKit `can_infer`: option letter, "Z" (refusal) or "" (nothing extractable)."""
    return can_infer_option(answer, choices, variant) or can_infer_text(answer, choices, variant)


def build_choices(options: Mapping[str, str | None]) -> dict[str, str]:
    """VLMEvalKit `build_choices`: A–Z in order, skipping missing option texts."""
    return {ch: str(options[ch]) for ch in string.ascii_uppercase if options.get(ch) is not None}


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    pred = can_infer(row["prediction"], build_choices(row["options"]), options.variant)
    scores: dict[str, Any] = {"index": row["index"], "group": row["index"] % CIRCULAR_OFFSET,
                              "pred": pred or None, "correct": float(pred == row["gt"])}
    if row.get("category") is not None:
        scores["category"] = row["category"]
    return scores


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    main = {sc["index"]: sc for sc in scores if sc["index"] < CIRCULAR_OFFSET}
    groups: dict[int, list[float]] = defaultdict(list)
    ignored = 0
    for sc in scores:
        if sc["group"] in main:
            groups[sc["group"]].append(sc["correct"])
        else:
            ignored += 1
    hits = {g: float(all(v == 1.0 for v in vals)) for g, vals in groups.items()}
    by_category: dict[str, list[float]] = defaultdict(list)
    for g, hit in hits.items():
        if "category" in main[g]:
            by_category[main[g]["category"]].append(hit)
    summary: dict[str, Any] = {
        "unit": "percent", "count": len(scores), "groups": len(hits), "ignored_rows": ignored,
        "circular": any(len(v) > 1 for v in groups.values()),
        "accuracy": ratio(sum(hits.values()), len(hits)),
    }
    if by_category:
        summary["per_category"] = {c: ratio(sum(v), len(v)) for c, v in sorted(by_category.items())}
    return summary


def render(summary: Mapping[str, Any]) -> str:
    rows = [[c, fmt(v)] for c, v in summary.get("per_category", {}).items()]
    rows.append(["Overall", fmt(summary["accuracy"])])
    return markdown_table(["MMBench category", "accuracy"], rows)


def _is_options(value: Any) -> str | None:
    ok = (isinstance(value, dict) and value
          and all(k in string.ascii_uppercase and len(k) == 1 for k in value)
          and all(v is None or isinstance(v, str) for v in value.values()))
    return None if ok else f"expected a mapping of letters A-Z to option texts, got {show(value)}"


def _consistency(row: Row) -> list[str]:
    problems = []
    if row["index"] < 0:
        problems.append(f"field 'index': expected a non-negative integer, got {row['index']}")
    if row["gt"] not in build_choices(row["options"]):
        problems.append(f"field 'gt': {row['gt']!r} is not one of the row's options "
                        f"{', '.join(build_choices(row['options']))}")
    return problems


METRIC = Metric(
    name="mmbench",
    title="MMBench (circular)",
    variants=("vlmeval", "vlmeval-tail"),
    required_fields={"index": is_int, "options": _is_options, "gt": is_str},
    optional_fields={"category": is_str},
    score_row=score_row,
    summarize=summarize,
    render=render,
    check_consistency=_consistency,
)
