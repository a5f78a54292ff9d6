"""Tables, plots and metric names for evaluation summaries (the evaluate stage's outputs).

A *summary* is what `mmjobs.eval.score` computes for a metric (`summary.json` of an evaluate
or score output): `metric`, `unit` and the metric's numbers, plus, from the evaluate stage,
`label`, `pot` and `judge`. This module turns summaries into:

- flat metric names for MLflow and KFP (`summary_metrics`): `chartqa.human@0.05` becomes
  `chartqa.human_0.05` (MLflow accepts only letters, digits, `_ - . /` and spaces; we also
  drop `/` and spaces so names stay single path segments);
- one bar chart of a summary's categories (`category_bar_chart`);
- the evaluate stage's summary.md (`evaluation_markdown`: the metric's tables, PoT statuses,
  the judge's counts), which the KFP UI shows too;
- the seed recipes' comparison tables, as markdown or CSV:
  `ap_table` (ChartMoE's @AP tables, Human / Augmented / Averaged by tolerance, one per
  setting such as w/o PoT / w/ PoT),
  `scienceqa_table` (LaVIN's NAT SOC LAN TXT IMG NO G1-6 G7-12 Average per run) and
  `results_table` (MLLM-DataEngine's Main Results: SEED, MMBench, MME, GQA, VQAv2, ScienceQA
  (accuracy/IMG) per model, optionally with the Incremental Dataset / Data Amount columns) and
  `win_lose_table` (the Chameleon Plus README's GPT-4o comparison: win / lose / equal / win
  rate not counting equal, per model against its baseline).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from mmjobs.eval.metrics.base import markdown_table
from mmjobs.eval.metrics.chartqa import ap_rows
from mmjobs.eval.score import summary_markdown

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Summary = Mapping[str, Any]
TableFormat = Literal["markdown", "csv"]

SCIENCEQA_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
CHARTQA_SPLITS = (("Human", "human"), ("Augmented", "augmented"), ("Avg", "average"))
_UNSAFE = re.compile(r"[^\w.\-]")
PAIRWISE_MODES = ("pairwise", "interleaved-compare")  # judge modes with A-vs-B verdicts


# --------------------------------------------------------------------------- metric names


def metric_key(*parts: str) -> str:
    """An MLflow/KFP-safe metric name: parts joined by ".", other characters become "_"."""
    return ".".join(_UNSAFE.sub("_", str(p)) for p in parts)


def summary_metrics(summary: Summary) -> dict[str, float]:
    """Every number worth tracking in a summary, by benchmark/category/tolerance.

    Names start with the metric (`chartqa.human_0.05`, `scienceqa.IMG`, `mme.total`,
    `mmbench.accuracy`, ...), then `pot.*` and `judge.*`. Missing values (an empty category)
    are left out: MLflow and KFP want numbers.
    """
    values: dict[str, float | None] = {}
    metric = summary.get("metric")
    if metric == "chartqa":
        for tol, acc in summary["accuracy"].items():
            for split in ("human", "augmented", "average", "overall"):
                values[metric_key("chartqa", f"{split}@{tol}")] = acc.get(split)
    elif metric == "scienceqa":
        for cat, value in summary["accuracy"].items():
            values[metric_key("scienceqa", cat)] = value
    elif metric == "mme":
        for part in ("perception", "cognition", "total"):
            values[metric_key("mme", part)] = summary[part]
        for task, v in summary["tasks"].items():
            values[metric_key("mme", task)] = v["score"]
            values[metric_key("mme", task, "acc")] = v["acc"]
            values[metric_key("mme", task, "acc_plus")] = v["acc_plus"]
    elif metric is not None:  # mmbench, gqa, vqav2, seedbench: accuracy + a breakdown
        values[metric_key(metric, "accuracy")] = summary.get("accuracy")
        for key in ("binary", "open"):
            if key in summary:
                values[metric_key(metric, key)] = summary[key]
        for key in ("per_category", "per_answer_type", "per_data_type"):
            for cat, value in summary.get(key, {}).items():
                values[metric_key(metric, cat)] = value
        names = summary.get("question_types", {})
        for type_id, value in summary.get("per_question_type", {}).items():
            values[metric_key(metric, names.get(type_id, f"type {type_id}"))] = value
    if pot := summary.get("pot"):
        values[metric_key("pot", "ok_rate")] = pot.get("ok_rate")
        for status, n in pot.get("status_counts", {}).items():
            values[metric_key("pot", status)] = n
    if judge := summary.get("judge"):
        for key in ("mean_score", "win_rate_a", "win_rate_a_excluding_ties", "wins_a", "wins_b",
                    "ties", "judged", "rows"):
            if key in judge:
                values[metric_key("judge", key)] = judge[key]
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def headline(summary: Summary) -> tuple[str | None, float | None]:
    """The one number a run is known by, and its metric name.

    ChartQA: the Human/Augmented average at the first tolerance (ChartMoE's headline; the
    pooled accuracy when a split is missing); ScienceQA: Avg; MME: total; others: accuracy;
    judge only: mean score (single) or A's win rate without ties (pairwise modes).
    """
    metric = summary.get("metric")
    if metric == "chartqa":
        tol = summary["tolerances"][0]
        acc = summary["accuracy"][tol]
        split = "average" if acc.get("average") is not None else "overall"
        return metric_key("chartqa", f"{split}@{tol}"), acc.get(split)
    if metric == "scienceqa":
        return metric_key("scienceqa", "Avg"), summary["accuracy"]["Avg"]
    if metric == "mme":
        return metric_key("mme", "total"), summary["total"]
    if metric is not None:
        return metric_key(metric, "accuracy"), summary.get("accuracy")
    judge = summary.get("judge") or {}
    if judge.get("mode") in PAIRWISE_MODES:
        return metric_key("judge", "win_rate_a_excluding_ties"), judge.get(
            "win_rate_a_excluding_ties")
    if judge:
        return metric_key("judge", "mean_score"), judge.get("mean_score")
    return None, None


# --------------------------------------------------------------------------- chart


def category_values(summary: Summary) -> dict[str, dict[str, float | None]]:
    """A summary's per-category numbers as {series: {category: value}} for plotting."""
    metric = summary.get("metric")
    if metric == "chartqa":
        return {label: {f"@{tol}": acc.get(key) for tol, acc in summary["accuracy"].items()}
                for label, key in CHARTQA_SPLITS}
    if metric == "scienceqa":
        acc = summary["accuracy"]
        return {"accuracy": {c: acc.get(c) for c in (*SCIENCEQA_COLUMNS, "Avg")}}
    if metric == "mme":
        return {"score": {t: v["score"] for t, v in summary["tasks"].items()}}
    if metric is not None:
        cats: dict[str, float | None] = {}
        for key in ("per_category", "per_answer_type", "per_data_type"):
            cats.update(summary.get(key, {}))
        names = summary.get("question_types", {})
        cats.update({names.get(k, k): v for k, v in summary.get("per_question_type", {}).items()})
        cats.update({k: summary[k] for k in ("binary", "open") if k in summary})
        cats["Overall"] = summary.get("accuracy")
        return {"accuracy": cats}
    judge = summary.get("judge") or {}
    keys = ("win_rate_a", "win_rate_a_excluding_ties") if judge.get("mode") in PAIRWISE_MODES \
        else ("mean_score",)
    return {"judge": {k: judge.get(k) for k in keys}}


