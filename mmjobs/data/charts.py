"""The data behind a chart (`ChartTable`) and its renderings: markdown, CSV, JSON, code, PNG.

Shared by the `synthetic-charts`, `chart-align` and `aihub-chart` converters. A table is named
as for a vertical chart whatever its orientation: `x_label` titles the category axis, `y_label`
the value axis (`hbar` draws them transposed). Example::

    >>> t = ChartTable("Sales", "bar", ["North", "South"], [Series("2023", [3, 4.5])])
    >>> print(t.to_markdown())
    | Category | 2023 |
    | --- | --- |
    | North | 3 |
    | South | 4.5 |

`to_plot_code()` is ChartMoE's code target: a self-contained matplotlib script with the data as
literals. `draw()` executes exactly the drawing statements that script contains (on a pyplot-free
`Figure`, so no backend or figure registry is touched), so the code target provably redraws the
chart the model saw; a test checks the script's PNG is byte-identical to `draw()`'s.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any

CHART_TYPES = ("bar", "hbar", "stacked_bar", "stacked_hbar", "line", "pie")
# Canonical English names, used as short answers ("What type of chart is this?").
CHART_TYPE_NAMES = {"bar": "bar", "hbar": "horizontal bar", "stacked_bar": "stacked bar",
                    "stacked_hbar": "stacked horizontal bar", "line": "line", "pie": "pie"}
# The figure is ~3 inches on its short side whatever the pixel size, so fonts scale with it.
_FIGURE_INCHES = 3.0


class TableError(ValueError):
    """A table that cannot be a chart; the message is a one-line reject reason."""


@dataclass(frozen=True)
class Series:
    """One data series: a legend name and one value per category (None = missing cell)."""

    name: str
    values: list[float | None]


@dataclass
class ChartTable:
    """The data behind one chart; construction validates it (raises `TableError`)."""

    title: str
    chart_type: str
    categories: list[str]
    series: list[Series]
    x_label: str = ""
    y_label: str = ""
    unit: str = ""

    def __post_init__(self) -> None:
        if self.chart_type not in CHART_TYPES:
            raise TableError(f"unknown chart_type {self.chart_type!r} "
                             f"(expected one of: {', '.join(CHART_TYPES)})")
        if not self.categories:
            raise TableError("empty table: no categories")
        if not self.series:
            raise TableError("empty table: no series")
        for s in self.series:
            if len(s.values) != len(self.categories):
                raise TableError(f"ragged series {s.name!r}: {len(s.values)} values "
                                 f"for {len(self.categories)} categories")
            for cat, v in zip(self.categories, s.values, strict=True):
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise TableError(f"non-numeric value {v!r} in series {s.name!r} "
                                     f"at category {cat!r}")
                if not math.isfinite(v):
                    raise TableError(f"non-finite value {v!r} in series {s.name!r}")
        names = [s.name for s in self.series]
        if len(set(names)) != len(names):
            raise TableError(f"duplicate series names: {names}")
        if all(v is None for s in self.series for v in s.values):
            raise TableError("empty table: every value is missing")
        if self.chart_type == "pie":
            if len(self.series) != 1:
                raise TableError(f"a pie chart has exactly one series, got {len(self.series)}")
            if any(v is not None and v < 0 for v in self.series[0].values):
                raise TableError("a pie chart cannot show negative values")

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ChartTable:
        """Build from `{"title", "chart_type", "categories", "series": [{"name", "values"}],
        "x_label", "y_label", "unit"}` (the `chart-align` input row); raises `TableError`."""
        for key in ("chart_type", "categories", "series"):
            if key not in row:
                raise TableError(f"missing field {key!r}")
        cats, series = row["categories"], row["series"]
        if not isinstance(cats, list) or not isinstance(series, list):
            raise TableError("'categories' and 'series' must be lists")
        parsed = []
        for i, s in enumerate(series, start=1):
            if not isinstance(s, dict) or not isinstance(s.get("values"), list):
                raise TableError(f"series {i} is not an object with a 'values' list")
            parsed.append(Series(str(s.get("name") or f"Series {i}"), list(s["values"])))
        return cls(str(row.get("title") or ""), str(row["chart_type"]),
                   [str(c) for c in cats], parsed, str(row.get("x_label") or ""),
                   str(row.get("y_label") or ""), str(row.get("unit") or ""))

    def to_dict(self) -> dict[str, Any]:
        """The inverse of `from_dict`."""
        return {"title": self.title, "chart_type": self.chart_type,
                "categories": list(self.categories),
                "series": [{"name": s.name, "values": [_num(v) for v in s.values]}
                           for s in self.series],
                "x_label": self.x_label, "y_label": self.y_label, "unit": self.unit}

    # ----------------------------------------------------------------------- text targets

    def header(self, category_header: str | None = None) -> list[str]:
        """Column names: the category column, then one per series (with the unit)."""
        suffix = f" ({self.unit})" if self.unit else ""
        return [category_header or self.x_label or "Category",
                *(s.name + suffix for s in self.series)]

    def rows(self) -> list[list[str]]:
        """Body cells as strings (`format_number`; a missing value is an empty cell)."""
        return [[cat, *(format_number(s.values[i]) for s in self.series)]
                for i, cat in enumerate(self.categories)]

    def to_markdown(self, *, category_header: str | None = None, with_title: bool = False) -> str:
        """A GitHub-style markdown table, optionally preceded by `TITLE | <title>`."""
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

        head = self.header(category_header)
        lines = [line(head), "| " + " | ".join("---" for _ in head) + " |",
                 *(line(r) for r in self.rows())]
        if with_title and self.title:
            lines.insert(0, f"TITLE | {_md_cell(self.title)}")
        return "\n".join(lines)

    def to_csv(self, *, category_header: str | None = None) -> str:
        """CSV with a header row, `\\n` line ends and no trailing newline."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header(category_header))
        writer.writerows(self.rows())
        return buf.getvalue().rstrip("\n")

    def to_json(self) -> str:
        """ChartMoE's JSON target: metadata plus one object per category, keyed by series."""
        data = [{"category": cat, **{s.name: _num(s.values[i]) for s in self.series}}
                for i, cat in enumerate(self.categories)]
        return json.dumps({"title": self.title, "chart_type": self.chart_type,
                           "x_label": self.x_label, "y_label": self.y_label, "unit": self.unit,
                           "data": data}, ensure_ascii=False)

    # ----------------------------------------------------------------------- code and image

    def to_plot_code(self, output: str = "chart.png", *, size: tuple[int, int] = (224, 224),
                     dpi: float | None = None, value_labels: bool = False) -> str:
        """A standalone matplotlib (Agg) script that redraws the chart and saves it to `output`."""
        figsize, dpi = figure_geometry(size, dpi)
        return "\n".join([
            "import matplotlib", "", "matplotlib.use('Agg')", "import matplotlib.pyplot as plt",
            "", self._data_code(), "",
            f"fig, ax = plt.subplots(figsize={figsize!r}, dpi={dpi!r})",
            self._draw_code(value_labels),
            f"fig.savefig({output!r}, metadata={{'Software': None}})",
            "plt.close(fig)", ""])

    def draw(self, path: str | os.PathLike, *, size: tuple[int, int] = (224, 224),
             dpi: float | None = None, value_labels: bool = False) -> None:
        """Render the chart to a PNG at `path`, exactly `size` pixels. No PNG metadata, so the
        bytes depend only on the table and the matplotlib version."""
        from matplotlib.figure import Figure

        figsize, dpi = figure_geometry(size, dpi)
        fig = Figure(figsize=figsize, dpi=dpi)
        ax = fig.add_subplot()
        # Running the generated statements (not a parallel implementation) is what makes the
        # code target trustworthy; their only inputs are repr()'d literals from this table.
        code = self._data_code() + "\n" + self._draw_code(value_labels)
        exec(code, {"fig": fig, "ax": ax})
        fig.savefig(os.fspath(path), metadata={"Software": None})

    def _data_code(self) -> str:
        unit = f" ({self.unit})" if self.unit else ""
        value_label = (self.y_label + unit) if self.y_label else self.unit
        series = "".join(f"    ({s.name!r}, [{', '.join(_literal(v) for v in s.values)}]),\n"
                         for s in self.series)
        return (f"title = {self.title!r}\ncategories = {self.categories!r}\n"
                f"series = [  # (name, values); None is a missing value\n{series}]\n"
                f"x_label = {self.x_label!r}\ny_label = {value_label!r}")

    def _draw_code(self, value_labels: bool) -> str:
        body, labels_on, labels_off = _DRAW[self.chart_type]
        code = body.replace("    @LABELS\n", labels_on if value_labels else labels_off)
        if self.chart_type != "pie" and len(self.series) > 1:
            code += "ax.legend(fontsize=6)\n"
        return code + "ax.tick_params(labelsize=6)\nax.set_title(title, fontsize=8)\n" \
            "fig.tight_layout()"


