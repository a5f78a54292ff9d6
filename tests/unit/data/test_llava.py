"""The `llava` converter: LLaVA JSON array / JSONL -> canonical samples, rejects, streaming."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import MalformedInputError, Reject, Sample


def run(path: Path, **options: Any) -> tuple[list[Any], list[Reject]]:
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path.parent / "images",
                         options=options)
    out = list(get_converter("llava").fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def turn(role: str, value: Any) -> dict[str, Any]:
    return {"from": role, "value": value}


ROWS: list[Any] = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [turn("human", "What are the colors of the bus?\n<image>"),
                       turn("gpt", "White and red."),
                       turn("human", "Where is it?"), turn("gpt", "On a street.")]},
    {"id": "sharegpt-1", "model": "gpt-4",
     "conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hello")]},
    {"id": 42, "image": "gqa/images/1.jpg",
     "conversations": [turn("human", "<image>\nIs it red?"), turn("gpt", "Yes")]},
    {"conversations": [turn("human", "no id"), turn("gpt", "x")]},
    {"id": "empty", "conversations": []},
    {"id": "bot", "conversations": [turn("human", "hi"), turn("bot", "x")]},
    {"id": "num", "conversations": [turn("human", "hi"), turn("gpt", 3)]},
    {"id": "badimg", "image": ["a.jpg", 5], "conversations": [turn("human", "x")]},
    ["not", "an", "object"],
]


def test_llava_rows_become_samples_with_llava_image_placement(tmp_path):
    samples, _ = run(write_json(tmp_path / "mix665k.json", ROWS))

    assert [s.model_dump() for s in samples] == [
        {"id": "000000033471", "images": ["coco/train2017/000000033471.jpg"],
         "meta": {"source": "llava"},
         "conversations": [
             {"role": "user", "content": "<image>\nWhat are the colors of the bus?"},
             {"role": "assistant", "content": "White and red."},
             {"role": "user", "content": "Where is it?"},
             {"role": "assistant", "content": "On a street."}]},
        {"id": "sharegpt-1", "images": [], "meta": {"source": "llava", "model": "gpt-4"},
         "conversations": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]},
        {"id": "42", "images": ["gqa/images/1.jpg"], "meta": {"source": "llava"},
         "conversations": [{"role": "user", "content": "<image>\nIs it red?"},
                           {"role": "assistant", "content": "Yes"}]},
    ]
    assert all(isinstance(s, Sample) for s in samples)


def test_llava_rejects_say_which_row_and_why(tmp_path):
    path = write_json(tmp_path / "mix665k.json", ROWS)
    samples, rejects = run(path)

    assert [(r.row, r.reason) for r in rejects] == [
        ("mix665k.json[3]", "missing id"),
        ("empty", "missing or empty conversations"),
        ("bot", "conversations[1] has unknown role 'bot' (expected one of: human, gpt, system)"),
        ("num", "conversations[1].value is a JSON number, not a string"),
        ("badimg", "image must be a non-empty path or a list of non-empty paths, "
                   "got array ['a.jpg', 5]"),
        ("mix665k.json[8]", "row is a JSON array, not an object"),
    ]
    assert {r.source for r in rejects} == {str(path)}
    assert len(samples) + len(rejects) == len(ROWS)


def test_llava_image_token_keep_leaves_text_as_published(tmp_path):
    samples, _ = run(write_json(tmp_path / "a.json", ROWS[:1]), image_token="keep",
                     id_prefix="mix/")
    assert samples[0].id == "mix/000000033471"
    assert samples[0].conversations[0].content == "What are the colors of the bus?\n<image>"


def test_llava_multi_image_turns_keep_their_token_positions(tmp_path):
    row = {"id": "m", "image": ["a.jpg", "b.jpg"],
           "conversations": [turn("human", "Compare <image> and <image>."), turn("gpt", "Same.")]}
    samples, _ = run(write_json(tmp_path / "a.json", [row]))
    assert samples[0].images == ["a.jpg", "b.jpg"]
    assert samples[0].conversations[0].content == "Compare <image> and <image>."


def test_llava_reads_jsonl_by_extension_and_rejects_bad_lines(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_bytes(json.dumps(ROWS[2]).encode() + b"\n{\"id\": \n\n" + b"\xff\xfe\n")
    samples, rejects = run(path)
    assert [s.id for s in samples] == ["42"]
    assert [(r.row, r.reason) for r in rejects] == [
        ("part.jsonl:2", "invalid JSON: Expecting value at column 8"),
        ("part.jsonl:4", "invalid UTF-8 at byte 0"),
    ]


def test_llava_truncated_array_fails_naming_the_row_and_byte(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps(ROWS[:3])
    path.write_text(text[:-40], encoding="utf-8")
    start = text.index('{"id": 42')
    with pytest.raises(MalformedInputError) as e:
        run(path)
    assert f"the file ends inside cut.json[2] at byte {start} " in str(e.value)
    assert "truncated" in str(e.value)


def test_llava_refuses_a_file_that_is_not_an_array(tmp_path):
    path = write_json(tmp_path / "dict.json", {"data": ROWS})
    with pytest.raises(ValueError, match="expected a top-level JSON array"):
        run(path)


def test_llava_option_errors_are_reported_together(tmp_path):
    path = write_json(tmp_path / "a.json", ROWS)
    with pytest.raises(ValueError) as e:
        run(path, image_token="end", colour="red")
    assert str(e.value) == (
        "converter 'llava': option image_token='end' is not one of: start, keep; "
        "unknown option 'colour' (known: id_prefix, image_token)")


def test_llava_needs_an_input(tmp_path):
    ctx = ConvertContext(input=None, image_root=None, output_images=tmp_path)
    with pytest.raises(ValueError, match="needs an input file"):
        list(get_converter("llava").fn(ctx))


@pytest.mark.slow
def test_llava_streams_a_large_array_in_bounded_memory(tmp_path):
    """50k rows (~20 MB of JSON, ~100 MB as Python objects) convert with a small peak."""
    n = 50_000
    path = tmp_path / "big.json"
    answer = "A long answer with details. " * 10
    with path.open("w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            row = {"id": f"r{i}", "image": f"coco/train2017/{i:012d}.jpg",
                   "conversations": [turn("human", f"<image>\nQuestion {i}?"),
                                     turn("gpt", answer)]}
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")
    assert path.stat().st_size > 15_000_000

    count = 0
    tracemalloc.start()
    try:
        for item in run_iter(path):
            assert not isinstance(item, Reject)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 20 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


def run_iter(path: Path):
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path.parent / "images")
    return get_converter("llava").fn(ctx)
