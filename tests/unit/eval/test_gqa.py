"""GQA: exact match over balanced questions; LLaVA preprocessing variant."""

from __future__ import annotations


def g(i, pred, answer, **extra):
    return {"id": i, "prediction": pred, "answer": answer, **extra}


ROWS = [
    g(1, "Yes", "yes", structural_type="verify"),
    g(2, "table.", "table", structural_type="query"),
    g(3, "table .", "table", structural_type="query"),
    g(4, "left", "left", structural_type="choose", is_balanced=False),
    g(5, " No.", "no", structural_type="verify"),
]


def test_official_is_exact_match_over_balanced(score):
    summary, scores = score("gqa", ROWS)
    assert summary["count"] == 4 and summary["unbalanced"] == 1
    assert summary["accuracy"] == 0.0  # the unbalanced right answer does not count
    assert scores[3]["correct"] == 1.0 and scores[3]["balanced"] is False


def test_llava_lowercases_and_strips_trailing_periods(score):
    summary, _ = score("gqa", ROWS, variant="llava")
    # "table ." and " No." keep their spaces (no strip): wrong
    assert summary["accuracy"] == 50.0
    assert summary["binary"] == 50.0
    assert summary["open"] == 50.0
