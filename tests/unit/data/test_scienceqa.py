"""The `scienceqa` converter: problems.json + pid_splits.json -> LLaVA / LaVIN prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import Reject

MAMMAL = {
    "question": "Which animal is a mammal?", "choices": ["frog", "dog", "snake"], "answer": 1,
    "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade3",
    "subject": "natural science", "topic": "biology", "category": "Classification",
    "skill": "Identify mammals", "lecture": "Mammals have fur.\nThey feed milk.",
    "solution": "A dog has fur.", "split": "train",
}
CAPITAL = {
    "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "answer": 0,
    "hint": "Look at the map.", "image": None, "task": "closed choice", "grade": "grade7",
    "subject": "social science", "topic": "geography", "category": "Capitals", "skill": "",
    "lecture": "", "solution": "", "split": "train",
}
PROBLEMS = {"1": MAMMAL, "2": CAPITAL, "3": {**CAPITAL, "answer": 2},
            "4": {**MAMMAL, "split": "val"}}
SPLITS = {"train": ["1", "2", "3", "99"], "val": ["4"], "minival": ["4"]}


@pytest.fixture
def sqa_dir(tmp_path) -> Path:
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(PROBLEMS), encoding="utf-8")
    (root / "pid_splits.json").write_text(json.dumps(SPLITS), encoding="utf-8")
    (root / "captions.json").write_text(json.dumps({"captions": {"1": "A dog on grass."}}))
    return root


def run(path: Path, **options: Any) -> tuple[list[Any], list[Reject]]:
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path / "images",
                         options=options)
    out = list(get_converter("scienceqa").fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


def texts(sample: Any) -> tuple[str, str]:
    return sample.conversations[0].content, sample.conversations[1].content


def test_scienceqa_default_llava_cqm_a(sqa_dir):
    samples, rejects = run(sqa_dir)

    assert samples[0].model_dump() == {
        "id": "1", "images": ["train/1/image.png"],
        "conversations": [
            {"role": "user", "content": "<image>\nContext: N/A\n"
                                        "Question: Which animal is a mammal?\n"
                                        "Options: (A) frog (B) dog (C) snake"},
            {"role": "assistant", "content": "The answer is B."}],
        "meta": {"source": "scienceqa", "pid": "1", "split": "train",
                 "subject": "natural science", "grade": "grade3", "hint": "", "has_image": True,
                 "choices": ["frog", "dog", "snake"], "answer": 1,
                 "category": "Classification", "topic": "biology"},
    }
    assert samples[1].images == []
    assert texts(samples[1]) == ("Context: Look at the map.\n"
                                 "Question: What is the capital of France?\n"
                                 "Options: (A) Paris (B) Rome", "The answer is A.")
    assert samples[1].meta["has_image"] is False
    assert [(r.row, r.reason) for r in rejects] == [
        ("3", "answer index 2 out of range for 2 choices"),
        ("99", "pid 99 is listed in pid_splits.json['train'] but missing from problems.json"),
    ]
    assert len(samples) + len(rejects) == len(SPLITS["train"])


def test_scienceqa_llava_qcm_lea_and_ale(sqa_dir):
    samples, _ = run(sqa_dir, prompt_format="QCM-LEA")
    # LLaVA removes the leading "Question: " and the "Answer: " prefix.
    assert texts(samples[0]) == (
        "<image>\nWhich animal is a mammal?\nContext: N/A\nOptions: (A) frog (B) dog (C) snake",
        "Mammals have fur.\nThey feed milk. A dog has fur. The answer is B.")

    samples, _ = run(sqa_dir, prompt_format="QCM-ALE")
    assert texts(samples[0])[1] == (
        "The answer is B. BECAUSE: Mammals have fur.\nThey feed milk. A dog has fur.")
    # Empty lecture and solution: the dangling "BECAUSE:" is removed.
    assert texts(samples[1])[1] == "The answer is A."


def test_scienceqa_llava_lepa(sqa_dir):
    samples, _ = run(sqa_dir, prompt_format="QCM-LEPA")
    assert texts(samples[0])[1] == ("LECTURE: Mammals have fur.\nThey feed milk.\n"
                                    "SOLUTION: A dog has fur.\n###\nANSWER: B.")
    assert texts(samples[1])[1] == "###\nANSWER: A."


def test_scienceqa_lavin_qcm_ale(sqa_dir):
    samples, _ = run(sqa_dir / "problems.json", prompt_format="QCM-ALE", style="lavin")
    assert texts(samples[0]) == (
        "<image>\nQuestion: Which animal is a mammal?\nContext: N/A\n"
        "Options: (A) frog (B) dog (C) snake\nResponse:",
        "The answer is B. BECAUSE: Mammals have fur.\\nThey feed milk. A dog has fur.")
    # LaVIN keeps the trailing "BECAUSE:" when lecture and solution are empty.
    assert texts(samples[1]) == (
        "Question: What is the capital of France?\nContext: Look at the map.\n"
        "Options: (A) Paris (B) Rome\nResponse:", "The answer is A. BECAUSE:")


def test_scienceqa_minival_images_live_in_their_problem_split(sqa_dir):
    samples, rejects = run(sqa_dir, split="minival")
    assert rejects == []
    assert samples[0].images == ["val/4/image.png"]
    assert samples[0].meta["split"] == "minival"


def test_scienceqa_captions_join_the_context(sqa_dir):
    samples, _ = run(sqa_dir, use_caption=True)
    assert texts(samples[0])[0].startswith("<image>\nContext: A dog on grass.\nQuestion:")
    assert texts(samples[1])[0].startswith("Context: Look at the map.\nQuestion:")


def test_scienceqa_bad_options_name_the_fix(sqa_dir):
    with pytest.raises(ValueError, match=re.escape("split 'dev' is not in pid_splits.json; "
                                                   "available: minival, train, val")):
        run(sqa_dir, split="dev")
    with pytest.raises(ValueError, match="prompt_format 'QCM-LEPA' is not valid for style"):
        run(sqa_dir, prompt_format="QCM-LEPA", style="lavin")
