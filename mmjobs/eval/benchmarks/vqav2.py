"""`vqav2`: VQAv2 open-ended questions with their 10 answers, scored by `--metric vqav2`.

Official layout (visualqa.org, with the COCO images)::

    <root>/v2_OpenEnded_mscoco_<split>_questions.json  {"questions": [{"image_id": 42,
                                                          "question": "...",
                                                          "question_id": 420}, ...], ...}
    <root>/v2_mscoco_<split>_annotations.json          {"annotations": [{"question_id": 420,
                                                          "answers": [{"answer": "..."} x 10],
                                                          "answer_type": "yes/no", ...}, ...]}
    <root>/<image split>/COCO_<image split>_<image_id:012d>.jpg

The image split is the split itself, except `test-dev2015`, whose images are in `test2015`.
Test splits have no annotations: their items carry no `answers` (submit them to the
evaluation server; LLaVA-1.5 reports test-dev this way). Both JSON files are streamed (val2014
is ~0.5 GB); they list questions in the same order, so they are joined in lockstep, and only
if the order ever differs are the remaining annotations indexed by question id.

Items: id = str(question_id); fields `answers` (the 10 annotator answers), `answer_type` and
`question_type` (the metric's per-type breakdowns).
Prompt: LLaVA-1.5's (`llava_vqav2_mscoco_test-dev2015.jsonl`): `<image>\\n{question}` +
"\\nAnswer the question using a single word or phrase." (`prompt_suffix`).
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
from mmjobs.logs import get_logger

log = get_logger(__name__)
LAYOUT = ("v2_OpenEnded_mscoco_<split>_questions.json, v2_mscoco_<split>_annotations.json "
          "(not for test splits), <image split>/COCO_<image split>_<image_id:012d>.jpg")


class VQAv2Options(BenchmarkOptions):
    """Options of the `vqav2` loader."""

    split: str = Field("val2014", description="val2014, train2014, test-dev2015, test2015.")
    image_dir: str | None = Field(None, description="Image folder under root; default the "
                                  "image split (test-dev2015 -> test2015).")
    prompt_suffix: str = Field(SHORT_ANSWER_PROMPT, description="Appended to each question.")


def image_split(split: str) -> str:
    """The COCO folder holding a VQAv2 split's images."""
    return "test2015" if split == "test-dev2015" else split


def load(root: str, opts: VQAv2Options) -> Iterator[BenchmarkItem]:
    """Check the layout, then stream questions joined with their annotations."""
    questions = f"v2_OpenEnded_mscoco_{opts.split}_questions.json"
    annotations = f"v2_mscoco_{opts.split}_annotations.json"
    image_dir = opts.image_dir or image_split(opts.split)
    has_answers = not opts.split.startswith("test")
    required = [questions, *([annotations] if has_answers else []), image_dir + "/"]
    require_files("VQAv2", root, required, LAYOUT.replace("<split>", opts.split))
    if not has_answers:
        log.info("VQAv2 %s has no public answers: items carry no `answers`; score them on the "
                 "evaluation server", opts.split)
    return _items(root, opts, questions, annotations if has_answers else None, image_dir)


def _items(root: str, opts: VQAv2Options, questions: str, annotations: str | None,
           image_dir: str) -> Iterator[BenchmarkItem]:
    q_uri = storage.join(root, questions)
    stream = _annotations(storage.join(root, annotations)) if annotations else None
    for q in islice(stream_json(q_uri, "questions.item"), opts.limit):
        try:
            qid, image_id, text = int(q["question_id"]), int(q["image_id"]), str(q["question"])
        except (KeyError, TypeError, ValueError) as e:
            raise BenchmarkError(f"{q_uri}: question {q!r:.120} lacks question_id/image_id/"
                                 "question") from e
        fields: dict[str, Any] = {}
        if stream is not None:
            fields = stream.send(qid)
        name = f"COCO_{image_split(opts.split)}_{image_id:012d}.jpg"
        yield BenchmarkItem(id=str(qid), prompt=with_image_tokens(text + opts.prompt_suffix, 1),
                            images=[storage.join(root, image_dir, name)], fields=fields)


def annotation_fields(a: dict[str, Any]) -> dict[str, Any]:
    """The metric fields of one VQA annotation: the 10 `answers`, `answer_type`,
    `question_type`."""
    answers = [str(x["answer"]) for x in a.get("answers", [])]
    out: dict[str, Any] = {"answers": answers}
    for key in ("answer_type", "question_type"):
        if a.get(key) is not None:
            out[key] = str(a[key])
    return out


def _annotations(uri: str) -> Any:
    """A coroutine: send a question id, receive that question's fields.

    Walks the annotations in file order while the ids match; on the first mismatch it indexes
    the rest of the file (answers only) and serves from the index.
    """
    fields = annotation_fields
    def run() -> Any:
        stream = stream_json(uri, "annotations.item")
        index: dict[int, dict[str, Any]] | None = None
        result: dict[str, Any] = {}
        while True:
            qid = yield result
            if index is None:
                a = next(stream, None)
                if a is not None and int(a.get("question_id", -1)) == qid:
                    result = fields(a)
                    continue
                log.info("VQAv2: %s is not in question order; indexing it", uri)
                index = {}
                if a is not None:
                    index[int(a["question_id"])] = fields(a)
                for a in stream:
                    index[int(a["question_id"])] = fields(a)
            if qid not in index:
                raise BenchmarkError(f"VQAv2: question {qid} has no annotation in {uri}")
            result = index.pop(qid)

    coroutine = run()
    next(coroutine)  # advance to the first `yield`
    return coroutine


BENCHMARK = Benchmark(name="vqav2", title="VQAv2", metric="vqav2", options=VQAv2Options,
                      load=load, layout=LAYOUT)
