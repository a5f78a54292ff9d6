"""`chart-align`: ChartMoE's three alignment tasks (chart -> table / JSON / plotting code).

For each chart's underlying table it yields one sample per target (`meta.target`): the markdown
(or CSV) table, `ChartTable.to_json()` and `ChartTable.to_plot_code()`. Input is JSONL of
tables, one per line (a file, or a directory whose `*.jsonl` files are read in order)::

    {"id": "c1", "title": "Fruit sales", "chart_type": "bar", "categories": ["Apple", "Pear"],
     "series": [{"name": "2023", "values": [3, 4.5]}], "x_label": "Fruit", "y_label": "Sales",
     "unit": "t", "image": "png/c1.png"}

`image` is relative to `ctx.image_root` (default: the input's directory) and is copied to
`images/<image>` so that every image of the dataset lives under one root; without `image` the
chart is drawn by us to `images/<id>.png`, and then the code target provably redraws it. With
no input (or `num` set) it generates `num` random tables from `seed` instead, so the chartmoe
recipe runs without downloads.

Options: `num`, `seed`, `targets` (["table", "json", "code"]), `table_format` (markdown|csv),
`prompts` ({target: instruction}), `image_size` (224), `value_labels` (True), `chart_types`
(for generated tables), `code_output` (the file name the code saves to, "chart.png").
Rejects (one per bad row, reason exact): invalid JSON, not an object, a missing field, ragged
series, non-numeric values, empty tables, unknown chart types, unsafe or missing image paths.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from mmjobs import storage
from mmjobs.data.charts import CHART_TYPES, ChartTable, TableError
from mmjobs.data.converters import IMAGES_DIR, ConvertContext, register
from mmjobs.data.converters.synthetic_charts import image_size, random_table, user_turn
from mmjobs.data.records import Record, Reject, Sample, Turn, iter_jsonl

SOURCE = "chart-align"
TARGETS = ("table", "json", "code")
# Instructions in the spirit of ChartMoE-Align (chart -> table / JSON / code).
DEFAULT_PROMPTS = {
    "table": "Convert the chart to a table.",
    "json": "Convert the chart to JSON.",
    "code": "Write python code that draws this chart.",
}
_DEFAULTS: dict[str, Any] = {
    "targets": list(TARGETS), "table_format": "markdown", "prompts": {}, "image_size": 224,
    "value_labels": True, "chart_types": ["bar", "hbar", "line", "pie"],
    "code_output": "chart.png",
}


def _options(ctx: ConvertContext) -> dict[str, Any]:
    opts = {**_DEFAULTS, "seed": ctx.seed, **ctx.options}
    errors = [f"unknown option {k!r}" for k in sorted(set(ctx.options) - set(_DEFAULTS)
                                                      - {"num", "seed"})]
    if ctx.input is not None and "num" in ctx.options:
        errors.append("num: generate tables (num) or read an input, not both")
    opts.setdefault("num", 100)
    if not isinstance(opts["num"], int) or opts["num"] < 0:
        errors.append(f"num={opts['num']!r}: use a non-negative integer")
    if not opts["targets"] or any(t not in TARGETS for t in opts["targets"]):
        errors.append(f"targets={opts['targets']!r}: use a non-empty list of {', '.join(TARGETS)}")
    if opts["table_format"] not in ("markdown", "csv"):
        errors.append(f"table_format={opts['table_format']!r}: use markdown or csv")
    if not isinstance(opts["prompts"], dict) or set(opts["prompts"]) - set(TARGETS):
        errors.append(f"prompts={opts['prompts']!r}: use a mapping from {', '.join(TARGETS)}")
    if any(t not in CHART_TYPES for t in opts["chart_types"]):
        errors.append(f"chart_types={opts['chart_types']!r}: use {', '.join(CHART_TYPES)}")
    try:
        opts["image_size"] = image_size(opts["image_size"])
    except ValueError as e:
        errors.append(str(e))
    if errors:
        raise ValueError(f"{SOURCE} options: " + "; ".join(errors))
    opts["prompts"] = {**DEFAULT_PROMPTS, **opts["prompts"]}
    return opts


def input_files(uri: str, suffix: str) -> list[tuple[str, str]]:
    """(uri, path relative to the input) of `uri` itself if it names a `suffix` file, else of
    every `suffix` file under it, sorted. Reads through `mmjobs.storage`, so s3:// works."""
    if uri.endswith(suffix):
        return [(uri, uri.rstrip("/").rsplit("/", 1)[-1])]
    files = [(o.uri, o.relpath) for o in storage.list_objects(uri) if o.relpath.endswith(suffix)]
    if not files:
        raise FileNotFoundError(f"{uri}: no *{suffix} files found")
    return files