# Drawing statements per chart type (they see `fig`, `ax` and the data variables), and the
# statements that print values on the marks, which a model reading values off a chart needs.
_BAR_LABELS = ("    ax.bar_label(bars, ['' if v is None else f'{{v:g}}' for v in values], "
               "fontsize=6{where})\n")
_GROUPED = """\
size = 0.8 / len(series)
for i, (name, values) in enumerate(series):
    pos = [j + (i - (len(series) - 1) / 2) * size for j in range(len(categories))]
    bars = ax.{bar}(pos, [0 if v is None else v for v in values], size, label=name)
    @LABELS
"""
_STACKED = """\
base = [0] * len(categories)
for name, values in series:
    sizes = [0 if v is None else v for v in values]
    bars = ax.{bar}(range(len(categories)), sizes, 0.6, {base}=base, label=name)
    @LABELS
    base = [b + v for b, v in zip(base, sizes)]
"""
_VERTICAL_AXES = ("ax.margins(y=0.1)\nax.set_xticks(range(len(categories)), categories)\n"
                  "ax.set_xlabel(x_label, fontsize=7)\nax.set_ylabel(y_label, fontsize=7)\n")
# Horizontal bars: categories top to bottom in table order, as they are read.
_HORIZONTAL_AXES = ("ax.margins(x=0.1)\nax.set_yticks(range(len(categories)), categories)\n"
                    "ax.invert_yaxis()\n"
                    "ax.set_ylabel(x_label, fontsize=7)\nax.set_xlabel(y_label, fontsize=7)\n")
