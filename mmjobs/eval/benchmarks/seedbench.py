"""`seedbench`: SEED-Bench-1 multiple-choice questions on images, scored by `--metric seedbench`.

Official layout (AILab-CVC/SEED-Bench `DATASET.md`, SEED-Bench-1; images from the Hugging Face
dataset, as LLaVA-1.5's eval expects them)::

    <root>/SEED-Bench.json     {"questions": [{"answer": "A", "choice_a": "One", ...,
                                 "choice_d": "Four", "data_id": "1454426_2591111986",
                                 "data_type": "image", "question": "...",
                                 "question_id": "101669", "question_type_id": 5}, ...],
                                "question_type": {"Scene Understanding": 1, ...}}
    <root>/SEED-Bench-image/<data_id>      (file names are the data ids, no extension)

Only image questions (dimensions 1-9) are loaded: the video dimensions need frames extracted
from three other datasets. Items: id = question_id; fields `answer`, `question_type_id`,
`data_type`. Prompt: LLaVA-1.5's (`llava-seed-bench.jsonl`): `<image>\\n{question}` +
"\\nA. {choice_a}" ... "\\nD. {choice_d}" + "\\nAnswer with the option's letter from the
given choices directly." (`prompt_suffix`). The JSON is streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    LETTER_PROMPT,
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    lettered,
    require_files,
    stream_json,
    with_image_tokens,
)

LAYOUT = "SEED-Bench.json, SEED-Bench-image/<data_id>"
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


class SEEDBenchOptions(BenchmarkOptions):
    """Options of the `seedbench` loader."""

    file: str = Field("SEED-Bench.json", description="Questions JSON under root.")
    image_dir: str = Field("SEED-Bench-image", description="Image folder under root.")
    prompt_suffix: str = Field(LETTER_PROMPT, description="Appended to each prompt.")


def load(root: str, opts: SEEDBenchOptions) -> Iterator[BenchmarkItem]:
    """Check the layout, then stream the image questions (see module doc)."""
    require_files("SEED-Bench", root, [opts.file, opts.image_dir.rstrip("/") + "/"],
                  LAYOUT.replace("SEED-Bench.json", opts.file))
    return _items(root, opts)


def _image_questions(uri: str) -> Iterator[dict]:
    for q in stream_json(uri, "questions.item"):
        if isinstance(q, dict) and q.get("data_type", "image") == "image":
            yield q


def question_fields(q: Any, uri: str) -> dict[str, Any]:
    """The metric fields of one SEED-Bench question: `answer`, `question_type_id`,
    `data_type`."""
    try:
        return {"answer": str(q["answer"]), "question_type_id": int(q["question_type_id"]),
                "data_type": str(q.get("data_type", "image"))}
    except (KeyError, TypeError, ValueError) as e:
        qid = q.get("question_id") if isinstance(q, dict) else None
        raise BenchmarkError(f"{uri}: question {qid!r} lacks answer/question_type_id "
                             f"({type(e).__name__}: {e})") from e


def _items(root: str, opts: SEEDBenchOptions) -> Iterator[BenchmarkItem]:
    uri = storage.join(root, opts.file)
    for q in islice(_image_questions(uri), opts.limit):
        fields = question_fields(q, uri)
        try:
            choices = [str(q[c]) for c in CHOICES]
            prompt = f"{q['question']}\n{lettered(choices)}{opts.prompt_suffix}"
            image = storage.join(root, opts.image_dir, str(q["data_id"]))
            qid = str(q["question_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise BenchmarkError(f"{uri}: question {q.get('question_id')!r} lacks "
                                 f"{e.args[0] if isinstance(e, KeyError) else 'a valid field'}"
                                 f" ({type(e).__name__})") from e
        yield BenchmarkItem(id=qid, prompt=with_image_tokens(prompt, 1), images=[image],
                            fields=fields)


BENCHMARK = Benchmark(name="seedbench", title="SEED-Bench", metric="seedbench",
                      options=SEEDBenchOptions, load=load, layout=LAYOUT)
