"""VQAv2: the official question file (header + 30 questions), the official results-file layout
and the question types list. No annotation excerpt exists: where the loader or a results
file needs annotations, the test builds them for the real question ids (10 answers each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmjobs.eval.benchmarks import load_benchmark
from mmjobs.eval.metrics import ScoreInputError
from mmjobs.eval.score import score_file
from tests.real_data import REAL, real

OFFICIAL = REAL / "vqav2" / "official"
QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"


def question_types() -> list[str]:
    return real("vqav2/official/mscoco_question_types.txt").read_text(encoding="utf-8") \
        .splitlines()


def typed(question: str, types: list[str]) -> str:
    """The longest listed type the question starts with (else "none of the above")."""
    q = question.lower()
    return max((t for t in types if q.startswith(t + " ")), key=len, default="none of the above")


def annotations(folder: Path, questions: list[dict], answers: dict[int, str]) -> Path:
    """v2_mscoco_val2014_annotations.json for `questions`, 10 annotator answers each."""
    types = question_types()
    data = {"annotations": [{
        "question_id": q["question_id"], "image_id": q["image_id"],
        "question_type": typed(q["question"], types), "answer_type": "other",
        "multiple_choice_answer": answers[q["question_id"]],
        "answers": [{"answer": answers[q["question_id"]], "answer_confidence": "yes",
                     "answer_id": k} for k in range(1, 11)]} for q in questions]}
    path = folder / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def copied_questions(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(OFFICIAL / QUESTIONS, folder / QUESTIONS)
    return json.loads((folder / QUESTIONS).read_text())["questions"]


def test_loader_reads_the_official_question_file(tmp_path):
    header = json.loads((OFFICIAL / QUESTIONS).read_text())
    assert (header["data_subtype"], header["task_type"]) == ("val2014", "Open-Ended")
    assert header["license"]["name"] == "Creative Commons Attribution 4.0 International License"
    questions = copied_questions(tmp_path / "vqa")
    annotations(tmp_path / "vqa", questions, {q["question_id"]: "yes" for q in questions})
    (tmp_path / "vqa" / "val2014").mkdir()
    (tmp_path / "vqa" / "val2014" / "placeholder.jpg").write_bytes(b"")
    items = list(load_benchmark("vqav2", tmp_path / "vqa"))
    assert len(items) == len(questions) == 30
    assert [i.id for i in items] == [str(q["question_id"]) for q in questions]
    assert items[0].id == "262148000"
    assert items[0].images == [str(tmp_path / "vqa" / "val2014" /
                                   "COCO_val2014_000000262148.jpg")]
    assert items[0].prompt == ("<image>\nWhere is he looking?\nAnswer the question using a "
                               "single word or phrase.")
    assert all(len(i.fields["answers"]) == 10 for i in items)
    # question ids are image_id * 1000 + k
    assert all(q["question_id"] // 1000 == q["image_id"] for q in questions)


def test_official_results_file_scores(tmp_path):
    """The official results layout `[{"answer", "question_id"}]` (GT-Vision-Lab's fake
    results for VQA v1 train2014 question ids 1-10) joined with annotations for those ids."""
    results = json.loads((OFFICIAL / "OpenEnded_mscoco_train2014_fake_results.json").read_text())
    assert [list(r) for r in results] == [["answer", "question_id"]] * 10
    qs = [{"question_id": r["question_id"], "image_id": 1, "question": "what is it"}
          for r in results]
    truth = {r["question_id"]: r["answer"] if r["question_id"] % 2 else "bagel" for r in results}
    gt = annotations(tmp_path, qs, truth)
    path = OFFICIAL / "OpenEnded_mscoco_train2014_fake_results.json"
    summary = score_file(None, path, answer_format="vqa-results", ground_truth=[str(gt)],
                         output=tmp_path / "out")
    assert summary["metric"] == "vqav2" and summary["count"] == 10
    assert summary["accuracy"] == 50.0  # odd ids answered as all 10 annotators did
    ids = [json.loads(x)["id"] for x in (tmp_path / "out" / "scores.jsonl").read_text()
           .splitlines()]
    assert ids == [str(i) for i in range(1, 11)]
    annotations(tmp_path, qs[:9], truth)  # question 10 has no annotation now
    with pytest.raises(ScoreInputError, match=r"\[9\]: question 10 has no ground truth"):
        score_file(None, path, answer_format="vqa-results", ground_truth=[str(gt)])


def test_question_types_break_down_the_score(tmp_path):
    types = question_types()
    assert len(types) == 65 and types[-1] == "none of the above" and len(set(types)) == 65
    questions = copied_questions(tmp_path / "vqa")
    annotations(tmp_path / "vqa", questions, {q["question_id"]: "2" for q in questions})
    (tmp_path / "vqa" / "val2014").mkdir()
    (tmp_path / "vqa" / "val2014" / "placeholder.jpg").write_bytes(b"")
    items = list(load_benchmark("vqav2", tmp_path / "vqa"))
    assert all(i.fields["question_type"] in types for i in items)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": i.id, "prediction": "two", **i.fields}) + "\n"
                             for i in items))  # "two" normalises to "2" only when annotators
    summary = score_file("vqav2", preds)      # disagree; here they agree: scored as written
    per_type = summary["per_question_type"]
    assert set(per_type) <= set(types) and len(per_type) > 5
    assert sum(per_type.values()) == 0.0
    assert {"how many", "what color is the", "is the"} <= set(per_type)
