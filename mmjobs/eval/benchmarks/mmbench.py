"""`mmbench`: an MMBench TSV (images inside, base64), scored by `--metric mmbench`.

Official layout: one TSV (OpenMMLab's `mmbench_dev_20230712.tsv`, VLMEvalKit's
`MMBench_DEV_EN.tsv`, ...), either `root` itself or `<root>/<file>`, with a header row and
the columns ``index, question, hint, A, B, C, D[, E...], answer, category, image, ...``
(``answer`` is absent from test sets: such items have no `gt` and can only be submitted).

Images are base64 in the ``image`` column. They are decoded once into a local cache folder
(`cache_dir`, default `$MMJOBS_HOME/cache/mmbench/<hash of the TSV URI>/<index>.<ext>`) and
items refer to those files. VLMEvalKit TSVs store an image once and put the index of the row
holding it in the ``image`` cell of the others; that row must come first (it does in their
files). The TSV is read as a stream, never whole.

Items: id = str(index); fields `index`, `options` (letter -> text), `gt` (the answer letter)
and `category`. The prompt is LLaVA-1.5's (haotian-liu/LLaVA `llava/eval/model_vqa_mmbench.py`
with `--single-pred-prompt`): `<image>\\n`, the hint and a newline when there is one, the
question, "\\nA. x" per option (stopping at the first missing option, as LLaVA's `get_options`
does), then "\\nAnswer with the option's letter from the given choices directly."

Circular evaluation: `mmbench_dev_20230712.tsv` already holds the rotated copies (index
``i + k * 1_000_000``), so by default rows are loaded as they are. `circular: true` generates
the copies for a TSV of main questions only, the way the metric expects them
(`mmjobs.eval.metrics.mmbench`): for a question with n options, copies k = 1..n-1 rotate the
options left by k (LLaVA's ``options[1:] + options[:1]``, applied k times) with the answer
letter moved accordingly. Copies already in the file are then skipped, with a warning, so
groups are never doubled.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from mmjobs import settings, storage
from mmjobs.eval.benchmarks.base import (
    LETTER_PROMPT,
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    MissingBenchmarkFilesError,
    lettered,
    with_image_tokens,
)
from mmjobs.eval.metrics.mmbench import CIRCULAR_OFFSET
from mmjobs.logs import get_logger

log = get_logger(__name__)
DEFAULT_FILE = "mmbench_dev_20230712.tsv"
LAYOUT = (f"a TSV file (root itself, or <root>/{DEFAULT_FILE} / the `file` option) with columns "
          "index, question, hint, A, B, C, D, answer, category, image (base64)")
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"RIFF", "webp"),
          (b"BM", "bmp"))
_REQUIRED_COLUMNS = ("index", "question", "A", "B", "image")


class MMBenchOptions(BenchmarkOptions):
    """Options of the `mmbench` loader."""

    file: str = Field(DEFAULT_FILE, description="TSV name under root (ignored when root is "
                      "the .tsv itself).")
    circular: bool = Field(False, description="Generate the rotated copies (index + k*1e6).")
    cache_dir: str | None = Field(None, description="Local folder for the decoded images; "
                                  "default $MMJOBS_HOME/cache/mmbench/<hash of the TSV URI>.")
    prompt_suffix: str = Field(LETTER_PROMPT, description="Appended to each prompt.")


def tsv_uri(root: str, opts: MMBenchOptions) -> str:
    """The TSV a root and options name."""
    return root if root.lower().endswith(".tsv") else storage.join(root, opts.file)


def image_cache(tsv: str, opts: MMBenchOptions) -> Path:
    """Where this TSV's images are decoded to."""
    if opts.cache_dir:
        return Path(opts.cache_dir).expanduser().absolute()
    return settings.home() / "cache" / "mmbench" / hashlib.sha256(tsv.encode()).hexdigest()[:16]


def load(root: str, opts: MMBenchOptions) -> Iterator[BenchmarkItem]:
    """Check the TSV exists, then stream its rows (and circular copies) as items."""
    tsv = tsv_uri(root, opts)
    if not storage.exists(tsv):
        raise MissingBenchmarkFilesError(
            f"MMBench: missing {tsv}; expected the official layout: {LAYOUT}")
    return _items(tsv, opts, image_cache(tsv, opts))


