"""`dataengine`: MLLM-DataEngine GPT-VQA multiple-choice data to LLaVA-style instructions.

Three source shapes, one row each, in a top-level JSON array (or `.jsonl`):

1. v1.0 parsed rows (opendatalab/MLLM-DataEngine@version1.0,
   `engine_pipeline/data_demo/gptvqa_train_data.json`, the output of its
   `Step4-post-process.py`)::

    {"image_id": 407348, "question_type": "future_prediction",
     "question": "What is likely to happen next in this image?",
     "choices": ["The woman will put down her cell phone", "...", "..."],
     "correct_choice_idx": 2, "rationales": ["Explanations: By observing the image, ..."]}

2. v1.0 raw GPT results (`gptvqa_result.jsonl`: `image_id`, `question_type`,
   `raw_instructions` and no `question` key): `raw_instructions` is parsed the way
   `Step4-post-process.py` parses it (`parse_raw_instructions`: its sections, its choice
   splitting, its bounding-box removal and its filters), so the rows equal the released
   parsed rows.
3. v2 rows (README "Dataset Format", `dataengine_llava.json` on the HF hub)::

    {"instruction": "Where is the man ...?", "answer": "...", "short_answer": "...",
     "options": ["Top right", "Bottom right", "Bottom left", "Left middle"],
     "choice_answer": "D", "image": "vg/VG_100K_2/2404787.jpg", "qtype": 4}

   `image` is a path relative to the image root (LLaVA's `playground/data`); the answer is
   `choice_answer` (the README's own example misspells it `choide_answer`, which
   MiniGPT-4's loader would drop too: such rows are rejected, naming the key).

Each row becomes one user/assistant exchange. The user turn is LLaVA-1.5's multiple-choice
prompt (the A-OKVQA rows of mix665k; DataEngine's MiniGPT-4 loader
`minigpt4/datasets/datasets/engine_vqa_datasets.py` builds the same text)::

    <image>
    What is likely to happen next in this image?
    A. The woman will put down her cell phone
    B. ...
    Answer with the option's letter from the given choices directly.

The assistant turn is the letter ("C"). `raw_instructions` (GPT's unparsed output) is dropped.

Options:
    coco_split: COCO image folder (default "train2014"), for v1 rows.
    coco_path_template: v1 image path relative to the image root; fields `split`, `image_id`.
        Default: "{split}/COCO_{split}_{image_id:012d}.jpg" for 2014/2015 splits and
        "{split}/{image_id:012d}.jpg" for 2017 splits (COCO renamed its files in 2017).
    answer_style: "letter" (default) or "letter_rationale": the first rationale, without its
        "Explanation(s):" label, follows the letter per `rationale_template` (rows with no
        rationale, e.g. v2 rows, fall back to the letter).
    prompt_template: fields `question`, `options` (default: the prompt above without
        `<image>`; use "{question}\\nOptions:\\n{options}\\n..." to add an "Options:" line).
    option_template: one line per choice, fields `letter`, `choice` (default "{letter}. {choice}").
    rationale_template: fields `letter`, `rationale` (default "{letter}. Because {rationale}").
    id_prefix: ids are the row's `id` if it has one, else "{id_prefix}{image_id}-{index}"
        (v2: "{id_prefix}{index}"; default prefix "dataengine-"; index = position in the file).

Rejected rows: missing question, fewer than 2 choices (or non-string choices), the answer
missing or out of range, `image_id` not an integer (v1) or `image` not a path (v2); raw
results that Step4 drops (they mention coordinates or bounding boxes, GPT wrote "skip", a
"located at [" box survives, the rationale talks about the image description) or cannot parse
(a missing "Question:" / "Choices:" / "Answer:" section, no "(letter)" in the answer) — each
with that reason.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from typing import Any

from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import (
    RowError,
    build,
    convert_rows,
    extras,
    get_id,
    json_type,
    require_input,
    resolve_options,
)
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
DEFAULTS: dict[str, Any] = {
    "coco_split": "train2014",
    "coco_path_template": "",  # "" = pick by split, see module docstring
    "answer_style": "letter",
    "prompt_template": "{question}\n{options}\n" + MC_INSTRUCTION,
    "option_template": "{letter}. {choice}",
    "rationale_template": "{letter}. Because {rationale}",
    "id_prefix": "dataengine-",
}
# GPT writes rationales as "Explanation: ..." / "Explanations: ..."; the label is not content.
_RATIONALE_LABEL = re.compile(r"^\s*explanations?\s*:\s*", re.IGNORECASE)
_USED = {"id", "image_id", "question", "choices", "correct_choice_idx", "rationales",
         "question_type", "raw_instructions", "instruction", "options", "choice_answer", "image",
         "qtype"}


def coco_template(split: str, template: str) -> str:
    """The image path template: the user's, or COCO's file naming for `split`."""
    if template:
        return template
    if split.endswith("2017"):
        return "{split}/{image_id:012d}.jpg"
    return "{split}/COCO_{split}_{image_id:012d}.jpg"


def rationale_text(rationale: str) -> str:
    """Drop the "Explanation:" label and lower-case the first word so it reads after "Because".

    Only a plain capitalized word ("By", "The") is lower-cased; acronyms and "I" are kept.
    """
    text = _RATIONALE_LABEL.sub("", rationale).strip()
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[0].isupper() and first[1:].islower():
        text = text[0].lower() + text[1:]
    return text


# --------------------------------------------------------------------------- raw GPT results

# Step4-post-process.py looks for the explanation under these labels, in this order. Note that
# "Explanations:" (plural, what GPT usually writes) is not among them: for such rows Step4 takes
# the last line of the text as the rationale, which is where the explanation is.
_EXPLANATION_LABELS = ("Explanation:", "Reason:", "Reasoning:", "Lecture:", "Explanatory note:",
                       "Explaination:")
_LOCATED_AT_BOX = re.compile(r"located at\s*\[")


def remove_boxes(text: str) -> str:
    """Step4's `remove_bbox_v2`: drop `[x0, y0, x1, y1]` boxes and tidy what they leave.

    The boxes go, then "and" left before punctuation, repeated commas, a comma before "." or
    "?", and spaces before punctuation; runs of spaces collapse to one.
    """
    text = re.sub(r"\[.*?\]", "", text)
    text = re.sub(r"\s*and\s*([,.?])", r"\1", text)
    text = re.sub(r"(\s*,\s*)+", ", ", text)
    text = re.sub(r"\s*,\s*([.?])", r"\1", text)
    text = re.sub(r"\s*([,.?])", r"\1", text)
    return " ".join(word for word in text.split(" ") if word).strip()


def _split_choices(block: str) -> list[str]:
    """Step4's choice splitting: the text after each ")" up to the next "(" (or the end).

    Kept as published: a choice containing "(...)" is cut there, as it was in the released data.
    """
    choices = []
    for i, ch in enumerate(block):
        if ch != ")":
            continue
        k = block.find("(", i)
        text = block[i + 1:] if k in (-1, len(block) - 1) else block[i + 1:k]
        if text.strip():
            choices.append(text.strip())
    return [c[:-1] if c.endswith(".") else c for c in choices]


def parse_raw_instructions(raw: str) -> dict[str, Any]:
    """GPT's raw Q&A text -> `question`, `choices`, `correct_choice_idx`, `rationales`.

    Reproduces MLLM-DataEngine v1.0 `engine_pipeline/Step4-post-process.py::process_data` for
    one row; where Step4 drops a row (or would crash on it) this raises `RowError` saying why.
    """
    if any(word in raw for word in ("coordinate", "bounding box")):
        raise RowError("raw_instructions mention coordinates or bounding boxes (DataEngine's "
                       "post-processing drops such rows)")
    if "skip" in raw or "Skip" in raw:
        raise RowError("raw_instructions say skip (GPT declined; DataEngine drops such rows)")
    q, m, a = raw.find("Question:"), raw.find("Choices:"), raw.find("Answer:")
    missing = [label for label, at in (("Question:", q), ("Choices:", m), ("Answer:", a))
               if at == -1]
    if missing:
        raise RowError(f"raw_instructions lack the {', '.join(missing)} section(s)")
    e = next((at for label in _EXPLANATION_LABELS if (at := raw.find(label)) != -1), -1)
    question = raw[q + len("Question:"):m].strip()
    choices = _split_choices(raw[m + len("Choices:"):a].strip())
    if not choices:
        raise RowError("raw_instructions list no choices after 'Choices:'")
    # Step4 slices raw[a:e] with e = -1 when no label was found: the text minus its last char.
    answer = raw[a:e]
    letter = answer.split("(")[1].split(")")[0].upper() if "(" in answer else ""
    if letter not in ("A", "B", "C", "D", "E"):
        raise RowError(f"raw_instructions answer has no (A)-(E) letter: {answer.strip()!r:.80}")
    rationale = raw[e:].strip() if e != -1 else raw.split("\n")[-1]
    if any(_LOCATED_AT_BOX.search(t) for t in (question, *choices, rationale)):
        raise RowError("raw_instructions keep a 'located at [box]' (DataEngine drops such rows)")
    rationale = remove_boxes(rationale)
    if "description" in rationale.lower():
        raise RowError("the rationale refers to the image description GPT was given "
                       "(DataEngine drops such rows)")
    return {"question": remove_boxes(question), "choices": [remove_boxes(c) for c in choices],
            "correct_choice_idx": "ABCDE".index(letter), "rationales": [rationale]}


# --------------------------------------------------------------------------- rows


def _v1_fields(data: dict[str, Any]) -> dict[str, Any]:
    """question/choices/answer/rationales of a v1 row (parsed, or raw GPT output)."""
    if "question" not in data and isinstance(data.get("raw_instructions"), str):
        return parse_raw_instructions(data["raw_instructions"])
    return {k: data.get(k) for k in ("question", "choices", "correct_choice_idx", "rationales")}


def _v2_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The same fields from a v2 row (`instruction`, `options`, `choice_answer`)."""
    if "choice_answer" not in data:
        typo = " (the README example spells it 'choide_answer')" if "choide_answer" in data \
            else ""
        raise RowError(f"missing choice_answer{typo}")
    letter, options = data["choice_answer"], data.get("options")
    if not isinstance(letter, str) or len(letter.strip()) != 1 or not letter.strip().isalpha():
        raise RowError(f"choice_answer {letter!r} is not an option letter")
    index = string.ascii_uppercase.index(letter.strip().upper())
    return {"question": data.get("instruction"), "choices": options,
            "correct_choice_idx": index, "rationales": []}


