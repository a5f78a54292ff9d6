"""The shared row readers: a bad row is rejected and reading goes on, a broken file fails
naming the row and byte, and the number of rows read always equals the rows in the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmjobs.data import json_rows
from mmjobs.data.json_rows import (
    MalformedInputError,
    iter_json_array,
    iter_json_object,
    iter_jsonl,
)
from mmjobs.data.records import read_json

N, K = 12, 5  # rows in each file, the bad row's index
ROW_K = f'{{\n  "id": "r{K}"'  # where row K starts in `array_text()`


def rows(n: int = N) -> list[dict]:
    # Multi-byte text and newlines before the bad row, so byte offsets differ from characters.
    return [{"id": f"r{i}", "text": "é한" * i, "n": i, "list": [i, {"k": "a,b]}"}]}
            for i in range(n)]


def array_text(items: list[dict], bad: str | None = None, indent: int | None = 1) -> str:
    """A JSON array of `items`, with row K's `"n": K` replaced by `"n": <bad>`."""
    text = json.dumps(items, ensure_ascii=False, indent=indent)
    if bad is not None:
        text = text.replace(f'"n": {K},', f'"n": {bad},', 1)
    return text


def write(tmp_path: Path, text: str | bytes, name: str = "rows.json") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def byte_of(text: str, needle: str, after: int = 0) -> int:
    return len(text[:text.index(needle, after)].encode())


@pytest.fixture(params=[1 << 20, 7], ids=["1MiB-window", "7-byte-window"])
def window(request, monkeypatch) -> int:
    """Every test also runs with a tiny window, so rows, numbers, strings and escapes are cut
    at every possible point."""
    monkeypatch.setattr(json_rows, "CHUNK_BYTES", request.param)
    return request.param


# --------------------------------------------------------------------------- bad rows: recovered


@pytest.mark.parametrize("bad, detail", [
    ("NaN", "NaN is not allowed in JSON"),
    ("Infinity", "Infinity is not allowed in JSON"),
    ("-Infinity", "-Infinity is not allowed in JSON"),
    ("1e400", "number 1e400 is too large for a float"),
])
def test_non_finite_number_at_row_k_rejects_that_row_and_reads_the_rest(tmp_path, window, bad,
                                                                        detail):
    path = write(tmp_path, array_text(rows(), bad))
    out = list(iter_json_array(path))
    assert len(out) == N  # every row of the file, the bad one included
    assert [r.locator for r in out] == [f"rows.json[{i}]" for i in range(N)]
    assert [r.data for i, r in enumerate(out) if i != K] == [r for i, r in enumerate(rows())
                                                             if i != K]
    assert out[K].error.startswith(f"invalid JSON: {detail}")
    assert out[K].data["id"] == f"r{K}"  # the row parsed: a reject can name its id
    assert [r for r in out if r.error] == [out[K]]


def test_python_json_dumps_nan_is_what_is_caught(tmp_path, window):
    """The real-world source: `json.dump` of a float('nan') (allow_nan is its default)."""
    items = rows()
    items[K]["score"] = math.nan
    out = list(iter_json_array(write(tmp_path, json.dumps(items))))
    assert len(out) == N and [i for i, r in enumerate(out) if r.error] == [K]


@pytest.mark.parametrize("bad, message", [
    (",", "Expecting value"),                           # "n": ,
    ('"unterminated" "x"', "Expecting ',' delimiter"),  # a stray pair of quotes
    ("tru", "Expecting value"),
    ("{'a': 1}", "Expecting property name enclosed in double quotes"),
    ('"tab\there"', "Invalid control character"),
])
def test_syntax_error_inside_row_k_rejects_that_row_naming_the_byte(tmp_path, window, bad,
                                                                    message):
    text = array_text(rows(), bad)
    out = list(iter_json_array(write(tmp_path, text)))
    assert len(out) == N
    assert [i for i, r in enumerate(out) if r.error] == [K]
    assert out[K].error.startswith(f"invalid JSON: {message} at byte ")
    assert [r.data for r in out[K + 1:]] == rows()[K + 1:]


