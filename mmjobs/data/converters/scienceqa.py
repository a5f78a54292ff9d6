"""`scienceqa`: ScienceQA (`problems.json` + `pid_splits.json`) to canonical samples.

Source format (lupantech/ScienceQA `data/scienceqa/`): `problems.json` maps a pid to::

    {"question": "Which figure of speech is used in this text?", "choices": ["simile", "pun"],
     "answer": 0, "hint": "Sing, O goddess, ...", "image": "image.png" | null,
     "task": "closed choice", "grade": "grade7", "subject": "language science",
     "topic": "figurative-language", "category": "Literary devices", "skill": "...",
     "lecture": "...", "solution": "...", "split": "train"}

and `pid_splits.json` maps a split (train, val, test, trainval, minitrain, minival, minitest)
to its list of pids. `ctx.input` is the directory holding both, or the `problems.json` path.

Prompts are rebuilt exactly as the published code builds them, from these files:

- `style: llava` (default): haotian-liu/LLaVA `scripts/convert_sqa_to_llava.py` with
  `create_one_example_chatbot` from `scripts/convert_sqa_to_llava_base_prompt.py` — user turn
  e.g. "Context: N/A\\nQuestion: ...\\nOptions: (A) x (B) y" (a leading "Question: " and the
  assistant's "Answer: " prefix are removed, as LLaVA does), assistant "The answer is A.".
- `style: lavin`: luogen1996/LaVIN `util/base_prompt.py` `create_training_example` — user turn
  ends with "\\nResponse:", newlines in lecture/solution become a literal "\\n", and a trailing
  "BECAUSE:" on an empty explanation is kept (LaVIN assigns the fixed string to an unused
  variable; we keep the text LaVIN trains on).

Both: context = hint (+ caption with `use_caption`), "N/A" when empty; options "(A) x (B) y";
"{lecture} {solution}" explanations; double spaces collapsed once. Output codes follow the
source tables, including their naming quirk: "AL" appends the solution and "AE" the lecture.
`QCM-LEA` gives "{lecture} {solution} The answer is A."; `QCM-ALE` gives
"The answer is A. BECAUSE: {lecture} {solution}". An image, stored as
`{problem split}/{pid}/{image}` (mini/trainval splits use their problems' own folders), puts
`<image>\\n` first in the user turn (LLaVA's converter appends "\\n<image>", and its training
code moves the token to the front).

Options:
    split: pid_splits key (default "train").
    prompt_format: "{input}-{output}", inputs CQM QCM QCML QCME QCMLE QCLM QCEM QCLEM; outputs
        A AL AE ALE AEL LA EA LEA ELA (+ LEPA with style llava). Default "CQM-A" (LLaVA's eval
        files); the LaVIN recipe uses "QCM-ALE".
    style: "llava" (default) or "lavin".
    use_caption: add captions to the context (default false, as both recipes train).
    captions_file: captions JSON ({"captions": {pid: text}}) beside problems.json, or a URI.

`meta` keeps pid, split, subject, grade, hint, has_image, choices, answer (index), category,
topic: the fields ScienceQA's per-category accuracy (NAT/SOC/LAN/TXT/IMG/NO/G1-6/G7-12) needs.

Rejected rows: a pid listed in the split but missing from problems.json, an answer index out of
range, fewer than 2 choices, a missing question; a problem that is not valid JSON (a NaN, a
syntax error inside it) or whose pid is a key of problems.json twice. problems.json is streamed
(`mmjobs.data.json_rows.iter_json_object`): a break in its structure fails the stage.
"""

from __future__ import annotations

import os
import posixpath
import string
from collections.abc import Iterator
from typing import Any

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import (
    RowError,
    build,
    json_type,
    require_input,
    resolve_options,
)
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject, iter_json_object, read_json

