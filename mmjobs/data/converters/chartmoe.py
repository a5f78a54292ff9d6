"""`chartmoe`: ChartMoE / InternLM-XComposer2 fine-tuning JSON to canonical samples.

Source format (IDEA-FinAI/ChartMoE `chartmoe/train/README.md`, read by
`chartmoe/train/data_mix.py`): a top-level JSON array (or `.jsonl`) of::

    {"id": "0", "image": ["ChartMoE-Align/table/0.png"],
     "conversations": [{"from": "user", "value": "<ImageHere> Convert the chart to a table."},
                       {"from": "assistant", "value": "| year | sales |\\n| 2020 | 3 |"}]}

`image` is a LIST of paths (a single string is accepted too); rows without it are text-only.
Roles: user (or human) → user, assistant (or gpt) → assistant, system → system; `data_mix.py`'s
`conv2text` accepts the same user/assistant spellings. Like `conv2text`, each value is
stripped. The `<ImageHere>` placeholder becomes the canonical `<image>`. Other fields go to
`meta`, with `meta.source = "chartmoe"`.

Options:
    placeholder: the image placeholder to replace (default "<ImageHere>").
    id_prefix: prepended to every id (default ""). ChartMoE's table/json/code alignment files
        each number their rows from "0", so merging them needs distinct prefixes.

Rejected rows: as for `llava` (missing id, missing/empty conversations, unknown role,
non-string value, malformed `image`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import (
    build,
    convert_rows,
    convert_turns,
    extras,
    get_id,
    get_images,
    require_input,
    resolve_options,
)
from mmjobs.data.records import IMAGE_TOKEN, Record, Reject

CHARTMOE_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                  "system": "system"}


@register("chartmoe", help="ChartMoE / InternLM-XComposer2 JSON (image list, <ImageHere>)")
def convert_chartmoe(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert a ChartMoE-format file; see the module docstring for the format and options."""
    uri = require_input(ctx, "chartmoe")
    opts = resolve_options(ctx, "chartmoe", {"placeholder": "<ImageHere>", "id_prefix": ""})
    placeholder = opts["placeholder"]

    def rewrite(text: str) -> str:
        return text.strip().replace(placeholder, IMAGE_TOKEN)

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"])
        images = get_images(data, "image")
        turns = convert_turns(data.get("conversations"), CHARTMOE_ROLES, rewrite=rewrite)
        meta = extras(data, {"id", "image", "conversations"}, "chartmoe")
        return build("sample", {"id": record_id, "images": images, "conversations": turns,
                                "meta": meta})

    yield from convert_rows(uri, one)
