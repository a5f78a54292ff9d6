"""Converters reading their inputs from a real S3-protocol server (moto_server over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import Reject

pytestmark = pytest.mark.integration


def convert(name: str, uri: str, tmp_path: Path, **options) -> tuple[list, list[Reject]]:
    ctx = ConvertContext(input=uri, image_root=None, output_images=tmp_path / "images",
                         options=options)
    out = list(get_converter(name).fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


def test_llava_json_array_streams_from_s3(tmp_path, s3_bucket):
    rows = [{"id": f"r{i}", "image": f"coco/train2017/{i:012d}.jpg",
             "conversations": [{"from": "human", "value": f"Question {i}?\n<image>"},
                               {"from": "gpt", "value": f"Answer {i}."}]} for i in range(2000)]
    rows.append({"id": "bad", "conversations": [{"from": "alien", "value": "?"}]})
    uri = f"s3://{s3_bucket}/raw/llava/mix665k.json"
    storage.write_bytes(uri, json.dumps(rows).encode("utf-8"))

    samples, rejects = convert("llava", uri, tmp_path)

    assert len(samples) == 2000
    assert samples[1234].model_dump() == {
        "id": "r1234", "images": ["coco/train2017/000000001234.jpg"], "meta": {"source": "llava"},
        "conversations": [{"role": "user", "content": "<image>\nQuestion 1234?"},
                          {"role": "assistant", "content": "Answer 1234."}]}
    assert [(r.row, r.reason, r.source) for r in rejects] == [
        ("bad", "conversations[0] has unknown role 'alien' (expected one of: human, gpt, system)",
         uri)]


def test_llava_jsonl_and_scienceqa_directory_from_s3(tmp_path, s3_bucket):
    jsonl = f"s3://{s3_bucket}/raw/llava/part.jsonl"
    storage.write_bytes(jsonl, b'{"id": "t", "conversations": [{"from": "human", "value": "Hi"}]}'
                               b"\nnot json\n")
    samples, rejects = convert("llava", jsonl, tmp_path)
    assert [s.id for s in samples] == ["t"]
    assert [r.row for r in rejects] == ["part.jsonl:2"]

    sqa = f"s3://{s3_bucket}/raw/scienceqa"
    problem = {"question": "Which is a fish?", "choices": ["shark", "whale"], "answer": 0,
               "hint": "", "image": "image.png", "split": "test", "subject": "natural science",
               "grade": "grade4", "category": "Classification", "topic": "biology",
               "lecture": "", "solution": ""}
    storage.write_text(f"{sqa}/problems.json", json.dumps({"7": problem}))
    storage.write_text(f"{sqa}/pid_splits.json", json.dumps({"test": ["7"]}))
    for uri in (sqa, f"{sqa}/problems.json"):
        samples, rejects = convert("scienceqa", uri, tmp_path, split="test")
        assert rejects == []
        assert samples[0].images == ["test/7/image.png"]
        assert samples[0].conversations[1].content == "The answer is A."
