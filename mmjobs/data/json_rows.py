"""Row readers for JSON arrays, JSON objects of rows and JSON Lines that never lose a row silently.

Every converter reads its input through here (`iter_json_array`, `iter_json_object`,
`iter_jsonl`, `parse_json_row`), so every format gets the same guarantees:

- **A bad row whose extent is clear is quarantined and reading goes on.** The reader yields a
  `RawRow` with `error` set (the converter turns it into a `Reject`) and continues with the next
  row. That covers a NaN or Infinity (Python's `json.dumps` writes them, JSON forbids them and
  they would make `samples.jsonl` unreadable elsewhere), a number too large for a float, a
  lone-surrogate escape, invalid UTF-8, and a syntax error inside a row whose brackets and
  strings still balance (e.g. an unquoted key, a stray unescaped quote pair, a missing comma
  *inside* the row): the row ends at the next `,` or `]` outside brackets and strings.
- **A break in the file's structure fails the read** with `MalformedInputError` naming the file,
  the row, the byte offset (and line/column) and the fix: a file that ends inside a row
  (truncated download), a bracket closed by the wrong kind or a string that never ends (the
  rest of the file cannot be split into rows reliably), no `,` between two rows, data after the
  closing `]` (e.g. two arrays appended into one file), a file that is not an array at all. Rows
  after such a point cannot be counted, so the stage must fail rather than commit a partial
  dataset: `rows_in` could not equal the real number of rows.

Known limit: two defects in different rows that each leave an odd number of quotes cancel out,
and the rows between them are quarantined as one bad row (no bracket-and-string scan can see
this; a strict parser would have stopped at the first one).

The JSON array reader streams with Python's C-accelerated `json` decoder over 1 MiB windows,
so memory stays bounded by the largest row (at most `MAX_ROW_CHARS`), not the file.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from mmjobs import storage

CHUNK_BYTES = 1 << 20
MAX_ROW_CHARS = 64 << 20  # a row that does not close within this is a broken string/bracket
_WS = re.compile(r"[ \t\n\r]*")
_STRUCT = re.compile(r'["\[\]{},]')
_STRING_END = re.compile(r'["\\]')
_CLOSE = {"[": "]", "{": "}"}
_MARGIN = 8  # text a decoded value must leave before the window's edge: a number may go on
_RAW_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of invalid UTF-8
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # pairs are fine: the value is checked


class MalformedInputError(ValueError):
    """A JSON/JSONL file's structure is broken where the rows that follow cannot be located.

    The message names the file, the row and the byte offset, and says what to fix.
    """


_Fail = Callable[[int, str, str], MalformedInputError]  # (position, what, fix) -> the error


@dataclass(frozen=True)
class RawRow:
    """One raw row of an input file; `error` set means it must be rejected, and says why.

    `data` is the parsed value: None when the row did not parse, and also set next to `error`
    when it parsed but breaks a rule of JSON (a NaN), so a reject can name the row's id.
    """

    locator: str  # "file.jsonl:12", "file.json[3]" or 'problems.json["pid"]'
    data: Any = None
    error: str | None = None
    line: int | None = None  # JSON Lines: the 1-based line number


class _RowDecoder:
    """`json` with the checks JSON itself makes but Python's decoder does not.

    `decode(text, start)` returns `(value, end, problem)`: `problem` is None for a clean row,
    else why the row must be quarantined although it parsed (NaN, overflow, surrogates).
    """

    def __init__(self) -> None:
        self._problem: str | None = None
        self._json = json.JSONDecoder(parse_constant=self._constant, parse_float=self._float)

    def _constant(self, name: str) -> None:
        self._problem = self._problem or (f"invalid JSON: {name} is not allowed in JSON "
                                          "(Python's json.dumps writes it for a non-finite "
                                          "float); write null or a number")

    def _float(self, text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            self._problem = self._problem or \
                f"invalid JSON: number {text[:40]} is too large for a float"
        return value

    def decode(self, text: str, start: int = 0, dirty: bool = True) -> tuple[Any, int, str | None]:
        """Decode one value at `text[start:]`; raises `json.JSONDecodeError` / `RecursionError`.

        `dirty`: the text may hold invalid UTF-8 (as surrogateescape characters).
        """
        self._problem = None
        value, end = self._json.raw_decode(text, start)
        return value, end, self._problem or _text_problem(text, start, end, value, dirty)


def _text_problem(text: str, start: int, end: int, value: Any, dirty: bool) -> str | None:
    """Invalid UTF-8 (searched for only when the reader met some) or a lone surrogate escape
    in `text[start:end]`."""
    if dirty:
        bad = _RAW_BAD_BYTE.search(text, start, end)
        if bad:
            return _bad_utf8(bad)
    if _ESCAPED_SURROGATE.search(text, start, end):
        try:  # pairs (emoji) decode to one character; a lone half cannot be written as UTF-8
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return ("invalid JSON: a \\ud800-\\udfff escape without its pair (not a Unicode "
                    "character)")
    return None


def _bad_utf8(match: re.Match[str]) -> str:
    return f"invalid UTF-8: byte 0x{ord(match.group()) - 0xDC00:02x} is not UTF-8 text"


def parse_json_row(text: str) -> tuple[Any, str | None]:
    """Parse one whole-document row (a JSONL line, a one-row file): `(value, problem)`.

    Raises `json.JSONDecodeError` on a syntax error (including data after the value) and
    `RecursionError` when nested too deeply; `problem` is the reject reason for a value that
    parsed but must still be quarantined (NaN, overflow, lone surrogate), else None.
    """
    decoder = _RowDecoder()
    start = _WS.match(text).end()
    value, end, problem = decoder.decode(text, start, dirty=False)
    if _WS.match(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, _WS.match(text, end).end())
    return value, problem


# --------------------------------------------------------------------------- JSON Lines


def iter_jsonl(uri: str | os.PathLike) -> Iterator[RawRow]:
    """Stream a JSONL file line by line; a bad line is a row with `error` set.

    Raises `MalformedInputError` when the last line has no newline and is not valid JSON: the
    file was cut off (an interrupted download or write), so lines may be missing after it.
    """
    name = os.path.basename(os.fspath(uri))
    for number, line in storage.iter_lines(uri):
        if not line.strip():
            continue
        locator = f"{name}:{number}"
        try:
            text = line.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(locator, error=f"invalid UTF-8 at byte {e.start}", line=number)
            continue
        try:
            value, problem = parse_json_row(text)
        except json.JSONDecodeError as e:
            if not line.endswith(b"\n"):
                raise MalformedInputError(
                    f"{uri}: line {number} (the last) has no newline and is not valid JSON "
                    f"({e.msg} at column {e.colno}): the file looks truncated; re-download "
                    "or re-copy it (or fix that line)") from None
            yield RawRow(locator, error=f"invalid JSON: {e.msg} at column {e.colno}",
                         line=number)
            continue
        except RecursionError:
            yield RawRow(locator, error="invalid JSON: nested too deeply", line=number)
            continue
        yield RawRow(locator, value, problem, line=number)


# --------------------------------------------------------------------------- JSON containers


class _Window:
    """A sliding text window over a byte stream, with byte offsets and line numbers."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.text = ""
        self.base = 0  # byte offset of text[0] in the file
        self.line = 1  # line number of text[0]
        self.line_start = 0  # byte offset where that line starts
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.dirty = False  # invalid UTF-8 was read: rows must be searched for it
        self._first = True

    def more(self) -> bool:
        """Append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self.raw.read(CHUNK_BYTES)
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError:  # keep the bytes (as surrogates) so the row can be rejected
            self._decoder.errors = "surrogateescape"
            text = self._decoder.decode(data, final=not data)
            self._decoder.errors = "strict"
            self.dirty = True
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):  # a byte-order mark some tools write
                text, self.base = text[1:], 3
        self.eof = not data
        self.text += text
        return bool(data) or bool(text)

    def drop(self, pos: int) -> int:
        """Forget `text[:pos]` once it is large; return the position's new index."""
        if pos < CHUNK_BYTES:
            return pos
        gone = self.text[:pos]
        newlines = gone.count("\n")
        if newlines:
            self.line += newlines
            self.line_start = self.base + _nbytes(gone[:gone.rindex("\n") + 1])
        self.base += _nbytes(gone)
        self.text = self.text[pos:]
        return 0

    def skip_ws(self, pos: int) -> int:
        """Index of the next non-whitespace character, reading on; `len(text)` at the end."""
        while True:
            pos = _WS.match(self.text, pos).end()
            if pos < len(self.text) or not self.more():
                return pos

    def peek(self, pos: int, n: int) -> str:
        """Up to `n` characters from `pos` (reading on), for messages."""
        while len(self.text) - pos < n and self.more():
            pass
        return self.text[pos:pos + n]

    def where(self, pos: int) -> str:
        """`byte N (line L, column C)` for `text[pos]`."""
        before = self.text[:pos]
        newlines = before.count("\n")
        line_start = self.line_start if not newlines else \
            self.base + _nbytes(before[:before.rindex("\n") + 1])
        offset = self.base + _nbytes(before)
        return f"byte {offset} (line {self.line + newlines}, column {offset - line_start + 1})"


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


