"""`mme`: the MME benchmark (14 yes/no subtasks), scored by `--metric mme`.

Official layout (`MME_Benchmark_release_version/`, from BradyFU/Awesome-Multimodal-Large-
Language-Models, Evaluation branch; also accepted one level up, with `MME_Benchmark/` inside).
Each image has a `<stem>.txt` with two lines `question<TAB>Yes|No`; where they live depends on
the task:

    <root>/<task>/questions_answers_YN/<stem>.txt + <root>/<task>/images/<stem>.jpg|png
        (artwork, celebrity, landmark, posters, scene)
    <root>/<task>/<stem>.txt + <root>/<task>/<stem>.jpg|png
        (existence, count, position, color, OCR, commonsense_reasoning, numerical_calculation,
         text_translation, code_reasoning)

The loader does not hard-code which task is which: a task with a `questions_answers_YN/`
folder is read from there and `images/`, any other from its own folder.

Items: id `"<task>/<image>/<0|1>"`, fields `task`, `image` (the image file name; the metric
pairs an image's two questions by it) and `gt` (`yes`/`no`). The prompt is the question as
written (it already ends with "Please answer yes or no."), plus `prompt_suffix` (default none;
LLaVA-1.5's `llava_mme.jsonl` adds "\\nAnswer the question using a single word or phrase.").

Options: `tasks` (default all 14), `prompt_suffix`, `limit` (images per task).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

from pydantic import Field, field_validator

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    MissingBenchmarkFilesError,
    with_image_tokens,
)
from mmjobs.eval.metrics.mme import COGNITION, PERCEPTION

TASKS = (*PERCEPTION, *COGNITION)
QA_DIR, IMAGE_DIR = "questions_answers_YN", "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
LAYOUT = ("<task>/questions_answers_YN/<stem>.txt + <task>/images/<stem>.<jpg|png>, or "
          "<task>/<stem>.txt + <task>/<stem>.<jpg|png>, for the tasks " + ", ".join(TASKS))


class MMEOptions(BenchmarkOptions):
    """Options of the `mme` loader."""

    tasks: list[str] = Field(default_factory=lambda: list(TASKS), min_length=1,
                             description="Subtasks to load (folder names).")
    prompt_suffix: str = Field("", description="Appended to each question.")

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown MME task(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(TASKS)}")
        return value


def load(root: str, opts: MMEOptions) -> Iterator[BenchmarkItem]:
    """List the layout once, check every task folder, then stream the questions."""
    files = {o.relpath: o.uri for o in storage.list_objects(root)}
    if not any(rel.split("/", 1)[0] in TASKS for rel in files) and any(
            rel.startswith("MME_Benchmark/") for rel in files):
        root = storage.join(root, "MME_Benchmark")  # the zip's inner folder
        files = {rel.split("/", 1)[1]: uri for rel, uri in files.items()
                 if rel.startswith("MME_Benchmark/")}
    plans = {task: _plan(task, files) for task in opts.tasks}
    missing = [storage.join(root, t) + "/" for t, p in plans.items() if not p]
    if missing:
        raise MissingBenchmarkFilesError(
            f"MME: missing {', '.join(missing)}; expected the official layout: {LAYOUT}")
    return _items(plans, opts)


def _plan(task: str, files: dict[str, str]) -> list[tuple[str, str, str]]:
    """(stem, txt URI, image URI) of every question file of `task`, sorted by stem."""
    prefix = f"{task}/{QA_DIR}/"
    split_layout = any(rel.startswith(prefix) for rel in files)
    qa_prefix, image_prefix = (prefix, f"{task}/{IMAGE_DIR}/") if split_layout else (
        f"{task}/", f"{task}/")
    images: dict[str, str] = {}
    texts: dict[str, str] = {}
    for rel, uri in files.items():
        folder, name = posixpath.split(rel)
        stem, suffix = posixpath.splitext(name)
        if folder + "/" == qa_prefix and suffix == ".txt":
            texts[stem] = uri
        if folder + "/" == image_prefix and suffix.lower() in IMAGE_SUFFIXES:
            images[stem] = uri
    plan = []
    for stem in sorted(texts):
        if stem not in images:
            raise MissingBenchmarkFilesError(
                f"MME: {texts[stem]} has no image {image_prefix}{stem}.<jpg|png>; expected the "
                f"official layout: {LAYOUT}")
        plan.append((stem, texts[stem], images[stem]))
    return plan


def _items(plans: dict[str, list[tuple[str, str, str]]],
           opts: MMEOptions) -> Iterator[BenchmarkItem]:
    # The ~1,200 question files are tiny: fetch them a few at a time (S3 round trips dominate).
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="mme") as pool:
        for task, plan in plans.items():
            chosen = list(islice(plan, opts.limit))
            texts = pool.map(storage.read_text, [txt for _, txt, _ in chosen])
            for (_, txt, image), text in zip(chosen, texts, strict=True):
                name = posixpath.basename(storage.parse(image).key)
                for k, (question, gt) in enumerate(_questions(text, txt)):
                    yield BenchmarkItem(
                        id=f"{task}/{name}/{k}",
                        prompt=with_image_tokens(question + opts.prompt_suffix, 1),
                        images=[image], fields={"task": task, "image": name, "gt": gt})


def _questions(text: str, source: str) -> list[tuple[str, str]]:
    """The (question, yes|no) lines of one MME question file."""
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        question, sep, answer = line.rstrip("\r\n").rpartition("\t")
        gt = answer.strip().lower()
        if not sep or gt not in ("yes", "no"):
            raise BenchmarkError(f"{source}: line {n} is not 'question<TAB>Yes|No': {line!r:.120}")
        pairs.append((question.strip(), gt))
    return pairs


BENCHMARK = Benchmark(name="mme", title="MME", metric="mme", options=MMEOptions, load=load,
                      layout=LAYOUT)