def category_bar_chart(summary: Summary, metric: str | None = None) -> Figure:
    """A bar per category (grouped by series, e.g. ChartQA splits per tolerance).

    Args:
        summary: an evaluation summary.
        metric: the metric name, if the summary does not carry it (`summary["metric"]`).

    Returns:
        A matplotlib `Figure` (not attached to pyplot; save it with `fig.savefig`).
    """
    from matplotlib.figure import Figure

    if metric is not None and summary.get("metric") != metric:
        summary = {**summary, "metric": metric}
    series = category_values(summary)
    categories = list(dict.fromkeys(c for values in series.values() for c in values))
    width = 0.8 / max(len(series), 1)
    fig = Figure(figsize=(max(6.0, 0.55 * len(categories) * len(series) + 2), 4.5),
                 layout="constrained")
    ax = fig.subplots()
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        heights = [values.get(c) or 0.0 for c in categories]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[_short(values.get(c)) for c in categories], fontsize=7,
                     padding=2)
    ax.set_xticks(range(len(categories)), categories, rotation=45 if len(categories) > 6 else 0,
                  ha="right" if len(categories) > 6 else "center")
    unit = {"percent": "accuracy (%)", "fraction": "relaxed accuracy", "score": "score"}
    ax.set_ylabel(unit.get(summary.get("unit", ""), "value"))
    title = summary.get("metric") or "judge"
    if summary.get("label"):
        title += f" — {summary['label']}"
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


