"""MME: calculation.py yes/no parsing, acc+, task scores and totals."""

from __future__ import annotations

import pytest

from mmjobs.eval.metrics.mme import parse_pred_ans
from mmjobs.eval.score import ScoreInputError


@pytest.mark.parametrize(("pred", "parsed"), [
    ("Yes", "yes"), ("NO", "no"), ("yes, there is a dog", "yes"), ("No.", "no"),
    ("nope", "no"), ("none of them", "no"), (" yes", "yes"),
    ("The answer is yes", "other"),   # only the first 4 characters are looked at
    ("  yes", "other"),               # not stripped: "  ye" has no yes/no
    ("", "other"),
])
def test_parse_pred_ans(pred, parsed):
    assert parse_pred_ans(pred) == parsed


def q(i, task, image, gt, pred):
    return {"id": i, "task": task, "image": image, "gt": gt, "prediction": pred}


ROWS = [
    q(1, "existence", "a.jpg", "Yes", "yes"), q(2, "existence", "a.jpg", "No", "no"),
    q(3, "existence", "b.jpg", "Yes", "Yes"), q(4, "existence", "b.jpg", "No", "yes"),
    q(5, "code_reasoning", "c.png", "Yes", "Yes."), q(6, "code_reasoning", "c.png", "No", "No"),
]


def test_acc_plus_and_scores(score):
    summary, scores = score("mme", ROWS)
    existence = summary["tasks"]["existence"]
    assert existence["acc"] == 75.0        # 3 of 4 questions
    assert existence["acc_plus"] == 50.0   # a.jpg both right, b.jpg one wrong
    assert existence["score"] == 125.0
    assert summary["tasks"]["code_reasoning"]["score"] == 200.0
    assert summary["perception"] == 125.0
    assert summary["cognition"] == 200.0
    assert summary["total"] == 325.0
    assert len(summary["missing_tasks"]) == 12
    assert [s["correct"] for s in scores] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_image_must_have_two_questions(score):
    rows = [*ROWS, q(7, "OCR", "d.jpg", "yes", "yes")]
    with pytest.raises(ScoreInputError, match=r"line 7: task 'OCR' image 'd.jpg' has 1 question"):
        score("mme", rows)


def test_unknown_task_and_bad_gt(score):
    with pytest.raises(ScoreInputError) as e:
        score("mme", [q(1, "ocr", "x", "maybe", "yes")])
    assert "field 'task'" in str(e.value) and "field 'gt'" in str(e.value)
