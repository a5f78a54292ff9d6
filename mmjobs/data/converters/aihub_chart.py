"""`aihub-chart`: AI-hub Korean chart annotations (the ChartWiz data) -> table / description /
summary / qa samples, instructions in Korean.

Input: one JSON file per chart (a directory, read recursively, or one file). A typical file::

    {"image": [{"filename": "C_0001.jpg", "width": 800, "height": 600}],
     "metadata": {"chart_main": "세로 막대형", "chart_sub": "일반 세로 막대형"},
     "annotations": [{"title": "연도별 매출", "unit": "억원",
                      "axis_label": {"x_axis": ["2021", "2022"], "y_axis": "매출"},
                      "legend": ["국내", "해외"], "data_label": [[12, 15.5], [3, "4,000"]]}],
     "description": "연도별 매출을 나타낸 차트이다.", "summary": ["국내 매출이 늘었다."],
     "qa": [{"question": "2022년 국내 매출은?", "answer": "15.5"}]}

gives the table answer (the `table` sample; `description`, `summary` and one `qa` sample per
question follow)::

    TITLE | 연도별 매출
    | 분류 | 국내 (억원) | 해외 (억원) |
    | --- | --- | --- |
    | 2021 | 12 | 3 |
    | 2022 | 15.5 | 4000 |

How messy files are read (one reject per unreadable file, so input files = files with samples +
rejects; a file whose table cannot be built is rejected whole, even if it has a description):

- title / unit / axis_label / legend / data_label come from each annotation, else from the top
  level (some files keep them there; without `annotations` the top level is the annotation).
- The category axis is `axis_label.y_axis` for 가로 (horizontal) subtypes, else `x_axis`; a
  string there is an axis title. Categories are, in order: data_label's first row when it is
  all non-numeric text (a header row); the category-axis list when its length equals the longest
  series; the other axis list when that does (axes swapped in the file); for 원형 the legend
  (slices named only in the legend); a longer category-axis list (short series, below).
- Series are named by the legend; an empty legend gives 계열1, 계열2, ...; a legend whose
  length differs from data_label's rows is rejected (the names cannot be matched to rows).
- A series shorter than the categories is padded with empty cells at the end only when the
  legend names every series (radar and mixed charts omit trailing points this way; ChartWiz's
  preprocessing pads them too); without a legend the missing cells cannot be placed: rejected.
- Values may be numbers or strings like "1,234", "12.5%"; "", "-" and null are empty cells;
  anything else is rejected naming the cell.
- 혼합형 (and any file with several annotations): one table per annotation, merged side by side
  when all have the same categories (differing units move into the series names), otherwise
  the answer holds one table per annotation separated by a blank line.
- description / summary may be a string or a list of strings (joined by a space); QA entries
  without both a question and an answer are skipped; missing texts just make no sample.
- chart_sub is matched ignoring spaces ("100%기준" and "100% 기준" both occur).

Images: `image[0].filename`, relative to `ctx.image_root`, in the AI-hub layout by default:
the JSON's directory (relative to the input) with `text_data` -> `img_data` and `text_X` ->
`img_X`, e.g. `text_data/text_line_standard/a.json` -> `img_data/img_line_standard/a.jpg`.
Options: `tasks` (table, description, summary, qa), `templates` ({task: instruction}; qa's
contains `{question}`), `category_header` (default: the axis title, else 분류), `image_layout`
(aihub | flat: the filename alone), `image_prefix` (prepended to image paths), `table_format`
(`markdown`, above, or `chartwiz`: ChartWiz's own table text, `chartwiz_table`).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

from mmjobs import storage
from mmjobs.data.charts import ChartTable, Series, TableError
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.converters.chart_align import input_files
from mmjobs.data.converters.synthetic_charts import user_turn
from mmjobs.data.records import Record, Reject, Sample, Turn, parse_json_row

SOURCE = "aihub-chart"
TASKS = ("table", "description", "summary", "qa")
# chart_sub -> (meta.chart_type, the ChartTable type that validates the data)
SUBTYPES = {
    "일반 세로 막대형": ("bar", "bar"), "일반 가로 막대형": ("hbar", "hbar"),
    "누적 세로 막대형": ("stacked_bar", "stacked_bar"),
    "누적 가로 막대형": ("stacked_hbar", "stacked_hbar"),
    "100%기준 누적 세로 막대형": ("stacked_bar_100", "stacked_bar"),
    "100%기준 누적 가로 막대형": ("stacked_hbar_100", "stacked_hbar"),
    "선형": ("line", "line"), "원형": ("pie", "pie"), "방사형": ("radar", "line"),
    "혼합형": ("mixed", "bar"),
}
_BY_KEY = {re.sub(r"\s+", "", name): name for name in SUBTYPES}
DEFAULT_TEMPLATES = {
    "table": "이 차트를 표로 변환해 주세요.",
    "description": "이 차트를 자세히 설명해 주세요.",
    "summary": "이 차트의 내용을 요약해 주세요.",
    "qa": "{question}",
}
_DEFAULTS: dict[str, Any] = {"tasks": list(TASKS), "templates": {}, "category_header": "",
                             "image_layout": "aihub", "image_prefix": "",
                             "table_format": "markdown"}
TABLE_FORMATS = ("markdown", "chartwiz")
_MISSING = {"", "-", "null", "none", "n/a"}


class _BadFile(Exception):
    """A file that yields no samples; the message is the reject reason."""


def _options(ctx: ConvertContext) -> dict[str, Any]:
    opts = {**_DEFAULTS, **ctx.options}
    errors = [f"unknown option {k!r}" for k in sorted(set(ctx.options) - set(_DEFAULTS))]
    if ctx.input is None:
        errors.append("input: give a directory of AI-hub chart JSON files, or one file")
    if not opts["tasks"] or any(t not in TASKS for t in opts["tasks"]):
        errors.append(f"tasks={opts['tasks']!r}: use a non-empty list of {', '.join(TASKS)}")
    templates = opts["templates"]
    if not isinstance(templates, dict) or set(templates) - set(TASKS):
        errors.append(f"templates={templates!r}: use a mapping from {', '.join(TASKS)}")
    elif "{question}" not in templates.get("qa", "{question}"):
        errors.append("templates.qa: must contain {question}")
    if opts["table_format"] not in TABLE_FORMATS:
        errors.append(f"table_format={opts['table_format']!r}: use {' or '.join(TABLE_FORMATS)}")
    if opts["image_layout"] not in ("aihub", "flat"):
        errors.append(f"image_layout={opts['image_layout']!r}: use aihub or flat")
    if errors:
        raise ValueError(f"{SOURCE} options: " + "; ".join(errors))
    opts["templates"] = {**DEFAULT_TEMPLATES, **templates}
    return opts


@register(SOURCE, help="AI-hub Korean chart JSON (ChartWiz): table, description, summary, qa")
def convert(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """One reject, or the samples of every requested task, per JSON file."""
    opts = _options(ctx)
    for uri, rel, raw in _read_ahead(input_files(str(ctx.input), ".json")):
        try:
            try:  # utf-8-sig: some files start with a byte-order mark
                data, problem = parse_json_row(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _BadFile(f"invalid JSON: {e}") from None
            except RecursionError:
                raise _BadFile("invalid JSON: nested too deeply") from None
            if problem:  # NaN, an overflowing number, a lone surrogate
                raise _BadFile(problem)
            samples = _samples(data, rel, opts)
        except (_BadFile, TableError) as e:
            yield Reject(rel, str(e), uri)
            continue
        yield from samples


def _read_ahead(files: list[tuple[str, str]], window: int = 32) -> Iterator[tuple[str, str, bytes]]:
    """Read files in order, up to `window` at once: 240k small objects read one by one from
    S3 would spend hours on request latency; the window bounds memory."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        pending: deque[tuple[str, str, Future[bytes]]] = deque()
        for uri, rel in files:
            pending.append((uri, rel, pool.submit(storage.read_bytes, uri)))
            if len(pending) >= window:
                first_uri, first_rel, future = pending.popleft()
                yield first_uri, first_rel, future.result()
        for uri, rel, future in pending:
            yield uri, rel, future.result()


