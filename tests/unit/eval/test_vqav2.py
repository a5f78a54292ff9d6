"""VQAv2 accuracy: leave-one-annotator-out averaging and the normalisation quirks."""

from __future__ import annotations

import pytest

from mmjobs.eval.metrics.vqav2 import process_digit_article, process_punctuation, vqa_accuracy


@pytest.mark.parametrize(("matching", "expected"), [
    (0, 0.0),
    (1, 0.3),  # 9 subsets keep the match (1/3 each), 1 loses it: 9/30
    (2, 0.6),  # 2 subsets with 1 match (1/3), 8 with 2 matches (2/3): (2/3 + 16/3) / 10
    (3, 0.9),  # 3 subsets with 2 matches (2/3), 7 with 3 (1): (2 + 7) / 10
    (4, 1.0),
    (10, 1.0),
])
def test_leave_one_out_average(matching, expected):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_normalisation_only_when_annotators_disagree():
    agree = ["yes"] * 10
    # Unanimous annotators: nothing is normalised, so case matters in the official scorer...
    assert vqa_accuracy("Yes", agree, "official") == 0.0
    assert vqa_accuracy("yes", agree, "official") == 1.0
    # ...while the legacy tool and lmms-eval always normalise the prediction.
    assert vqa_accuracy("Yes", agree, "legacy") == 1.0
    assert vqa_accuracy("Yes", agree, "lmms") == 1.0
    # With disagreement both sides are normalised ("Yes" -> "yes" matches 9 annotators).
    disagree = ["yes"] * 9 + ["no"]
    assert vqa_accuracy("Yes", disagree, "official") == 1.0


def test_unanimous_number_word_kept_as_is():
    two = ["two"] * 10
    assert vqa_accuracy("two", two, "official") == 1.0
    # Normalising the prediction only ("two" -> "2") breaks the match.
    assert vqa_accuracy("two", two, "legacy") == 0.0
    assert vqa_accuracy("two", two, "lmms") == 0.0
    # Disagreeing annotators: both become digits; articles drop out.
    mixed = ["two"] * 5 + ["2"] * 4 + ["3"]
    assert vqa_accuracy("the two", mixed, "official") == 1.0


def test_legacy_normalises_ground_truth_punctuation_only():
    answers = ["the dog"] * 5 + ["cat"] * 5  # disagree: gt gets processPunctuation only
    assert vqa_accuracy("the dog", answers, "legacy") == 0.0  # pred loses its article, gt not
    assert vqa_accuracy("the dog", answers, "official") == 1.0


def test_newlines_and_outer_spaces_are_always_cleaned():
    assert vqa_accuracy(" yes\n", ["yes"] * 10, "official") == 1.0


def test_process_punctuation():
    assert process_punctuation("hello, world") == "hello world"  # ", " present: delete
    assert process_punctuation("a/b") == "a b"  # no space around it: becomes a space
    assert process_punctuation("1,000") == "1000"  # digit,digit: delete every punctuation mark
    assert process_punctuation("e.g.") == "eg"
    assert process_punctuation("3.5") == "3.5"  # a period before a digit stays
    assert process_punctuation("3.") == "3"


def test_period_strip_count_quirk():
    # vqaEval.py passes re.UNICODE (32) as the `count` of the period substitution.
    assert process_punctuation("." * 40) == "." * 8


def test_process_digit_article():
    assert process_digit_article("The Two dogs") == "2 dogs"
    assert process_digit_article("dont know") == "don't know"
    assert process_digit_article("none") == "0"
    assert process_digit_article("an eleven") == "eleven"


def test_summary_with_answer_types(score):
    rows = [
        {"id": 1, "prediction": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no"},
        {"id": 2, "prediction": "2", "answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},
        {"id": 3, "prediction": "Yes", "answers": ["yes"] * 10, "answer_type": "yes/no"},
    ]
    summary, scores = score("vqav2", rows)
    assert summary["accuracy"] == pytest.approx(100 * 1.6 / 3)
    assert summary["per_answer_type"] == {"number": pytest.approx(60.0), "yes/no": 50.0}
    assert [s["accuracy"] for s in scores] == [1.0, pytest.approx(0.6), 0.0]


def test_requires_ten_answers(score):
    from mmjobs.eval.score import ScoreInputError

    with pytest.raises(ScoreInputError, match=r"line 1: field 'answers': expected 10 strings"):
        score("vqav2", [{"id": 1, "prediction": "a", "answers": ["a"] * 9}])
