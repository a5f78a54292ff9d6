"""`chartmoe`: ChartMoE / InternLM-XComposer2 fine-tuning JSON to canonical samples.

Source format (IDEA-FinAI/ChartMoE `chartmoe/train/README.md`, read by
`chartmoe/train/data_mix.py`): a top-level JSON array (or `.jsonl`) of::

    {"id": "0", "image": ["ChartMoE-Align/table/0.png"],
     "conversations": [{"from": "user", "value": "<ImageHere> Convert the chart to a table."},
                       {"from": "assistant", "value": "| year | sales |\\n| 2020 | 3 |"}]}

`image` is a LIST of paths (a single string is accepted too); rows without it are text-only.
Roles: user (or human) → user, assistant (or gpt) → assistant, system → system; `data_mix.py`'s
`conv2text` accepts the same user/assistant spellings. Like `conv2text`, each value is
stripped. The `<ImageHere>` placeholder becomes the canonical `<image>`. Other fields go to
`meta`, with `meta.source = "chartmoe"`.

Options:
    placeholder: the image placeholder to replace (default "<ImageHere>").
    id_prefix: prepended to every id (default ""). ChartMoE's table/json/code alignment files
        each number their rows from "0", so merging them needs distinct prefixes.

Rejected rows: as for `llava` (missing id, missing/empty conversations, unknown role,
non-string value, malformed `image`).

Data-mix files. ChartMoE's training scripts take a `.txt` listing the JSON files to mix, one
`path amount` per line separated by one space (`chartmoe/train/data/sft.txt`:
`./data/chartqa.json 70` / `./data/chartgemma.json -1`). `read_data_mix` parses one into
`MixEntry`s, and `MixEntry.rows` says how many rows `chartmoe/train/train.py` draws from each
file: with `--given_num True` (all four of ChartMoE's train scripts) the amount is in
THOUSANDS of rows (`int(float(n) * 1000)`: 70 -> 70,000) and -1 means every row; without it
the amount is a ratio of the file's rows (none = every row). A file with fewer rows than asked
is padded with random duplicates, a larger one sampled without replacement.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import (
    build,
    convert_rows,
    convert_turns,
    extras,
    get_id,
    get_images,
    require_input,
    resolve_options,
)
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject

CHARTMOE_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                  "system": "system"}


@register("chartmoe", help="ChartMoE / InternLM-XComposer2 JSON (image list, <ImageHere>)")
def convert_chartmoe(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert a ChartMoE-format file; see the module docstring for the format and options."""
    uri = require_input(ctx, "chartmoe")
    opts = resolve_options(ctx, "chartmoe", {"placeholder": "<ImageHere>", "id_prefix": ""})
    placeholder = opts["placeholder"]

    def rewrite(text: str) -> str:
        return text.strip().replace(placeholder, IMAGE_TOKEN)

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"])
        images = get_images(data, "image")
        turns = convert_turns(data.get("conversations"), CHARTMOE_ROLES, rewrite=rewrite)
        meta = extras(data, {"id", "image", "conversations"}, "chartmoe")
        return build("sample", {"id": record_id, "images": images, "conversations": turns,
                                "meta": meta})

    yield from convert_rows(uri, one)


# --------------------------------------------------------------------------- data-mix files


@dataclass(frozen=True)
class MixEntry:
    """One line of a ChartMoE data-mix file.

    Attributes:
        path: the JSON file as written (ChartMoE's paths are relative to `chartmoe/train`).
        amount: the number after the path (thousands of rows, -1, or a ratio); None if absent.
        line: the line number, for messages.
    """

    path: str
    amount: float | None
    line: int

    def rows(self, available: int, *, given_num: bool = True) -> int:
        """Rows ChartMoE's train.py draws from this file when it holds `available` rows."""
        if self.amount is None or (given_num and self.amount == -1):
            return available
        return int(self.amount * 1000) if given_num else int(available * self.amount)

    def resolve(self, base: str) -> str:
        """The file's URI, `path` taken relative to `base` (the folder train.py ran in)."""
        rel = posixpath.normpath(self.path)
        if storage.is_s3(rel) or rel.startswith("/"):
            return self.path
        if rel.startswith("../"):
            raise ValueError(f"data-mix line {self.line}: {self.path!r} leaves the base "
                             f"folder {base}; list files inside it")
        return storage.join(base, rel)


def parse_data_mix(text: str, source: str = "data mix", *, given_num: bool = True
                   ) -> list[MixEntry]:
    """Parse a data-mix file's text; every bad line is named in one `ValueError`.

    Blank lines are skipped (train.py would try to open a file named ""). With `given_num`
    each line must have an amount, as train.py asserts.
    """
    entries: list[MixEntry] = []
    errors: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split(" ")  # one space, as train.py splits: two spaces are an error there
        amount: float | None = None
        if len(fields) == 2:
            try:
                amount = float(fields[1])
            except ValueError:
                errors.append(f"line {n}: amount {fields[1]!r} is not a number")
                continue
            if amount < 0 and amount != -1:
                errors.append(f"line {n}: amount {fields[1]} is negative (only -1, meaning "
                              "every row, is allowed)")
                continue
        elif len(fields) != 1 or given_num:
            errors.append(f"line {n}: expected 'path amount' separated by one space, got "
                          f"{line!r}")
            continue
        entries.append(MixEntry(fields[0], amount, n))
    if errors:
        raise ValueError(f"{source}: " + "; ".join(errors))
    if not entries:
        raise ValueError(f"{source}: lists no files")
    return entries


def read_data_mix(uri: str, *, given_num: bool = True) -> list[MixEntry]:
    """Read and parse a ChartMoE data-mix `.txt` (local path or `s3://`)."""
    return parse_data_mix(storage.read_text(uri), uri, given_num=given_num)
