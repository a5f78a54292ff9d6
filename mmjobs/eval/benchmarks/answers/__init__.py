"""Answer files of official tools and published code -> prediction rows for `mmjobs score`.

    mmjobs score --format mme-eval-tool --predictions eval_tool/LaVIN
    mmjobs score --format llava-mme --predictions answers/llava-v1.5-7b.jsonl \\
        --ground-truth MME_Benchmark_release_version
    mmjobs score --format mmbench-upload --predictions answers_upload/llava-v1.5-13b.tsv

Each format turns a file as its tool writes it into the rows a metric scores
(`{"id", "prediction", **fields}`, see `mmjobs.eval.metrics`), joining the ground truth from
the benchmark's own files where the answer file lacks it. `read_answers` yields one
`AnswerRow` per answer: the row, or why it cannot be scored (no ground truth for it, a
malformed line); `mmjobs.eval.score` reports every problem together, with where it is.

| format            | metric(s)             | predictions -> ground truth (`--ground-truth`)     |
|-------------------|-----------------------|----------------------------------------------------|
| `mme-eval-tool`   | mme                   | eval_tool `<task>.txt` (folder or file) -> in them |
| `llava-mme`       | mme                   | LLaVA answers JSONL -> eval_tool `<task>.txt`      |
|                   |                       | files/folders, or the MME release folder           |
| `llava-mmbench`   | mmbench               | LLaVA answers JSONL -> an MMBench TSV with index,  |
|                   |                       | A.., answer (the benchmark TSV or the upload)      |
| `mmbench-upload`  | mmbench               | the upload sheet as TSV -> its `answer` column     |
| `seed-bench`      | seedbench             | question_id + prediction lines (SEED-Bench result  |
|                   |                       | files, LLaVA's upload) -> `gt_answer` in the file  |
|                   |                       | and/or SEED-Bench.json                             |
| `gqa-predictions` | gqa                   | eval.py's [{questionId, prediction}] -> the GQA    |
|                   |                       | questions JSON                                     |
| `vqa-results`     | vqav2                 | [{question_id, answer}] -> the annotations JSON    |
| `llava-answers`   | gqa, vqav2, seedbench | LLaVA answers JSONL -> as for the three above      |

Every format's module docstring says what it reproduces. Ids are kept as strings exactly as
the files write them (GQA "2062325", SEED "v1738"); an answer whose id has no ground truth is
an error, never dropped.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mmjobs import storage
from mmjobs.eval.benchmarks.base import BenchmarkError


class AnswerFileError(BenchmarkError):
    """An answer or ground-truth file cannot be read at all (the message says why and the fix)."""


@dataclass(frozen=True)
class AnswerRow:
    """One answer: a prediction row for the metric, or the reason it cannot be scored.

    Attributes:
        where: the file and line (or position) it came from, for messages.
        row: `{"id", "prediction", **fields}`; None when `error` is set.
        error: why this answer cannot be scored.
    """

    where: str
    row: dict[str, Any] | None = None
    error: str | None = None


Reader = Callable[[str, Sequence[str], str], Iterator[AnswerRow]]


@dataclass(frozen=True)
class AnswerFormat:
    """A registered answer-file format.

    Attributes:
        name: the `--format` value.
        metrics: metrics its rows are made for (the first is the default).
        ground_truth: whether `--ground-truth` is required, optional or unused.
        read: `(predictions URI, ground-truth URIs, metric) -> AnswerRow`s.
        help: one line for `--help`.
    """

    name: str
    metrics: tuple[str, ...]
    ground_truth: Literal["required", "optional", "none"]
    read: Reader
    help: str


def json_lines(uri: str, *, trailing_commas: bool = False
               ) -> Iterator[tuple[str, Any | ValueError]]:
    """("<file> line N", the parsed value or the `ValueError` parsing raised) per non-blank
    line, streamed. `trailing_commas`: a "," ending a line is not part of its value (SEED-Bench's
    result files)."""
    name = posixpath.basename(uri)
    for n, raw in storage.iter_lines(uri):
        line = raw.strip()
        if not line:
            continue
        if trailing_commas and line.endswith(b","):
            line = line[:-1]
        try:
            yield f"{name} line {n}", json.loads(line)
        except ValueError as e:
            yield f"{name} line {n}", e


def _formats() -> dict[str, AnswerFormat]:
    from mmjobs.eval.benchmarks.answers import keyed, mmbench, mme

    return {f.name: f for f in (*mme.FORMATS, *mmbench.FORMATS, *keyed.FORMATS)}


def answer_formats() -> dict[str, AnswerFormat]:
    """Every registered format by name."""
    return _formats()


def read_answers(name: str, predictions: str, ground_truth: Sequence[str] = (),
                 metric: str | None = None) -> Iterator[AnswerRow]:
    """Read an answer file of format `name` (see the module table).

    Raises:
        AnswerFileError: unknown format, a metric the format does not serve, ground truth
            missing where required (or given where unused), or a file that cannot be read.
    """
    formats = _formats()
    if name not in formats:
        raise AnswerFileError(f"unknown answer format {name!r}; choose one of "
                              f"{', '.join(formats)}")
    fmt = formats[name]
    metric = metric or fmt.metrics[0]
    if metric not in fmt.metrics:
        raise AnswerFileError(f"format {name} makes rows for {', '.join(fmt.metrics)}, not "
                              f"{metric}")
    if fmt.ground_truth == "required" and not ground_truth:
        raise AnswerFileError(f"format {name} needs --ground-truth: {fmt.help}")
    if fmt.ground_truth == "none" and ground_truth:
        raise AnswerFileError(f"format {name} carries its own ground truth; drop "
                              "--ground-truth")
    return fmt.read(predictions, list(ground_truth), metric)
