"""`jsonl`: a generic VQA file, one JSON object per line, for any metric.

Layout: `root` is the JSONL itself, or a folder holding it (`file`, default
`questions.jsonl`). Each line::

    {"id": "q1", "question": "What is the highest bar?", "image": "charts/1.png",
     "answers": ["7"], ...any other fields}

- `id` (string or integer; default: the line number), `question` (required);
- `image` (one path) or `images` (a list), optional, relative to the file's folder (or
  `image_root`) unless already absolute or `s3://`;
- everything else — `answers`, `answer`, `split`, `choices`, ... — is copied into `fields`
  unchanged, so the file carries whatever its metric needs.

The prompt is `<image>\\n` per image + question + `prompt_suffix` (default none).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.data.json_rows import MalformedInputError, iter_jsonl
from mmjobs.eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    MissingBenchmarkFilesError,
    with_image_tokens,
)

DEFAULT_FILE = "questions.jsonl"
LAYOUT = ("a JSONL file (root itself, or <root>/questions.jsonl / the `file` option) with "
          "id, question, image (optional, relative to its folder), answers or answer")
_RESERVED = ("id", "question", "image", "images")


class JsonlOptions(BenchmarkOptions):
    """Options of the `jsonl` loader."""

    file: str = Field(DEFAULT_FILE, description="JSONL name under root (ignored when root is "
                      "the .jsonl itself).")
    image_root: str | None = Field(None, description="Folder (or s3:// prefix) image paths are "
                                   "relative to; default the JSONL's folder.")
    prompt_suffix: str = Field("", description="Appended to each question.")


def load(root: str, opts: JsonlOptions) -> Iterator[BenchmarkItem]:
    """Check the file exists, then stream its rows as items."""
    uri, image_root = locate(root, opts.file, opts.image_root, (".jsonl", ".json"), "JSONL",
                             LAYOUT)
    return _items(uri, image_root, opts)


def locate(root: str, file: str, image_root: str | None, suffixes: tuple[str, ...],
           title: str, layout: str) -> tuple[str, str]:
    """(the question file, the image root) for a root naming the file or its folder.

    Raises `MissingBenchmarkFilesError` when the file does not exist.
    """
    if root.lower().endswith(suffixes):
        uri = root
        folder = root.rsplit("/", 1)[0] if storage.is_s3(root) else os.path.dirname(root)
    else:
        uri, folder = storage.join(root, file), root
    if not storage.exists(uri):
        raise MissingBenchmarkFilesError(
            f"{title}: missing {uri}; expected the official layout: {layout}")
    return uri, str(storage.parse(image_root)) if image_root else folder


def _rows(uri: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line; a line that is not JSON (or a file cut
    off mid-line) is a `BenchmarkError` naming the file and line."""
    try:
        for raw in iter_jsonl(uri):
            if raw.data is None and raw.error:
                raise BenchmarkError(f"{uri}: line {raw.line}: not JSON ({raw.error})")
            yield raw.line or 0, raw.data
    except MalformedInputError as e:
        raise BenchmarkError(str(e)) from None


def _items(uri: str, image_root: str, opts: JsonlOptions) -> Iterator[BenchmarkItem]:
    for n, row in islice(_rows(uri), opts.limit):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise BenchmarkError(f"{uri}: line {n}: expected an object with a string "
                                 "'question'")
        images = _images(row, image_root, uri, n)
        fields: dict[str, Any] = {k: v for k, v in row.items() if k not in _RESERVED}
        yield BenchmarkItem(id=str(row.get("id", n)),
                            prompt=with_image_tokens(row["question"] + opts.prompt_suffix,
                                                     len(images)),
                            images=images, fields=fields)


def _images(row: dict[str, Any], image_root: str, uri: str, line: int) -> list[str]:
    paths = row.get("images", [row["image"]] if row.get("image") else [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise BenchmarkError(f"{uri}: line {line}: 'image' must be a path and 'images' a list "
                             "of paths")
    return [p if storage.is_s3(p) or os.path.isabs(p) else storage.join(image_root, p)
            for p in paths]


BENCHMARK = Benchmark(name="jsonl", title="JSONL", metric=None, options=JsonlOptions,
                      load=load, layout=LAYOUT)