def _short(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


# --------------------------------------------------------------------------- tables


def _render(headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: TableFormat) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(rows)
        return out.getvalue()
    if fmt != "markdown":
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
    return markdown_table(headers, rows)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ap_table(summaries_by_setting: Mapping[str, Summary], fmt: TableFormat = "markdown") -> str:
    """ChartMoE's @AP tables, one per setting (mode), in the seed README's layout.

    Each setting (e.g. "w/o PoT", "w/ PoT") gets ChartMoE's table: rows Human, Augmented and
    Averaged (their unweighted mean), columns @0.05 / 0.1 / 0.2 (the summary's tolerances),
    relaxed accuracy 0-1 with 4 decimals. Markdown: a bold setting name above each table. CSV:
    one table with a leading `setting` column, three rows per setting.

    Raises:
        ValueError: a summary is not a ChartQA summary.
    """
    _require(summaries_by_setting, "chartqa", "ap_table")
    tables = {setting: ap_rows(s) for setting, s in summaries_by_setting.items()}
    if fmt == "csv":
        headers = ["setting", *next(iter(tables.values()), (["@AP"], []))[0]]
        return _render(headers, [[setting, *row] for setting, (_, rows) in tables.items()
                                 for row in rows], fmt)
    return "\n\n".join(f"**{setting}**\n\n{_render(headers, rows, fmt)}"
                        for setting, (headers, rows) in tables.items())


def scienceqa_table(summaries_by_run: Mapping[str, Summary],
                    fmt: TableFormat = "markdown") -> str:
    """LaVIN's ScienceQA results table: one row per run, accuracy (%) per category.

    Raises:
        ValueError: a summary is not a ScienceQA summary.
    """
    _require(summaries_by_run, "scienceqa", "scienceqa_table")
    headers = ["Method", *SCIENCEQA_COLUMNS, "Average"]
    rows = [[run, *(_num(s["accuracy"].get(c), 2) for c in (*SCIENCEQA_COLUMNS, "Avg"))]
            for run, s in summaries_by_run.items()]
    return _render(headers, rows, fmt)


# The MLLM-DataEngine README's Main Results columns, in its order.
RESULTS_COLUMNS = (("SEED", "seedbench"), ("MMBench", "mmbench"), ("MME", "mme"),
                   ("GQA", "gqa"), ("VQAv2", "vqav2"), ("ScienceQA", "scienceqa"))


def data_amount_text(samples: int | None) -> str:
    """A Data Amount cell as the seed writes it: "220k" (thousands, rounded), "-" for none."""
    if samples is None:
        return "-"
    return f"{round(samples / 1000)}k" if samples >= 1000 else str(samples)


def results_table(rows: Mapping[str, Mapping[str, Summary]], fmt: TableFormat = "markdown", *,
                  data_amounts: Mapping[str, int | None] | None = None) -> str:
    """MLLM-DataEngine's Main Results layout: one row per model, one column per benchmark.

    Args:
        rows: model name -> {metric name -> summary} (seedbench, mmbench, mme, gqa, vqav2,
            scienceqa; a missing benchmark shows "-").
        fmt: "markdown": accuracies with 2 decimals, MME as "perception/cognition(total)"
            rounded like the DataEngine README ("1511/303(1814)"), ScienceQA as the README's
            two figures "accuracy/IMG accuracy" ("73.17/71.15": LLaVA's eval_science_qa.py
            prints Accuracy and IMG-Accuracy). "csv": the same numbers, MME split into MME-P,
            MME-C and MME columns, ScienceQA into ScienceQA and ScienceQA-IMG.
        data_amounts: model -> samples added (None: "-"); given, the first columns are the
            README's "Incremental Dataset" and "Data Amount" ("220k").
    """
    def acc(summaries: Mapping[str, Summary], metric: str) -> float | None:
        s = summaries.get(metric)
        return None if s is None else s.get("accuracy")

    table: list[list[str]] = []
    for model, summaries in rows.items():
        mme, sqa = summaries.get("mme"), summaries.get("scienceqa")
        cells = [model]
        if data_amounts is not None:
            cells.append(data_amount_text(data_amounts.get(model)))
        for _, metric in RESULTS_COLUMNS:
            if metric == "mme" and fmt == "csv":
                cells += [_num(mme and mme["perception"], 2), _num(mme and mme["cognition"], 2),
                          _num(mme and mme["total"], 2)]
            elif metric == "mme":
                cells.append("-" if mme is None else f"{mme['perception']:.0f}/"
                             f"{mme['cognition']:.0f}({mme['total']:.0f})")
            elif metric == "scienceqa" and fmt == "csv":
                cells += [_num(sqa and sqa["accuracy"].get("Avg"), 2),
                          _num(sqa and sqa["accuracy"].get("IMG"), 2)]
            elif metric == "scienceqa":
                cells.append("-" if sqa is None else f"{_num(sqa['accuracy'].get('Avg'), 2)}/"
                             f"{_num(sqa['accuracy'].get('IMG'), 2)}")
            else:
                cells.append(_num(acc(summaries, metric), 2))
        table.append(cells)
    headers = ["Model"] if data_amounts is None else ["Incremental Dataset", "Data Amount"]
    for label, metric in RESULTS_COLUMNS:
        if fmt == "csv" and metric == "mme":
            headers += ["MME-P", "MME-C", "MME"]
        elif fmt == "csv" and metric == "scienceqa":
            headers += ["ScienceQA", "ScienceQA-IMG"]
        else:
            headers.append(label)
    return _render(headers, table, fmt)


WIN_LOSE_HEADERS = ("win", "lose", "equal", "win rate (not counting equal)")


def win_lose_table(summaries_by_model: Mapping[str, Summary], *, baseline: str | None = None,
                   fmt: TableFormat = "markdown") -> str:
    """The Chameleon Plus README's comparison table: per model (row), its judged win / lose /
    equal against the baseline and the win rate not counting equal (percent with one decimal
    in markdown, as the seed's 57.8%; a fraction in CSV). Summaries without a pairwise judge
    are left out.

    Args:
        summaries_by_model: row name -> evaluate summary with a pairwise `judge`.
        baseline: the model compared against, named in a leading "vs" column when given.
    """
    rows = []
    for model, summary in summaries_by_model.items():
        judge = summary.get("judge") or {}
        if judge.get("mode") not in PAIRWISE_MODES:
            continue
        rate = judge.get("win_rate_a_excluding_ties")
        shown = (("-" if rate is None else f"{100 * rate:.1f}%") if fmt == "markdown"
                 else ("" if rate is None else repr(rate)))
        lead = [model, baseline] if baseline else [model]
        rows.append([*lead, *(str(judge.get(k, 0)) for k in ("wins_a", "wins_b", "ties")),
                     shown])
    headers = ["model", "vs"] if baseline else ["model"]
    return _render([*headers, *WIN_LOSE_HEADERS], rows, fmt)


def _require(summaries: Mapping[str, Summary], metric: str, where: str) -> None:
    wrong = [name for name, s in summaries.items() if s.get("metric") != metric]
    if wrong:
        raise ValueError(f"{where}: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} "
                         f"not {metric} summaries (metric "
                         f"{summaries[wrong[0]].get('metric')!r})")


# --------------------------------------------------------------------------- evaluation summary


def evaluation_markdown(summary: Summary) -> str:
    """An evaluate stage's summary as markdown: summary.md, the MLflow run's summary.md and
    the KFP UI's Markdown artifact."""
    parts = []
    if summary.get("label"):
        parts.append(f"### {summary['label']}")
    if summary.get("metric"):
        parts.append(summary_markdown(summary["metric"], summary))
    if pot := summary.get("pot"):
        counts = pot["status_counts"]
        rows = [[status, str(n)] for status, n in counts.items()]
        rate = "-" if pot["ok_rate"] is None else f"{pot['ok_rate']:.1%}"
        parts.append(f"**Program of thought**: {pot['programs']} programs, {rate} ran to "
                     f"completion (wall {pot['limits']['wall_s']}s, CPU "
                     f"{pot['limits']['cpu_s']}s each; isolation "
                     f"{pot.get('isolation', 'none')}, executor {pot.get('executor', 'local')})"
                     "\n\n" + markdown_table(["PoT status", "programs"], rows))
        if pot.get("warning"):
            parts.append(f"**Warning**: {pot['warning']}")
    if judge := summary.get("judge"):
        keys = ("rows", "judged", "mean_score") if judge["mode"] == "single" else (
            "rows", "judged", "wins_a", "wins_b", "ties", "win_rate_a",
            "win_rate_a_excluding_ties")
        cells = [_cell(judge.get(k)) for k in keys]
        parts.append(f"**LLM judge** (`{judge['model']}`, {judge['mode']})\n\n"
                     + markdown_table(["judge", *keys], [[judge["mode"], *cells]]))
        if judge.get("failures"):
            parts.append("judge failures: " + ", ".join(f"{k} {v}" for k, v in
                                                        judge["failures"].items()))
    return "\n\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)