class _Broken(Exception):
    def __init__(self, pos: int, what: str) -> None:
        self.pos, self.what = pos, what


class _Extent:
    """Finds where a value ends by brackets and strings alone (not full JSON), resumably.

    The value starting at `start` ends at the first `,` or `closer` outside brackets and
    strings. `scan(text)` returns that index, or None when the text ends first (call it again
    after appending text: it goes on where it stopped); `_Broken` for a bracket closed by the
    wrong kind.
    """

    def __init__(self, start: int, closer: str) -> None:
        self.pos, self.closer = start, closer
        self.stack: list[str] = []
        self.in_string = False

    @property
    def balanced(self) -> bool:
        """Every bracket and string opened so far is closed."""
        return not self.stack and not self.in_string

    def scan(self, text: str) -> int | None:
        while True:
            if self.in_string:
                end = _STRING_END.search(text, self.pos)
                if end is None or end.end() == len(text):  # an escape's second half may follow
                    return None
                if end.group() == "\\":
                    self.pos = end.start() + 2
                    continue
                self.pos, self.in_string = end.start() + 1, False
            match = _STRUCT.search(text, self.pos)
            if match is None:
                self.pos = len(text)
                return None
            char, pos = match.group(), match.start()
            self.pos = pos + 1
            if char == '"':
                self.in_string = True
            elif char in "[{":
                self.stack.append(_CLOSE[char])
            elif char == "," and not self.stack:
                return pos
            elif char in "]}":
                if not self.stack:
                    if char != self.closer:
                        raise _Broken(pos, f"{char!r} where the rows' container closes with "
                                           f"{self.closer!r}")
                    return pos
                if self.stack[-1] != char:
                    raise _Broken(pos, f"{char!r} closes a bracket that needs {self.stack[-1]!r}")
                self.stack.pop()