def test_syntax_error_byte_offset_and_line_are_exact(tmp_path, window):
    text = array_text(rows(), ",")
    at = byte_of(text, '"n": ,') + len('"n": ')
    line = text[:text.index('"n": ,')].count("\n") + 1
    out = list(iter_json_array(write(tmp_path, text)))
    assert f"at byte {at} (line {line}, column " in out[K].error


def test_invalid_utf8_and_lone_surrogates_reject_one_row(tmp_path, window):
    text = array_text(rows(3), indent=None).encode()
    good = json.dumps({"id": "emoji", "t": "\ud83d\ude00"}).encode()  # an escaped pair: fine
    data = text[:-1] + b',{"id": "bad", "t": "\xff\xfe"},{"id": "half", "t": "\\ud800"},' + \
        good + b"]"
    out = list(iter_json_array(write(tmp_path, data)))
    assert [r.error is None for r in out] == [True, True, True, False, False, True]
    assert out[3].error.startswith("invalid UTF-8: byte 0xff")
    assert "escape without its pair" in out[4].error
    assert out[5].data == {"id": "emoji", "t": "\U0001F600"}


def test_deep_nesting_is_one_bad_row(tmp_path):
    data = "[" + "[" * 100_000 + "]" * 100_000 + ', {"id": "after"}]'
    out = list(iter_json_array(write(tmp_path, data)))
    assert out[0].error == "invalid JSON: nested too deeply" and out[1].data == {"id": "after"}


def test_byte_order_mark_and_empty_array(tmp_path, window):
    out = list(iter_json_array(write(tmp_path, b"\xef\xbb\xbf" + json.dumps(rows(2)).encode())))
    assert [r.data for r in out] == rows(2)
    assert list(iter_json_array(write(tmp_path, " [ ]\n", "empty.json"))) == []


def test_every_valid_layout_reads_the_same_rows_at_any_window(tmp_path, window):
    items = [*rows(), 1.5e-7, -3, "s", None, True, [], {}, 12345678901234567890]
    for indent in (None, 0, 4):
        for ascii_only in (True, False):
            text = json.dumps(items, indent=indent, ensure_ascii=ascii_only)
            assert [r.data for r in iter_json_array(write(tmp_path, text))] == items


# --------------------------------------------------------------------------- broken files: fail


@pytest.mark.parametrize("case", ["truncated-in-row", "truncated-after-comma",
                                  "no-closing-bracket", "unterminated-string"])
def test_truncated_file_fails_naming_the_row_and_byte(tmp_path, window, case):
    text = array_text(rows())
    start = text.index(ROW_K)
    at = len(text[:start].encode())
    if case == "truncated-in-row":
        text = text[:start + 30]
        expected = f"the file ends inside rows.json[{K}] at byte {at} "
    elif case == "truncated-after-comma":
        text = text[:start]
        expected = f"the file ends where rows.json[{K}] should start at byte {at} "
    elif case == "no-closing-bracket":
        text = text.rstrip().removesuffix("]")
        expected = f"the file ends after rows.json[{N - 1}] without the closing ']'"
    else:  # a quote missing: the rest of the file is one string that never ends
        text = text.replace(f'"id": "r{K}"', f'"id": "r{K}', 1)
        expected = "rows.json: "
    with pytest.raises(MalformedInputError) as e:
        list(iter_json_array(write(tmp_path, text)))
    assert expected in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "rows.json"))


def test_a_file_cut_at_any_byte_fails(tmp_path, window):
    """No truncation point reads as a shorter, valid-looking array (a multi-byte character
    cut in half included)."""
    text = json.dumps([{"id": "r0", "t": "é\"\\", "n": [1.5, -2e3, None, True]}, 17, "s,]",
                       {"o": {}}, []], ensure_ascii=False, indent=1).encode()
    path = tmp_path / "cut.json"
    for cut in range(len(text.rstrip())):
        path.write_bytes(text[:cut])
        with pytest.raises(MalformedInputError):
            list(iter_json_array(path))


