"""`dataengine`: MLLM-DataEngine GPT-VQA multiple-choice JSON to LLaVA-style instructions.

Source format (opendatalab/MLLM-DataEngine, `engine_pipeline/data_demo/gptvqa_train_data.json`;
the released `dataengine_llava.json` has the same items): a top-level JSON array (or `.jsonl`)
of::

    {"image_id": 407348, "question_type": "future_prediction",
     "question": "What is likely to happen next in this image?",
     "choices": ["The woman will put down her cell phone", "...", "..."],
     "correct_choice_idx": 2, "rationales": ["Explanations: By observing the image, ..."]}

Each item becomes one user/assistant exchange. The user turn is LLaVA-1.5's multiple-choice
prompt (the A-OKVQA rows of mix665k; DataEngine's own `ENGINEMCVQADataset` in
`MiniGPT-4/minigpt4/datasets/datasets/engine_vqa_datasets.py` builds the same text)::

    <image>
    What is likely to happen next in this image?
    A. The woman will put down her cell phone
    B. ...
    Answer with the option's letter from the given choices directly.

The assistant turn is the letter ("C"). `raw_instructions` (GPT's unparsed output) is dropped.

Options:
    coco_split: COCO image folder (default "train2014").
    coco_path_template: image path relative to the image root; fields `split`, `image_id`.
        Default: "{split}/COCO_{split}_{image_id:012d}.jpg" for 2014/2015 splits and
        "{split}/{image_id:012d}.jpg" for 2017 splits (COCO renamed its files in 2017).
    answer_style: "letter" (default) or "letter_rationale": the first rationale, without its
        "Explanation(s):" label, follows the letter per `rationale_template` (rows with no
        rationale fall back to the letter).
    prompt_template: fields `question`, `options` (default: the prompt above without
        `<image>`; use "{question}\\nOptions:\\n{options}\\n..." to add an "Options:" line).
    option_template: one line per choice, fields `letter`, `choice` (default "{letter}. {choice}").
    rationale_template: fields `letter`, `rationale` (default "{letter}. Because {rationale}").
    id_prefix: ids are the row's `id` if it has one, else "{id_prefix}{image_id}-{index}"
        (default prefix "dataengine-"; index = position in the file).

Rejected rows: missing question, fewer than 2 choices (or non-string choices),
`correct_choice_idx` missing or out of range, `image_id` not an integer.
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
         "question_type", "raw_instructions"}


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
        question = data.get("question")
        if not isinstance(question, str) or not question.strip():
            raise RowError("missing question")
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            count = len(choices) if isinstance(choices, list) else 0
            raise RowError(f"fewer than 2 choices ({count})")
        if len(choices) > 26 or not all(isinstance(c, str) for c in choices):
            raise RowError("choices must be at most 26 strings")
        answer = data.get("correct_choice_idx")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise RowError(f"correct_choice_idx is a JSON {json_type(answer)}, not an integer")
        if not 0 <= answer < len(choices):
            raise RowError(f"correct_choice_idx {answer} out of range for {len(choices)} choices")
        image_id = data.get("image_id")
        if isinstance(image_id, str) and image_id.isdigit():
            image_id = int(image_id)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise RowError(f"image_id is a JSON {json_type(image_id)}, not an integer COCO id")
        record_id = get_id(data, fallback=f"{opts['id_prefix']}{image_id}-{index}")

        letters = string.ascii_uppercase
        options = "\n".join(opts["option_template"].format(letter=letters[i], choice=c)
                            for i, c in enumerate(choices))
        prompt = opts["prompt_template"].format(question=question, options=options)
        letter = letters[answer]
        reply = letter
        rationales = data.get("rationales") or []
        if opts["answer_style"] == "letter_rationale" and rationales:
            if not isinstance(rationales, list) or not isinstance(rationales[0], str):
                raise RowError("rationales must be a list of strings")
            # A-OKVQA-style rows carry several paraphrased rationales; one is enough.
            reply = opts["rationale_template"].format(letter=letter,
                                                      rationale=rationale_text(rationales[0]))
        meta = {**extras(data, _USED, "dataengine"), "image_id": image_id,
                "question_type": data.get("question_type"), "choices": choices, "answer": answer}
        image = path_template.format(split=opts["coco_split"], image_id=image_id)
        return build("sample", {
            "id": record_id, "images": [image], "meta": meta,
            "conversations": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"},
                              {"role": "assistant", "content": reply}],
        })

    yield from convert_rows(uri, one)
