"""`gqa`: GQA balanced questions (default test-dev), scored by `--metric gqa`.

Official layout (cs.stanford.edu/people/dorarad/gqa: `questions1.2.zip` and `images.zip`)::

    <root>/testdev_balanced_questions.json   {qid: {"imageId": "n161313", "question": "...",
                                               "answer": "no", "isBalanced": true,
                                               "types": {"structural": "verify", ...}, ...}}
    <root>/images/<imageId>.jpg

Items: id = qid; fields `answer`, `is_balanced` and `structural_type` (GQA eval.py's
binary/open split). Prompt: LLaVA-1.5's GQA prompt (`llava_gqa_testdev_balanced.jsonl`):
`<image>\\n{question}` + "\\nAnswer the question using a single word or phrase."
(`prompt_suffix`). The questions file is streamed (the train files are over 1 GB).

Options: `questions` (file name under root, e.g. `val_balanced_questions.json`), `image_dir`
(default `images`; LLaVA's eval layout keeps them in `data/images`), `prompt_suffix`, `limit`.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    SHORT_ANSWER_PROMPT,
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    require_files,
    stream_json,
    with_image_tokens,
)

DEFAULT_QUESTIONS = "testdev_balanced_questions.json"
LAYOUT = f"{DEFAULT_QUESTIONS}, images/<imageId>.jpg"


class GQAOptions(BenchmarkOptions):
    """Options of the `gqa` loader."""

    questions: str = Field(DEFAULT_QUESTIONS, description="Questions JSON under root.")
    image_dir: str = Field("images", description="Image folder under root.")
    prompt_suffix: str = Field(SHORT_ANSWER_PROMPT, description="Appended to each question.")


def load(root: str, opts: GQAOptions) -> Iterator[BenchmarkItem]:
    """Check the layout, then stream the questions (see module doc)."""
    require_files("GQA", root, [opts.questions, opts.image_dir.rstrip("/") + "/"], LAYOUT)
    return _items(root, opts)


def question_fields(qid: str, q: Any, uri: str) -> dict[str, Any]:
    """The metric fields of one question of a GQA questions file (see the module docstring)."""
    if not isinstance(q, dict) or not all(k in q for k in ("imageId", "question", "answer")):
        raise BenchmarkError(f"{uri}: question {qid} lacks imageId/question/answer")
    fields = {"answer": str(q["answer"]), "is_balanced": bool(q.get("isBalanced", True))}
    structural = (q.get("types") or {}).get("structural")
    if structural is not None:
        fields["structural_type"] = str(structural)
    return fields


def _items(root: str, opts: GQAOptions) -> Iterator[BenchmarkItem]:
    uri = storage.join(root, opts.questions)
    for qid, q in islice(stream_json(uri, "", kv=True), opts.limit):
        fields = question_fields(qid, q, uri)
        yield BenchmarkItem(
            id=str(qid), prompt=with_image_tokens(q["question"] + opts.prompt_suffix, 1),
            images=[storage.join(root, opts.image_dir, f"{q['imageId']}.jpg")], fields=fields)


BENCHMARK = Benchmark(name="gqa", title="GQA", metric="gqa", options=GQAOptions, load=load,
                      layout=LAYOUT)
