"""`llava`: LLaVA visual-instruction JSON (e.g. `llava_v1_5_mix665k.json`) to canonical samples.

Source format (haotian-liu/LLaVA, `docs/Data.md` and `llava/train/train.py`): a top-level JSON
array, streamed row by row (a `.jsonl`/`.ndjson` input is read line by line; see
`mmjobs.data.json_rows` for which malformed rows are rejected and which fail the file)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

`image` is optional: text-only rows (ShareGPT in mix665k) are kept with `images: []`; a list of
paths is accepted as well (LLaVA-NeXT style). Roles map human→user, gpt→assistant,
system→system. Every other field (e.g. `model`) is kept in `meta`, with `meta.source = "llava"`.

Options:
    image_token: "start" (default) rewrites a turn holding one `<image>` to `<image>\\n{text}`,
        exactly as LLaVA's `preprocess_multimodal` does before tokenizing, so the canonical
        record is what LLaVA-1.5 trains on (mix665k puts the token first or last); "keep"
        leaves the text as published.
    id_prefix: prepended to every id (default ""), to keep ids unique across merged files.

Rejected rows: missing id; missing or empty `conversations`; a turn that is not an object; an
unknown `from` role; a non-string `value`; an `image` that is not a path or a list of paths.

This module also holds the small row helpers the other JSON converters share (`iter_rows`,
`convert_rows`, `RowError`, ...), because they all read LLaVA-shaped files.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.records import (
    IMAGE_TOKEN,
    Kind,
    MalformedInputError,
    RawRow,
    Record,
    Reject,
    iter_json_array,
    iter_jsonl,
    parse_record,
)

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")


# --------------------------------------------------------------------------- shared helpers


class RowError(ValueError):
    """One input row cannot be converted; the message is the `Reject` reason."""


def require_input(ctx: ConvertContext, converter: str) -> str:
    """The input URI, or a `ValueError` saying the converter needs one."""
    if not ctx.input:
        raise ValueError(f"converter {converter!r} needs an input file: set the prepare input URI")
    return os.fspath(ctx.input)


def resolve_options(ctx: ConvertContext, converter: str, defaults: Mapping[str, Any],
                    choices: Mapping[str, tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """`ctx.options` over `defaults`; every unknown key, wrong type or bad choice in one error."""
    choices = choices or {}
    errors: list[str] = []
    for key, value in ctx.options.items():
        if key not in defaults:
            errors.append(f"unknown option {key!r} (known: {', '.join(sorted(defaults))})")
            continue
        default = defaults[key]
        if default is not None and type(value) is not type(default):
            errors.append(f"option {key}={value!r} must be a {type(default).__name__}")
        elif key in choices and value not in choices[key]:
            allowed = ", ".join(map(str, choices[key]))
            errors.append(f"option {key}={value!r} is not one of: {allowed}")
    if errors:
        raise ValueError(f"converter {converter!r}: " + "; ".join(errors))
    return {**defaults, **ctx.options}


def iter_rows(uri: str) -> Iterator[RawRow]:
    """Stream rows of a top-level JSON array, or of JSON Lines when the name ends in .jsonl.

    Bad rows come back with `error` set; a file whose structure breaks (truncated, not an
    array, data after the array, ...) raises `MalformedInputError` naming the row and byte
    offset, so no converter can silently lose the rows after a bad one. A git-lfs pointer in
    place of the data (a clone without `git lfs pull`) is refused up front with that fix.
    """
    refuse_lfs_pointer(uri)
    if uri.lower().endswith(JSONL_SUFFIXES):
        return iter_jsonl(uri)
    return iter_json_array(uri)


LFS_POINTER_START = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(uri: str) -> None:
    """Raise `MalformedInputError` if `uri` is a git-lfs pointer file rather than the data.

    Repositories that keep large files in git-lfs (e.g. copies of `llava_v1_5_mix665k.json`)
    check out a ~130-byte text file naming the real file's sha256 and size until `git lfs pull`
    fetches it; without this check it would read as a JSON syntax error at byte 0.
    """
    with storage.open_read(uri) as f:
        head = f.read(512)
    if not head.startswith(LFS_POINTER_START):
        return
    fields = dict(line.split(" ", 1) for line in head.decode("utf-8", "replace").splitlines()
                  if " " in line)
    size = fields.get("size", "?")
    raise MalformedInputError(
        f"{uri}: is a git-lfs pointer ({fields.get('oid', 'no oid')}, size {size} bytes), not "
        "the data itself: fetch the file (`git lfs pull` in the repository it came from, or "
        "download it from where the dataset is published) and pass that")


def json_type(value: Any) -> str:
    """JSON's name for a parsed value's type, for reject reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def file_stem(uri: str) -> str:
    """`s3://b/x/train.jsonl` -> `train` (fallback ids are `{stem}-{index}`)."""
    return posixpath.basename(uri.rstrip("/")).split(".", 1)[0] or "row"


