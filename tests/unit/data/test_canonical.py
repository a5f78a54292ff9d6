"""The `canonical` converters: existing samples.jsonl -> validated records and reasoned rejects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import PreferenceSample, Reject, Sample


def run(name: str, path: Path, **options: Any) -> tuple[list[Any], list[Reject]]:
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path.parent / "images",
                         options=options)
    out = list(get_converter(name).fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


SAMPLE = {"id": "a1", "images": ["x.png"], "meta": {"source": "llava"},
          "conversations": [{"role": "user", "content": "<image>\nHi"},
                            {"role": "assistant", "content": "Hello"}]}
PAIR = {"id": "p1", "images": [], "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": "Hello", "rejected": "Go away", "meta": {}}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_canonical_passes_valid_records_and_rejects_bad_lines(tmp_path):
    lines = [
        json.dumps(SAMPLE).encode(),
        b'{"id": "broken",',
        b"\xc3\x28",
        json.dumps({"id": "nc", "images": []}).encode(),
        json.dumps({**SAMPLE, "id": "role",
                    "conversations": [{"role": "human", "content": "x"}]}).encode(),
        b"[1, 2]",
    ]
    path = write_lines(tmp_path / "samples.jsonl", lines)
    records, rejects = run("canonical", path)

    assert records == [Sample.model_validate(SAMPLE)]
    assert [(r.row, r.reason) for r in rejects] == [
        ("samples.jsonl:2", "invalid JSON: Expecting property name enclosed in double quotes "
                            "at column 17"),
        ("samples.jsonl:3", "invalid UTF-8 at byte 0"),
        ("nc", "not a canonical sample record: conversations: Field required"),
        ("role", "not a canonical sample record: conversations.0.role: Input should be "
                 "'system', 'user' or 'assistant'"),
        ("samples.jsonl:6", "not a canonical sample record: record: Input should be a valid "
                            "dictionary or instance of Sample"),
    ]
    assert {r.source for r in rejects} == {str(path)}
    assert len(records) + len(rejects) == len(lines)


def test_canonical_kind_option_and_kind_specific_names(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(PAIR).encode(),
                                                  json.dumps(SAMPLE).encode()])
    for name, options in (("canonical", {"kind": "preference"}), ("canonical-preference", {})):
        records, rejects = run(name, path, **options)
        assert records == [PreferenceSample.model_validate(PAIR)]
        assert [(r.row, r.reason) for r in rejects] == [
            ("a1", "not a canonical preference record: prompt: Field required")]
    assert get_converter("canonical-preference").kind == "preference"
    assert get_converter("canonical-prompt").kind == "prompt"
    with pytest.raises(ValueError, match="kind='pairs' is not one of: sample, preference"):
        run("canonical", path, kind="pairs")


def test_canonical_reads_committed_directories_only(tmp_path):
    dataset = tmp_path / "dataset"
    write_lines(dataset / "samples.jsonl", [json.dumps(SAMPLE).encode()])
    with pytest.raises(ValueError, match="not a committed dataset directory"):
        run("canonical", dataset)
    storage.commit_dir(dataset)
    records, rejects = run("canonical", dataset)
    assert [r.id for r in records] == ["a1"] and rejects == []
