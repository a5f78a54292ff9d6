"""Assemble a report from collected runs into a local folder: PNGs, tables, report.md/json.

    collected = collect("lavin-sweep")
    info = build_report(collected, Path("out"), ReportOptions(title="LaVIN schedules"))

What goes in (each part only when the runs have what it needs; otherwise the runs left out
are listed with the reason in report.md and report.json):

- `loss.png` / `lr.png` (more runs than `max_series`: `loss_2.png`, ...): per-step curves of
  every run that logged `loss` (eval loss as markers);
- `categories_<benchmark>.png`: per-category bars, one colour per evaluate run;
- `sweep_<benchmark>_<metric>_by_<param>.png`: the headline metric against each sweep param
  (explicit `sweep_params`, else detected, else the runs' labels when they differ);
- tables, each as `<name>.md` and `<name>.csv`: `runs` (summary), `chartqa_ap`, `scienceqa`,
  `results` (Main Results across benchmarks);
- `report.md` (title, scope, tables, plots embedded by file name), `report.html` (the same page
  with the plots inlined: what renders with its images in MLflow's artifact viewer, see
  `mmjobs.report.html`) and `report.json` (the same facts for programs).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmjobs.eval.report import category_values
from mmjobs.logs import get_logger
from mmjobs.report import plots, tables
from mmjobs.report.collect import Collected, Skip
from mmjobs.report.html import report_html
from mmjobs.report.runs import RunRecord, RunSet, headline_of, summary_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = get_logger(__name__)
REPORT_MD, REPORT_JSON, REPORT_HTML = "report.md", "report.json", "report.html"
DPI = 120
_UNSAFE = re.compile(r"[^\w-]+")


@dataclass
class ReportOptions:
    """How to build a report (the report stage's config fields of the same names)."""

    title: str
    sweep_params: list[str] = field(default_factory=list)
    headline_metrics: list[str] = field(default_factory=list)
    max_series: int = 12


@dataclass
class _Parts:
    """What a report build has made so far (files are relative to the output folder)."""

    out_dir: Path
    plots: list[str] = field(default_factory=list)
    tables: list[tables.Table] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def figure(self, fig: Figure, stem: str) -> str:
        name = f"{_UNSAFE.sub('_', stem).strip('_')}.png"
        fig.savefig(self.out_dir / name, dpi=DPI)
        self.plots.append(name)
        return f"![{stem}]({name})"

    def table(self, table: tables.Table) -> str:
        (self.out_dir / f"{table.name}.md").write_text(table.markdown + "\n", encoding="utf-8")
        (self.out_dir / f"{table.name}.csv").write_text(table.csv, encoding="utf-8")
        self.tables.append(table)
        return f"{table.markdown}\n\n(`{table.name}.csv`)"

    def skip(self, run: RunRecord, reason: str) -> None:
        log.info("report: %s (%s) left out: %s", run.name, run.short_id, reason)
        self.skipped.append(Skip(run.run_id, run.name, reason))


def build_report(collected: Collected, out_dir: Path, options: ReportOptions) -> dict[str, Any]:
    """Write the report files into `out_dir`; return what `report.json` holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runset = RunSet(collected.runs, collected.parents)
    parts = _Parts(out_dir, skipped=list(collected.skipped))
    evaluations = runset.evaluations()
    _note_unusable(runset, evaluations, parts)
    eval_runs = [r for runs in evaluations.values() for r in runs]
    sweep = options.sweep_params or runset.detect_sweep_params(eval_runs)
    for key in options.sweep_params:
        if not any(runset.setting(r, key) for r in collected.runs):
            log.warning("report: no run carries sweep param %r (a param or tag of the runs, "
                        "their pipeline run, or their training runs)", key)
    metrics = options.headline_metrics or tables.default_headline_metrics(collected.runs)
    summary = tables.run_summary_table(collected.runs, runset, sweep_params=sweep,
                                       metrics=metrics)
    parts.sections.append(f"## Runs\n\n{parts.table(summary)}")
    _training_section(runset, sweep, options, parts)
    names = runset.display_names(eval_runs, sweep)
    for bench, runs in evaluations.items():
        _benchmark_section(bench, runs, runset, names, sweep, options, parts)
    results, superseded = tables.main_results_table(runset, evaluations)
    parts.skipped += superseded
    if results is not None:
        parts.sections.append(f"## {results.title}\n\n{parts.table(results)}")
    info = _info(collected, options, sweep, metrics, parts, runset)
    markdown = _markdown(info, parts)
    (out_dir / REPORT_MD).write_text(markdown, encoding="utf-8")
    (out_dir / REPORT_HTML).write_text(report_html(markdown, out_dir, options.title),
                                       encoding="utf-8")
    (out_dir / REPORT_JSON).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    return info


def _note_unusable(runset: RunSet, evaluations: dict[str, list[RunRecord]],
                   parts: _Parts) -> None:
    """Record train and evaluate runs that cannot appear in curves or benchmark tables."""
    usable = {r.run_id for runs in evaluations.values() for r in runs}
    for run in runset.runs:
        if run.stage == "train" and not run.is_training:
            parts.skip(run, f"train run without a `loss` metric (status {run.status.lower()}; "
                       "a reused output, or stopped before its first logged step)")
        elif run.stage == "evaluate" and run.run_id not in usable:
            metric = run.value("metric") or "?"
            why = ("judge-only evaluation: no benchmark table" if metric == "judge" else
                   f"no {metric} metrics (status {run.status.lower()})")
            parts.skip(run, why)


def _training_section(runset: RunSet, sweep: Sequence[str], options: ReportOptions,
                      parts: _Parts) -> None:
    runs = [r for r in runset.training if r.history.get("loss")]
    already = {s.run_id for s in parts.skipped}  # e.g. a history MLflow could not serve
    for run in runset.training:
        if not run.history.get("loss") and run.run_id not in already:
            parts.skip(run, "no `loss` history to plot")
    if not runs:
        return
    # Without sweep params from the evaluations, what tells training runs apart (lr_schedule,
    # mode, ...) still names their curves.
    names = runset.display_names(runs, sweep or runset.detect_sweep_params(runs))
    lines = ["## Training"]
    for key, title in (("loss", "Training loss"), ("lr", "Learning rate")):
        with_key = [r for r in runs if r.history.get(key)]
        for i, group in enumerate(plots.chunked(with_key, options.max_series)):
            curves = {names[r.run_id]: r.history[key] for r in group}
            overlay = ({names[r.run_id]: r.history["eval_loss"] for r in group
                        if r.history.get("eval_loss")} if key == "loss" else None)
            fig = plots.curves_figure(curves, key, title=title, overlay=overlay)
            lines.append(parts.figure(fig, key if i == 0 else f"{key}_{i + 1}"))
    parts.sections.append("\n\n".join(lines))


def _benchmark_section(bench: str, runs: list[RunRecord], runset: RunSet,
                       names: dict[str, str], sweep: Sequence[str], options: ReportOptions,
                       parts: _Parts) -> None:
    lines = [f"## {bench}"]
    if bench == "chartqa":
        lines.append(parts.table(tables.chartqa_ap_table(runs, names)))
    elif bench == "scienceqa":
        lines.append(parts.table(tables.scienceqa_runs_table(runs, names)))
    for i, group in enumerate(plots.chunked(runs, options.max_series)):
        values = {names[r.run_id]: _flat_categories(summary_of(r) or {}) for r in group}
        unit = (summary_of(group[0]) or {}).get("unit", "")
        fig = plots.grouped_bars(values, title=f"{bench}: per category", unit=unit)
        lines.append(parts.figure(fig, f"categories_{bench}" + (f"_{i + 1}" if i else "")))
    lines += _sweep_plots(bench, runs, runset, sweep, options, parts)
    parts.sections.append("\n\n".join(lines))


def _sweep_plots(bench: str, runs: list[RunRecord], runset: RunSet, sweep: Sequence[str],
                 options: ReportOptions, parts: _Parts) -> list[str]:
    """Metric-vs-setting plots for one benchmark: by each sweep param that takes two or more
    values among its runs, else by label when the runs' labels differ."""
    metrics = [m for m in options.headline_metrics if m.startswith(f"{bench}.")] or list(
        dict.fromkeys(name for r in runs if (name := headline_of(r)[0])))
    by_key = {key: {r.run_id: runset.setting(r, key) for r in runs} for key in sweep}
    by_key = {k: v for k, v in by_key.items() if len(set(v.values()) - {None}) >= 2}
    if not by_key and len({r.label for r in runs if r.label}) >= 2:
        by_key = {"label": {r.run_id: r.label for r in runs}}
    lines = []
    for key, values in by_key.items():
        for run in runs:
            if values[run.run_id] is None:
                parts.skip(run, f"{bench} by {key}: the run has no {key!r} value")
        for metric in metrics:
            points: dict[str, list[float]] = {}
            for run in runs:
                if (value := values[run.run_id]) is not None and metric in run.metrics:
                    points.setdefault(value, []).append(run.metrics[metric])
            if len(points) >= 2:
                fig = plots.sweep_figure(points, setting=key, metric=metric)
                lines.append(parts.figure(fig, f"sweep_{bench}_{metric}_by_{key}"))
    return lines


def _flat_categories(summary: dict[str, Any]) -> dict[str, float | None]:
    """A summary's categories as one series (ChartQA: "Human @0.05", ...)."""
    series = category_values(summary)
    if len(series) == 1:
        return next(iter(series.values()))
    return {f"{name} {cat}": v for name, cats in series.items() for cat, v in cats.items()}


def _info(collected: Collected, options: ReportOptions, sweep: Sequence[str],
          metrics: Sequence[str], parts: _Parts, runset: RunSet) -> dict[str, Any]:
    stages = Counter(r.stage or "-" for r in collected.runs)
    return {
        "title": options.title,
        "experiment": collected.experiment,
        "experiment_id": collected.experiment_id,
        "parent_run_id": collected.parent_run_id,
        "tracking_uri": collected.tracking_uri,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {"runs": len(collected.runs), "by_stage": dict(stages.most_common()),
                   "pipeline_runs": len(collected.parents),
                   "earlier_reports": collected.reports, "skipped": len(parts.skipped)},
        "sweep_params": list(sweep),
        "headline_metrics": list(metrics),
        "plots": parts.plots,
        "tables": {t.name: {"title": t.title, "markdown": f"{t.name}.md", "csv": f"{t.name}.csv"}
                   for t in parts.tables},
        "runs": [{"run_id": r.run_id, "name": r.name, "stage": r.stage, "label": r.label,
                  "status": r.status, "parent_run_id": r.parent_run_id,
                  "settings": {k: runset.setting(r, k) for k in sweep},
                  "metrics": {m: r.metrics[m] for m in metrics if m in r.metrics}}
                 for r in collected.runs],
        "skipped": [s.as_dict() for s in parts.skipped],
    }


def _markdown(info: dict[str, Any], parts: _Parts) -> str:
    scope = (f"pipeline run `{info['parent_run_id']}`" if info["parent_run_id"]
             else "every run")
    counts = info["counts"]
    stages = ", ".join(f"{n} {s}" for s, n in counts["by_stage"].items()) or "none"
    head = [f"# {info['title']}",
            f"Experiment `{info['experiment']}` ({scope}) at `{info['tracking_uri']}`, "
            f"{info['created']}.",
            f"Runs: {counts['runs']} ({stages}); pipeline runs: {counts['pipeline_runs']}."]
    if parts.plots:  # MLflow's Markdown view shows image links as text
        head.append(f"Plots: the PNG files beside this file; `{REPORT_HTML}` shows them inline "
                    "(open it in MLflow's artifact view).")
    if info["sweep_params"]:
        head.append("Sweep params: " + ", ".join(f"`{p}`" for p in info["sweep_params"]) + ".")
    if not counts["runs"]:
        head.append("No stage runs to report.")
    body = [*head, *parts.sections]
    if parts.skipped:
        items = [f"- {s.run} (`{s.run_id[:8]}`): {s.reason}" for s in parts.skipped]
        body.append("## Left out\n\n" + "\n".join(items))
    return "\n\n".join(body) + "\n"
