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

Questions may instead come from the official eval_tool's answer-file templates
(`questions_dir`: `eval_tool/Your_Results/` holds one `<task>.txt` per task, lines
`image<TAB>question<TAB>Yes|No`, in the order `calculation.py` pairs them): then items follow
those files (a 4th column, a model's response, is ignored) and only the images come from
`root`, found by file stem in the task's `images/` folder or the task folder itself (LLaVA's
converted files name `<stem>.txt` in the first column: the stem is what counts).

Items: id `"<task>/<image>/<0|1>"`, fields `task`, `image` (the image file name; the metric
pairs an image's two questions by it) and `gt` (`yes`/`no`). The prompt is the question as
written (it already ends with "Please answer yes or no."), plus `prompt_suffix` (default none).
`question_style: llava` gives LLaVA-1.5's prompt instead, as its `MME/llava_mme.jsonl` has it
(the file `scripts/v1_5/eval/mme.sh` and DataEngine's `mme_lora.sh` run): the trailing
"Please answer yes or no." dropped, then "\\nAnswer the question using a single word or phrase."

Options: `tasks` (default all 14), `questions_dir`, `prompt_suffix`, `question_style`, `limit`
(images per task).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    SHORT_ANSWER_PROMPT,
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
YES_NO_INSTRUCTION = "Please answer yes or no."
LAYOUT = ("<task>/questions_answers_YN/<stem>.txt + <task>/images/<stem>.<jpg|png>, or "
          "<task>/<stem>.txt + <task>/<stem>.<jpg|png>, for the tasks " + ", ".join(TASKS))


class MMEOptions(BenchmarkOptions):
    """Options of the `mme` loader."""

    tasks: list[str] = Field(default_factory=lambda: list(TASKS), min_length=1,
                             description="Subtasks to load (folder names).")
    prompt_suffix: str = Field("", description="Appended to each question.")
    questions_dir: str | None = Field(
        None, description="Folder (or s3:// prefix) of eval_tool-style <task>.txt files "
        "(image, question, Yes/No per line) to read the questions from, e.g. "
        "eval_tool/Your_Results; images still come from root.")
    question_style: Literal["official", "llava"] = Field(
        "official", description="official: the question as written (ends with 'Please answer "
        "yes or no.'); llava: LLaVA-1.5's llava_mme.jsonl text (that sentence dropped, "
        "'\\nAnswer the question using a single word or phrase.' appended).")

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown MME task(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(TASKS)}")
        return value

    @model_validator(mode="after")
    def _one_suffix(self) -> MMEOptions:
        if self.question_style == "llava" and self.prompt_suffix:
            raise ValueError("question_style llava brings its own suffix (LLaVA's short-answer "
                             "instruction); drop prompt_suffix")
        return self

    def prompt(self, question: str) -> str:
        """The user turn for one MME question (one image)."""
        if self.question_style == "llava":
            question = question.removesuffix(YES_NO_INSTRUCTION).rstrip() + SHORT_ANSWER_PROMPT
        else:
            question += self.prompt_suffix
        return with_image_tokens(question, 1)


def load(root: str, opts: MMEOptions) -> Iterator[BenchmarkItem]:
    """List the layout once, check every task folder, then stream the questions."""
    files = {o.relpath: o.uri for o in storage.list_objects(root)}
    if not any(rel.split("/", 1)[0] in TASKS for rel in files) and any(
            rel.startswith("MME_Benchmark/") for rel in files):
        root = storage.join(root, "MME_Benchmark")  # the zip's inner folder
        files = {rel.split("/", 1)[1]: uri for rel, uri in files.items()
                 if rel.startswith("MME_Benchmark/")}
    if opts.questions_dir is not None:
        return _eval_tool_items(root, files, opts)
    plans = {task: _plan(task, files) for task in opts.tasks}
    missing = [storage.join(root, t) + "/" for t, p in plans.items() if not p]
    if missing:
        raise MissingBenchmarkFilesError(
            f"MME: missing {', '.join(missing)}; expected the official layout: {LAYOUT}")
    return _items(plans, opts)


def _eval_tool_items(root: str, files: dict[str, str], opts: MMEOptions
                     ) -> Iterator[BenchmarkItem]:
    """Items from eval_tool `<task>.txt` question lists, images from the benchmark `root`."""
    qdir = str(storage.parse(opts.questions_dir))
    texts = {task: storage.join(qdir, f"{task}.txt") for task in opts.tasks}
    missing = [uri for uri in texts.values() if not storage.exists(uri)]
    if missing:
        raise MissingBenchmarkFilesError(
            f"MME: missing {', '.join(missing)}; questions_dir must hold one <task>.txt per "
            "task (image<TAB>question<TAB>Yes|No per line), like eval_tool/Your_Results")
    plans = {}
    for task, uri in texts.items():
        lines = eval_tool_lines(storage.read_text(uri), uri, min_fields=3)
        images = list(dict.fromkeys(line[0] for line in lines))[:opts.limit]  # file order
        found = {name: _find_image(task, name, files) for name in images}
        absent = [name for name, image in found.items() if image is None]
        if absent:
            raise MissingBenchmarkFilesError(
                f"MME: {uri} names images not found under {storage.join(root, task)}/ (or its "
                f"images/): {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}; "
                f"expected the official layout: {LAYOUT}")
        plans[task] = [(line, found[line[0]]) for line in lines if line[0] in found]
    return _eval_tool_stream(plans, opts)


def _eval_tool_stream(plans: dict[str, list[tuple[list[str], str | None]]],
                      opts: MMEOptions) -> Iterator[BenchmarkItem]:
    for task, lines in plans.items():
        seen: dict[str, int] = {}
        for (name, question, gt, *_), image in lines:
            k = seen[name] = seen.get(name, -1) + 1
            image_name = posixpath.basename(storage.parse(image).key)
            yield BenchmarkItem(
                id=f"{task}/{image_name}/{k}",
                prompt=opts.prompt(question), images=[image],
                fields={"task": task, "image": image_name, "gt": gt.strip().lower()})


def _find_image(task: str, name: str, files: dict[str, str]) -> str | None:
    """The URI of `name`'s image (matched by stem) in `<task>/images/` or `<task>/`."""
    stem = posixpath.splitext(name)[0]
    for folder in (f"{task}/{IMAGE_DIR}", task):
        for suffix in IMAGE_SUFFIXES:
            for candidate in (f"{folder}/{stem}{suffix}", f"{folder}/{stem}{suffix.upper()}"):
                if candidate in files:
                    return files[candidate]
    return None


def eval_tool_lines(text: str, source: str, *, min_fields: int) -> list[list[str]]:
    """The tab-separated fields of every line of an eval_tool `<task>.txt`.

    Lines are `image<TAB>question<TAB>Yes|No[<TAB>response]`, LF-terminated (the terminator is
    not part of the last field). Raises `BenchmarkError` naming the first bad line.
    """
    lines = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < min_fields or fields[2].strip().lower() not in ("yes", "no"):
            raise BenchmarkError(f"{source}: line {n} is not 'image<TAB>question<TAB>Yes|No'"
                                 f"{'<TAB>response' if min_fields > 3 else ''}: {line!r:.120}")
        lines.append(fields)
    return lines


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
                        prompt=opts.prompt(question),
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