def read_tsv(tsv: str, required: tuple[str, ...] = _REQUIRED_COLUMNS, layout: str = LAYOUT
             ) -> Iterator[dict[str, str]]:
    """Stream the rows of an MMBench-style TSV (header row; quoted cells may span lines).

    Raises `BenchmarkError` when a `required` column is missing, naming `layout`.
    """
    # Base64 images are far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with storage.open_read(tsv) as raw:
        text = io.TextIOWrapper(_Readable(raw), encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text, delimiter="\t")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"MMBench: {tsv} lacks the column(s) {', '.join(missing)}; "
                                 f"expected {layout}")
        yield from reader


class _Readable(io.RawIOBase):
    """A raw stream over any `read(n)` object (S3 bodies), so TextIOWrapper can decode it."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def is_missing(value: str | None) -> bool:
    """LLaVA's `is_none`: empty, "nan" or "none" (pandas writes NaN as an empty cell)."""
    return value is None or value.strip().lower() in ("", "nan", "none")


def _items(tsv: str, opts: MMBenchOptions, cache: Path) -> Iterator[BenchmarkItem]:
    cache.mkdir(parents=True, exist_ok=True)
    decoded: dict[str, str] = {}  # row index -> image file (for rows that refer to another's)
    skipped_copies = 0
    for n, row in enumerate(read_tsv(tsv), start=2):  # line 1 is the header
        if opts.limit is not None and n - 2 >= opts.limit:
            break
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError):
            raise BenchmarkError(f"{tsv}: line {n}: index {row['index']!r} is not a number") \
                from None
        if opts.circular and index >= CIRCULAR_OFFSET:
            skipped_copies += 1
            continue
        image = _image(row, index, decoded, cache, tsv, n)
        texts = []
        for letter in string.ascii_uppercase:
            if letter not in row or is_missing(row[letter]):
                break  # LLaVA get_options: the options end at the first missing one
            texts.append(row[letter])
        answer = None if is_missing(row.get("answer")) else row["answer"].strip()
        rotations = range(max(len(texts), 1)) if opts.circular and index < CIRCULAR_OFFSET else [0]
        for k in rotations:
            rotated = texts[k:] + texts[:k]
            gt = None
            if answer is not None and answer in string.ascii_uppercase[:len(texts)]:
                gt = string.ascii_uppercase[(string.ascii_uppercase.index(answer) - k)
                                            % len(texts)]
            yield _item(row, index + k * CIRCULAR_OFFSET, rotated, gt, image, opts)
    if skipped_copies:
        log.warning("MMBench: %s already holds %d circular copies; skipped them because "
                    "circular: true generates its own", tsv, skipped_copies)


def _item(row: dict[str, str], index: int, texts: list[str], gt: str | None, image: str,
          opts: MMBenchOptions) -> BenchmarkItem:
    question = row["question"]
    if not is_missing(row.get("hint")):
        question = row["hint"] + "\n" + question
    prompt = f"{question}\n{lettered(texts)}{opts.prompt_suffix}"
    fields: dict[str, Any] = {"index": index,
                              "options": dict(zip(string.ascii_uppercase, texts, strict=False))}
    if gt is not None:
        fields["gt"] = gt
    if not is_missing(row.get("category")):
        fields["category"] = row["category"]
    return BenchmarkItem(id=str(index), prompt=with_image_tokens(prompt, 1), images=[image],
                         fields=fields)


def _image(row: dict[str, str], index: int, decoded: dict[str, str], cache: Path, tsv: str,
           line: int) -> str:
    """The cached image file of a row, decoding it on first sight."""
    value = (row.get("image") or "").strip()
    if len(value) <= 64 and value.lstrip("-").isdigit():  # VLMEvalKit: "see row <value>"
        if value not in decoded:
            raise BenchmarkError(f"{tsv}: line {line}: the image of index {index} refers to "
                                 f"row {value}, which has not appeared before it")
        decoded[str(index)] = decoded[value]
        return decoded[value]
    try:
        data = base64.b64decode(value, validate=False)
    except ValueError as e:
        raise BenchmarkError(f"{tsv}: line {line}: image of index {index} is not base64 "
                             f"({e})") from e
    ext = next((e for magic, e in _MAGIC if data.startswith(magic)), None)
    if ext is None:
        raise BenchmarkError(f"{tsv}: line {line}: image of index {index} is not a PNG, JPEG, "
                             "GIF, WebP or BMP")
    path = cache / f"{index}.{ext}"
    if not path.exists() or path.stat().st_size != len(data):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file
    decoded[str(index)] = str(path)
    return str(path)


BENCHMARK = Benchmark(name="mmbench", title="MMBench", metric="mmbench", options=MMBenchOptions,
                      load=load, layout=LAYOUT)
