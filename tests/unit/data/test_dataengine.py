"""The `dataengine` converter: MLLM-DataEngine GPT-VQA JSON -> LLaVA multiple-choice samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import Reject


def run(path: Path, **options: Any) -> tuple[list[Any], list[Reject]]:
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path.parent / "images",
                         options=options)
    out = list(get_converter("dataengine").fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


GOOD = {
    "image_id": 407348, "question_type": "future_prediction",
    "raw_instructions": "Question: ... Answer: The answer is (C) ...",
    "question": "What is likely to happen next in this image?",
    "choices": ["She puts the phone down", "She checks the clock", "She keeps talking"],
    "correct_choice_idx": 2,
    "rationales": ["Explanations: By observing the image, the call is still going on."],
}
ROWS: list[Any] = [
    GOOD,
    {**GOOD, "image_id": 550113, "rationales": [], "correct_choice_idx": 0},
    {**GOOD, "correct_choice_idx": 3},
    {**GOOD, "choices": ["only one"], "correct_choice_idx": 0},
    {**GOOD, "question": ""},
    {**GOOD, "image_id": "abc"},
]
PROMPT = ("<image>\nWhat is likely to happen next in this image?\n"
          "A. She puts the phone down\nB. She checks the clock\nC. She keeps talking\n"
          "Answer with the option's letter from the given choices directly.")


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "dataengine_llava.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    return path


def test_dataengine_builds_llava_mc_prompt_letter_answer_and_coco_path(data_file):
    samples, rejects = run(data_file)

    assert samples[0].model_dump() == {
        "id": "dataengine-407348-0",
        "images": ["train2014/COCO_train2014_000000407348.jpg"],
        "conversations": [{"role": "user", "content": PROMPT},
                          {"role": "assistant", "content": "C"}],
        "meta": {"source": "dataengine", "image_id": 407348, "question_type": "future_prediction",
                 "choices": GOOD["choices"], "answer": 2},
    }
    assert samples[1].id == "dataengine-550113-1"
    assert samples[1].conversations[1].content == "A"
    assert [(r.row, r.reason) for r in rejects] == [
        ("dataengine_llava.json[2]", "correct_choice_idx 3 out of range for 3 choices"),
        ("dataengine_llava.json[3]", "fewer than 2 choices (1)"),
        ("dataengine_llava.json[4]", "missing question"),
        ("dataengine_llava.json[5]", "image_id is a JSON string, not an integer COCO id"),
    ]
    assert len(samples) + len(rejects) == len(ROWS)


def test_dataengine_letter_rationale_answers(data_file):
    samples, _ = run(data_file, answer_style="letter_rationale")
    assert samples[0].conversations[1].content == (
        "C. Because by observing the image, the call is still going on.")
    assert samples[1].conversations[1].content == "A"  # no rationale: the letter alone


def test_dataengine_coco_2017_naming_and_custom_templates(data_file):
    samples, _ = run(data_file, coco_split="train2017")
    assert samples[0].images == ["train2017/000000407348.jpg"]

    samples, _ = run(data_file, coco_path_template="coco/{image_id}.jpg", id_prefix="de/",
                     prompt_template="{question}\nOptions:\n{options}\nAnswer with the letter.",
                     option_template="({letter}) {choice}")
    assert samples[0].id == "de/407348-0"
    assert samples[0].images == ["coco/407348.jpg"]
    assert samples[0].conversations[0].content == (
        "<image>\nWhat is likely to happen next in this image?\nOptions:\n"
        "(A) She puts the phone down\n(B) She checks the clock\n(C) She keeps talking\n"
        "Answer with the letter.")


def test_dataengine_bad_template_fails_before_reading(data_file):
    with pytest.raises(ValueError, match="template option has an unknown or bad field"):
        run(data_file, coco_path_template="{split}/{imageid}.jpg")
    with pytest.raises(ValueError, match="answer_style='words' is not one of: letter, "):
        run(data_file, answer_style="words")