INPUTS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choice}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
    "QCMLE": ("Question: {question}\nContext: {context}\nOptions: {choice}\n"
              "BECAUSE: {lecture} {solution}\n"),
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
    "QCLEM": ("Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\n"
              "Options: {choice}\n"),
}
OUTPUTS = {  # without LLaVA's "Answer: " prefix, which LaVIN's training example omits
    "A": "The answer is {answer}.",
    "AL": "The answer is {answer}. BECAUSE: {solution}",
    "AE": "The answer is {answer}. BECAUSE: {lecture}",
    "ALE": "The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "{lecture} The answer is {answer}.",
    "EA": "{solution} The answer is {answer}.",
    "LEA": "{lecture} {solution} The answer is {answer}.",
    "ELA": "{solution} {lecture} The answer is {answer}.",
}
DEFAULTS: dict[str, Any] = {"split": "train", "prompt_format": "CQM-A", "style": "llava",
                            "use_caption": False, "captions_file": "captions.json"}


def check_format(prompt_format: str, style: str) -> tuple[str, str]:
    """Split "QCM-ALE" into its input and output codes, or raise naming the valid ones."""
    fmt_in, _, fmt_out = prompt_format.partition("-")
    outputs = [*OUTPUTS, "LEPA"] if style == "llava" else list(OUTPUTS)
    if fmt_in not in INPUTS or fmt_out not in outputs:
        raise ValueError(f"converter 'scienceqa': prompt_format {prompt_format!r} is not valid "
                         f"for style {style!r}; use INPUT-OUTPUT with INPUT in "
                         f"{', '.join(INPUTS)} and OUTPUT in {', '.join(outputs)}")
    return fmt_in, fmt_out


def llava_example(fmt_in: str, fmt_out: str, fields: dict[str, str]) -> tuple[str, str]:
    """LLaVA's `create_one_example_chatbot` followed by `convert_to_llava`'s prefix removal."""
    text_in = INPUTS[fmt_in].format(**fields)
    if fmt_out == "LEPA":
        text_out = ""
        if fields["lecture"].strip():
            text_out += f"LECTURE: {fields['lecture']}\n"
        if fields["solution"].strip():
            text_out += f"SOLUTION: {fields['solution']}\n"
        text_out += f"###\nANSWER: {fields['answer']}."
    else:
        text_out = "Answer: " + OUTPUTS[fmt_out].format(**fields)
    text_in = text_in.replace("  ", " ").strip()
    text_out = text_out.replace("  ", " ").strip()
    if text_in.endswith("BECAUSE:"):
        text_in = text_in.replace("BECAUSE:", "").strip()
    if text_out.endswith("BECAUSE:"):
        text_out = text_out.replace("BECAUSE:", "").strip()
    # convert_to_llava uses str.replace (every occurrence), guarded by startswith; kept as is.
    if text_in.startswith("Question: "):
        text_in = text_in.replace("Question: ", "")
    if text_out.startswith("Answer: "):
        text_out = text_out.replace("Answer: ", "")
    return text_in, text_out


def lavin_example(fmt_in: str, fmt_out: str, fields: dict[str, str]) -> tuple[str, str]:
    """LaVIN's `create_training_example` (its leading "\\n" is stripped away, as there)."""
    text_in = (INPUTS[fmt_in].format(**fields) + "Response:").replace("  ", " ").strip()
    text_out = OUTPUTS[fmt_out].format(**fields).replace("  ", " ").strip()
    return text_in, text_out


def data_files(uri: str) -> tuple[str, str]:
    """(problems.json URI, directory URI) for an input naming the directory or problems.json."""
    if not uri.rstrip("/").endswith(".json"):
        return storage.join(uri, "problems.json"), uri
    if storage.is_s3(uri):
        return uri, posixpath.dirname(uri)
    return uri, os.path.dirname(storage.parse(uri).key)