def row_label(data: dict[str, Any], locator: str) -> str:
    """What a reject's `row` says: the row's own id when it has a usable one, else its locator."""
    value = data.get("id")
    ok = isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip()
    return str(value) if ok else locator


def get_id(data: dict[str, Any], *, prefix: str = "", fallback: str | None = None) -> str:
    """The row's `id` (string or integer) with `prefix`; `fallback` when absent, else `RowError`."""
    value = data.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        if fallback is None:
            raise RowError("missing id")
        return prefix + fallback
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError(f"id must be a string or an integer, not a JSON {json_type(value)}")
    return f"{prefix}{value}"


def get_images(data: dict[str, Any], key: str) -> list[str]:
    """`data[key]` as a list of paths: absent/null -> [], a string -> [it], a list of strings."""
    value = data.get(key)
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise RowError(f"{key} must be a non-empty path or a list of non-empty paths, "
                       f"got {json_type(value)} {value!r:.60}")
    return list(paths)


def convert_turns(conversations: Any, roles: Mapping[str, str], *,
                  rewrite: Callable[[str], str] | None = None) -> list[dict[str, str]]:
    """`[{from, value}]` -> canonical `[{role, content}]`; `rewrite` maps each content."""
    if not isinstance(conversations, list) or not conversations:
        raise RowError("missing or empty conversations")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{i}] is a JSON {json_type(turn)}, not an object")
        role = turn.get("from")
        if not isinstance(role, str) or role not in roles:
            raise RowError(f"conversations[{i}] has unknown role {role!r} "
                           f"(expected one of: {', '.join(roles)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise RowError(f"conversations[{i}].value is a JSON {json_type(value)}, not a string")
        turns.append({"role": roles[role], "content": rewrite(value) if rewrite else value})
    return turns


def build(kind: Kind, data: dict[str, Any]) -> Record:
    """Validate a canonical record built by a converter; a schema failure rejects the row."""
    try:
        return parse_record(data, kind)
    except ValueError as e:
        raise RowError(str(e)) from None


def extras(data: dict[str, Any], used: set[str], source: str) -> dict[str, Any]:
    """`meta` for a record: the fields the converter did not consume, plus `source`."""
    meta = {k: v for k, v in data.items() if k not in used}
    if "source" in meta:  # keep the row's own `source` field, but `meta.source` names the format
        meta["original_source"] = meta.pop("source")
    return {"source": source, **meta}


RowFn = Callable[[dict[str, Any], int, str], Record]


def convert_rows(uri: str, convert: RowFn) -> Iterator[Record | Reject]:
    """Run `convert(data, index, locator)` over every row of `uri`: one record or reject each."""
    for index, raw in enumerate(iter_rows(uri)):
        if raw.error is not None:
            yield Reject(raw.locator, raw.error, uri)
        elif not isinstance(raw.data, dict):
            yield Reject(raw.locator, f"row is a JSON {json_type(raw.data)}, not an object", uri)
        else:
            try:
                yield convert(raw.data, index, raw.locator)
            except RowError as e:
                yield Reject(row_label(raw.data, raw.locator), str(e), uri)


# --------------------------------------------------------------------------- llava


def image_first(text: str) -> str:
    """LLaVA's `preprocess_multimodal`: a turn with one `<image>` becomes `<image>\\n{text}`.

    Turns with several tokens (multi-image rows) keep their positions: LLaVA would collapse them.
    """
    if text.count(IMAGE_TOKEN) != 1:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


@register("llava", help="LLaVA instruction JSON array or JSONL (llava_v1_5_mix665k.json)")
def convert_llava(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Convert a LLaVA-format file; see the module docstring for the format and options."""
    uri = require_input(ctx, "llava")
    opts = resolve_options(ctx, "llava", {"image_token": "start", "id_prefix": ""},
                           {"image_token": ("start", "keep")})

    def one(data: dict[str, Any], index: int, locator: str) -> Record:
        record_id = get_id(data, prefix=opts["id_prefix"])
        images = get_images(data, "image")
        # LLaVA rewrites only rows that have an image (text-only rows skip preprocess_multimodal).
        rewrite = image_first if images and opts["image_token"] == "start" else None
        turns = convert_turns(data.get("conversations"), LLAVA_ROLES, rewrite=rewrite)
        meta = extras(data, {"id", "image", "conversations"}, "llava")
        return build("sample", {"id": record_id, "images": images, "conversations": turns,
                                "meta": meta})

    yield from convert_rows(uri, one)
