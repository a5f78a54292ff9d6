"""ScienceQA: LLaVA answer parsing and evaluate_acc.py category accounting."""

from __future__ import annotations

import pytest

from mmjobs.eval.metrics.scienceqa import lavin_guess, parse_answer, predicted_index
from mmjobs.eval.score import ScoreInputError


@pytest.mark.parametrize(("text", "llava", "llava_dot"), [
    ("A", "A", "A"),
    ("B. a cat", "B", "B"),
    ("B.", None, "B"),                      # bare "X." is only parsed by llava-dot
    ("B.cat", None, None),                  # the period must be followed by a space
    ("The answer is C.", "C", "C"),
    ("Because ... The answer is D!", "D", "D"),  # the regex's "." matches any character
    ("The answer is C", None, None),        # ...but needs one after the letter
    ("The answer is A. The answer is B.", None, None),  # two matches: FAILED
    (" A", None, None),                     # no stripping
    ("a", None, None),
    ("E", "E", "E"),
])
def test_parse_answer(text, llava, llava_dot):
    assert parse_answer(text, "llava") == llava
    assert parse_answer(text, "llava-dot") == llava_dot


def test_letter_beyond_choices_or_unparsed_is_wrong_not_random():
    assert predicted_index("E", 3) == -1
    assert predicted_index("Z", 5) == -1
    assert predicted_index(None, 2) == -1
    assert predicted_index("C", 3) == 2


def row(i, pred, subject, grade, hint, image, answer=0):
    return {"id": i, "prediction": pred, "choices": ["x", "y", "z"], "answer": answer,
            "subject": subject, "grade": grade, "hint": hint, "has_image": image}


ROWS = [
    row(1, "A", "natural science", "grade3", "ctx", True),         # right: NAT TXT IMG G1-6
    row(2, "B", "social science", "grade8", "", False),            # wrong: SOC NO G7-12
    row(3, "The answer is A.", "language science", "grade12", "", True),  # right: LAN IMG G7-12
    row(4, "I think A", "natural science", "grade6", "h", False),  # unparsed: NAT TXT G1-6
    row(5, "A. x", "natural science", "grade1", "x", True),        # right: NAT TXT IMG G1-6
]


def test_category_accounting_with_txt_img_overlap(score):
    summary, scores = score("scienceqa", ROWS)
    acc, counts = summary["accuracy"], summary["counts"]
    assert counts == {"NAT": 3, "SOC": 1, "LAN": 1, "TXT": 3, "IMG": 3, "NO": 1, "G1-6": 3,
                      "G7-12": 2, "Avg": 5}
    assert acc["NAT"] == pytest.approx(200 / 3)
    assert acc["SOC"] == 0.0
    assert acc["LAN"] == 100.0
    assert acc["TXT"] == pytest.approx(200 / 3)
    assert acc["IMG"] == 100.0
    assert acc["NO"] == 0.0
    assert acc["G1-6"] == pytest.approx(200 / 3)
    assert acc["G7-12"] == 50.0
    assert acc["Avg"] == 60.0
    assert summary["unparsed"] == 1
    assert scores[3]["pred"] == -1 and scores[3]["parsed"] is None


def test_empty_category_is_none(score):
    summary, _ = score("scienceqa", ROWS[:1])
    assert summary["accuracy"]["SOC"] is None


def test_bad_rows_are_reported(score):
    bad = [row(1, "A", "natural science", "grade13", "", False),
           row(2, "A", "biology", "grade1", "", False),
           row(3, "A", "natural science", "grade1", "", False, answer=3)]
    with pytest.raises(ScoreInputError) as e:
        score("scienceqa", bad)
    text = str(e.value)
    assert "line 1: field 'grade'" in text
    assert "line 2: field 'subject'" in text
    assert "line 3: field 'answer': index 3" in text


@pytest.mark.parametrize(("text", "letter"), [
    ("The answer is B. BECAUSE: magnets attract.", "B"),
    ("The answer is A. The answer is B.", "A"),            # LaVIN takes the first match
    ("Because ... The answer is D!", "D"),                 # "." matches any character
    ("The answer is C", None),                             # ...but needs one
    ("B", None),                                           # no bare-letter rule in LaVIN
    ("B. a cat", None),
    ("the answer is A.", None),                            # case-sensitive
    ("", None),
])
def test_parse_answer_lavin(text, letter):
    assert parse_answer(text, "lavin") == letter == parse_answer(text, "lavin-strict")


def test_lavin_guesses_failures_reproducibly_and_strict_counts_them_wrong(score):
    """LaVIN's get_pred_idx: FAILED or a letter past the choices -> a random choice; here one
    seeded with the row id, so two scoring runs agree and the guess is a valid index."""
    rows = [row(1, "The answer is A. BECAUSE: x", "natural science", "grade3", "", True),
            row(2, "The answer is E.", "social science", "grade8", "", False),  # 3 choices
            row(3, "no idea", "language science", "grade12", "h", False),
            row(4, "The answer is B. The answer is A.", "natural science", "grade6", "", False)]
    summary, scores = score("scienceqa", rows, variant="lavin")
    again, scores_again = score("scienceqa", rows, variant="lavin")
    assert scores == scores_again and summary["accuracy"] == again["accuracy"]
    assert [s["parsed"] for s in scores] == ["A", "E", None, "B"]
    assert [bool(s.get("guessed")) for s in scores] == [False, True, True, False]
    assert summary["guessed"] == 2 and summary["unparsed"] == 1
    assert all(0 <= s["pred"] < 3 for s in scores)
    assert scores[0]["correct"] == 1.0 and scores[3]["pred"] == 1
    guesses = {lavin_guess(i, 3) for i in range(60)}  # the seed really varies the guess
    assert guesses == {0, 1, 2}
    strict, strict_scores = score("scienceqa", rows, variant="lavin-strict")
    assert [s["pred"] for s in strict_scores] == [0, -1, -1, 1]
    assert strict["guessed"] == 0 and strict["accuracy"]["Avg"] == 25.0
