"""MMBench answer files: LLaVA-1.5's answers JSONL and the upload sheet.

`mmbench-upload` reads the sheet LLaVA's `scripts/convert_mmbench_for_submission.py` writes
(and VLMEvalKit's `{model}_{dataset}.xlsx` resembles): the MMBench TSV without hint, category,
source, image, comment and l2-category, with the model's text inserted as `prediction`, i.e.
the columns `index, question, A, B, C, D, prediction, answer, split` (extra columns such as
`category` are used when present). It must be tab-separated text: the `.xlsx` workbook itself
is refused with the fix (save Sheet1 as TSV; values unchanged). Options end at the first empty
cell (2- and 3-option questions leave C/D empty); an empty `prediction` is an unanswered
question (scored wrong); a row without `answer` (a test-split upload, scored only by the
MMBench server) is an error.

`llava-mmbench` reads `llava/eval/model_vqa_mmbench.py`'s answers
(`answers/<split>/<model>.jsonl`: `question_id` = the TSV `index`, `round_id`, `text`,
`options`, `option_char`) and takes the answer letter from a TSV with `index`, `A`.., `answer`
(the official MMBench TSV, or the upload sheet above). With `--all-rounds` LLaVA asks each
question once per rotation of its options (round k shows `options[k:] + options[:k]`): the
row's `options` must equal the ground truth's rotated by `round_id`, and the right letter
moves with them. Round k of question i is scored as circular copy `i + k * 1_000_000` (the
metric groups copies by `index % 1_000_000`). Note that LLaVA's own upload keeps only the last
round's text per index; here every round is scored.

Rows: id `str(index)` (`"<index>-round<k>"` for k > 0), `index`, `options`, `gt`, `category`.
"""

from __future__ import annotations

import posixpath
import string
from collections.abc import Iterator, Sequence
from typing import Any

from mmjobs.eval.benchmarks.answers import AnswerFileError, AnswerFormat, AnswerRow, json_lines
from mmjobs.eval.benchmarks.mmbench import is_missing, read_tsv
from mmjobs.eval.metrics.mmbench import CIRCULAR_OFFSET

UPLOAD_LAYOUT = "a TSV with index, A, B[, C, D], prediction, answer (Sheet1 of the upload .xlsx)"
TRUTH_LAYOUT = "an MMBench TSV with index, A, B[, C, D], answer (the benchmark TSV or the upload)"


def _tsv(uri: str, required: tuple[str, ...], layout: str) -> Iterator[tuple[int, dict]]:
    if uri.lower().endswith((".xlsx", ".xls")):
        raise AnswerFileError(f"{uri}: an Excel workbook; save its Sheet1 as tab-separated text "
                              f"(values unchanged) and pass the .tsv: {layout}")
    # line numbers count records (a quoted cell may span lines); the header is record 1
    return enumerate(read_tsv(uri, required, layout), start=2)


def options_of(row: dict[str, str]) -> list[str]:
    """A row's option texts, A.. up to the first missing one (LLaVA's `get_options`)."""
    texts = []
    for letter in string.ascii_uppercase:
        if letter not in row or is_missing(row[letter]):
            break
        texts.append(row[letter])
    return texts


def _index(value: str) -> int:
    return int(float(value))


def upload_answers(predictions: str, ground_truth: Sequence[str], metric: str
                   ) -> Iterator[AnswerRow]:
    """`mmbench-upload`: the sheet's own prediction and answer columns."""
    name = posixpath.basename(predictions)
    for n, row in _tsv(predictions, ("index", "A", "B", "prediction", "answer"),
                       UPLOAD_LAYOUT):
        where = f"{name} row {n}"
        try:
            index = _index(row["index"])
        except ValueError:
            yield AnswerRow(where, error=f"index {row['index']!r} is not a number")
            continue
        if is_missing(row.get("answer")):
            yield AnswerRow(where, error="no answer (a test-split sheet is scored by the "
                            "MMBench server)")
            continue
        texts = options_of(row)
        out: dict[str, Any] = {"id": str(index), "prediction": row.get("prediction") or "",
                               "index": index, "gt": row["answer"].strip(),
                               "options": dict(zip(string.ascii_uppercase, texts, strict=False))}
        if not is_missing(row.get("category")):
            out["category"] = row["category"]
        yield AnswerRow(where, row=out)


def load_truth(uris: Sequence[str]) -> dict[int, tuple[list[str], str, str | None]]:
    """index -> (option texts, answer letter, category) from the ground-truth TSVs."""
    truth: dict[int, tuple[list[str], str, str | None]] = {}
    for uri in uris:
        for n, row in _tsv(uri, ("index", "A", "B", "answer"), TRUTH_LAYOUT):
            if is_missing(row.get("answer")):
                continue  # test-split rows: nothing to score against
            try:
                index = _index(row["index"])
            except ValueError:
                raise AnswerFileError(f"{uri}: row {n}: index {row['index']!r} is not a "
                                      "number") from None
            category = None if is_missing(row.get("category")) else row["category"]
            truth[index] = (options_of(row), row["answer"].strip(), category)
    return truth


def llava_answers(predictions: str, ground_truth: Sequence[str], metric: str
                  ) -> Iterator[AnswerRow]:
    """`llava-mmbench`: LLaVA's answers with the letters from the ground-truth TSV."""
    truth = load_truth(ground_truth)
    for where, answer in json_lines(predictions):
        try:
            if isinstance(answer, ValueError):
                raise answer
            qid, k, text = int(answer["question_id"]), int(answer.get("round_id", 0)), \
                str(answer["text"])
        except (ValueError, KeyError, TypeError) as e:
            yield AnswerRow(where, error=f"not a LLaVA answer with question_id, text "
                            f"({type(e).__name__}: {e})")
            continue
        if qid not in truth:
            yield AnswerRow(where, error=f"index {qid} has no answer in the --ground-truth "
                            "files")
            continue
        texts, letter, category = truth[qid]
        n_opts = len(texts)
        if letter not in string.ascii_uppercase[:n_opts]:
            yield AnswerRow(where, error=f"index {qid}: answer {letter!r} is not one of its "
                            f"{n_opts} options")
            continue
        rotated = texts[k % n_opts:] + texts[:k % n_opts]
        if "options" in answer and answer["options"] != rotated:
            yield AnswerRow(where, error=f"index {qid} round {k}: the answer's options "
                            f"{answer['options']!r:.120} are not the ground truth's rotated by "
                            "round_id (answers and ground truth are different TSVs)")
            continue
        gt = string.ascii_uppercase[(string.ascii_uppercase.index(letter) - k) % n_opts]
        out: dict[str, Any] = {"id": str(qid) if k == 0 else f"{qid}-round{k}",
                               "prediction": text, "index": qid + k * CIRCULAR_OFFSET, "gt": gt,
                               "options": dict(zip(string.ascii_uppercase, rotated,
                                                   strict=False))}
        if category is not None:
            out["category"] = category
        yield AnswerRow(where, row=out)


FORMATS = (
    AnswerFormat("mmbench-upload", ("mmbench",), "none", upload_answers,
                 "MMBench upload sheet as TSV (index, A.., prediction, answer)"),
    AnswerFormat("llava-mmbench", ("mmbench",), "required", llava_answers,
                 "LLaVA MMBench answers JSONL; --ground-truth: the MMBench TSV or the upload "
                 "sheet as TSV"),
)
