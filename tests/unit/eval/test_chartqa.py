"""ChartQA relaxed accuracy: pix2struct and ChartMoE quirks, hand-computed."""

from __future__ import annotations

import pytest

from mmjobs.eval.metrics.chartqa import (
    chartmoe_relaxed_acc,
    is_correct,
    pix2struct_relaxed_correctness,
)


def p2s(pred: str, gold: str, tol: float = 0.05) -> bool:
    return pix2struct_relaxed_correctness(gold, pred, tol)


def moe(pred: str, gold: str, tol: float = 0.05) -> bool:
    return is_correct(pred, [gold], tol, "chartmoe")


# --------------------------------------------------------------------------- pix2struct


def test_percent_is_divided_by_100():
    assert p2s("12%", "0.12")
    assert p2s("0.12", "12%")
    assert not p2s("12", "0.12")


def test_gold_zero_is_exact_match_only():
    assert p2s("0", "0")
    assert not p2s("0.0", "0")  # numerically equal, but gold 0 is not treated as a number
    assert not p2s("0.01", "0", tol=0.2)
    assert moe("0.01", "0")  # ChartMoE: absolute difference when gold is 0


@pytest.mark.parametrize(("pred", "tol", "expected"), [
    ("105", 0.05, True), ("95", 0.05, True),          # exactly 5%: `<=` includes the boundary
    ("105.1", 0.05, False), ("94.9", 0.05, False),
    ("110", 0.1, True), ("110.5", 0.1, False),
    ("120", 0.2, True), ("79", 0.2, False),
])
def test_tolerance_boundaries(pred, tol, expected):
    assert p2s(pred, "100", tol) is expected


def test_negative_gold_uses_absolute_value():
    assert p2s("-10.4", "-10")
    assert not p2s("10", "-10", tol=0.2)


def test_text_is_case_insensitive_exact_match_without_strip():
    assert p2s("Yes", "yes")
    assert not p2s(" yes", "yes")
    assert not p2s("light blue", "blue")
    assert p2s(" 12 ", "12")  # float() itself ignores surrounding spaces
    assert not p2s("1,000", "1000")  # float() rejects the comma -> exact match fails


def test_max_over_multiple_golds():
    assert is_correct("15.5", ["red", "15"], 0.05, "pix2struct")
    assert is_correct("Red", ["red", "15"], 0.05, "pix2struct")
    assert not is_correct("blue", ["red", "15"], 0.05, "pix2struct")


# --------------------------------------------------------------------------- ChartMoE


def test_chartmoe_reads_first_number_ignoring_sign_percent_and_commas():
    assert moe("The value is 12.5%", "12.5")
    assert moe("-5", "5")
    assert moe("1,234", "1234")
    assert not moe("12%", "0.12")  # no /100 in ChartMoE
    assert not moe("between 3 and 100", "100")  # first number only


def test_chartmoe_yes_no_and_substring_rules():
    assert moe("yes, it is", "Yes")
    assert moe("Nope", "none")  # both contain "no"
    assert moe("blue", "light blue")  # prediction inside gold
    assert not moe("light blue", "blue")
    assert moe("   ", "anything")  # stripped empty prediction is a substring of any gold
    assert not p2s("", "anything")


def test_chartmoe_relaxed_acc_does_not_strip_itself():
    assert not chartmoe_relaxed_acc(" Red ", "red")
    assert moe(" Red ", "red")  # evaluate_relaxed_accuracy strips the prediction first


# --------------------------------------------------------------------------- summary


ROWS = [
    {"id": "h1", "prediction": "100", "answers": ["100"], "split": "human"},
    {"id": "h2", "prediction": "115", "answers": ["100"], "split": "human"},
    {"id": "a1", "prediction": "blue", "answers": ["red"], "split": "augmented"},
]


def test_summary_per_split_average_and_overall(score):
    summary, rows = score("chartqa", ROWS)
    assert summary["tolerances"] == ["0.05", "0.1", "0.2"]
    acc = summary["accuracy"]
    assert acc["0.05"] == {"human": 0.5, "augmented": 0.0, "average": 0.25,
                           "overall": pytest.approx(1 / 3)}
    assert acc["0.1"]["human"] == 0.5
    assert acc["0.2"] == {"human": 1.0, "augmented": 0.0, "average": 0.5,
                          "overall": pytest.approx(2 / 3)}
    assert summary["counts"] == {"human": 2, "augmented": 1}
    assert rows[1] == {"id": "h2", "split": "human", "correct@0.05": 0.0, "correct@0.1": 0.0,
                       "correct@0.2": 1.0}


def test_single_tolerance_and_missing_split(score):
    summary, _ = score("chartqa", ROWS[:2], tolerance=0.2)
    assert list(summary["accuracy"]) == ["0.2"]
    assert summary["accuracy"]["0.2"]["human"] == 1.0
    assert summary["accuracy"]["0.2"]["augmented"] is None
    assert summary["accuracy"]["0.2"]["average"] is None


def test_variant_changes_scores(score):
    rows = [{"id": 1, "prediction": "0.02", "answers": ["0"], "split": "augmented"}]
    assert score("chartqa", rows)[0]["accuracy"]["0.05"]["augmented"] == 0.0
    assert score("chartqa", rows, variant="chartmoe")[0]["accuracy"]["0.05"]["augmented"] == 1.0
