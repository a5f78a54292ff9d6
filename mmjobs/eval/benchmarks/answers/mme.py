"""MME answer files: the official eval_tool's `<task>.txt` and LLaVA-1.5's answers JSONL.

`mme-eval-tool` reads what the MME eval_tool's `calculation.py --results_dir DIR` reads: one
`<task>.txt` per task (`eval_tool/readme.txt`: `Image_Name + "\\t" + Question + "\\t" +
Ground_Truth_Answer + "\\t" + Your_Response + "\\n"`), e.g. `eval_tool/LaVIN/` or the files
LLaVA's `convert_answer_to_mme.py` writes (their first column is `<stem>.txt`, not the image
name: the pairing is by that column either way). The response is the 4th field up to the line
end, as `calculation.py` reads it (it is not stripped; `mmjobs.eval.metrics.mme` parses it).
A file whose lines have 3 fields is the unfilled `Your_Results` template; a response holding a
tab (5+ fields) would crash `calculation.py`: both are errors naming the line. Files whose
name is not one of the 14 tasks are ignored (and listed in the log).

`llava-mme` reads LLaVA's answers (`playground/data/eval/MME/answers/<model>.jsonl`: rows
`question_id` "<task>/<image>" or "<task>/images/<image>", `prompt`, `text`) and joins the
ground truth the way `convert_answer_to_mme.py` does, by (task, image file stem, question),
the question compared without LLaVA's "\\nAnswer the question using a single word or
phrase." and MME's "Please answer yes or no." and with runs of whitespace as one space (the
ground-truth files put one or two spaces before "Please"). Ground truth: any mix of
eval_tool-style `<task>.txt` files (or folders of them: `Your_Results/`, a results folder) and
the MME release folder (`<task>/questions_answers_YN/<stem>.txt` or `<task>/<stem>.txt`,
lines `question<TAB>Yes|No`). Unlike `convert_answer_to_mme.py`, which drops answers it
cannot match, an answer without ground truth is an error naming it.

Rows: id `"<task>/<image>/<k>"` (k-th question of that image), `task`, `image`, `gt`.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence

from mmjobs import storage
from mmjobs.eval.benchmarks.answers import AnswerFileError, AnswerFormat, AnswerRow, json_lines
from mmjobs.eval.benchmarks.base import SHORT_ANSWER_PROMPT
from mmjobs.eval.benchmarks.mme import TASKS
from mmjobs.logs import get_logger

log = get_logger(__name__)
YES_NO = "Please answer yes or no."


def task_files(uri: str) -> list[tuple[str, str]]:
    """(task, URI) of every `<task>.txt` directly in a folder, or of the file `uri` itself."""
    if uri.lower().endswith(".txt"):
        task = posixpath.splitext(posixpath.basename(uri))[0]
        if task not in TASKS:
            raise AnswerFileError(f"{uri}: {task!r} is not an MME task; name the file "
                                  f"<task>.txt with a task from {', '.join(TASKS)}")
        return [(task, uri)]
    found, ignored = [], []
    for obj in storage.list_objects(uri):
        if "/" in obj.relpath or not obj.relpath.endswith(".txt"):
            continue
        task = obj.relpath[:-4]
        (found if task in TASKS else ignored).append((task, obj.uri))
    if ignored:
        log.info("MME answers: ignored %s (not task names)", ", ".join(u for _, u in ignored))
    if not found:
        raise AnswerFileError(f"{uri}: holds no <task>.txt file for any of {', '.join(TASKS)}")
    order = {task: i for i, task in enumerate(TASKS)}
    return sorted(found, key=lambda t: order[t[0]])


def eval_tool_answers(predictions: str, ground_truth: Sequence[str], metric: str
                      ) -> Iterator[AnswerRow]:
    """`mme-eval-tool`: rows from 4-column eval_tool files (see the module docstring)."""
    for task, uri in task_files(predictions):
        name = posixpath.basename(uri)
        seen: dict[str, int] = defaultdict(int)
        for n, line in enumerate(storage.read_text(uri).split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{name} line {n}"
            fields = line.split("\t")
            if len(fields) == 3:
                yield AnswerRow(where, error="no response: this is the unfilled template; add "
                                "the model's one-line response as a 4th tab-separated field "
                                "(eval_tool readme.txt)")
                continue
            if len(fields) != 4:
                yield AnswerRow(where, error=f"{len(fields)} tab-separated fields, expected "
                                "image, question, ground truth, response (a response may not "
                                "hold tabs or newlines)")
                continue
            image, _, gt, response = fields
            if gt.strip().lower() not in ("yes", "no"):
                yield AnswerRow(where, error=f"ground truth {gt!r} is not Yes or No")
                continue
            k = seen[image]
            seen[image] += 1
            yield AnswerRow(where, row={"id": f"{task}/{image}/{k}", "prediction": response,
                                        "task": task, "image": image, "gt": gt.strip().lower()})


def core_question(text: str) -> str:
    """A question without LLaVA's and MME's answer-format sentences, whitespace collapsed."""
    text = text.replace(SHORT_ANSWER_PROMPT.strip(), "").replace(YES_NO, "")
    return re.sub(r"\s+", " ", text).strip()


def _truth_lines(uri: str) -> Iterator[tuple[str, str, str, str]]:
    """(task, image stem, question, yes|no) of every ground-truth line under `uri`."""
    single = uri.lower().endswith(".txt")
    objects = [(posixpath.basename(uri), uri)] if single else [
        (o.relpath, o.uri) for o in storage.list_objects(uri) if o.relpath.endswith(".txt")]
    any_task = False
    for rel, obj in objects:
        parts = rel.split("/")
        if len(parts) == 1 and parts[0][:-4] in TASKS:  # eval_tool <task>.txt
            any_task = True
            for line in storage.read_text(obj).split("\n"):
                fields = line.split("\t")
                if len(fields) >= 3:
                    stem = posixpath.splitext(fields[0])[0]
                    yield parts[0][:-4], stem, fields[1], fields[2]
        elif len(parts) >= 2 and parts[0] in TASKS:  # release layout <task>/.../<stem>.txt
            any_task = True
            stem = posixpath.splitext(parts[-1])[0]
            for line in storage.read_text(obj).split("\n"):
                question, sep, answer = line.rpartition("\t")
                if sep:
                    yield parts[0], stem, question, answer
    if not any_task:
        raise AnswerFileError(f"{uri}: no MME ground truth found (expected eval_tool <task>.txt "
                              "files or the release layout <task>/questions_answers_YN/*.txt)")


def load_truth(uris: Sequence[str]) -> dict[tuple[str, str, str], str]:
    """(task, stem, core question) -> yes|no from every ground-truth source, merged."""
    truth: dict[tuple[str, str, str], str] = {}
    for uri in uris:
        for task, stem, question, answer in _truth_lines(uri):
            key, gt = (task, stem, core_question(question)), answer.strip().lower()
            if gt not in ("yes", "no"):
                raise AnswerFileError(f"{uri}: {task} {stem}: ground truth {answer!r} is not "
                                      "Yes or No")
            if truth.setdefault(key, gt) != gt:
                raise AnswerFileError(f"{uri}: {task} {stem} {key[2]!r}: ground truth {gt} "
                                      f"contradicts {truth[key]} from another file")
    return truth


def llava_answers(predictions: str, ground_truth: Sequence[str], metric: str
                  ) -> Iterator[AnswerRow]:
    """`llava-mme`: LLaVA's answers joined with the ground truth (see the module docstring)."""
    truth = load_truth(ground_truth)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for where, answer in json_lines(predictions):
        try:
            if isinstance(answer, ValueError):
                raise answer
            qid, prompt, text = answer["question_id"], answer["prompt"], answer["text"]
        except (ValueError, KeyError, TypeError) as e:
            yield AnswerRow(where, error=f"not a LLaVA answer with question_id, prompt, text "
                            f"({type(e).__name__}: {e})")
            continue
        task, image = str(qid).split("/", 1)[0], posixpath.basename(str(qid))
        if task not in TASKS:
            yield AnswerRow(where, error=f"question_id {qid!r} does not start with an MME task")
            continue
        stem, question = posixpath.splitext(image)[0], core_question(str(prompt))
        gt = truth.get((task, stem, question))
        if gt is None:
            yield AnswerRow(where, error=f"no ground truth for {task} {image} {question!r} in "
                            "the --ground-truth files")
            continue
        k = seen[task, image]
        seen[task, image] += 1
        yield AnswerRow(where, row={"id": f"{task}/{image}/{k}", "prediction": str(text),
                                    "task": task, "image": image, "gt": gt})


FORMATS = (
    AnswerFormat("mme-eval-tool", ("mme",), "none", eval_tool_answers,
                 "MME eval_tool <task>.txt files with responses (a folder or one file)"),
    AnswerFormat("llava-mme", ("mme",), "required", llava_answers,
                 "LLaVA MME answers JSONL; --ground-truth: eval_tool <task>.txt files or "
                 "folders, or the MME_Benchmark_release_version folder"),
)
