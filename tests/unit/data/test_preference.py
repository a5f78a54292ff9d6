"""The `preference` and `prompt-only` converters: Align-Anything-style rows -> canonical records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import PreferenceSample, PromptSample, Reject


def run(name: str, path: Path, **options: Any) -> tuple[list[Any], list[Reject]]:
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path.parent / "images",
                         options=options)
    out = list(get_converter(name).fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


def write(path: Path, rows: list[Any]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


PAIR = {"question": "What is in the image?", "image": "imgs/1.png",
        "response_1": "A dog.", "response_2": "A cat.", "better_response_id": 2,
        "overall_textfeedback": "cat is right"}
ROWS: list[Any] = [
    PAIR,
    {"id": "cr", "prompt": "Describe both.", "image": ["a.png", "b.png"],
     "chosen": "Two cats.", "rejected": "Two dogs."},
    {"prompt": "Safe?", "response_0": "No.", "response_1": "Yes.", "better_response_id": 0},
    {"id": "cham", "question": "Draw a cat.", "response_1": "Here it is.", "response_2": "",
     "output_image_1": "gen/1.png", "output_image_2": ["gen/2a.png", "gen/2b.png"],
     "better_response_id": "1"},
    {**PAIR, "better_response_id": 0},
    {**PAIR, "better_response_id": None},
    {**PAIR, "response_2": "A dog."},
    {**PAIR, "response_1": "  "},
    {**PAIR, "question": ""},
    {"question": "q", "chosen": "x"},
]


def test_preference_rows_pick_chosen_by_preferred_id(tmp_path):
    records, _ = run("preference", write(tmp_path / "pairs.json", ROWS))
    assert all(isinstance(r, PreferenceSample) for r in records)

    assert [r.model_dump() for r in records] == [
        {"id": "pairs-0", "images": ["imgs/1.png"],
         "prompt": [{"role": "user", "content": "<image>\nWhat is in the image?"}],
         "chosen": "A cat.", "rejected": "A dog.", "chosen_images": [], "rejected_images": [],
         "meta": {"source": "preference", "overall_textfeedback": "cat is right"}},
        {"id": "cr", "images": ["a.png", "b.png"],
         "prompt": [{"role": "user", "content": "<image><image>\nDescribe both."}],
         "chosen": "Two cats.", "rejected": "Two dogs.", "chosen_images": [],
         "rejected_images": [], "meta": {"source": "preference"}},
        {"id": "pairs-2", "images": [], "prompt": [{"role": "user", "content": "Safe?"}],
         "chosen": "No.", "rejected": "Yes.", "chosen_images": [], "rejected_images": [],
         "meta": {"source": "preference"}},
        {"id": "cham", "images": [], "prompt": [{"role": "user", "content": "Draw a cat."}],
         "chosen": "Here it is.<image>", "rejected": "<image><image>",
         "chosen_images": ["gen/1.png"], "rejected_images": ["gen/2a.png", "gen/2b.png"],
         "meta": {"source": "preference"}},
    ]


def test_preference_rejects_ties_duplicates_and_empties(tmp_path):
    records, rejects = run("preference", write(tmp_path / "pairs.json", ROWS))
    assert [(r.row, r.reason) for r in rejects] == [
        ("pairs.json[4]", "better_response_id is 0, not 1 or 2 "
                          "(a tie or unlabeled pair cannot train a preference)"),
        ("pairs.json[5]", "missing better_response_id"),
        ("pairs.json[6]", "chosen and rejected responses are identical"),
        ("pairs.json[7]", "empty rejected response"),
        ("pairs.json[8]", "missing prompt (expected a non-empty `question` or `prompt` string)"),
        ("pairs.json[9]", "rejected response is a JSON null, not a string"),
    ]
    assert len(records) + len(rejects) == len(ROWS)


def test_preference_options_preferred_key_separator_and_prefix(tmp_path):
    row = {"id": 7, "question": "Which?", "image": "x.png", "response_1": "one",
           "response_2": "two", "overall_response": 1, "better_response_id": 2}
    records, rejects = run("preference", write(tmp_path / "aa.jsonl", [row]),
                           preferred_key="overall_response", image_separator="", id_prefix="aa/")
    assert rejects == []
    assert records[0].id == "aa/7"
    assert records[0].prompt[0].content == "<image>Which?"
    assert (records[0].chosen, records[0].rejected) == ("one", "two")
    assert records[0].meta == {"source": "preference", "better_response_id": 2}


def test_prompt_only_rows(tmp_path):
    rows: list[Any] = [
        {"question": "Describe.", "image": "p.png", "category": "art"},
        {"id": "t", "prompt": "Tell a joke."},
        {"prompt": "<image>\nWhat now?", "image": ["q.png"]},
        {"image": "p.png"},
    ]
    records, rejects = run("prompt-only", write(tmp_path / "prompts.jsonl", rows))
    assert all(isinstance(r, PromptSample) for r in records)
    assert [r.model_dump() for r in records] == [
        {"id": "prompts-0", "images": ["p.png"],
         "prompt": [{"role": "user", "content": "<image>\nDescribe."}],
         "meta": {"source": "prompt-only", "category": "art"}},
        {"id": "t", "images": [], "prompt": [{"role": "user", "content": "Tell a joke."}],
         "meta": {"source": "prompt-only"}},
        {"id": "prompts-2", "images": ["q.png"],
         "prompt": [{"role": "user", "content": "<image>\nWhat now?"}],
         "meta": {"source": "prompt-only"}},
    ]
    assert [(r.row, r.reason) for r in rejects] == [
        ("prompts.jsonl:4", "missing prompt (expected a non-empty `question` or `prompt` string)"),
    ]


def test_preference_registry_kinds():
    assert get_converter("preference").kind == "preference"
    assert get_converter("prompt-only").kind == "prompt"


def test_prompt_only_rejects_preference_only_options(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'preferred_key'"):
        run("prompt-only", write(tmp_path / "p.json", []), preferred_key="x")


def test_own_image_tokens_are_kept_for_the_validator_to_judge(tmp_path):
    rows = [{"question": "<image><image> two?", "image": "a.png"}]
    records, rejects = run("prompt-only", write(tmp_path / "p.json", rows))
    assert rejects == []
    assert records[0].prompt[0].content == "<image><image> two?"  # prepare rejects the mismatch
