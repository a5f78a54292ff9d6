"""Answer files keyed by question id: SEED-Bench, GQA, VQAv2 and LLaVA's answers JSONL.

- `seed-bench`: lines `{"question_id", "prediction"[, "gt_answer"]}` — SEED-Bench's own
  result files (`evaluate_result/SEED-Bench-1/*.json`: one object per line, every line but
  the last ending in ",", no brackets: neither JSON nor JSONL), LLaVA's upload
  (`answers_upload/<model>.jsonl`, `scripts/convert_seed_for_submission.py`), or a JSON
  array. The answer letter is `gt_answer`, or comes from `--ground-truth SEED-Bench.json`
  (which also gives `question_type_id` and `data_type`; where both exist they must agree).
  Without SEED-Bench.json, `data_type` follows SEED-Bench-1's ids ("v1738" is a video
  question, "101669" an image one).
- `gqa-predictions`: the predictions file GQA's `eval.py` reads (its header: "JSON array:
  [{"questionId": str, "prediction": str}]"), with `--ground-truth` the questions JSON.
- `vqa-results`: the VQA results file (`[{"question_id": int, "answer": str}]`, the
  official `Results/*_fake_results.json` layout), with `--ground-truth` the annotations JSON.
- `llava-answers`: LLaVA's `model_vqa_loader.py` answers (`{"question_id", "prompt", "text",
  ...}` per line) for GQA, VQAv2 or SEED-Bench (`--metric`), with the same ground truth.

Rows: id = the question id as a string, exactly as written; the metric's fields from the
ground truth (`mmjobs.eval.benchmarks.gqa.question_fields`, `vqav2.annotation_fields`,
`seedbench.question_fields`, as the benchmark loaders give them). The ground truth is streamed
and only the answered ids are kept. Predictions are not normalised here: the metric variant
does what its reference does (e.g. `--variant llava` for GQA answers from LLaVA).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mmjobs import storage
from mmjobs.eval.benchmarks import gqa, seedbench, vqav2
from mmjobs.eval.benchmarks.answers import AnswerFileError, AnswerFormat, AnswerRow, json_lines
from mmjobs.eval.benchmarks.base import BenchmarkError, stream_json

Truth = Callable[[Sequence[str], set[str]], dict[str, dict[str, Any]]]


def _is_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value) != ""


def parse_lines(uri: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) of each record of a JSON array, JSONL, or SEED's comma lines."""
    with storage.open_read(uri) as f:
        array = f.read(4096).lstrip().startswith(b"[")
    if not array:
        # SEED-Bench's result files end every line but the last with a comma.
        yield from json_lines(uri, trailing_commas=True)
        return
    try:
        records = json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise AnswerFileError(f"{uri}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise AnswerFileError(f"{uri}: a JSON value that is not an array of answers")
    name = posixpath.basename(uri)
    for i, record in enumerate(records):
        yield f"{name}[{i}]", record


def _rows(uri: str, id_key: str, pred_key: str) -> list[tuple[str, str | None, Any, dict]]:
    """(where, id or None, prediction or error text, record) of every answer."""
    out = []
    for where, record in parse_lines(uri):
        if isinstance(record, ValueError):
            out.append((where, None, f"not JSON ({record})", {}))
        elif not isinstance(record, dict) or not _is_id(record.get(id_key)) \
                or not isinstance(record.get(pred_key), str):
            out.append((where, None, f"expected an object with {id_key!r} (an id) and "
                        f"{pred_key!r} (a string), got {record!r:.100}", {}))
        else:
            out.append((where, str(record[id_key]), record[pred_key], record))
    return out


def gqa_truth(uris: Sequence[str], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """qid -> gqa fields, from GQA questions JSONs (objects keyed by question id)."""
    truth = {}
    for uri in uris:
        for qid, q in stream_json(uri, "", kv=True):
            if qid in wanted:
                truth[qid] = gqa.question_fields(qid, q, uri)
    return truth


def vqav2_truth(uris: Sequence[str], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """question_id -> vqav2 fields, from VQA annotation JSONs (`annotations` list)."""
    truth = {}
    for uri in uris:
        for a in stream_json(uri, "annotations.item"):
            qid = str(a.get("question_id")) if isinstance(a, dict) else None
            if qid in wanted:
                truth[qid] = vqav2.annotation_fields(a)
    return truth


def seed_truth(uris: Sequence[str], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """question_id -> seedbench fields, from SEED-Bench.json files (`questions` list)."""
    truth = {}
    for uri in uris:
        for q in stream_json(uri, "questions.item"):
            qid = str(q.get("question_id")) if isinstance(q, dict) else None
            if qid in wanted:
                truth[qid] = seedbench.question_fields(q, uri)
    return truth


TRUTH: dict[str, Truth] = {"gqa": gqa_truth, "vqav2": vqav2_truth, "seedbench": seed_truth}


def _joined(predictions: str, ground_truth: Sequence[str], metric: str, id_key: str,
            pred_key: str, own: Callable[[str, dict], dict[str, Any]] | None = None
            ) -> Iterator[AnswerRow]:
    """Rows of `predictions` with the metric's fields from `ground_truth` (and `own` fields
    the answer file carries itself, which must agree with the ground truth)."""
    rows = _rows(predictions, id_key, pred_key)
    wanted = {qid for _, qid, _, _ in rows if qid is not None}
    try:
        truth = TRUTH[metric](ground_truth, wanted) if ground_truth else {}
    except BenchmarkError as e:
        raise AnswerFileError(str(e)) from e
    for where, qid, prediction, record in rows:
        if qid is None:
            yield AnswerRow(where, error=prediction)
            continue
        fields = dict(own(qid, record)) if own else {}
        known = truth.get(qid)
        if known is not None:
            clash = [k for k, v in fields.items() if k in known and known[k] != v]
            if clash:
                yield AnswerRow(where, error=f"question {qid}: {', '.join(clash)} in the answer "
                                f"file ({fields[clash[0]]!r}) disagrees with the ground truth "
                                f"({known[clash[0]]!r})")
                continue
            fields.update(known)
        elif ground_truth or not fields:
            where_truth = "the --ground-truth files" if ground_truth else \
                "the answer file (pass --ground-truth)"
            yield AnswerRow(where, error=f"question {qid} has no ground truth in {where_truth}")
            continue
        yield AnswerRow(where, row={"id": qid, "prediction": prediction, **fields})


def _seed_own(qid: str, record: dict) -> dict[str, Any]:
    """What a SEED answer line carries itself: `gt_answer`; the data type its id implies."""
    if "gt_answer" not in record:
        return {}
    return {"answer": str(record["gt_answer"]),
            "data_type": "video" if qid.startswith("v") else "image"}


def seed_answers(predictions: str, ground_truth: Sequence[str], metric: str
                 ) -> Iterator[AnswerRow]:
    """`seed-bench` (see the module docstring)."""
    return _joined(predictions, ground_truth, "seedbench", "question_id", "prediction",
                   _seed_own)


def gqa_answers(predictions: str, ground_truth: Sequence[str], metric: str
                ) -> Iterator[AnswerRow]:
    """`gqa-predictions` (see the module docstring)."""
    return _joined(predictions, ground_truth, "gqa", "questionId", "prediction")


def vqa_answers(predictions: str, ground_truth: Sequence[str], metric: str
                ) -> Iterator[AnswerRow]:
    """`vqa-results` (see the module docstring)."""
    return _joined(predictions, ground_truth, "vqav2", "question_id", "answer")


def llava_answers(predictions: str, ground_truth: Sequence[str], metric: str
                  ) -> Iterator[AnswerRow]:
    """`llava-answers` (see the module docstring)."""
    return _joined(predictions, ground_truth, metric, "question_id", "text")


FORMATS = (
    AnswerFormat("seed-bench", ("seedbench",), "optional", seed_answers,
                 "SEED-Bench result lines or LLaVA's upload JSONL (question_id, prediction"
                 "[, gt_answer]); --ground-truth: SEED-Bench.json"),
    AnswerFormat("gqa-predictions", ("gqa",), "required", gqa_answers,
                 "GQA eval.py predictions [{questionId, prediction}]; --ground-truth: the "
                 "questions JSON"),
    AnswerFormat("vqa-results", ("vqav2",), "required", vqa_answers,
                 "VQA results [{question_id, answer}]; --ground-truth: the annotations JSON"),
    AnswerFormat("llava-answers", ("gqa", "vqav2", "seedbench"), "required", llava_answers,
                 "LLaVA answers JSONL (question_id, text); --ground-truth: the benchmark's "
                 "questions JSON (gqa, seedbench) or annotations JSON (vqav2)"),
)
