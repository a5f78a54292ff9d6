"""SEED-Bench-1: the official format doc, SEED-Bench's own result file and LLaVA's upload.

`seed_bench/derived/SEED-Bench.doc-examples.json` is not an excerpt of SEED-Bench.json: it
holds the four records DATASET.md prints, verbatim (PROVENANCE.md marks it derived).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from mmjobs.eval.benchmarks import load_benchmark
from mmjobs.eval.benchmarks.answers import read_answers
from mmjobs.eval.metrics import ScoreInputError
from mmjobs.eval.metrics.seedbench import QUESTION_TYPES
from mmjobs.eval.score import score_file
from tests.real_data import REAL, placeholder_images, real

GPT4V = REAL / "seed_bench" / "official" / "evaluate_result" / "SEED-Bench-1" / "GPT-4V.json"
UPLOAD = REAL / "seed_bench" / "llava" / "answers_upload" / "llava-v1.5-13b.jsonl"
DOC = REAL / "seed_bench" / "derived" / "SEED-Bench.doc-examples.json"


def test_dataset_doc_question_types_match_the_metric():
    text = real("seed_bench/official/DATASET.md.lines217-301.md").read_text(encoding="utf-8")
    block = text.split('"question_type": {', 1)[1].split("}", 1)[0]
    documented = {name: int(n) for name, n in re.findall(r'"([^"]+)": (\d+)', block)}
    assert documented == {name: i for i, name in QUESTION_TYPES.items()}
    # the documented ids are strings, "v..." for video questions
    assert re.findall(r'"question_id": "([^"]+)"', text) == ["101669", "v1738", "v1962", "v4397"]
    # the derived file holds exactly those records, values verbatim
    doc = json.loads(DOC.read_text(encoding="utf-8"))
    assert [q["question_id"] for q in doc["questions"]] == ["101669", "v1738", "v1962", "v4397"]
    assert doc["question_type"] == documented


def test_seed_bench_result_lines_score_as_they_are():
    """GPT-4V.json is neither JSON nor JSONL (no brackets, a comma after every object but the
    file's last; these are its first 50 lines, so all 50 end in one); it carries its own
    `gt_answer`."""
    raw = GPT4V.read_bytes()
    assert raw.count(b"},\n") == 50 and not raw.startswith(b"[")
    lines = [json.loads(line.rstrip(",")) for line in raw.decode().splitlines()]
    rows = [a.row for a in read_answers("seed-bench", str(GPT4V))]
    assert len(rows) == len(lines) == 50
    assert [r["id"] for r in rows] == [line["question_id"] for line in lines]
    assert all(isinstance(r["id"], str) for r in rows) and rows[0]["id"] == "101669"
    assert {r["data_type"] for r in rows} == {"image"}  # no "v..." ids in these 50 lines
    summary = score_file(None, GPT4V, answer_format="seed-bench")
    right = sum(line["prediction"] == line["gt_answer"] for line in lines)
    assert right == 34 and summary["accuracy"] == pytest.approx(100 * right / 50)
    assert "per_question_type" in summary and summary["per_question_type"] == {}


def test_llava_upload_joins_seed_bench_json(tmp_path):
    """LLaVA's upload (question_id, prediction) takes answers and types from SEED-Bench.json;
    only 101669 of its 50 ids is among the documented records: the other 49 are named."""
    with pytest.raises(ScoreInputError) as err:
        score_file(None, UPLOAD, answer_format="seed-bench", ground_truth=[str(DOC)])
    assert len(err.value.errors) == 49
    assert err.value.errors[0] == ("llava-v1.5-13b.jsonl line 2: question 104933 has no "
                                   "ground truth in the --ground-truth files")
    first = next(a for a in read_answers("seed-bench", str(UPLOAD), [str(DOC)]) if a.row)
    assert first.row == {"id": "101669", "prediction": "B", "answer": "A",
                         "question_type_id": 5, "data_type": "image"}
    # SEED-Bench's own GPT-4V result agrees with SEED-Bench.json on that question's answer
    gpt = next(a for a in read_answers("seed-bench", str(GPT4V), [str(DOC)]) if a.row)
    assert gpt.row["answer"] == "A" and gpt.row["prediction"] == "A"
    # predictions for every documented id keep "v..." ids as strings, typed as video
    preds = tmp_path / "upload.jsonl"
    preds.write_text("".join(json.dumps({"question_id": q, "prediction": "B"}) + "\n"
                             for q in ("101669", "v1738", "v1962", "v4397")))
    summary = score_file(None, preds, answer_format="seed-bench", ground_truth=[str(DOC)],
                         output=tmp_path / "out")
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text()
              .splitlines()]
    assert [s["id"] for s in scores] == ["101669", "v1738", "v1962", "v4397"]
    assert summary["per_question_type"] == {"5": 0.0, "10": 100.0, "11": 100.0, "12": 0.0}
    assert summary["per_data_type"] == {"image": 0.0, "video": pytest.approx(200 / 3)}


def test_loader_reads_the_documented_records(tmp_path):
    root = tmp_path / "SEED-Bench"
    root.mkdir()
    shutil.copyfile(DOC, root / "SEED-Bench.json")
    placeholder_images(root / "SEED-Bench-image", ["1454426_2591111986"])  # no extension
    items = list(load_benchmark("seedbench", root))
    assert [i.id for i in items] == ["101669"]  # video questions need extracted frames
    assert items[0].prompt == (
        "<image>\nHow many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n"
        "Answer with the option's letter from the given choices directly.")
    assert items[0].images == [str(root / "SEED-Bench-image" / "1454426_2591111986")]
    assert items[0].fields == {"answer": "A", "question_type_id": 5, "data_type": "image"}
