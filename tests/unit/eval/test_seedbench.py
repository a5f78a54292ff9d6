"""SEED-Bench: per-question-type accuracy, pooled total, option extraction variants."""

from __future__ import annotations

import pytest

from mmjobs.eval.metrics.seedbench import extract_option


@pytest.mark.parametrize(("pred", "llava", "lmms"), [
    ("A", "A", "A"), ("A.", "A.", "A"), (" B ", " B ", "B"), ("C) a dog", "C) a dog", "C"),
])
def test_extract_option(pred, llava, lmms):
    assert extract_option(pred, "llava") == llava
    assert extract_option(pred, "lmms") == lmms


def s(i, pred, answer, qtype, data_type="image"):
    return {"id": i, "prediction": pred, "answer": answer, "question_type_id": qtype,
            "data_type": data_type}


def test_per_type_and_pooled_total(score):
    rows = [s(1, "A", "A", 1), s(2, "B", "A", 1), s(3, "C", "D", 2),
            s(4, "D.", "D", 10, "video")]
    summary, _ = score("seedbench", rows)
    assert summary["per_question_type"] == {"1": 50.0, "2": 0.0, "10": 0.0}
    assert summary["accuracy"] == 25.0  # pooled 1/4, not the mean of per-type accuracies
    assert summary["per_data_type"] == {"image": pytest.approx(100 / 3), "video": 0.0}
    assert summary["question_types"]["10"] == "Action Recognition"
    lmms, _ = score("seedbench", rows, variant="lmms")
    assert lmms["per_question_type"]["10"] == 100.0
    assert lmms["accuracy"] == 50.0