def _check_mc(fields: dict[str, Any]) -> tuple[str, list[str], int]:
    question, choices, answer = (fields[k] for k in ("question", "choices",
                                                     "correct_choice_idx"))
    if not isinstance(question, str) or not question.strip():
        raise RowError("missing question")
    if not isinstance(choices, list) or len(choices) < 2:
        count = len(choices) if isinstance(choices, list) else 0
        raise RowError(f"fewer than 2 choices ({count})")
    if len(choices) > 26 or not all(isinstance(c, str) for c in choices):
        raise RowError("choices must be at most 26 strings")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise RowError(f"correct_choice_idx is a JSON {json_type(answer)}, not an integer")
    if not 0 <= answer < len(choices):
        raise RowError(f"correct_choice_idx {answer} out of range for {len(choices)} choices")
    return question, choices, answer


@register("dataengine", help="MLLM-DataEngine GPT-VQA multiple-choice JSON (COCO images)")
def convert_dataengine(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert a DataEngine GPT-VQA file; see the module docstring for the format and options."""
    uri = require_input(ctx, "dataengine")
    opts = resolve_options(ctx, "dataengine", DEFAULTS,
                           {"answer_style": ("letter", "letter_rationale")})
    path_template = coco_template(opts["coco_split"], opts["coco_path_template"])
    try:  # fail on a bad template before reading any data
        path_template.format(split=opts["coco_split"], image_id=1)
        opts["prompt_template"].format(question="q", options="o")
        opts["option_template"].format(letter="A", choice="c")
        opts["rationale_template"].format(letter="A", rationale="r")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"converter 'dataengine': a template option has an unknown or bad "
                         f"field ({e!r}); see the allowed fields in its docstring") from e

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        v2 = "instruction" in data and "options" in data
        fields = _v2_fields(data) if v2 else _v1_fields(data)
        question, choices, answer = _check_mc(fields)
        if v2:
            image = data.get("image")
            if not isinstance(image, str) or not image.strip():
                raise RowError(f"image is a JSON {json_type(image)}, not a path")
            meta_extra = {"qtype": data.get("qtype")}
            record_id = get_id(data, fallback=f"{opts['id_prefix']}{index}")
        else:
            image_id = data.get("image_id")
            if isinstance(image_id, str) and image_id.isdigit():
                image_id = int(image_id)
            if isinstance(image_id, bool) or not isinstance(image_id, int):
                raise RowError(f"image_id is a JSON {json_type(image_id)}, not an integer "
                               "COCO id")
            image = path_template.format(split=opts["coco_split"], image_id=image_id)
            meta_extra = {"image_id": image_id, "question_type": data.get("question_type")}
            record_id = get_id(data, fallback=f"{opts['id_prefix']}{image_id}-{index}")

        letters = string.ascii_uppercase
        options = "\n".join(opts["option_template"].format(letter=letters[i], choice=c)
                            for i, c in enumerate(choices))
        prompt = opts["prompt_template"].format(question=question, options=options)
        letter = letters[answer]
        reply = letter
        rationales = fields["rationales"] or []
        if opts["answer_style"] == "letter_rationale" and rationales:
            if not isinstance(rationales, list) or not isinstance(rationales[0], str):
                raise RowError("rationales must be a list of strings")
            # A-OKVQA-style rows carry several paraphrased rationales; one is enough.
            reply = opts["rationale_template"].format(letter=letter,
                                                      rationale=rationale_text(rationales[0]))
        meta = {**extras(data, _USED, "dataengine"), **meta_extra, "choices": choices,
                "answer": answer}
        return build("sample", {
            "id": record_id, "images": [image], "meta": meta,
            "conversations": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"},
                              {"role": "assistant", "content": reply}],
        })

    yield from convert_rows(uri, one)
