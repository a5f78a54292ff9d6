"""`llava-questions`: LLaVA-1.5's evaluation question files, as `model_vqa_loader` reads them.

LLaVA ships each benchmark as a JSONL question file (`playground/data/eval/*/`, e.g.
`llava_gqa_testdev_balanced.jsonl`, `MME/llava_mme.jsonl`, `llava-seed-bench.jsonl`,
`llava_vqav2_mscoco_test-dev2015.jsonl`), one question per line::

    {"question_id": "201307251", "image": "n161313.jpg",
     "text": "Is it overcast?\\nAnswer the question using a single word or phrase.",
     "category": "default"}

`root` is the file itself, or a folder holding it (`file` option). Images are relative to
`image_root` (default: the file's folder; LLaVA passes `--image-folder`).

Items: the prompt is `<image>\\n` + `text`, as `llava/eval/model_vqa_loader.py` builds it (the
text already carries LLaVA's answer-format instruction); rows without `image` are text-only.
`fields` keep `question_id` exactly as written (a string stays a string: GQA's "2062325" and
"201307251" are different lengths and must not be cast) and every other field (`category`,
...), so answers can be joined back to ground truth by the same key.

Ids: the `question_id`, as a string. It is not unique in every file — both questions of an
MME image share one (`llava_mme.jsonl`) — so a repeated id gets `#<n>` for its n-th repeat
(`"code_reasoning/0020.png"`, `"code_reasoning/0020.png#1"`); LLaVA writes its answers in
question-file order, which is how the repeats are told apart there too.

Options: `file` (default `questions.jsonl` under a folder root), `image_root`, `limit`.
The metric is chosen by the user (`mmjobs score --metric ...`), as with `jsonl`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    with_image_tokens,
)
from mmjobs.eval.benchmarks.jsonl import locate

DEFAULT_FILE = "questions.jsonl"
LAYOUT = ("LLaVA's question JSONL (root itself, or <root>/questions.jsonl / the `file` option) "
          "with question_id, image, text[, category]")


class LLaVAQuestionsOptions(BenchmarkOptions):
    """Options of the `llava-questions` loader."""

    file: str = Field(DEFAULT_FILE, description="JSONL name under root (ignored when root is "
                      "the .jsonl itself).")
    image_root: str | None = Field(None, description="Folder (or s3:// prefix) the `image` "
                                   "paths are relative to (LLaVA's --image-folder); default the "
                                   "JSONL's folder.")


def load(root: str, opts: LLaVAQuestionsOptions) -> Iterator[BenchmarkItem]:
    """Check the file exists, then stream its questions."""
    uri, image_root = locate(root, opts.file, opts.image_root, (".jsonl",), "LLaVA questions",
                             LAYOUT)
    return _items(uri, image_root, opts)


def _rows(uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in storage.iter_lines(uri):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BenchmarkError(f"{uri}: line {n}: not JSON ({e})") from e
        qid = row.get("question_id") if isinstance(row, dict) else None
        if qid is None or isinstance(qid, bool) or not isinstance(row.get("text"), str):
            raise BenchmarkError(f"{uri}: line {n}: expected an object with question_id and a "
                                 "string 'text' (LLaVA's question format)")
        image = row.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise BenchmarkError(f"{uri}: line {n}: 'image' must be a path")
        yield n, row


def _items(uri: str, image_root: str, opts: LLaVAQuestionsOptions) -> Iterator[BenchmarkItem]:
    seen: Counter[str] = Counter()
    for _, row in islice(_rows(uri), opts.limit):
        qid = str(row["question_id"])
        item_id = f"{qid}#{seen[qid]}" if seen[qid] else qid
        seen[qid] += 1
        image = row.get("image")
        images = [] if image is None else [
            image if storage.is_s3(image) or os.path.isabs(image)
            else storage.join(image_root, image)]
        fields = {k: v for k, v in row.items() if k not in ("text", "image")}
        yield BenchmarkItem(id=item_id, prompt=with_image_tokens(row["text"], len(images)),
                            images=images, fields=fields)


BENCHMARK = Benchmark(name="llava-questions", title="LLaVA questions", metric=None,
                      options=LLaVAQuestionsOptions, load=load, layout=LAYOUT)