def iter_json_array(uri: str | os.PathLike) -> Iterator[RawRow]:
    """Stream the rows of a top-level JSON array (e.g. llava_v1_5_mix665k.json).

    Bad rows come back with `error` set; a broken file raises `MalformedInputError` (see the
    module docstring for which is which).
    """
    yield from _iter_container(uri, "[")


def iter_json_object(uri: str | os.PathLike) -> Iterator[tuple[str, RawRow]]:
    """Stream `(key, row)` for each member of a top-level JSON object of rows (ScienceQA's
    `problems.json`: pid -> problem), with the same guarantees as `iter_json_array`."""
    yield from _iter_container(uri, "{")


def _iter_container(uri: str | os.PathLike, opener: str) -> Iterator[Any]:
    name = os.path.basename(os.fspath(uri))
    closer = _CLOSE[opener]
    kind = "array" if opener == "[" else "object"
    decoder = _RowDecoder()
    with storage.open_read(uri) as raw:
        win = _Window(raw)

        def fail(pos: int, what: str, fix: str) -> MalformedInputError:
            return MalformedInputError(f"{uri}: {what} at {win.where(pos)}; {fix}")

        pos = win.skip_ws(0)
        if win.text[pos:pos + 1] != opener:
            head = win.peek(pos, 30)
            jsonl = " (or a .jsonl file)" if kind == "array" else ""
            raise fail(pos, f"expected a top-level JSON {kind} of rows{jsonl}"
                       + (f", but it starts with {head!r}" if head else
                          ", but the file is empty"),
                       "pass the file that holds the rows" if head else "re-download it")
        pos = win.skip_ws(pos + 1)
        index = 0
        if win.text[pos:pos + 1] == closer:
            pos += 1
        else:
            while True:
                pos = win.skip_ws(win.drop(pos))
                key = None
                row_start = pos
                if opener == "{":
                    key, pos = _member_key(win, pos, index, fail)
                locator = f"{name}[{index}]" if key is None else f"{name}[{json.dumps(key)}]"
                if pos >= len(win.text):
                    raise fail(pos, f"the file ends where {locator} should start",
                               "it looks truncated; re-download or re-copy it")
                row, pos = _read_value(win, pos, closer, locator, decoder, fail, row_start)
                yield row if key is None else (key, row)
                index += 1
                pos = win.skip_ws(pos)
                sep = win.text[pos:pos + 1]
                if sep == ",":
                    pos = win.skip_ws(pos + 1)
                    if win.text[pos:pos + 1] == closer:
                        raise fail(pos, f"a ',' after the last row ({locator}) before "
                                   f"{closer!r}", "remove the trailing comma")
                    continue
                if sep == closer:
                    pos += 1
                    break
                if not sep:
                    raise fail(pos, f"the file ends after {locator} without the closing "
                               f"{closer!r}", "it looks truncated; re-download or re-copy it")
                raise fail(pos, f"expected ',' or {closer!r} after {locator} but found "
                           f"{win.peek(pos, 20)!r}", "a comma between rows is missing, "
                           "or the row has extra data after its end; fix the file there")
        pos = win.skip_ws(pos)
        if pos < len(win.text):
            raise fail(pos, f"data after the {kind}'s closing {closer!r} "
                       f"({win.peek(pos, 20)!r}; {index} row{'' if index == 1 else 's'} "
                       "before it)",
                       "a file must hold one JSON " + kind + " (two appended into one file? "
                       "merge them into one, or use JSON Lines)")


