"""Evaluation-server upload files (`mmjobs.eval.submission`), read back in the servers' formats
and checked against LLaVA's real upload files (`../shared/real-data/`)."""

from __future__ import annotations

import csv
import json

import pytest

from mmjobs.eval.benchmarks import BenchmarkError, load_benchmark
from mmjobs.eval.submission import write_submission
from tests.real_data import real
from tests.unit.eval.test_benchmarks import make_mmbench, make_seedbench, make_vqav2_test

UPLOAD_SHEET = "mmbench/llava/answers_upload/mmbench_dev_20230712/llava-v1.5-13b.xlsx" \
               ".sheet1_first30rows.tsv"


def test_vqav2_upload_has_every_test_question_evalai_normalised(tmp_path):
    root = make_vqav2_test(tmp_path / "vqav2")
    items = list(load_benchmark("vqav2", root, split="test-dev2015"))
    assert [i.id for i in items] == ["420", "421", "730"] and "answers" not in items[0].fields
    rows = {"420": {"prediction": "Red."}, "730": {"prediction": "Two dogs"}}  # 421 unanswered
    summary = write_submission("vqav2", str(root), {"split": "test-dev2015"}, rows,
                               tmp_path / "out")
    assert summary == {"benchmark": "vqav2", "file": "vqav2_test-dev2015_evalai.json",
                       "format": "EvalAI VQAv2 results (JSON array)", "questions": 4,
                       "answered": 2, "unanswered": 2}
    upload = json.loads((tmp_path / "out" / summary["file"]).read_text())
    # EvalAI's results format: a JSON array of {question_id (int), answer (str)}, every test
    # question in the question file's order, "" when unanswered
    assert upload == [{"question_id": 420, "answer": "red"}, {"question_id": 421, "answer": ""},
                      {"question_id": 730, "answer": "2 dogs"},
                      {"question_id": 99000, "answer": ""}]
    # the official results example has the same two keys
    example = json.loads(real("vqav2/official/OpenEnded_mscoco_train2014_fake_results.json")
                         .read_text())
    assert all(set(entry) == set(example[0]) for entry in upload)


def test_vqav2_upload_refuses_a_split_with_answers_and_foreign_ids(tmp_path):
    root = make_vqav2_test(tmp_path / "vqav2")
    with pytest.raises(BenchmarkError, match="no server phase"):
        write_submission("vqav2", str(root), {"split": "val2014"}, {}, tmp_path / "out")
    with pytest.raises(BenchmarkError, match=r"1 prediction.*12345"):
        write_submission("vqav2", str(root), {"split": "test-dev2015"},
                         {"12345": {"prediction": "x"}}, tmp_path / "out")
    (root / "v2_OpenEnded_mscoco_test2015_questions.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"test2015_questions\.json"):
        write_submission("vqav2", str(root), {"split": "test-dev2015"}, {}, tmp_path / "out")


def test_mmbench_upload_has_llavas_columns_and_cells(tmp_path):
    from openpyxl import load_workbook

    tsv = make_mmbench(tmp_path / "mmbench")
    rows = {"0": {"prediction": "B"}, "1000000": {"prediction": "A"}}  # row 7 unanswered
    summary = write_submission("mmbench", str(tsv.parent), {}, rows, tmp_path / "out")
    assert summary["file"] == "mmbench_mmbench_dev_20230712.xlsx"
    assert (summary["questions"], summary["answered"], summary["unanswered"]) == (3, 2, 1)
    book = load_workbook(tmp_path / "out" / summary["file"])
    assert book.sheetnames == ["Sheet1"]
    cells = [list(r) for r in book["Sheet1"].iter_rows(values_only=True)]
    # the header of LLaVA's real upload sheet (convert_mmbench_for_submission.py)
    with open(real(UPLOAD_SHEET), encoding="utf-8", newline="") as f:
        real_rows = list(csv.reader(f, delimiter="\t"))
    assert cells[0] == real_rows[0] == ["index", "question", "A", "B", "C", "D", "prediction",
                                        "answer", "split"]
    assert cells[1] == [0, "What is shown?", "a cat", "a dog", "a bird", "a fish", "B", "B",
                        "dev"]
    # index a number, missing options and predictions empty cells (as the real sheet has)
    assert cells[2] == [7, 'Which is "correct"?\nPick one.', "yes", "no", None, None, None,
                        "A", "dev"]
    assert cells[3][0] == 1000000 and cells[3][6] == "A"
    assert any(r[4] == "" and r[5] == "" for r in real_rows[1:])  # 2-option rows there too


def test_seedbench_upload_lists_every_question_in_file_order(tmp_path):
    root = make_seedbench(tmp_path / "seed")
    items = list(load_benchmark("seedbench", root))
    assert [i.id for i in items] == ["101669", "101700"]  # image questions only
    rows = {"101669": {"prediction": "B"}, "101700": {"prediction": "C"}}
    summary = write_submission("seedbench", str(root), {}, rows, tmp_path / "out")
    assert (summary["questions"], summary["answered"], summary["unanswered"]) == (3, 2, 1)
    lines = (tmp_path / "out" / summary["file"]).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"question_id": "101669", "prediction": "B"}, {"question_id": "v1738", "prediction": ""},
        {"question_id": "101700", "prediction": "C"}]
    # byte layout of LLaVA's real upload lines (string ids, key order)
    real_line = real("seed_bench/llava/answers_upload/llava-v1.5-13b.jsonl").read_text() \
        .splitlines()[0]
    assert real_line == '{"question_id": "101669", "prediction": "B"}' == lines[0]


def test_unknown_benchmark_has_no_server_format(tmp_path):
    with pytest.raises(BenchmarkError, match="no evaluation-server upload format for 'gqa'"):
        write_submission("gqa", str(tmp_path), {}, {}, tmp_path / "out")
