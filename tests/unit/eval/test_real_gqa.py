"""GQA: LLaVA's test-dev question file (40 real lines) and eval.py's documented file formats.

The official testdev_balanced_questions.json is not among the excerpts; where a test needs
it, it is built in tmp_path from the real LLaVA lines (real ids, image ids and questions;
placeholder answers).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmjobs.eval.benchmarks import load_benchmark
from mmjobs.eval.score import score_file
from tests.real_data import placeholder_images, real

SHORT = "\nAnswer the question using a single word or phrase."


def llava_rows() -> list[dict]:
    path = real("gqa/llava/llava_gqa_testdev_balanced.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def questions_file(folder: Path) -> Path:
    """testdev_balanced_questions.json for the 40 real questions (answers: placeholders)."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = {r["question_id"]: {
        "imageId": r["image"].removesuffix(".jpg"), "question": r["text"].removesuffix(SHORT),
        "answer": "yes" if i % 2 else "no", "isBalanced": True,
        "types": {"structural": "verify" if i % 2 else "query"}}
        for i, r in enumerate(llava_rows())}
    path = folder / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions), encoding="utf-8")
    return path


def test_llava_question_file_keeps_string_ids(tmp_path):
    rows = llava_rows()
    items = list(load_benchmark("llava-questions", real("gqa/llava/llava_gqa_testdev_balanced"
                                                        ".jsonl"), image_root=str(tmp_path)))
    assert len(items) == len(rows) == 40
    assert [i.id for i in items] == [r["question_id"] for r in rows]
    assert [i.fields["question_id"] for i in items] == [r["question_id"] for r in rows]
    assert all(isinstance(r["question_id"], str) for r in rows)
    assert len({len(r["question_id"]) for r in rows}) > 1  # "2062325" and "201307251"
    assert items[0].images == [str(tmp_path / "n161313.jpg")]
    assert all(i.images[0].split("/")[-1].startswith("n") for i in items)  # test-dev images
    assert all(i.prompt == "<image>\n" + r["text"] for i, r in zip(items, rows, strict=True))
    assert {i.fields["category"] for i in items} == {"default"}


def test_gqa_loader_prompt_is_llavas(tmp_path):
    """The gqa loader's prompt for each question equals LLaVA's line for it, byte for byte."""
    rows = llava_rows()
    root = questions_file(tmp_path / "gqa").parent
    placeholder_images(root / "images", [r["image"] for r in rows])
    items = list(load_benchmark("gqa", root))
    assert [i.id for i in items] == [r["question_id"] for r in rows]
    assert [i.prompt for i in items] == ["<image>\n" + r["text"] for r in rows]
    assert [i.images[0] for i in items] == [str(root / "images" / r["image"]) for r in rows]


def test_predictions_in_eval_py_format_score(tmp_path):
    header = real("gqa/official/eval.py.header-lines49-55.txt").read_text(encoding="utf-8")
    assert ('predictions file format: JSON array: [{"questionId": str, "prediction": str}]'
            in header)
    questions = questions_file(tmp_path / "gqa")
    truth = json.loads(questions.read_text())
    predictions = [{"questionId": qid, "prediction": q["answer"] if i < 30 else "maybe"}
                   for i, (qid, q) in enumerate(truth.items())]
    path = tmp_path / "testdev_balanced_predictions.json"
    path.write_text(json.dumps(predictions), encoding="utf-8")
    summary = score_file(None, path, answer_format="gqa-predictions",
                         ground_truth=[str(questions)], output=tmp_path / "out")
    assert summary["metric"] == "gqa" and summary["count"] == 40
    assert summary["accuracy"] == 75.0
    ids = [json.loads(line)["id"] for line in
           (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert ids == [r["question_id"] for r in llava_rows()]  # questionId strings kept as is
    # LLaVA's answers JSONL for the same questions (question_id, text) scores the same way
    answers = tmp_path / "llava-v1.5-7b.jsonl"
    answers.write_text("".join(json.dumps({"question_id": p["questionId"], "prompt": "",
                                           "text": p["prediction"].capitalize() + "."}) + "\n"
                               for p in predictions))
    llava = score_file("gqa", answers, answer_format="llava-answers", variant="llava",
                       ground_truth=[str(questions)])
    assert llava["accuracy"] == 75.0  # LLaVA's convert_gqa_for_eval: strip ".", lower-case
