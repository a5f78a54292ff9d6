"""MMBench: VLMEvalKit can_infer extraction and circular groups."""

from __future__ import annotations

import pytest

from mmjobs.eval.metrics.mmbench import can_infer
from mmjobs.eval.score import ScoreInputError

CHOICES = {"A": "cat", "B": "dog"}


@pytest.mark.parametrize(("answer", "expected"), [
    ("A", "A"),
    ("The answer is (B).", "B"),
    ("B. dog", "B"),
    ("A or B", ""),                    # two letters and no option text
    ("It is a dog", "B"),              # no letter ("a" is lower-case): option text match
    ("a cat and a dog", ""),           # two option texts
    ("Cannot determine the answer", "Z"),
    ("Z", "Z"),
    ("Failed to obtain answer via API, dog", "B"),  # option step gives up, text step runs
])
def test_can_infer(answer, expected):
    assert can_infer(answer, CHOICES) == expected


def test_tail_variant_requires_letter_near_the_end():
    long = "B is correct because it is furry and cute"
    assert can_infer(long, CHOICES, "vlmeval") == "B"
    assert can_infer(long, CHOICES, "vlmeval-tail") == ""
    assert can_infer("So the answer is B", CHOICES, "vlmeval-tail") == "B"


def test_tail_variant_caps_text_matching_length():
    assert can_infer("I am quite sure this is a dog", CHOICES, "vlmeval") == "B"
    assert can_infer("I am quite sure this is a dog", CHOICES, "vlmeval-tail") == ""


def mc(i, index, gt, pred, category="coarse"):
    return {"id": i, "index": index, "options": {"A": "cat", "B": "dog", "C": None}, "gt": gt,
            "prediction": pred, "category": category}


def test_circular_group_fails_when_one_copy_is_wrong(score):
    rows = [
        # question 5 and its three rotations: all right -> hit
        mc(1, 5, "A", "A"), mc(2, 1_000_005, "B", "B"), mc(3, 2_000_005, "A", "cat"),
        # question 6: second copy wrong -> whole group fails
        mc(4, 6, "B", "B", "fine"), mc(5, 1_000_006, "A", "B", "fine"),
        # question 8: a copy nothing can be extracted from -> fails (no LLM judge)
        mc(6, 8, "A", "A", "fine"), mc(7, 1_000_008, "B", "hmm"),
        # a copy whose main row is absent is ignored, like VLMEvalKit
        mc(8, 1_000_007, "A", "A"),
    ]
    summary, scores = score("mmbench", rows)
    assert summary["groups"] == 3
    assert summary["ignored_rows"] == 1
    assert summary["circular"] is True
    assert summary["accuracy"] == pytest.approx(100 / 3)
    assert summary["per_category"] == {"coarse": 100.0, "fine": 0.0}
    assert scores[6]["pred"] is None and scores[4]["correct"] == 0.0


def test_without_copies_is_plain_accuracy(score):
    summary, _ = score("mmbench", [mc(1, 1, "A", "A"), mc(2, 2, "A", "B")])
    assert summary["accuracy"] == 50.0 and summary["circular"] is False


def test_gt_must_be_an_option(score):
    with pytest.raises(ScoreInputError, match=r"line 1: field 'gt': 'C' is not one of"):
        score("mmbench", [mc(1, 1, "C", "A")])  # C has no text
