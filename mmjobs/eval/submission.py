"""Evaluation-server upload files from a predictions file, as LLaVA-1.5's converters write them.

Three benchmarks are scored (or, for VQAv2 test-dev, only scored) by their servers; LLaVA-1.5 and
MLLM-DataEngine report the servers' numbers. `write_submission` writes the file each server
takes, from the infer stage's rows and the benchmark's own files (which decide the rows of the
upload: every question of the split, not only the answered ones):

| benchmark   | file                         | upstream converter (haotian-liu/LLaVA)    |
|-------------|------------------------------|-------------------------------------------|
| `vqav2`     | `vqav2_<split>_evalai.json`  | scripts/convert_vqav2_for_submission.py   |
| `mmbench`   | `mmbench_<tsv stem>.xlsx`    | scripts/convert_mmbench_for_submission.py |
| `seedbench` | `seedbench_upload.jsonl`     | scripts/convert_seed_for_submission.py    |

- VQAv2 (EvalAI, challenge 830): a JSON array `[{"question_id": int, "answer": str}]` with one
  entry for EVERY question of `v2_OpenEnded_mscoco_test2015_questions.json` (test-dev is a
  subset of test2015; EvalAI wants them all), in that file's order; answers go through
  `EvalAIAnswerProcessor` (`mmjobs.eval.metrics.vqav2.evalai_answer_processor`); an unanswered
  question gets "".
- MMBench: the TSV's rows and columns minus hint, category, source, image, comment and
  l2-category, with `prediction` inserted as the 7th column (LLaVA's `insert(6, ...)`):
  `index question A B C D prediction answer split` for the dev TSV. One sheet `Sheet1`,
  `index` a number, other cells strings, an empty cell where the TSV has none / no prediction.
  The prediction is the model's raw answer text, as LLaVA uploads it.
- SEED-Bench: JSON Lines `{"question_id": <as in SEED-Bench.json>, "prediction": text}`, one
  per question of SEED-Bench.json in its order. LLaVA's converter fails on a question without
  an answer; here it gets "" (the loader answers image questions only, so video questions are
  unanswered unless their predictions come from elsewhere) and the summary counts them.

Every writer returns a summary (file, questions, answered, unanswered) that the infer stage
records, so a partial upload is never mistaken for a complete one. Predictions whose id names
no question of the benchmark file are an error: they mean the wrong file or split.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mmjobs import storage
from mmjobs.eval.benchmarks import benchmark_options
from mmjobs.eval.benchmarks.base import BenchmarkError, require_files, root_uri, stream_json
from mmjobs.eval.benchmarks.mmbench import read_tsv, tsv_uri
from mmjobs.eval.metrics.vqav2 import evalai_answer_processor

Summary = dict[str, Any]
# LLaVA's convert_mmbench_for_submission.py drops these columns and inserts the prediction at 6.
MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
MMBENCH_PREDICTION_AT = 6
VQAV2_ALL_TEST = "v2_OpenEnded_mscoco_test2015_questions.json"


def write_submission(benchmark: str, root: str, options: Mapping[str, Any],
                     predictions: Mapping[str, Mapping[str, Any]], out_dir: Path) -> Summary:
    """Write `benchmark`'s upload file into `out_dir` (see the module docstring).

    Args:
        benchmark: vqav2, mmbench or seedbench.
        root: the benchmark's files (as the infer stage read them).
        options: the loader options the infer stage used (split, file, ...).
        predictions: infer rows by id (`prediction` is the answer text).
        out_dir: a local folder (created).

    Returns:
        {"benchmark", "file" (name in out_dir), "format", "questions", "answered",
        "unanswered"}.

    Raises:
        BenchmarkError: no server format for `benchmark`, a split the server does not take,
            a missing benchmark file, or predictions for questions the file does not have.
    """
    if benchmark not in WRITERS:
        raise BenchmarkError(f"no evaluation-server upload format for {benchmark!r}; "
                             f"submission applies to {', '.join(WRITERS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = benchmark_options(benchmark, dict(options))
    answers = {item_id: str(row.get("prediction") or "") for item_id, row in predictions.items()}
    summary = WRITERS[benchmark](root_uri(root), opts, answers, out_dir)
    return {"benchmark": benchmark, **summary,
            "unanswered": summary["questions"] - summary["answered"]}


def _unknown(answers: Mapping[str, str], seen: set[str], where: str) -> None:
    extra = sorted(set(answers) - seen)
    if extra:
        raise BenchmarkError(f"{len(extra)} prediction(s) name no question of {where} (e.g. "
                             f"{', '.join(extra[:3])}): predictions and benchmark files are "
                             "from different splits; point benchmark_root/options at the "
                             "files the predictions were made from")


def vqav2_evalai(root: str, opts: Any, answers: Mapping[str, str], out_dir: Path) -> Summary:
    """VQAv2's EvalAI upload: every test2015 question, EvalAI-normalised answers."""
    if not opts.split.startswith("test"):
        raise BenchmarkError(f"VQAv2 split {opts.split!r} has public answers and no server "
                             "phase; submission applies to test-dev2015 / test2015")
    layout = "v2_OpenEnded_mscoco_test2015_questions.json (every test question, for EvalAI)"
    require_files("VQAv2 submission", root, [VQAV2_ALL_TEST], layout)
    uri = storage.join(root, VQAV2_ALL_TEST)
    name = f"vqav2_{opts.split}_evalai.json"
    seen: set[str] = set()
    answered = 0
    with open(out_dir / name, "w", encoding="utf-8") as f:
        f.write("[")
        for n, q in enumerate(stream_json(uri, "questions.item")):
            qid = int(q["question_id"])
            seen.add(str(qid))
            text = answers.get(str(qid))
            answered += text is not None
            answer = "" if text is None else evalai_answer_processor(text)
            f.write((", " if n else "") + json.dumps({"question_id": qid, "answer": answer}))
        f.write("]")
    _unknown(answers, seen, uri)
    return {"file": name, "format": "EvalAI VQAv2 results (JSON array)",
            "questions": len(seen), "answered": answered}