def _samples(data: Any, rel: str, opts: dict[str, Any]) -> list[Sample]:
    """All samples of one parsed file; raises `_BadFile` / `TableError` with the reason."""
    if not isinstance(data, dict):
        raise _BadFile("not a JSON object")
    metadata = data.get("metadata")
    chart_sub = metadata.get("chart_sub") if isinstance(metadata, dict) else None
    if not chart_sub or not isinstance(chart_sub, str):
        raise _BadFile("missing metadata.chart_sub")
    canonical = _BY_KEY.get(re.sub(r"\s+", "", chart_sub))
    if canonical is None:
        raise _BadFile(f"unknown chart_sub {chart_sub!r} (expected one of: "
                       f"{', '.join(SUBTYPES)})")
    chart_type, table_type = SUBTYPES[canonical]
    image = _image_path(data, rel, opts)
    annotations = data.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        annotations = [{}]
    tables: list[ChartTable] = []
    named: list[bool] = []  # whether each annotation's legend names its series (ChartWiz text)
    for i, ann in enumerate(annotations, start=1):
        where = f"annotation {i}: " if len(annotations) > 1 else ""
        try:
            tables.append(_table(ann if isinstance(ann, dict) else {}, data, chart_sub,
                                 table_type, first_number=sum(len(t.series) for t in tables)))
        except TableError as e:
            raise TableError(where + str(e)) from None
        legend = _field(ann if isinstance(ann, dict) else {}, data, "legend")
        named.append(isinstance(legend, list) and bool(legend))
    chartwiz_text = chartwiz_table(tables, named)
    tables = _merge(tables)
    stem = PurePosixPath(rel).stem
    common = {"source": rel, "chart_sub": canonical, "chart_type": chart_type,
              "title": tables[0].title}
    templates, out = opts["templates"], []

    def add(task: str, suffix: str, prompt: str, reply: str, **meta: Any) -> None:
        out.append(Sample(id=f"{stem}-{suffix}", images=[image], conversations=[
            user_turn(prompt), Turn(role="assistant", content=reply)],
            meta={**common, "task": task, **meta}))

    if "table" in opts["tasks"]:
        markdown = "\n\n".join(
            t.to_markdown(category_header=opts["category_header"] or t.x_label or "분류",
                          with_title=i == 0 or t.title != tables[0].title)
            for i, t in enumerate(tables))
        table_text = chartwiz_text if opts["table_format"] == "chartwiz" else markdown
        add("table", "table", templates["table"], table_text, table_markdown=markdown)
    first_ann = annotations[0] if isinstance(annotations[0], dict) else {}
    for task in ("description", "summary"):
        text = _text(_field({}, data, task) or _field(first_ann, {}, task))
        if task in opts["tasks"] and text:
            add(task, task, templates[task], text)
    qa = _field({}, data, "qa") or _field(first_ann, {}, "qa")
    for i, entry in enumerate(qa if isinstance(qa, list) else [], start=1):
        question = _text(entry.get("question")) if isinstance(entry, dict) else ""
        answer = _text(entry.get("answer")) if isinstance(entry, dict) else ""
        if "qa" in opts["tasks"] and question and answer:
            add("qa", f"qa{i}", templates["qa"].replace("{question}", question), answer,
                question=question, answer=answer, answers=[answer])
    if not out:  # keeps input files = files with samples + rejects
        raise _BadFile(f"nothing to convert: no {' / '.join(opts['tasks'])} content")
    return out


