"""`chartwiz` metric: relaxed 5 % on numeric gold answers (units kept), exact match otherwise,
reported per task; checked on hand-made rows and on real ChartQA labels."""

from __future__ import annotations

import json

import pytest

from mmjobs.eval.metrics.chartwiz import is_correct, parse_numeric
from tests.real_data import REAL


def r(i, pred, answers, **extra):
    return {"id": str(i), "prediction": pred, "answers": answers, **extra}


@pytest.mark.parametrize(("text", "parsed"), [
    ("21", (21.0, "")), (" 1,234.5 ", (1234.5, "")), ("-5%", (-5.0, "%")),
    ("15.5억원", (15.5, "억원")), ("15.5 억원", (15.5, "억원")), (".5", (0.5, "")),
    ("부산", None), ("1,23", None), ("2021년 매출", None), ("3.2.1", None),
])
def test_numbers_keep_their_unit(text, parsed):
    assert parse_numeric(text) == parsed


@pytest.mark.parametrize(("pred", "gold", "correct", "numeric"), [
    ("21", "20", True, True),          # 5 % of 20 is 1
    ("21.01", "20", False, True),
    ("19억원", "20억원", True, True),
    ("20", "20억원", False, True),      # the unit must match
    ("20%", "0.2", False, True),       # % is a unit here, not /100
    ("0", "0", True, True), ("0.01", "0", False, True),  # gold 0: exact
    ("부산", "부산", True, False), (" 부산 ", "부산", True, False),
    ("Seoul", "seoul", True, False), ("부산시", "부산", False, False),
    ("many", "20", False, True),
])
def test_relaxed_on_numbers_exact_otherwise(pred, gold, correct, numeric):
    assert is_correct(pred, gold) == (correct, numeric)


def test_summary_is_per_task_with_numeric_and_exact_parts(score):
    rows = [r(1, "21", ["20"], task="qa", chart_type="bar"),
            r(2, "30", ["20"], task="qa", chart_type="bar"),
            r(3, "부산", ["부산"], task="qa", chart_type="pie"),
            r(4, "TITLE | x", ["TITLE | y"], task="table", chart_type="pie"),
            r(5, "7", ["9", "7"])]  # no task: qa; the best gold counts
    summary, scores = score("chartwiz", rows)
    assert [s["correct"] for s in scores] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert summary["count"] == 5 and summary["accuracy"] == 60.0
    assert summary["tasks"]["qa"] == {"count": 4, "numeric": 3, "relaxed": 200 / 3,
                                      "exact": 100.0, "accuracy": 75.0}
    assert summary["tasks"]["table"] == {"count": 1, "numeric": 0, "relaxed": None,
                                         "exact": 0.0, "accuracy": 0.0}
    assert summary["per_category"] == {"qa": 75.0, "table": 0.0}
    assert summary["per_chart_type"] == {"bar": 50.0, "pie": 50.0}


def test_rendered_table_has_a_row_per_task(tmp_path, score):
    score("chartwiz", [r(1, "1", ["1"], task="qa"), r(2, "a", ["b"], task="summary")])
    table = next(tmp_path.glob("out*/summary.md")).read_text(encoding="utf-8")
    assert "Relaxed@5%" in table
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Task"))
    assert [line.split("|")[1].strip() for line in lines[start + 2:start + 5]] == [
        "qa", "summary", "Overall"]


def test_a_row_without_answers_is_refused_naming_the_line(score):
    with pytest.raises(ValueError, match="answers"):
        score("chartwiz", [{"id": "1", "prediction": "1"}])


def test_real_chartqa_labels_score_as_the_reference_rule_does(score):
    """On real ChartQA labels (numbers as strings, words): the label itself is right, a
    number 4 % off is right, 6 % off is wrong; word labels need the exact word."""
    records = json.loads((REAL / "chartqa" / "test" / "test_human.json").read_text("utf-8"))
    rows = []
    for i, rec in enumerate(records):
        label = rec["label"]
        rows.append(r(f"{i}-same", label, [label]))
        value = parse_numeric(label)
        if value is not None and value[0] != 0 and not value[1]:
            rows.append(r(f"{i}-near", repr(value[0] * 1.04), [label], task="near"))
            rows.append(r(f"{i}-far", repr(value[0] * 1.06), [label], task="far"))
    summary, _ = score("chartwiz", rows)
    assert summary["tasks"]["qa"]["accuracy"] == 100.0
    assert summary["tasks"]["near"]["accuracy"] == 100.0
    assert summary["tasks"]["far"]["accuracy"] == 0.0
    assert 0 < summary["tasks"]["qa"]["numeric"] < summary["tasks"]["qa"]["count"]


def test_the_run_results_show_the_per_task_table(score):
    from mmjobs.run_results import results_markdown

    summary, _ = score("chartwiz", [r(1, "21", ["20"]), r(2, "x", ["y"], task="table")])
    summary = {**summary, "metric": "chartwiz", "label": "chartwiz"}
    text = results_markdown("chartwiz", {"chartwiz": summary}, {"chartwiz": {"chartwiz": summary}})
    assert "## ChartWiz chart QA accuracy (%): chartwiz" in text
    assert "| qa " in text and "| table " in text and "Relaxed@5%" in text
    assert "| chartwiz | chartwiz.accuracy | 50 |" in text
