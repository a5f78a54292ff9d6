"""Every converter that reads JSON arrays, JSON objects of rows or JSONL shares the reader's
guarantees: a NaN row is one reject and every other row is still read (one item per input
row), and a truncated file fails naming the row instead of ending the dataset early."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import MalformedInputError, Reject

N, K = 9, 4


def turns(user: str, assistant: str, spelled: tuple[str, str] = ("human", "gpt")) -> list:
    return [{"from": spelled[0], "value": user}, {"from": spelled[1], "value": assistant}]


def canonical_row(i: int) -> dict:
    return {"id": f"c{i}", "images": [], "meta": {"score": 0.5},
            "conversations": [{"role": "user", "content": f"Q{i}?"},
                              {"role": "assistant", "content": "A."}]}


# name -> (file name, row i -> row, where the NaN goes in row K)
ROW_CONVERTERS: dict[str, tuple[str, Callable[[int], dict], Callable[[dict], None]]] = {
    "llava": ("mix.json", lambda i: {"id": f"l{i}", "conversations": turns(f"Q{i}?", "A.")},
              lambda r: r.update(score=math.nan)),
    "llava-jsonl": ("mix.jsonl", lambda i: {"id": f"l{i}", "conversations": turns("Q?", "A.")},
                    lambda r: r.update(score=math.nan)),
    "chartmoe": ("train.json", lambda i: {"id": str(i), "conversations": turns(
        "Convert it.", "| a |", ("user", "assistant"))}, lambda r: r.update(score=math.nan)),
    "dataengine": ("gptvqa.json", lambda i: {
        "image_id": i, "question": "What colour?", "choices": ["red", "blue"],
        "correct_choice_idx": 0, "rationales": ["r"], "question_type": "color"},
        lambda r: r.update(correct_choice_idx=math.nan)),
    "preference": ("pref.json", lambda i: {
        "id": f"p{i}", "question": "Which?", "response_1": "A.", "response_2": "B.",
        "better_response_id": 1}, lambda r: r.update(better_response_id=math.inf)),
    "prompt-only": ("prompts.json", lambda i: {"id": f"q{i}", "prompt": "Describe."},
                    lambda r: r.update(score=-math.inf)),
    "align-anything-ti2ti": ("ti2ti.json", lambda i: {
        "id": f"t{i}", "question": "Draw.", "response": "Here."},
        lambda r: r.update(score=math.nan)),
    "canonical": ("samples.jsonl", canonical_row, lambda r: r["meta"].update(score=math.nan)),
}


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")


def convert(name: str, path: Path, **options: Any) -> list[Any]:
    ctx = ConvertContext(input=str(path), image_root=str(path.parent),
                         output_images=path.parent / "images", options=options)
    return list(get_converter(name).fn(ctx))


@pytest.mark.parametrize("case", sorted(ROW_CONVERTERS))
def test_nan_at_row_k_is_one_reject_and_every_other_row_is_read(tmp_path, case):
    filename, make, poison = ROW_CONVERTERS[case]
    rows = [make(i) for i in range(N)]
    poison(rows[K])
    path = tmp_path / filename
    write_rows(path, rows)
    assert "NaN" in path.read_text() or "Infinity" in path.read_text()

    out = convert(case.removesuffix("-jsonl"), path)
    assert len(out) == N  # one item per input row: the rows after K are all there
    rejects = [o for o in out if isinstance(o, Reject)]
    assert len(rejects) == 1 and out[K] is rejects[0]
    assert "is not allowed in JSON" in rejects[0].reason
    assert rejects[0].row in (f"{filename}[{K}]", f"{filename}:{K + 1}")


@pytest.mark.parametrize("case", sorted(ROW_CONVERTERS))
def test_truncated_input_fails_naming_the_file_and_row(tmp_path, case):
    filename, make, _ = ROW_CONVERTERS[case]
    path = tmp_path / filename
    write_rows(path, [make(i) for i in range(N)])
    text = path.read_text()
    row_k = json.dumps(make(K)) if path.suffix == ".jsonl" else \
        json.dumps([make(K)], indent=1)[2:-2]
    path.write_text(text[:text.index(row_k) + 10], encoding="utf-8")  # cut inside row K
    with pytest.raises(MalformedInputError) as e:
        convert(case.removesuffix("-jsonl"), path)
    message = str(e.value)
    assert message.startswith(str(path)) and "truncated" in message
    assert f"ends inside {filename}[{K}] at byte " in message or \
        f"line {K + 1} (the last) has no newline" in message


def sqa_problem(i: int) -> dict:
    return {"question": f"Q{i}?", "choices": ["a", "b"], "answer": 0, "hint": "",
            "image": None, "split": "train", "lecture": "", "solution": ""}


def test_scienceqa_nan_problem_is_one_reject_and_a_broken_file_fails(tmp_path):
    problems = {str(i): sqa_problem(i) for i in range(N)}
    problems[str(K)]["grade"] = math.nan
    (tmp_path / "problems.json").write_text(json.dumps(problems, indent=1), encoding="utf-8")
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": list(problems)}),
                                              encoding="utf-8")
    out = convert("scienceqa", tmp_path)
    assert len(out) == N
    assert [o.row for o in out if isinstance(o, Reject)] == [str(K)]
    assert "NaN is not allowed in JSON" in out[K].reason

    text = (tmp_path / "problems.json").read_text()
    (tmp_path / "problems.json").write_text(text.replace('"7": {', '"7": [', 1),
                                            encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r'problems.json\["7"\] .* is broken'):
        convert("scienceqa", tmp_path)


def test_scienceqa_duplicate_pid_key_rejects_it(tmp_path):
    text = json.dumps({"1": sqa_problem(1), "2": sqa_problem(2)})
    (tmp_path / "problems.json").write_text(text[:-1] + ', "1": ' + json.dumps(sqa_problem(9))
                                            + "}", encoding="utf-8")
    (tmp_path / "pid_splits.json").write_text('{"train": ["1", "2"]}', encoding="utf-8")
    out = convert("scienceqa", tmp_path)
    assert [(o.row, o.reason) for o in out if isinstance(o, Reject)] == \
        [("1", "duplicate_id: pid '1' is a key of problems.json twice")]