@pytest.mark.parametrize("tail, found", [
    (" garbage", "'garbage'"),
    ('\n[{"id": "second"}]', "'[{\"id\": \"second\"}]'"),  # two arrays appended
    ("\n]", "']'"),
])
def test_data_after_the_array_fails(tmp_path, window, tail, found):
    text = array_text(rows()) + tail
    with pytest.raises(MalformedInputError) as e:
        list(iter_json_array(write(tmp_path, text)))
    at = len(array_text(rows()).encode()) + len(tail) - len(tail.lstrip())
    assert f"data after the array's closing ']' ({found}; {N} rows before it) at byte {at} " \
        in str(e.value)


@pytest.mark.parametrize("edit, message", [
    ((f'"list": [\n   {K},', f'"list": {{\n   {K},'),
     f"rows.json[{K}] (starting at byte "),
    ((f"}},\n {ROW_K}", f"}}\n {ROW_K}"),
     f"expected ',' or ']' after rows.json[{K - 1}]"),
    (("\n]", ",\n]"), f"a ',' after the last row (rows.json[{N - 1}])"),
])
def test_structure_breaks_fail_naming_the_row(tmp_path, window, edit, message):
    text = array_text(rows())
    assert edit[0] in text
    with pytest.raises(MalformedInputError, match=r"at byte \d+ \(line \d+, column \d+\)") as e:
        list(iter_json_array(write(tmp_path, text.replace(edit[0], edit[1], 1))))
    assert message in str(e.value)
    if message.startswith(f"rows.json[{K}]"):
        assert "is broken: ']' closes a bracket that needs '}'" in str(e.value)


@pytest.mark.parametrize("content, message", [
    ('{"rows": []}', "expected a top-level JSON array of rows (or a .jsonl file), but it starts "
                     "with '{\"rows\": []}'"),
    ("", "the file is empty"),
])
def test_a_file_that_is_not_an_array_fails(tmp_path, content, message):
    with pytest.raises(MalformedInputError) as e:
        list(iter_json_array(write(tmp_path, content)))
    assert message in str(e.value)


# --------------------------------------------------------------------------- JSONL, objects


def test_jsonl_nan_line_is_rejected_and_a_cut_last_line_fails(tmp_path):
    lines = [json.dumps(r) for r in rows(4)]
    lines[2] = lines[2].replace('"n": 2', '"n": NaN')
    path = write(tmp_path, "\n".join(lines) + "\n", "rows.jsonl")
    out = list(iter_jsonl(path))
    assert len(out) == 4 and [r.error is None for r in out] == [True, True, False, True]
    assert out[2].locator == "rows.jsonl:3" and "NaN is not allowed" in out[2].error

    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20], encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"rows.jsonl: line 4 \(the last\) has no "
                                                  r"newline and is not valid JSON"):
        list(iter_jsonl(path))

    path.write_text("\n".join(lines[:2]), encoding="utf-8")  # valid, no final newline: fine
    assert len(list(iter_jsonl(path))) == 2


def test_object_of_rows_rejects_members_and_fails_on_structure(tmp_path, window):
    members = {f"p{i}": {"q": i, "t": "é"} for i in range(6)}
    text = json.dumps(members, indent=1).replace('"q": 3', '"q": NaN').replace('"q": 4',
                                                                              '"q": ,')
    out = list(iter_json_object(write(tmp_path, text, "problems.json")))
    assert [k for k, _ in out] == list(members)
    assert [r.error is None for _, r in out] == [True, True, True, False, False, True]
    assert out[3][1].locator == 'problems.json["p3"]'
    with pytest.raises(MalformedInputError, match="ends inside"):
        list(iter_json_object(write(tmp_path, text[:len(text) // 2], "problems.json")))


def test_read_json_refuses_nan_naming_the_file(tmp_path):
    with pytest.raises(MalformedInputError, match=r"splits.json: invalid JSON: NaN"):
        read_json(write(tmp_path, '{"train": [1, NaN]}', "splits.json"))
    with pytest.raises(MalformedInputError, match=r"splits.json: invalid JSON: Expecting .* "
                                                  r"line 2 column"):
        read_json(write(tmp_path, '{"train":\n [1,, 2]}', "splits.json"))
