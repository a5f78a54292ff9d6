"""`preference`, `prompt-only`, `align-anything-ti2ti`, `alpaca`: Align-Anything-style JSON/JSONL
to preference / prompt / sample records.

Source formats (PKU-Alignment/align-anything, `align_anything/configs/template.py`; the file is
a top-level JSON array, or JSONL by extension). Preference rows, either of::

    {"question": "What is in the image?", "image": "imgs/1.png",
     "response_1": "A cat.", "response_2": "A dog.", "better_response_id": 1}
    {"prompt": "Describe it.", "image": ["a.png", "b.png"], "chosen": "...", "rejected": "..."}

The prompt is `question` or `prompt`; input images come from `image` (a path or a list; also
`images`/`image_url`). Responses are `response_1`/`response_2` (or `response_0`/`response_1`,
as PKU-SafeRLHF numbers them) picked by the preferred-id field, or `chosen`/`rejected`.
Chameleon-style rows (image-token models that also generate images) carry the output images as
`chosen_images`/`rejected_images` or `output_image_{id}`; as in align-anything's
`ANYTHING_TI2TI` template, one `<image>` per output image is appended to a response that has no
tokens of its own. The prompt becomes one user turn with one `<image>` per input image in
front (unless the text already holds `<image>` tokens of its own).

Prompt-only rows: `{"question" | "prompt": "...", "image": ...}` -> one user turn.

Supervised text-image-to-text-image rows (`align-anything-ti2ti`, the fields of
align-anything's `ANYTHING_TI2TI` SFT template)::

    {"question": "Draw a cat.", "image_url": "in/1.png", "response": "Here it is:",
     "output_image_url": "out/1.png"}

become a `sample`: one user turn (input images in front, as above) and one assistant turn, the
response with one `<image>` per output image appended (unless it has its own); `images` lists
the input images, then the output images. Pre-tokenized for an image-token model (Chameleon),
the output images become VQ tokens inside the labels: the model learns to draw them. The
prompt may also be `prompt`, the input images `image`/`images`, the output images
`output_image`/`output_images`.

Supervised text rows in the Alpaca layout (`alpaca`; align-anything's own text-to-text SFT
assets, `assets/text_to_text/supervised/train.json`)::

    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1.Eat a balanced diet ...", "text": "Below is an instruction that ..."}

become a text-only `sample`: the user turn is `instruction` and `input` joined by a space, as
align-anything's `Dialogue` template joins them (without the trailing space an empty input
leaves there), the assistant turn is `output`; `text` (Alpaca's own full prompt) goes to meta.

Options (all four converters; `alpaca` has no images, so only `id_prefix`):
    image_separator: between the leading `<image>` tokens and the prompt text (default "\\n",
        the LLaVA convention used across mmjobs; align-anything's Chameleon template uses "").
    id_prefix: ids are the row's `id`, else "{id_prefix}{file stem}-{index}" (default "").
Option (`preference` only):
    preferred_key: the field naming the better response (default "better_response_id";
        align-anything datasets also use e.g. "overall_response", "more_helpful_response_id").

Rejected rows: missing prompt (alpaca: missing instruction or output); missing responses (or,
for align-anything-ti2ti, a response with neither text nor output images); missing preferred
id or one that names neither response (a tie); an empty response; chosen identical to
rejected. (`<image>` counts are checked by the prepare stage's validator.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import (
    RowError,
    build,
    convert_rows,
    extras,
    file_stem,
    get_id,
    get_images,
    json_type,
    require_input,
    resolve_options,
)
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject

PROMPT_KEYS = ("question", "prompt")
IMAGE_KEYS = ("image", "images", "image_url")


def with_image_tokens(text: str, count: int, *, front: bool, sep: str) -> str:
    """`text` with one `<image>` per image, added only when the text has no token of its own.

    A text whose own tokens do not match the images is left alone: the prepare stage's
    validator rejects it as `placeholder_mismatch`.
    """
    if IMAGE_TOKEN in text or not count:
        return text
    tokens = IMAGE_TOKEN * count
    return f"{tokens}{sep}{text}" if front else f"{text}{tokens}"


def prompt_turn(data: dict[str, Any], sep: str) -> tuple[list[dict[str, str]], list[str]]:
    """The single user turn and the input images of a row."""
    key = next((k for k in PROMPT_KEYS if data.get(k) is not None), PROMPT_KEYS[0])
    text = data.get(key)
    if not isinstance(text, str) or not text.strip():
        raise RowError("missing prompt (expected a non-empty `question` or `prompt` string)")
    image_key = next((k for k in IMAGE_KEYS if data.get(k) is not None), IMAGE_KEYS[0])
    images = get_images(data, image_key)
    content = with_image_tokens(text, len(images), front=True, sep=sep)
    return [{"role": "user", "content": content}], images


def preferred_pair(data: dict[str, Any], key: str) -> tuple[Any, Any, list[str], list[str]]:
    """(chosen, rejected, chosen_images, rejected_images) from a row's two responses."""
    if "chosen" in data or "rejected" in data:
        return (data.get("chosen"), data.get("rejected"), get_images(data, "chosen_images"),
                get_images(data, "rejected_images"))
    if "response_1" in data and "response_2" in data:
        ids = (1, 2)
    elif "response_0" in data and "response_1" in data:
        ids = (0, 1)
    else:
        raise RowError("missing responses (expected response_1/response_2 or chosen/rejected)")
    better = data.get(key)
    if better is None:
        raise RowError(f"missing {key}")
    if isinstance(better, str) and better.strip().isdigit():
        better = int(better)  # align-anything reads it with int(...)
    if isinstance(better, bool) or better not in ids:
        raise RowError(f"{key} is {better!r}, not {ids[0]} or {ids[1]} "
                       "(a tie or unlabeled pair cannot train a preference)")
    worse = ids[1] if better == ids[0] else ids[0]
    return (data[f"response_{better}"], data[f"response_{worse}"],
            get_images(data, f"output_image_{better}"), get_images(data, f"output_image_{worse}"))


