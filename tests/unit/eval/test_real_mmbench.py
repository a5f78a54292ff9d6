"""MMBench: LLaVA-1.5's answers JSONL and its upload sheet (Sheet1 as TSV), as they are."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from mmjobs.eval.benchmarks.answers import read_answers
from mmjobs.eval.metrics import ScoreInputError
from mmjobs.eval.score import score_file
from tests.real_data import REAL

BASE = REAL / "mmbench" / "llava"
UPLOAD = BASE / "answers_upload" / "mmbench_dev_20230712" / \
    "llava-v1.5-13b.xlsx.sheet1_first30rows.tsv"
ANSWERS = BASE / "answers" / "mmbench_dev_20230712"


def sheet() -> list[dict[str, str]]:
    with UPLOAD.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_upload_sheet_scores_with_its_own_columns(tmp_path):
    rows = sheet()
    assert list(rows[0]) == ["index", "question", "A", "B", "C", "D", "prediction", "answer",
                             "split"]  # LLaVA's upload columns, in order
    got = [a.row for a in read_answers("mmbench-upload", str(UPLOAD))]
    assert len(got) == len(rows) == 30  # quoted multi-line questions stay one row each
    assert [r["id"] for r in got] == [r["index"] for r in rows] and got[0]["id"] == "241"
    assert all(r["options"].keys() == {"A", "B"} for r in got)  # C/D empty: 2-option rows
    assert got[0]["options"]["B"].startswith("Does Madelyn's snowboard slide down a hill")
    summary = score_file(None, UPLOAD, answer_format="mmbench-upload")
    right = sum(r["prediction"] == r["answer"] for r in rows)
    assert right == 26 and summary["accuracy"] == pytest.approx(100 * right / 30)
    assert summary["groups"] == 30 and summary["circular"] is False
    # the workbook itself is refused with the fix
    xlsx = tmp_path / "llava-v1.5-13b.xlsx"
    shutil.copyfile(UPLOAD, xlsx)
    with pytest.raises(ScoreInputError, match="save its Sheet1 as tab-separated text"):
        score_file(None, xlsx, answer_format="mmbench-upload")


def test_llava_answers_score_against_the_upload_ground_truth():
    """The 7B answers (30 lines) take their letters from the 13B upload sheet's `answer`
    column: both list the same dev indices, and every answer's options equal the sheet's."""
    answers = ANSWERS / "llava-v1.5-7b.jsonl"
    lines = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    rows = [a.row for a in read_answers("llava-mmbench", str(answers), [str(UPLOAD)])]
    assert len(rows) == 30 and all(r is not None for r in rows)
    truth = {int(r["index"]): r["answer"] for r in sheet()}
    assert [r["gt"] for r in rows] == [truth[line["question_id"]] for line in lines]
    assert {line["round_id"] for line in lines} == {0}
    # one 7B answer is not a bare letter; VLMEvalKit's matching reads its letter
    assert lines[2]["text"] == "A. the temperature of the soda"
    summary = score_file(None, answers, answer_format="llava-mmbench",
                         ground_truth=[str(UPLOAD)])
    right = sum(line["text"][0] == truth[line["question_id"]] for line in lines)
    assert summary["accuracy"] == pytest.approx(100 * right / 30)
    assert right == 25


def test_13b_answers_are_the_upload_predictions(tmp_path):
    """LLaVA's convert_mmbench_for_submission.py copied each 13B answer's text into the
    sheet's `prediction`: the two real files agree line by line."""
    answers = ANSWERS / "llava-v1.5-13b.jsonl"
    lines = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    by_index = {int(r["index"]): r for r in sheet()}
    assert len(lines) == 16
    assert [line["text"] for line in lines] == [by_index[line["question_id"]]["prediction"]
                                               for line in lines]
    rows = [a.row for a in read_answers("llava-mmbench", str(answers), [str(UPLOAD)])]
    assert [r["prediction"] for r in rows] == [line["text"] for line in lines]
    assert [list(r["options"].values()) for r in rows] == [line["options"] for line in lines]
    # a later round of a question shows its options rotated; the right letter moves with them
    rotated = dict(lines[0], round_id=1, options=lines[0]["options"][::-1], text="A")
    wrong = dict(lines[1], round_id=1)  # round 1 but options not rotated: a different TSV
    path = tmp_path / "rounds.jsonl"
    path.write_text(json.dumps(rotated) + "\n" + json.dumps(wrong) + "\n", encoding="utf-8")
    got = list(read_answers("llava-mmbench", str(path), [str(UPLOAD)]))
    assert got[0].row is not None and got[0].row["id"] == "241-round1"
    assert got[0].row["index"] == 1_000_241 and got[0].row["gt"] == "A"  # B moved to A
    assert got[1].row is None and "not the ground truth's rotated by round_id" in got[1].error
