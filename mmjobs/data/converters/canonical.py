"""`canonical`: re-read an existing canonical `samples.jsonl`, validating every line.

Source format: the canonical JSONL described in `mmjobs.data.records` (one record per line)::

    {"id": "a1", "images": ["x.png"], "meta": {},
     "conversations": [{"role": "user", "content": "<image>\\nHi"},
                       {"role": "assistant", "content": "Hello"}]}

`ctx.input` is the `samples.jsonl` file, or a committed dataset directory holding one (a
directory without `_MANIFEST.json` is refused: its writer did not finish). Lines that are not
UTF-8, not JSON, or not a valid record of the chosen kind are rejected with the reason.

Options:
    kind: "sample" (default), "preference" or "prompt".

`canonical-preference` and `canonical-prompt` are the same converter registered with their
record kind, for callers that take the kind from the registry rather than from options.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import get_args

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.llava import require_input, resolve_options, row_label
from mmjobs.data.records import SAMPLES_FILE, Kind, Record, Reject, iter_jsonl, parse_record

KINDS: tuple[str, ...] = get_args(Kind)


def samples_uri(uri: str) -> str:
    """The samples file for an input naming the file itself or a committed dataset directory."""
    if uri.rstrip("/").endswith((".jsonl", ".ndjson")):
        return uri
    if not storage.is_committed(uri):
        raise ValueError(f"{uri}: not a committed dataset directory (no {storage.MANIFEST_NAME}); "
                         f"pass the {SAMPLES_FILE} file itself to read it anyway")
    return storage.join(uri, SAMPLES_FILE)


def passthrough(ctx: ConvertContext, name: str, kind: Kind) -> Iterator[Record | Reject]:
    """Yield each valid line as a record of `kind`, each bad line as a `Reject`."""
    uri = samples_uri(require_input(ctx, name))
    for raw in iter_jsonl(uri):
        if raw.error is not None:
            yield Reject(raw.locator, raw.error, uri)
            continue
        try:
            yield parse_record(raw.data, kind)
        except ValueError as e:
            label = row_label(raw.data, raw.locator) if isinstance(raw.data, dict) else raw.locator
            yield Reject(label, str(e), uri)


@register("canonical", help="an existing canonical samples.jsonl (option kind)")
def convert_canonical(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Pass canonical records of `options.kind` through validation."""
    opts = resolve_options(ctx, "canonical", {"kind": "sample"}, {"kind": KINDS})
    yield from passthrough(ctx, "canonical", opts["kind"])


@register("canonical-preference", kind="preference", help="an existing canonical preference JSONL")
def convert_canonical_preference(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Pass canonical preference records through validation."""
    resolve_options(ctx, "canonical-preference", {})
    yield from passthrough(ctx, "canonical-preference", "preference")


@register("canonical-prompt", kind="prompt", help="an existing canonical prompt-only JSONL")
def convert_canonical_prompt(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Pass canonical prompt-only records through validation."""
    resolve_options(ctx, "canonical-prompt", {})
    yield from passthrough(ctx, "canonical-prompt", "prompt")