def _image_path(data: dict[str, Any], rel: str, opts: dict[str, Any]) -> str:
    images = data.get("image")
    first = images[0] if isinstance(images, list) and images else images
    filename = first.get("filename") if isinstance(first, dict) else None
    if not filename or not isinstance(filename, str):
        raise _BadFile("missing image[0].filename")
    if filename.startswith("/") or ".." in PurePosixPath(filename).parts:
        raise _BadFile(f"unsafe image[0].filename {filename!r}")
    parts = PurePosixPath(rel).parent.parts if opts["image_layout"] == "aihub" else ()
    parts = tuple("img_data" if p == "text_data" else "img_" + p[5:] if p.startswith("text_")
                  else p for p in parts)
    return str(PurePosixPath(opts["image_prefix"], *parts, filename))


def _field(ann: dict[str, Any], top: dict[str, Any], key: str) -> Any:
    """The annotation's value of `key` unless empty, else the file's top-level value."""
    value = ann.get(key)
    return value if value not in (None, "", [], {}) else top.get(key)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    return "" if value is None else str(value).strip()


def parse_number(value: Any) -> float | None:
    """A cell value: numbers, or "1,234" / "12.5%" strings; empty-like cells are None.
    Raises `ValueError` for anything else."""
    if isinstance(value, bool):
        raise ValueError(value)
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip().replace(",", "").removesuffix("%").strip()
        return None if text.lower() in _MISSING else float(text)
    raise ValueError(value)


def _is_text(value: Any) -> bool:
    """A non-empty string that is not a number (a category label)."""
    try:
        parse_number(value)
    except ValueError:
        return isinstance(value, str)
    return False


