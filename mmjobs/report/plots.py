"""Figures comparing runs: training curves, per-category bars, metric vs sweep setting.

Every function returns a matplotlib `Figure` built without pyplot (no global state, no
display backend; save it with `fig.savefig`). Inputs are plain mappings keyed by a run's
display name, so the figures do not depend on MLflow. A single run's category chart is
`mmjobs.eval.report.category_bar_chart`; the bars here compare several runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

T = TypeVar("T")
Curve = Sequence[tuple[int, float]]
MAX_BAR_LABELS = 48  # more bars than this and value labels overlap: leave them off
_UNITS = {"percent": "accuracy (%)", "fraction": "relaxed accuracy", "score": "score"}


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in consecutive groups of at most `size` (one figure per group)."""
    return [items[i:i + size] for i in range(0, len(items), max(size, 1))] or [items]


def curves_figure(curves: Mapping[str, Curve], metric: str, *, title: str | None = None,
                  overlay: Mapping[str, Curve] | None = None,
                  overlay_label: str = "eval") -> Figure:
    """One line per run: `metric` against the optimizer step.

    Args:
        curves: run name -> [(step, value)].
        metric: y-axis name (`loss`, `lr`, ...).
        overlay: run name -> points drawn as markers in the run's colour (e.g. `eval_loss`).
        overlay_label: suffix of the overlay's legend entries.
    """
    from matplotlib.figure import Figure

    wide = len(curves) + len(overlay or {}) > 8  # the legend goes beside the axes
    fig = Figure(figsize=(11 if wide else 8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, points) in enumerate(curves.items()):
        steps, values = _xy(points)
        (line,) = ax.plot(steps, values, label=name, linewidth=1.2, **_style(i, len(curves)),
                          marker="." if len(steps) < 30 else None)
        extra = (overlay or {}).get(name)
        if extra:
            ax.plot(*_xy(extra), linestyle="--", marker="o", markersize=4,
                    color=line.get_color(), label=f"{name} ({overlay_label})")
    if metric == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per step")
    ax.grid(alpha=0.3)
    if curves:
        _legend(ax, len(curves) + len(overlay or {}))
    return fig


def grouped_bars(values: Mapping[str, Mapping[str, float | None]], *, title: str,
                 unit: str = "") -> Figure:
    """Bars per category, one bar (colour) per run.

    Args:
        values: run name -> {category: value}; a missing category shows no bar.
        title: figure title (the benchmark).
        unit: the summary's unit (percent, fraction, score), for the y-axis name.
    """
    from matplotlib.figure import Figure

    categories = list(dict.fromkeys(c for v in values.values() for c in v))
    n = max(len(values), 1)
    width = 0.8 / n
    fig = Figure(figsize=(min(max(7.0, 0.35 * len(categories) * n + 2), 24), 4.8),
                 layout="constrained")
    ax = fig.subplots()
    label_bars = len(categories) * n <= MAX_BAR_LABELS
    for i, (name, cats) in enumerate(values.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(categories))]
        heights = [_finite(cats.get(c)) for c in categories]
        bars = ax.bar(xs, [h if h is not None else 0.0 for h in heights], width, label=name)
        if label_bars:
            ax.bar_label(bars, labels=[_short(h) for h in heights], fontsize=6, padding=2,
                         rotation=90 if n > 3 else 0)
    rotate = len(categories) > 6
    ax.set_xticks(range(len(categories)), categories, rotation=45 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_ylabel(_UNITS.get(unit, "value"))
    ax.set_title(title)
    ax.margins(y=0.15)
    _legend(ax, n)
    return fig


def sweep_figure(points: Mapping[str, Sequence[float]], *, setting: str, metric: str) -> Figure:
    """`metric` against a sweep setting: each run a dot, the mean per setting a diamond with
    its value. Points, not bars: the y-axis zooms to the data (sweeps differ by a point or
    two), and bars not starting at zero would mislead.

    Args:
        points: setting value -> the metric of each run with that value.
        setting: the sweep param (x-axis name), e.g. `train.lr_schedule`.
        metric: the metric (y-axis name), e.g. `scienceqa.Avg`.

    Settings that are all numbers are sorted and joined by a line; others keep their order.
    """
    from matplotlib.figure import Figure

    keys = list(points)
    numeric = all(_is_number(k) for k in keys)
    if numeric:
        keys.sort(key=float)
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    means = [sum(points[k]) / len(points[k]) for k in keys]
    for x, key in enumerate(keys):
        ax.scatter([x] * len(points[key]), points[key], color="tab:blue", alpha=0.45, s=18)
    ax.plot(range(len(keys)), means, marker="D", markersize=7, color="tab:red",
            linestyle="-" if numeric else "none", label="mean" if any(
                len(v) > 1 for v in points.values()) else metric)
    for x, mean in enumerate(means):
        ax.annotate(_short(mean), (x, mean), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.set_xticks(range(len(keys)), keys, rotation=30 if len(keys) > 5 else 0,
                  ha="right" if len(keys) > 5 else "center")
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.margins(y=0.25)
    ax.set_xlabel(setting)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {setting}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _style(i: int, n: int) -> dict[str, Any]:
    """Line colour and style of the i-th of n curves: the default 10 colours for a few,
    20 colours and then dash patterns for more, so no two curves look alike."""
    if n <= 10:
        return {}
    from matplotlib import colormaps

    return {"color": colormaps["tab20"](i % 20), "linestyle": ("-", "--", ":", "-.")[i // 20 % 4]}


def _legend(ax: Any, entries: int) -> None:
    """A legend inside the axes for a few entries, beside them for many. The position is
    fixed either way: matplotlib's "best" placement scans every line point and dominates
    drawing time with dozens of long curves."""
    if entries <= 8:
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncols=1 + entries // 25)


def _xy(points: Curve) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _short(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 \
        else f"{value:.2f}"