def targets(table: ChartTable, opts: dict[str, Any]) -> dict[str, str]:
    """The answer text of each requested target."""
    text = {
        "table": lambda: table.to_csv() if opts["table_format"] == "csv" else table.to_markdown(),
        "json": table.to_json,
        "code": lambda: table.to_plot_code(opts["code_output"], size=opts["image_size"],
                                           value_labels=opts["value_labels"]),
    }
    return {t: text[t]() for t in opts["targets"]}


@register(SOURCE, draws_images=True, help="ChartMoE alignment: chart -> table / JSON / code")
def convert(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Yield table / JSON / code samples per chart table (see module docstring)."""
    opts = _options(ctx)
    ctx.output_images.mkdir(parents=True, exist_ok=True)
    if ctx.input is None:
        for index in range(opts["num"]):
            rng = random.Random(f"{SOURCE}:{opts['seed']}:{index}")
            table = random_table(rng, opts["chart_types"])
            yield from _samples(ctx, opts, f"align-s{opts['seed']}-{index:06d}", table, None)
        return
    image_root = ctx.image_root or (
        os.path.dirname(ctx.input) if ctx.input.endswith(".jsonl") else ctx.input)
    for uri, _ in input_files(ctx.input, ".jsonl"):
        for raw in iter_jsonl(uri):
            data = raw.data
            row_id = str(data.get("id")) if isinstance(data, dict) and data.get("id") else \
                raw.locator
            if raw.error or not isinstance(data, dict):
                yield Reject(row_id, raw.error or "row is not a JSON object", uri)
                continue
            try:
                table = ChartTable.from_dict(data)
                image = _image(ctx, image_root, data.get("image"))
            except (TableError, FileNotFoundError) as e:
                yield Reject(row_id, str(e), uri)
                continue
            yield from _samples(ctx, opts, row_id, table, image)


def _image(ctx: ConvertContext, image_root: str, image: Any) -> str | None:
    """Copy a referenced chart image into the output's image dir; its dataset-relative path."""
    if image is None:
        return None
    rel = str(image)
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel:
        raise TableError(f"unsafe image path {rel!r} (must be relative, without '..')")
    src = storage.join(image_root, rel)
    try:
        storage.get_file(src, ctx.output_images / rel)
    except storage.StoreNotFoundError as e:
        raise FileNotFoundError(f"image not found: {src}") from e
    return f"{IMAGES_DIR}/{rel}"


def _samples(ctx: ConvertContext, opts: dict[str, Any], chart_id: str, table: ChartTable,
             image: str | None) -> Iterator[Sample]:
    drawn = image is None  # then the code target redraws exactly this image
    if image is None:
        # File names from ids: keep them portable (ids may contain '/' or spaces).
        name = re.sub(r"[^A-Za-z0-9._-]", "_", chart_id) + ".png"
        table.draw(ctx.output_images / name, size=opts["image_size"],
                   value_labels=opts["value_labels"])
        image = f"{IMAGES_DIR}/{name}"
    for target, answer in targets(table, opts).items():
        yield Sample(id=f"{chart_id}-{target}", images=[image], conversations=[
            user_turn(opts["prompts"][target]), Turn(role="assistant", content=answer)],
            meta={"source": SOURCE, "task": "chart_align", "target": target,
                  "chart_type": table.chart_type, "chart_id": chart_id, "drawn": drawn})