def used_keys(data: dict[str, Any]) -> set[str]:
    """Fields consumed into the record (everything else goes to meta)."""
    return {"id", *PROMPT_KEYS, *IMAGE_KEYS, "chosen", "rejected", "chosen_images",
            "rejected_images", *(k for k in data if k.startswith(("response_", "output_image_")))}


@register("preference", kind="preference",
          help="Align-Anything-style preference JSON/JSONL (response_1/2 + id, or chosen/rejected)")
def convert_preference(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert preference pairs; see the module docstring for the formats and options."""
    uri = require_input(ctx, "preference")
    opts = resolve_options(ctx, "preference", {"image_separator": "\n", "id_prefix": "",
                                               "preferred_key": "better_response_id"})
    stem = file_stem(uri)

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"], fallback=f"{stem}-{index}")
        prompt, images = prompt_turn(data, opts["image_separator"])
        chosen, rejected, chosen_images, rejected_images = preferred_pair(
            data, opts["preferred_key"])
        texts = {}
        for what, text, imgs in (("chosen", chosen, chosen_images),
                                 ("rejected", rejected, rejected_images)):
            if not isinstance(text, str):
                raise RowError(f"{what} response is a JSON {json_type(text)}, not a string")
            if not text.strip() and not imgs:
                raise RowError(f"empty {what} response")
            texts[what] = with_image_tokens(text, len(imgs), front=False, sep="")
        if texts["chosen"] == texts["rejected"] and chosen_images == rejected_images:
            raise RowError("chosen and rejected responses are identical")
        meta = extras(data, used_keys(data) | {opts["preferred_key"]}, "preference")
        return build("preference", {
            "id": record_id, "images": images, "prompt": prompt, "chosen": texts["chosen"],
            "rejected": texts["rejected"], "chosen_images": chosen_images,
            "rejected_images": rejected_images, "meta": meta})

    yield from convert_rows(uri, one)


@register("prompt-only", kind="prompt", help="Align-Anything-style prompt-only JSON/JSONL")
def convert_prompt_only(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert prompts (PPO rollouts, inference); see the module docstring."""
    uri = require_input(ctx, "prompt-only")
    opts = resolve_options(ctx, "prompt-only", {"image_separator": "\n", "id_prefix": ""})
    stem = file_stem(uri)

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"], fallback=f"{stem}-{index}")
        prompt, images = prompt_turn(data, opts["image_separator"])
        meta = extras(data, used_keys(data), "prompt-only")
        return build("prompt", {"id": record_id, "images": images, "prompt": prompt,
                                "meta": meta})

    yield from convert_rows(uri, one)


OUTPUT_IMAGE_KEYS = ("output_image_url", "output_image", "output_images")


@register("align-anything-ti2ti", images_in_responses=True,
          help="Align-Anything text-image-to-text-image SFT JSON/JSONL (question, image_url, "
               "response, output_image_url)")
def convert_ti2ti(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert supervised rows whose responses may contain images; see the module docstring."""
    uri = require_input(ctx, "align-anything-ti2ti")
    opts = resolve_options(ctx, "align-anything-ti2ti", {"image_separator": "\n",
                                                         "id_prefix": ""})
    stem = file_stem(uri)

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"], fallback=f"{stem}-{index}")
        prompt, images = prompt_turn(data, opts["image_separator"])
        response = data.get("response")
        if not isinstance(response, str):
            raise RowError(f"response is a JSON {json_type(response)}, not a string")
        key = next((k for k in OUTPUT_IMAGE_KEYS if data.get(k) is not None),
                   OUTPUT_IMAGE_KEYS[0])
        outputs = get_images(data, key)
        if not response.strip() and not outputs:
            raise RowError("empty response (no text and no output image)")
        answer = with_image_tokens(response, len(outputs), front=False, sep="")
        meta = extras(data, used_keys(data) | {"response", *OUTPUT_IMAGE_KEYS},
                      "align-anything-ti2ti")
        return build("sample", {
            "id": record_id, "images": [*images, *outputs],
            "conversations": [*prompt, {"role": "assistant", "content": answer}],
            "meta": meta})

    yield from convert_rows(uri, one)


@register("alpaca", help="Alpaca-layout supervised JSON/JSONL (instruction, input, output), "
                         "e.g. align-anything's text-to-text SFT assets")
def convert_alpaca(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert instruction/input/output rows to text-only samples; see the module docstring."""
    uri = require_input(ctx, "alpaca")
    opts = resolve_options(ctx, "alpaca", {"id_prefix": ""})
    stem = file_stem(uri)

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"], fallback=f"{stem}-{index}")
        texts = {k: data.get(k, "") for k in ("instruction", "input", "output")}
        for key, value in texts.items():
            if not isinstance(value, str):
                raise RowError(f"{key} is a JSON {json_type(value)}, not a string")
        if not texts["instruction"].strip():
            raise RowError("missing instruction")
        if not texts["output"].strip():
            raise RowError("missing output (an empty answer cannot be trained on)")
        prompt = " ".join(t for t in (texts["instruction"], texts["input"]) if t.strip())
        return build("sample", {
            "id": record_id, "images": [],
            "conversations": [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": texts["output"]}],
            "meta": extras(data, {"id", "instruction", "input", "output"}, "alpaca")})

    yield from convert_rows(uri, one)
