"""The canonical dataset format and streaming readers/writers for it.

A canonical dataset is a committed store directory (see `mmjobs.storage`) holding:

- `samples.jsonl`  one record per line, of one kind:
    * sample      `{"id", "images", "conversations": [{"role", "content"}], "meta"}`
    * preference  `{"id", "images", "prompt": [turns], "chosen", "rejected", "meta"}`
    * prompt      `{"id", "images", "prompt": [turns], "meta"}`
  `images` are paths relative to the dataset's image root; `<image>` in a turn's content marks
  where each image goes, in order.
- `rejects.jsonl`  one line per input row that did not make it: `{"row", "reason", "source"}`.
- `dataset.json`   the card: kind, counts (`input = accepted + rejected`), image root, source.

Readers stream: nothing here holds a whole dataset in memory (a 665k-row JSON array is parsed
incrementally). The row readers (`iter_jsonl`, `iter_json_array`, `iter_json_object`) live in
`mmjobs.data.json_rows`, which says which input errors reject one row and which fail the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmjobs import layout, storage
from mmjobs.data.json_rows import (  # noqa: F401 - re-exported for existing importers
    MalformedInputError,
    RawRow,
    iter_json_array,
    iter_json_object,
    iter_jsonl,
    parse_json_row,
)

SAMPLES_FILE = layout.SAMPLES_FILE
REJECTS_FILE = layout.REJECTS_FILE
CARD_FILE = layout.DATASET_CARD
IMAGE_TOKEN = "<image>"

Role = Literal["system", "user", "assistant"]
Kind = Literal["sample", "preference", "prompt"]


class Turn(BaseModel):
    """One conversation turn."""

    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)


class Sample(_Record):
    """A supervised conversation; the loss is on assistant turns."""

    conversations: list[Turn]


class PreferenceSample(_Record):
    """A prompt with a preferred and a dispreferred response (DPO, reward models).

    `chosen_images` / `rejected_images` hold images that are part of the responses
    (image-token models such as Chameleon generate images).
    """

    prompt: list[Turn]
    chosen: str
    rejected: str
    chosen_images: list[str] = Field(default_factory=list)
    rejected_images: list[str] = Field(default_factory=list)


class PromptSample(_Record):
    """A prompt only (PPO/GRPO rollouts, inference)."""

    prompt: list[Turn]


RECORD_TYPES: dict[str, type[_Record]] = {
    "sample": Sample, "preference": PreferenceSample, "prompt": PromptSample,
}
Record = Sample | PreferenceSample | PromptSample


@dataclass(frozen=True)
class Reject:
    """An input row that was not converted, and why. `row` locates it (id, or file:line)."""

    row: str
    reason: str
    source: str = ""

    def to_json(self) -> dict[str, str]:
        return {"row": self.row, "reason": self.reason, "source": self.source}


def parse_record(data: Any, kind: Kind = "sample") -> Record:
    """Validate one canonical record; raises `ValueError` with a one-line reason."""
    try:
        return RECORD_TYPES[kind].model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise ValueError(f"not a canonical {kind} record: {where}: {first['msg']}") from None


def count_image_tokens(record: Record) -> int:
    """Number of `<image>` placeholders in a record's input turns."""
    turns = record.conversations if isinstance(record, Sample) else record.prompt
    return sum(t.content.count(IMAGE_TOKEN) for t in turns)


# --------------------------------------------------------------------------- reading


def read_json(uri: str | os.PathLike) -> Any:
    """Read a small JSON document (an annotation file, a split list, a card).

    Raises `MalformedInputError` naming the file, line and column on a syntax error, a NaN or
    anything else `mmjobs.data.json_rows` would reject in a row.
    """
    text = storage.read_text(uri)
    try:
        value, problem = parse_json_row(text)
    except json.JSONDecodeError as e:
        raise MalformedInputError(f"{uri}: invalid JSON: {e.msg} at line {e.lineno} column "
                                  f"{e.colno}; fix the file there") from None
    except RecursionError:
        raise MalformedInputError(f"{uri}: invalid JSON: nested too deeply") from None
    if problem:
        raise MalformedInputError(f"{uri}: {problem}")
    return value


def iter_records(uri: str | os.PathLike, kind: Kind = "sample") -> Iterator[Record]:
    """Stream canonical records from a `samples.jsonl` (raises on a malformed line)."""
    for row in iter_jsonl(uri):
        if row.error:
            raise ValueError(f"{row.locator}: {row.error}")
        try:
            yield parse_record(row.data, kind)
        except ValueError as e:
            raise ValueError(f"{row.locator}: {e}") from None



# --------------------------------------------------------------------------- writing


class JsonlWriter:
    """Write JSON lines to a store URI; the file appears only when the block exits cleanly.

    Example::

        with JsonlWriter(join(out, SAMPLES_FILE)) as w:
            w.write(sample)
    """

    def __init__(self, uri: str | os.PathLike) -> None:
        self.uri = os.fspath(uri)
        self.count = 0
        self._ctx = storage.open_write(self.uri)
        self._f: IO[bytes] | None = None

    def __enter__(self) -> JsonlWriter:
        self._f = self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def write(self, record: BaseModel | Reject | dict[str, Any]) -> None:
        """Append one record (a pydantic record, a `Reject`, or a plain dict)."""
        if isinstance(record, BaseModel):
            data = record.model_dump(mode="json")
        elif isinstance(record, Reject):
            data = record.to_json()
        else:
            data = record
        if self._f is None:
            raise RuntimeError("JsonlWriter is used outside its `with` block")
        self._f.write(json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += 1


def dataset_readme(card: dict[str, Any]) -> str:
    """README.md of a canonical dataset: a Hugging Face dataset card whose `configs` header
    points `datasets.load_dataset(dir)` at `samples.jsonl` (without it, `datasets` picks files
    by their most common extension and returns the `images/` folder as an image dataset),
    then the counts and how to read it."""
    counts = card.get("counts", {})
    reasons = ", ".join(f"{k} {v}" for k, v in (counts.get("by_reason") or {}).items())
    source = card.get("source_format") or card.get("sources") or "?"
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {SAMPLES_FILE}
tags:
- mmjobs
- canonical
---
# Canonical {card.get("kind", "sample")} dataset

Made by mmjobs from `{source}`{f" (input `{card['input']}`)" if card.get("input") else ""}.

- rows: {counts.get("input", "?")} in, {counts.get("accepted", "?")} accepted, \\
{counts.get("rejected", "?")} rejected{f" ({reasons})" if reasons else ""}
- `{SAMPLES_FILE}`: one record per line (`id`, `images`, `conversations` or `prompt` /
  `chosen` / `rejected`, `meta`); `images` are paths relative to the image root
  `{card.get("image_root") or "."}`
- `{REJECTS_FILE}`: `{{row, reason, source}}` per rejected row; `{CARD_FILE}`: this card's
  numbers as JSON

```python
import datasets
rows = datasets.load_dataset(".", split="train")  # the records of {SAMPLES_FILE}
```
"""
