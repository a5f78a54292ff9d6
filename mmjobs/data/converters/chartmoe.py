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
    mix_base, given_num: for a data-mix input (below).

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

A data-mix file as the converter's input (a name ending in `.txt`) converts the mix ChartMoE
trains on: every listed JSON file, drawn as `train.py` draws it (`MixEntry.rows`), seeded by
the prepare stage's `seed` (the same seed draws the same rows). The listed paths are relative
to `mix_base` (default `..`: ChartMoE keeps its mixes in `chartmoe/train/data/` and runs from
`chartmoe/train`), itself relative to the mix file's folder unless absolute or `s3://`; image
paths inside the JSON files are taken as ChartMoE takes them, relative to the prepare stage's
image root (set it to the same folder). Every file is read once to count its rows before
anything is drawn, so a missing or broken file fails the conversion before any output. Ids
become `{id_prefix}{file stem}:{id}`, a duplicate's `...#{copy}` (1, 2, ...), keeping them
unique across files and copies; `meta.mix_file` names the mix line's path. A bad row yields one
reject per draw, so drawn rows = accepted + rejected. Unlike `train.py` (`int("0.5")` fails
there), a fractional amount such as 0.5 (500 rows) is accepted.
"""

from __future__ import annotations

import posixpath
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import (
    RowError,
    build,
    convert_rows,
    convert_turns,
    extras,
    file_stem,
    get_id,
    get_images,
    iter_rows,
    require_input,
    resolve_options,
    row_label,
)
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject

CHARTMOE_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                  "system": "system"}


MIX_OPTIONS = {"mix_base": "..", "given_num": True}
RowFn = Callable[[dict[str, Any], str], Record]


@register("chartmoe", help="ChartMoE / InternLM-XComposer2 JSON (image list, <ImageHere>), or "
          "a ChartMoE data-mix .txt listing such files")
def convert_chartmoe(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert a ChartMoE-format file, or the data mix a `.txt` lists; see the module
    docstring for the formats and options."""
    uri = require_input(ctx, "chartmoe")
    opts = resolve_options(ctx, "chartmoe", {"placeholder": "<ImageHere>", "id_prefix": "",
                                             **MIX_OPTIONS})
    if uri.lower().endswith(".txt"):
        yield from _convert_mix(uri, opts, ctx.seed)
        return
    stray = sorted(k for k in MIX_OPTIONS if k in ctx.options)
    if stray:
        raise ValueError(f"converter 'chartmoe': option(s) {', '.join(stray)} apply to a "
                         f"data-mix .txt input only, and {uri} is not one; drop them")
    one = _row_fn(opts["placeholder"], opts["id_prefix"])
    yield from convert_rows(uri, lambda data, index, locator: one(data, ""))


def _row_fn(placeholder: str, prefix: str) -> RowFn:
    """Converts one ChartMoE row; the second argument is appended to its id (`#copy`)."""

    def rewrite(text: str) -> str:
        return text.strip().replace(placeholder, IMAGE_TOKEN)

    def one(data: dict[str, Any], suffix: str) -> Record:
        record_id = get_id(data, prefix=prefix) + suffix
        images = get_images(data, "image")
        turns = convert_turns(data.get("conversations"), CHARTMOE_ROLES, rewrite=rewrite)
        meta = extras(data, {"id", "image", "conversations"}, "chartmoe")
        return build("sample", {"id": record_id, "images": images, "conversations": turns,
                                "meta": meta})

    return one


def _convert_mix(uri: str, opts: dict[str, Any], seed: int) -> Iterator[Record | Reject]:
    """Every file of the data mix `uri`, drawn as ChartMoE's train.py draws it."""
    entries = read_data_mix(uri, given_num=opts["given_num"])
    base = mix_base(uri, opts["mix_base"])
    rng = random.Random(seed)
    plans = []
    for entry in entries:  # count (and so check) every file before drawing from any
        try:
            source = entry.resolve(base)
        except ValueError as e:
            raise ValueError(f"{uri}: {e}") from None
        available = sum(1 for _ in iter_rows(source))
        wanted = entry.rows(available, given_num=opts["given_num"])
        if available == 0 and wanted > 0:
            raise ValueError(f"{uri} line {entry.line}: {source} has no rows to draw "
                             f"{wanted} from; fix the file or drop the line")
        plans.append((entry, source, draw_counts(available, wanted, rng)))
    for entry, source, times in plans:
        one = _row_fn(opts["placeholder"], f"{opts['id_prefix']}{file_stem(source)}:")
        for index, raw in enumerate(iter_rows(source)):
            for copy in range(times[index]):
                yield _mix_item(one, raw, copy, entry, source)


def _mix_item(one: RowFn, raw: Any, copy: int, entry: MixEntry, source: str
              ) -> Record | Reject:
    if raw.error is not None:
        return Reject(raw.locator, raw.error, source)
    if not isinstance(raw.data, dict):
        return Reject(raw.locator, "row is not a JSON object", source)
    try:
        record = one(raw.data, f"#{copy}" if copy else "")
    except RowError as e:
        return Reject(row_label(raw.data, raw.locator), str(e), source)
    record.meta["mix_file"] = entry.path
    return record


def draw_counts(available: int, wanted: int, rng: random.Random) -> list[int]:
    """How often each of `available` rows is drawn to give `wanted` (train.py's rule): all
    rows plus random duplicates when short, else a sample without replacement."""
    if wanted >= available:
        times = [1] * available
        for _ in range(wanted - available):
            times[rng.randrange(available)] += 1
        return times
    times = [0] * available
    for i in rng.sample(range(available), wanted):
        times[i] = 1
    return times


def mix_base(uri: str, base: str) -> str:
    """The folder a mix's paths are relative to: `base` itself when absolute or `s3://`,
    else `base` under the mix file's folder."""
    if storage.is_s3(base) or base.startswith("/"):
        return base
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    scheme = "s3://" if storage.is_s3(folder) else ""
    joined = posixpath.normpath(posixpath.join(folder[len(scheme):], base))
    if scheme and (joined.startswith("..") or joined == "."):  # above the bucket
        raise ValueError(f"{uri}: mix_base {base!r} leaves the bucket; give an s3:// URI")
    return scheme + joined


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
