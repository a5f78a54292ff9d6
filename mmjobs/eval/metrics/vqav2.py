"""VQAv2 accuracy (`--metric vqav2`): the official leave-one-annotator-out accuracy.

Rows: `answers` (the 10 annotator answer strings); optional `answer_type` (yes/no, number,
other) and `question_type` (the annotation's `question_type`, one of the 65 prefixes in
`QuestionTypes/mscoco_question_types.txt`, e.g. "what color is the") add per-answer-type and
per-question-type breakdowns, as the official tool's `perAnswerType` / `perQuestionType` do.

A question's accuracy is the mean, over the 10 subsets that leave one annotator out, of
``min(1, #matching answers among the other 9 / 3)`` (two matching annotators give 0.6).
Answer normalisation follows GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(``processPunctuation`` / ``processDigitArticle``), kept with its quirks: the period regex
``(?!<=\\d)(\\.)(?!\\d)`` (a typo for a look-behind, so every period not followed by a digit goes)
is applied with ``count=re.UNICODE`` (= 32, a flag passed as the count argument), punctuation
is deleted or replaced by a space depending on the *original* text, number words up to ten
become digits, articles are dropped, and contractions are restored.

Variants (they differ only in *when* answers are normalised):

- ``official`` (default): vqaEval.py as on GT-Vision-Lab/VQA master and as copied by lmms-eval:
  predictions and annotator answers only have newlines/tabs turned into spaces and are
  stripped; both are normalised **only when the 10 annotators disagree**
  (``len(set(gtAnswers)) > 1``). So "Yes" scores 0 on a question all annotators answered
  "yes". (The stored copies of GT-Vision-Lab/VQA this was checked against, commits
  07aecec/c4e6a0e/e6845dc, are older; the disagree-only rule is the later master, which the
  brief and lmms-eval's copy also describe — see ``legacy``.)
- ``legacy``: the older vqaEval.py (GT-Vision-Lab/VQA c4e6a0e, and salesforce/LAVIS
  ``lavis/common/vqa_tools/vqa_eval.py``): the prediction is always normalised; annotator
  answers get ``processPunctuation`` only, and only when they disagree.
- ``lmms``: EvolvingLMMs-Lab/lmms-eval ``tasks/vqav2/utils.py::vqav2_process_results``: the
  prediction always goes through ``EvalAIAnswerProcessor`` (lower-case, drop ``,`` and ``?``,
  ``'s`` -> `` 's``, punctuation, digits/articles); when the annotators disagree, both sides are
  normalised (again) as in ``official``. lmms-eval's comma regex ``(?<=\\d)(\\,)+(?=\\d)`` is used.

Summary: ``accuracy`` in percent over all rows (the official tool rounds to 2 decimals when
printing; here values are unrounded), plus ``per_answer_type`` / ``per_question_type`` when
rows carry `answer_type` / `question_type`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from mmjobs.eval.metrics.base import (
    Metric,
    Row,
    ScoreOptions,
    fmt,
    is_str,
    is_str_list,
    markdown_table,
    ratio,
)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is not a look-behind
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
LMMS_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str, comma_strip: re.Pattern[str] = COMMA_STRIP) -> str:
    """vqaEval.py `processPunctuation`."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_strip.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_answer_processor(text: str) -> str:
    """`EvalAIAnswerProcessor.__call__` (mmf's, copied into lmms-eval and into LLaVA's
    `llava/eval/m4c_evaluator.py`, which `scripts/convert_vqav2_for_submission.py` applies to
    every answer it submits)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean(text)
    return process_digit_article(process_punctuation(text, LMMS_COMMA_STRIP))


def _normalise(text: str, variant: str) -> str:
    comma = LMMS_COMMA_STRIP if variant == "lmms" else COMMA_STRIP
    return process_digit_article(process_punctuation(text, comma))


def vqa_accuracy(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """Accuracy (0–1) of one prediction against the annotator answers, per `variant`."""
    disagree = len(set(_clean(a) if variant != "legacy" else a for a in answers)) > 1
    if variant == "legacy":
        pred = _normalise(_clean(prediction), variant)
        golds = [process_punctuation(a) if disagree else a for a in answers]
    else:
        pred = evalai_answer_processor(prediction) if variant == "lmms" else _clean(prediction)
        golds = [_clean(a) for a in answers]
        if disagree:
            golds = [_normalise(a, variant) for a in golds]
            pred = _normalise(pred, variant)
    # Leave out each annotator in turn (by position: upstream compares answer dicts, which carry
    # a unique answer_id, so equal strings from different annotators are distinct).
    matches = [g == pred for g in golds]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def score_row(row: Row, options: ScoreOptions) -> dict[str, Any]:
    scores: dict[str, Any] = {"accuracy": vqa_accuracy(row["prediction"], row["answers"],
                                                       options.variant)}
    for key in ("answer_type", "question_type"):
        if row.get(key) is not None:
            scores[key] = row[key]
    return scores


def summarize(rows: Sequence[Row], scores: Sequence[Mapping[str, Any]],
              options: ScoreOptions) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "unit": "percent", "count": len(scores),
        "accuracy": ratio(sum(sc["accuracy"] for sc in scores), len(scores)),
    }
    for key in ("answer_type", "question_type"):
        by_type: dict[str, list[float]] = defaultdict(list)
        for sc in scores:
            if key in sc:
                by_type[sc[key]].append(sc["accuracy"])
        if by_type:
            summary[f"per_{key}"] = {t: ratio(sum(v), len(v)) for t, v in sorted(by_type.items())}
    return summary


def render(summary: Mapping[str, Any]) -> str:
    types = summary.get("per_answer_type", {})
    table = markdown_table(["VQAv2", *types, "Overall"],
                           [["Accuracy", *(fmt(v) for v in types.values()),
                             fmt(summary["accuracy"])]])
    if questions := summary.get("per_question_type"):
        table += "\n\n" + markdown_table(["VQAv2 question type", "accuracy"],
                                          [[t, fmt(v)] for t, v in questions.items()])
    return table


METRIC = Metric(
    name="vqav2",
    title="VQAv2 accuracy",
    variants=("official", "legacy", "lmms"),
    required_fields={"answers": is_str_list(10)},
    optional_fields={"answer_type": is_str, "question_type": is_str},
    score_row=score_row,
    summarize=summarize,
    render=render,
)