@register("scienceqa", help="ScienceQA problems.json + pid_splits.json (LLaVA / LaVIN prompts)")
def convert_scienceqa(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert one ScienceQA split; see the module docstring for the format and options."""
    uri = require_input(ctx, "scienceqa")
    opts = resolve_options(ctx, "scienceqa", DEFAULTS, {"style": ("llava", "lavin")})
    fmt_in, fmt_out = check_format(opts["prompt_format"], opts["style"])
    problems_uri, base = data_files(uri)
    splits = read_json(storage.join(base, "pid_splits.json"))
    if not isinstance(splits, dict):
        raise ValueError(f"converter 'scienceqa': {storage.join(base, 'pid_splits.json')} must "
                         "hold a JSON object (split -> pids)")
    # Streamed member by member: a bad problem (a NaN, a syntax error inside it) rejects that
    # pid only; a broken file structure raises MalformedInputError naming the byte.
    problems: dict[str, Any] = {}
    bad_problems: dict[str, str] = {}
    for pid, row in iter_json_object(problems_uri):
        if pid in problems or pid in bad_problems:  # json.load would keep the last silently
            bad_problems[pid] = f"duplicate_id: pid {pid!r} is a key of problems.json twice"
        elif row.error is None:
            problems[pid] = row.data
        else:
            bad_problems[pid] = row.error
    if opts["split"] not in splits:
        raise ValueError(f"converter 'scienceqa': split {opts['split']!r} is not in "
                         f"pid_splits.json; available: {', '.join(sorted(splits))}")
    captions: dict[str, str] = {}
    if opts["use_caption"]:
        cap_uri = opts["captions_file"]
        if "://" not in cap_uri and not os.path.isabs(cap_uri):
            cap_uri = storage.join(base, cap_uri)
        captions = read_json(cap_uri).get("captions", {})
    example = llava_example if opts["style"] == "llava" else lavin_example
    source = problems_uri

    def one(pid: str) -> Record:
        if pid in bad_problems:
            raise RowError(bad_problems[pid])
        problem = problems.get(pid)
        if problem is None:
            raise RowError(f"pid {pid} is listed in pid_splits.json[{opts['split']!r}] "
                           "but missing from problems.json")
        if not isinstance(problem, dict):
            raise RowError(f"problem is a JSON {json_type(problem)}, not an object")
        question, choices, answer = (problem.get(k) for k in ("question", "choices", "answer"))
        if not isinstance(question, str) or not question.strip():
            raise RowError("missing question")
        if (not isinstance(choices, list) or not 2 <= len(choices) <= 26
                or not all(isinstance(c, str) for c in choices)):
            raise RowError("choices must be a list of 2 to 26 strings")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise RowError(f"answer is a JSON {json_type(answer)}, not an integer index")
        if not 0 <= answer < len(choices):
            raise RowError(f"answer index {answer} out of range for {len(choices)} choices")
        hint = problem.get("hint") or ""
        lecture = problem.get("lecture") or ""
        solution = problem.get("solution") or ""
        if opts["style"] == "llava":
            # build_prompt_chatbot escapes newlines, then turns every "\\n" back into a newline.
            lecture = lecture.replace("\n", "\\n").replace("\\n", "\n")
            solution = solution.replace("\n", "\\n").replace("\\n", "\n")
        else:  # LaVIN keeps the escaped form (a literal backslash-n) in its training text
            lecture, solution = lecture.replace("\n", "\\n"), solution.replace("\n", "\\n")
        caption = captions.get(pid, "") if opts["use_caption"] else ""
        letters = string.ascii_uppercase
        fields = {
            "question": question,
            "context": " ".join([hint, caption]).strip() or "N/A",
            "choice": " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices)),
            "answer": letters[answer], "lecture": lecture, "solution": solution,
        }
        text_in, text_out = example(fmt_in, fmt_out, fields)
        image = problem.get("image")
        images = [f"{problem.get('split') or opts['split']}/{pid}/{image}"] if image else []
        if images:
            text_in = f"{IMAGE_TOKEN}\n{text_in}"
        meta = {"source": "scienceqa", "pid": pid, "split": opts["split"],
                "subject": problem.get("subject"), "grade": problem.get("grade"), "hint": hint,
                "has_image": bool(image), "choices": choices, "answer": answer,
                "category": problem.get("category"), "topic": problem.get("topic")}
        return build("sample", {"id": pid, "images": images, "meta": meta, "conversations": [
            {"role": "user", "content": text_in}, {"role": "assistant", "content": text_out}]})

    for pid in splits[opts["split"]]:
        try:
            yield one(str(pid))
        except RowError as e:
            yield Reject(str(pid), str(e), source)
