"""The `align-anything-ti2ti` converter: Align-Anything TI2TI SFT rows (responses that contain
images) -> canonical samples whose assistant turn holds the output images' `<image>` markers."""

from __future__ import annotations

from typing import Any

from mmjobs.data.records import Sample
from tests.unit.data.test_preference import run, write

ROWS: list[Any] = [
    {"question": "Draw a cat.", "image_url": "in/1.png", "response": "Here it is:",
     "output_image_url": "out/1.png", "category": "animals"},
    {"id": "two", "prompt": "Two pictures, please.", "images": [], "response": "",
     "output_images": ["out/2a.png", "out/2b.png"]},
    {"id": "own", "question": "<image> and <image>: redraw the first.",
     "image_url": ["a.png", "b.png"], "response": "Redrawn: <image> done.",
     "output_image": "out/3.png"},
    {"id": "text", "question": "Just talk.", "image_url": [], "response": "Sure."},
    {"id": "empty", "question": "Nothing?", "image_url": [], "response": "  "},
    {"id": "bad", "question": "q", "response": 3},
]


def test_ti2ti_rows_put_output_images_in_the_assistant_turn(tmp_path):
    records, rejects = run("align-anything-ti2ti", write(tmp_path / "sft.jsonl", ROWS),
                           image_separator="")
    by_id = {r.id: r for r in records}
    assert all(isinstance(r, Sample) for r in records)
    first = by_id["sft-0"]
    assert first.images == ["in/1.png", "out/1.png"]  # input images, then output images
    assert [t.model_dump() for t in first.conversations] == [
        {"role": "user", "content": "<image>Draw a cat."},
        {"role": "assistant", "content": "Here it is:<image>"}]
    assert first.meta == {"source": "align-anything-ti2ti", "category": "animals"}
    assert by_id["two"].conversations[1].content == "<image><image>"
    assert by_id["two"].images == ["out/2a.png", "out/2b.png"]
    own = by_id["own"]  # texts with their own markers are left alone
    assert own.conversations[0].content == "<image> and <image>: redraw the first."
    assert own.conversations[1].content == "Redrawn: <image> done."
    assert own.images == ["a.png", "b.png", "out/3.png"]
    assert by_id["text"].images == [] and by_id["text"].conversations[1].content == "Sure."
    assert sorted((r.row, r.reason) for r in rejects) == [
        ("bad", "response is a JSON number, not a string"),
        ("empty", "empty response (no text and no output image)")]