def _table(ann: dict[str, Any], top: dict[str, Any], chart_sub: str, table_type: str,
           first_number: int = 0) -> ChartTable:
    """One annotation's table, by the rules in the module docstring; raises `TableError`."""
    rows = _field(ann, top, "data_label")
    if not isinstance(rows, list) or not rows:
        raise TableError("no data: data_label is missing or empty")
    if not any(isinstance(r, list) for r in rows):
        rows = [rows]  # one series written flat
    if not all(isinstance(r, list) for r in rows):
        raise TableError("data_label mixes lists and single values")
    header: list[Any] = []
    if rows[0] and all(_is_text(v) for v in rows[0]):
        header, rows = rows[0], rows[1:]
    if not rows or not any(rows):
        raise TableError("no data: data_label has no values")
    axis = _field(ann, top, "axis_label")
    axis = axis if isinstance(axis, dict) else {}
    cat_key, val_key = ("y_axis", "x_axis") if "가로" in chart_sub else ("x_axis", "y_axis")
    cat_list, other = (axis.get(k) if isinstance(axis.get(k), list) else [] for k in
                       (cat_key, val_key))
    legend = _field(ann, top, "legend")
    legend = [str(x).strip() for x in legend] if isinstance(legend, list) else []
    width = max(len(r) for r in rows)
    if header:
        categories = header
    elif len(cat_list) == width:
        categories = cat_list
    elif len(other) == width:
        categories = other
    elif table_type == "pie" and len(rows) == 1 and len(legend) == width:
        categories, legend = legend, []
    elif len(cat_list) > width:
        categories = cat_list
    else:
        raise TableError(f"no category labels for {width} values "
                         f"(axis_label.{cat_key} has {len(cat_list)})")
    if legend and len(legend) != len(rows):
        raise TableError(f"legend names {len(legend)} series but data_label has {len(rows)}")
    series = []
    for i, row in enumerate(rows):
        if len(row) > len(categories):
            raise TableError(f"ragged data_label: series {i + 1} has {len(row)} values for "
                             f"{len(categories)} categories")
        if len(row) < len(categories) and not legend:
            raise TableError(f"ragged data_label: series {i + 1} has {len(row)} values for "
                             f"{len(categories)} categories and no legend names the series, "
                             "so the missing cells cannot be placed")
        values = []
        for j, v in enumerate(row):
            try:
                values.append(parse_number(v))
            except ValueError:
                raise TableError(f"non-numeric value {v!r} in data_label[{i}][{j}]") from None
        values += [None] * (len(categories) - len(values))
        series.append(Series(legend[i] if legend else f"계열{first_number + i + 1}", values))
    return ChartTable(_text(_field(ann, top, "title")), table_type,
                      [str(c).strip() for c in categories], series,
                      _text(axis.get(cat_key)) if isinstance(axis.get(cat_key), str) else "",
                      _text(axis.get(val_key)) if isinstance(axis.get(val_key), str) else "",
                      _text(_field(ann, top, "unit")))


def chartwiz_table(tables: list[ChartTable], named: list[bool]) -> str:
    """ChartWiz's table text (allright2024/ChartWiz `preprocess/make_tabledata.py`,
    `ChartTable.make_table`), one chart's annotations in order::

        TITLE | 연도별 매출            TITLE | 연도별 매출
        2021 | 12억원                 | 2021 | 2022
        2022 | 15.5억원               국내 | 12억원 | 15.5억원
                                      해외 | 3억원 | 4000억원

    (spaces as ChartWiz writes them: `| {x} ` per category, `{legend} ` then `| {v}{unit} `
    per value, each line ending in a newline). Left: an annotation without legend, one
    `label | value<unit>` row per category; right: with a legend, the category row (first
    annotation only) and one row per series. The title is the first annotation's. Values
    are written as numbers (`12`, `15.5`); ChartWiz prints numpy's values, so one file
    mixing integers and decimals gets `12.0` there. ChartWiz drops files whose series are
    ragged (its bare `except`); this converter pads them, and a padded cell is empty.
    """
    from mmjobs.data.charts import format_number

    text = f"TITLE | {tables[0].title}\n"
    for n, (table, has_legend) in enumerate(zip(tables, named, strict=True)):
        if not has_legend and len(table.series) == 1:
            for category, value in zip(table.categories, table.series[0].values, strict=True):
                text += f"{category} | {format_number(value)}{table.unit}\n"
            continue
        if n == 0:
            text += "".join(f"| {category} " for category in table.categories) + "\n"
        for series in table.series:
            text += f"{series.name} " + "".join(
                f"| {format_number(v)}{table.unit} " for v in series.values) + "\n"
    return text


def _merge(tables: list[ChartTable]) -> list[ChartTable]:
    """Annotations over the same categories become one table, series side by side."""
    first = tables[0]
    if len(tables) == 1 or any(t.categories != first.categories for t in tables):
        return tables
    units = {t.unit for t in tables}
    series = [Series(s.name + (f" ({t.unit})" if len(units) > 1 and t.unit else ""), s.values)
              for t in tables for s in t.series]
    return [ChartTable(first.title, first.chart_type, first.categories, series, first.x_label,
                       first.y_label, first.unit if len(units) == 1 else "")]