def mmbench_upload(root: str, opts: Any, answers: Mapping[str, str], out_dir: Path) -> Summary:
    """MMBench's upload workbook: the TSV's rows, LLaVA's columns, the raw predictions."""
    from openpyxl import Workbook

    tsv = tsv_uri(root, opts)
    rows = read_tsv(tsv, required=("index", "question"))
    header: list[str] | None = None
    book = Workbook(write_only=True)
    sheet = book.create_sheet("Sheet1")
    seen: set[str] = set()
    answered = 0
    for n, row in enumerate(rows, start=2):
        if header is None:
            header = [c for c in row if c not in MMBENCH_DROPPED]
            header.insert(min(MMBENCH_PREDICTION_AT, len(header)), "prediction")
            sheet.append(header)
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError):
            raise BenchmarkError(f"{tsv}: line {n}: index {row['index']!r} is not a number") \
                from None
        seen.add(str(index))
        prediction = answers.get(str(index))
        answered += prediction is not None
        cells = {**row, "prediction": prediction}
        sheet.append([index if c == "index" else _cell(cells.get(c)) for c in header])
    if header is None:
        raise BenchmarkError(f"{tsv}: no rows to submit")
    _unknown(answers, seen, tsv)
    name = f"mmbench_{posixpath.splitext(posixpath.basename(tsv))[0]}.xlsx"
    book.save(out_dir / name)
    return {"file": name, "format": "MMBench upload workbook (xlsx, Sheet1)",
            "columns": header, "questions": len(seen), "answered": answered}


def _cell(value: str | None) -> str | None:
    """A string cell; None (an empty cell) where pandas would have read NaN."""
    if value is None or value.strip().lower() in ("", "nan"):
        return None
    return value


def seedbench_upload(root: str, opts: Any, answers: Mapping[str, str],
                     out_dir: Path) -> Summary:
    """SEED-Bench's upload: every question of SEED-Bench.json, in its order."""
    require_files("SEED-Bench submission", root, ["SEED-Bench.json"], "SEED-Bench.json")
    uri = storage.join(root, "SEED-Bench.json")
    name = "seedbench_upload.jsonl"
    seen: set[str] = set()
    answered = 0
    with open(out_dir / name, "w", encoding="utf-8") as f:
        for q in _questions(uri):
            qid = q["question_id"]  # written as the file has it (a string)
            seen.add(str(qid))
            text = answers.get(str(qid))
            answered += text is not None
            f.write(json.dumps({"question_id": qid, "prediction": text or ""}) + "\n")
    _unknown(answers, seen, uri)
    return {"file": name, "format": "SEED-Bench upload (JSON Lines)", "questions": len(seen),
            "answered": answered}


def _questions(uri: str) -> Iterator[dict[str, Any]]:
    for q in stream_json(uri, "questions.item"):
        if not isinstance(q, dict) or "question_id" not in q:
            raise BenchmarkError(f"{uri}: a question without question_id: {q!r:.120}")
        yield q


WRITERS: dict[str, Callable[[str, Any, Mapping[str, str], Path], Summary]] = {
    "vqav2": vqav2_evalai, "mmbench": mmbench_upload, "seedbench": seedbench_upload}
