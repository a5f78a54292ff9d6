"""Every converter runs through the prepare stage from the S3 test server to the S3 test server.

Inputs and images live in a bucket on a real S3-protocol server; the committed output must
reconcile its counts. Format details are covered by each converter's unit tests; this checks
that nothing in any converter's path assumes local files.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mmjobs import storage
from mmjobs.data.records import CARD_FILE, SAMPLES_FILE
from mmjobs.stages.prepare import PrepareConfig, main

pytestmark = pytest.mark.integration


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def canonical(i: int) -> dict:
    return {"id": f"c{i}", "images": ["img/a.png"], "meta": {},
            "conversations": [{"role": "user", "content": "<image>\nWhat colour?"},
                              {"role": "assistant", "content": "red"}]}


# name -> (input file name, input bytes, images relative to the image root, extra config)
CASES = {
    "chartmoe": ("train.json", json.dumps([
        {"id": "0", "image": ["img/a.png"], "conversations": [
            {"from": "user", "value": "<ImageHere> Convert the chart to a table."},
            {"from": "assistant", "value": "| a | 1 |"}]}]), ["img/a.png"], {}),
    "dataengine": ("gptvqa.json", json.dumps([
        {"image_id": 7, "question": "What colour is it?", "choices": ["red", "blue"],
         "correct_choice_idx": 0, "rationales": ["It is red."], "question_type": "color"}]),
        ["train2014/COCO_train2014_000000000007.jpg"], {}),
    "preference": ("pref.json", json.dumps([
        {"question": "What is shown?", "image": "img/a.png", "response_1": "A red square.",
         "response_2": "A cat.", "better_response_id": 1}]), ["img/a.png"], {}),
    "prompt-only": ("prompts.jsonl", json.dumps({"prompt": "Describe it.", "image": "img/a.png"}),
                    ["img/a.png"], {}),
    "alpaca": ("train.json", json.dumps([
        {"instruction": "Give three tips.", "input": "", "output": "1. Sleep."}]), [], {}),
    "canonical": ("samples.jsonl", "\n".join(json.dumps(canonical(i)) for i in range(3)),
                  ["img/a.png"], {}),
    "synthetic-charts": (None, None, [], {"num": 2, "seed": 3}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_converter_runs_s3_to_s3_with_reconciled_counts(name, s3_bucket):
    filename, content, images, extra = CASES[name]
    root = f"s3://{s3_bucket}/raw/{name}"
    for rel in images:
        storage.write_bytes(storage.join(root, rel), png())
    source = None
    if filename:
        source = storage.join(root, filename)
        storage.write_text(source, content)
    out = f"s3://{s3_bucket}/prepared/{name}"
    result = main(PrepareConfig(source_format=name, input=source, output=out,
                                image_root=root if filename else None,
                                max_reject_fraction=0.0, **extra))
    assert storage.is_committed(out)
    card = json.loads(storage.read_text(storage.join(out, CARD_FILE)))
    assert result.rows_in == result.accepted + result.rejected == card["counts"]["input"]
    assert result.accepted > 0 and result.rejected == 0
    lines = storage.read_text(storage.join(out, SAMPLES_FILE)).splitlines()
    assert len(lines) == result.accepted
