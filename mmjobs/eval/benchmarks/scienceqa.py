"""`scienceqa`: a ScienceQA split (default test), scored by `--metric scienceqa`.

Official layout (lupantech/ScienceQA `data/scienceqa/`, images from its download script)::

    <root>/problems.json        {pid: {question, choices, answer, hint, image: "image.png"|null,
                                       subject, grade, split, lecture, solution, ...}}
    <root>/pid_splits.json      {"train": [pid, ...], "val": [...], "test": [...], ...}
    <root>/images/<split>/<pid>/<image>   (the problem's own split: minitest -> images/test)

Items: id = pid, in `pid_splits.json` order; an image only when the problem has one; fields
`choices`, `answer` (index), `subject`, `grade`, `hint`, `has_image` (ScienceQA's NAT/SOC/LAN/
TXT/IMG/NO/G1-6/G7-12 categories).

Prompts (`style`):

- `llava` (default): LLaVA-1.5's eval file `llava_test_CQM-A.json` with `--single-pred-prompt`,
  as EvolvingLMMs-Lab/lmms-eval `tasks/scienceqa/utils.py::sqa_doc_to_text` reproduces it:
  "Context: {hint}\\n" (only when the hint is non-empty) + question + "\\nA. x\\nB. y" +
  "\\nAnswer with the option's letter from the given choices directly." (`prompt_suffix`).
- `lavin`: LaVIN's QCM prompt ending in "Response:" (luogen1996/LaVIN `util/base_prompt.py`,
  built by `mmjobs.data.converters.scienceqa.lavin_example`, the same text the lavin-sweep
  recipe trains on).

`problems.json` (~40 MB) is streamed; only the split's problems are kept.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from mmjobs import storage
from mmjobs.eval.benchmarks.base import (
    LETTER_PROMPT,
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    BenchmarkOptions,
    lettered,
    read_json,
    require_files,
    stream_json,
    with_image_tokens,
)

LAYOUT = "problems.json, pid_splits.json, images/<split>/<pid>/<image>"


class ScienceQAOptions(BenchmarkOptions):
    """Options of the `scienceqa` loader."""

    split: str = Field("test", description="A pid_splits.json key (test, val, minitest, ...).")
    style: Literal["llava", "lavin"] = Field("llava", description="Prompt format (see docs).")
    prompt_suffix: str = Field(LETTER_PROMPT, description="Appended to llava-style prompts.")
    image_only: bool = Field(False, description="Only questions with an image (SQA-IMG).")


def load(root: str, opts: ScienceQAOptions) -> Iterator[BenchmarkItem]:
    """Check the layout and split, then stream the split's questions (see module doc)."""
    require_files("ScienceQA", root, ["problems.json", "pid_splits.json"], LAYOUT)
    splits = read_json(storage.join(root, "pid_splits.json"))
    if not isinstance(splits, dict) or opts.split not in splits:
        available = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
        raise BenchmarkError(f"ScienceQA: split {opts.split!r} is not in "
                             f"{storage.join(root, 'pid_splits.json')}; available: {available}")
    return _items(root, opts, [str(pid) for pid in splits[opts.split]])


def _items(root: str, opts: ScienceQAOptions, pids: list[str]) -> Iterator[BenchmarkItem]:
    wanted = set(pids)
    problems: dict[str, dict[str, Any]] = {}
    problems_uri = storage.join(root, "problems.json")
    for pid, problem in stream_json(problems_uri, "", kv=True):
        if pid in wanted:
            # Lectures and solutions are most of the file and no prompt here uses them.
            problems[pid] = {k: v for k, v in problem.items() if k not in ("lecture", "solution")}
    yielded = 0
    for pid in pids:
        if opts.limit is not None and yielded >= opts.limit:
            return
        problem = problems.get(pid)
        if problem is None:
            raise BenchmarkError(f"ScienceQA: pid {pid} is in pid_splits.json[{opts.split!r}] "
                                 f"but not in {problems_uri}")
        image = problem.get("image")
        if opts.image_only and not image:
            continue
        images = ([storage.join(root, "images", problem.get("split") or opts.split, pid, image)]
                  if image else [])
        yield BenchmarkItem(id=pid, prompt=with_image_tokens(_prompt(problem, opts),
                                                             len(images)),
                            images=images, fields=_fields(problem, pid, problems_uri))
        yielded += 1


def _prompt(problem: dict[str, Any], opts: ScienceQAOptions) -> str:
    hint = problem.get("hint") or ""
    if opts.style == "lavin":
        from mmjobs.data.converters.scienceqa import lavin_example

        letters = string.ascii_uppercase
        choice = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(problem["choices"]))
        fields = {"question": problem["question"], "context": hint or "N/A", "choice": choice,
                  "answer": "", "lecture": "", "solution": ""}
        return lavin_example("QCM", "A", fields)[0]
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{problem['question']}\n{lettered(problem['choices'])}{opts.prompt_suffix}"


def _fields(problem: dict[str, Any], pid: str, source: str) -> dict[str, Any]:
    try:
        return {"choices": [str(c) for c in problem["choices"]], "answer": int(problem["answer"]),
                "subject": problem["subject"], "grade": problem["grade"],
                "hint": problem.get("hint") or "", "has_image": bool(problem.get("image"))}
    except (KeyError, TypeError, ValueError) as e:
        raise BenchmarkError(f"{source}: problem {pid} lacks choices/answer/subject/grade "
                             f"({type(e).__name__}: {e})") from e


BENCHMARK = Benchmark(name="scienceqa", title="ScienceQA", metric="scienceqa",
                      options=ScienceQAOptions, load=load, layout=LAYOUT)
