"""What every benchmark loader shares: items, the registry entry, errors, layout checks, JSON.

A loader turns a benchmark in its official file layout (a local folder or an `s3://` prefix,
read through `mmjobs.storage`) into `BenchmarkItem`s: the prompt to generate from, the images
it refers to (absolute paths or `s3://` URIs) and the `fields` the benchmark's metric needs
(`mmjobs.eval.metrics`), which the infer stage copies into each predictions row.

Loaders check the layout *eagerly* (a missing file is reported before any generation starts)
and then stream their items lazily, so a 200 MB annotation file is never held whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import Field

from mmjobs import storage
from mmjobs.config import StrictModel

IMAGE_TOKEN = "<image>"
LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


class BenchmarkError(ValueError):
    """A benchmark cannot be loaded: unknown name, bad options, or a malformed file."""


class MissingBenchmarkFilesError(BenchmarkError, FileNotFoundError):
    """Files of the official layout are missing; the message names each one and the layout."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One question to generate an answer for.

    Attributes:
        id: unique within the benchmark (becomes the predictions row `id`).
        prompt: the user turn; `<image>` marks where each image goes (one per image).
        images: absolute local paths or `s3://` URIs, in `<image>` order.
        fields: what the metric needs besides `id` and `prediction` (its `required_fields`
            and useful optional ones), copied verbatim into the predictions row.
    """

    id: str
    prompt: str
    images: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)


class BenchmarkOptions(StrictModel):
    """Options every loader accepts (each loader's options subclass this)."""

    limit: int | None = Field(
        None, ge=1, description="Load at most this many source records (questions; MME: "
        "images, each with its two questions; MMBench: TSV rows before circular copies). "
        "For smoke tests.")


@dataclass(frozen=True)
class Benchmark:
    """A registered loader.

    Attributes:
        name: `load_benchmark` name.
        title: human-readable name, used in error messages.
        metric: the `METRICS` key the items' fields are made for (None: set by the user).
        options: the options model (unknown options are errors).
        load: `(root URI, options) -> items`; checks the layout before returning.
        layout: the official layout, as error messages print it.
    """

    name: str
    title: str
    metric: str | None
    options: type[BenchmarkOptions]
    load: Callable[[str, Any], Iterator[BenchmarkItem]]
    layout: str


# --------------------------------------------------------------------------- paths


def root_uri(root: str | os.PathLike) -> str:
    """`root` as an absolute local path or `s3://bucket/prefix`, without a trailing slash."""
    return str(storage.parse(root)).rstrip("/") or "/"


def require_files(title: str, root: str, required: Sequence[str], layout: str) -> None:
    """Raise `MissingBenchmarkFilesError` naming every entry of `required` absent under `root`.

    Entries ending in "/" are folders (an S3 prefix with at least one object).
    """
    missing = [rel for rel in required if not _present(storage.join(root, rel), rel.endswith("/"))]
    if missing:
        paths = ", ".join(storage.join(root, rel) + ("/" if rel.endswith("/") else "")
                          for rel in missing)
        raise MissingBenchmarkFilesError(
            f"{title}: missing {paths}; expected the official layout: {layout}")


def _present(uri: str, folder: bool) -> bool:
    """A file exists / a folder holds something (an empty local folder counts as missing,
    like an S3 prefix without objects)."""
    loc = storage.parse(uri)
    if folder and loc.scheme == "file":
        path = Path(loc.key)
        return path.is_dir() and next(path.iterdir(), None) is not None
    return storage.exists(uri)


def with_image_tokens(text: str, n_images: int) -> str:
    """Put `<image>\\n` in front for every image the text does not already place itself."""
    missing = n_images - text.count(IMAGE_TOKEN)
    return f"{IMAGE_TOKEN}\n" * max(missing, 0) + text


def lettered(options: Sequence[str]) -> str:
    """Options as LLaVA's eval prompts list them: "A. x\\nB. y"."""
    return "\n".join(f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(options))


# --------------------------------------------------------------------------- JSON streaming


def stream_json(uri: str, prefix: str, *, kv: bool = False) -> Iterator[Any]:
    """Stream the items (or with `kv`, the `(key, value)` pairs) at `prefix` of a JSON file.

    `prefix` is an ijson prefix: "item" for a top-level array, "questions.item" for
    `{"questions": [...]}`, "" with `kv` for a top-level object. Numbers come back as float/int
    (not Decimal). Raises `BenchmarkError` naming the file if it is not valid JSON.
    """
    import ijson

    with storage.open_read(uri) as f:
        try:
            parse = ijson.kvitems if kv else ijson.items
            yield from parse(_Reader(f), prefix, use_float=True)
        except ijson.JSONError as e:
            raise BenchmarkError(f"{uri}: not valid JSON ({e})") from e


class _Reader:
    """Adapts S3 bodies (whose `read()` wants a size) to what ijson's C backend calls."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def read(self, size: int = 64 * 1024) -> bytes:
        return self._f.read(size)


def read_json(uri: str) -> Any:
    """Parse a small JSON file whole; `BenchmarkError` naming the file if it is not JSON."""
    import json

    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise BenchmarkError(f"{uri}: not valid JSON ({e})") from e