_LINE = """\
for name, values in series:
    ax.plot(range(len(categories)), [float('nan') if v is None else v for v in values],
            marker='o', markersize=3, label=name)
    @LABELS
"""
_LINE_LABELS = """\
    for x, v in enumerate(values):
        if v is not None:
            ax.annotate(f'{v:g}', (x, v), xytext=(0, 3), textcoords='offset points',
                        ha='center', fontsize=6)
"""
_PIE = """\
name, values = series[0]
sizes = [0 if v is None else v for v in values]
    @LABELS
ax.pie(sizes, labels=labels, startangle=90, counterclock=False, textprops={'fontsize': 6})
"""
# chart type -> (statements, value-label statements, statements without value labels)
_DRAW: dict[str, tuple[str, str, str]] = {
    "bar": (_GROUPED.format(bar="bar") + _VERTICAL_AXES, _BAR_LABELS.format(where=""), ""),
    "hbar": (_GROUPED.format(bar="barh") + _HORIZONTAL_AXES, _BAR_LABELS.format(where=""), ""),
    "stacked_bar": (_STACKED.format(bar="bar", base="bottom") + _VERTICAL_AXES,
                    _BAR_LABELS.format(where=", label_type='center'"), ""),
    "stacked_hbar": (_STACKED.format(bar="barh", base="left") + _HORIZONTAL_AXES,
                     _BAR_LABELS.format(where=", label_type='center'"), ""),
    "line": (_LINE + _VERTICAL_AXES, _LINE_LABELS, ""),
    "pie": (_PIE, "labels = [f'{c} ({v:g})' for c, v in zip(categories, sizes)]\n",
            "labels = categories\n"),
}


def figure_geometry(size: tuple[int, int], dpi: float | None) -> tuple[tuple[float, float], float]:
    """Figure inches and dpi that render to exactly `size` pixels. The default dpi makes the
    figure ~3 inches on its short side, so fonts scale with the image."""
    if dpi is None:
        dpi = max(1, round(min(size) / _FIGURE_INCHES))
    # Agg truncates inches * dpi to whole pixels: round the inches up (by < 1 pixel), keeping
    # them short in the generated code.
    inches = tuple(math.ceil((px / dpi + 1e-9) * 1e4) / 1e4 for px in size)
    return (inches[0], inches[1]), dpi


def format_number(value: float | None) -> str:
    """`23` for 23.0, `4.5` for 4.5, `` for a missing value (ChartQA-style gold answers)."""
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(float(value), ".10g")


def _num(value: float | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() and abs(value) < 1e15 else float(value)


def _literal(value: float | None) -> str:
    return "None" if value is None else repr(_num(value))


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