def _member_key(win: _Window, pos: int, index: int, fail: _Fail) -> tuple[str, int]:
    """Read `"key":` of an object member at `pos`; return the key and where its value starts."""
    key = None
    if win.text[pos:pos + 1] == '"':
        while key is None:
            try:
                key, pos = json.decoder.scanstring(win.text, pos + 1)
            except json.JSONDecodeError:
                if len(win.text) - pos > MAX_ROW_CHARS or not win.more():
                    break
    if key is None:
        if win.eof and win.text.find('"', pos + 1) < 0:
            raise fail(pos, f"the file ends inside the key of member {index}",
                       "it looks truncated; re-download or re-copy it")
        raise fail(pos, f"expected the key of member {index} (a string)",
                   "the object's structure is broken there; fix the file")
    pos = win.skip_ws(pos)
    if win.text[pos:pos + 1] != ":":
        raise fail(pos, f"expected ':' after key {key!r}", "fix the file there")
    return key, win.skip_ws(pos + 1)


def _scan_to_end(win: _Window, pos: int, closer: str, locator: str, fail: _Fail,
                 row_start: int) -> int | None:
    """The end of the row at `pos` by the bracket scan, reading on as needed; None if it had to
    read on (the caller decodes again); `MalformedInputError` if it never ends or breaks."""
    extent = _Extent(pos, closer)
    grew = False
    while True:
        try:
            end = extent.scan(win.text)
        except _Broken as b:
            raise fail(b.pos, f"{locator} (starting at {win.where(row_start)}) is broken: "
                       f"{b.what}", "the rows after it cannot be located; fix the file "
                       "there") from None
        if end is not None:
            return None if grew else end
        if len(win.text) - pos > MAX_ROW_CHARS:
            raise fail(pos, f"{locator} does not end within {MAX_ROW_CHARS >> 20} Mi characters",
                       "a string or bracket is not closed; fix the file there")
        if not win.more():
            if extent.balanced:  # the value is whole; the file just ends after it
                return None if grew else len(win.text)
            raise fail(pos, f"the file ends inside {locator}",
                       "it looks truncated (or a string or bracket is not closed); "
                       "re-download or re-copy it")
        grew = True


def _read_value(win: _Window, pos: int, closer: str, locator: str, decoder: _RowDecoder,
                fail: _Fail, row_start: int) -> tuple[RawRow, int]:
    """Decode the row at `pos`, reading more text until it is complete; `(row, end)`.

    A failed decode is either a row cut by the window's edge or a bad row: the bracket scan
    finds the row's end (reading on), and if it had to read on the row is decoded again.
    """
    while True:
        try:
            value, stop, problem = decoder.decode(win.text, pos, win.dirty)
            if stop > len(win.text) - _MARGIN and win.more():
                continue  # a number at the window's edge ("12." + "5e3") may go on
            return RawRow(locator, value, problem), stop
        # Keep only the message: the exception holds the whole window (its `doc`) in a
        # reference cycle through its traceback, which would keep old windows alive.
        except json.JSONDecodeError as e:
            message = f"{e.msg.removesuffix(' at')} at {win.where(e.pos)}"  # "...character at"
        except RecursionError:
            message = "nested too deeply"
        end = _scan_to_end(win, pos, closer, locator, fail, row_start)
        if end is not None:
            break
    bad = _RAW_BAD_BYTE.search(win.text, pos, end) if win.dirty else None
    if bad:
        return RawRow(locator, error=_bad_utf8(bad)), end
    return RawRow(locator, error=f"invalid JSON: {message}"), end
