"""Tables across runs, as markdown and CSV.

- `run_summary_table`: one row per run: name, id, stage, label, status, sweep params and
  headline metrics.
- The seed recipes' tables, drawn by `mmjobs.eval.report` from summaries rebuilt from each
  run's metrics (`mmjobs.report.runs.summary_of`): `chartqa_ap_table` (ChartMoE's @AP table,
  one per label such as "w/o PoT" / "w/ PoT"), `scienceqa_runs_table` (LaVIN's category
  table, a row per run or sweep setting), `main_results_table` (MLLM-DataEngine's Main
  Results, a row per model: the evaluate runs sharing a pipeline run and label).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmjobs.eval.metrics.base import markdown_table
from mmjobs.eval.report import RESULTS_COLUMNS, ap_table, results_table, scienceqa_table
from mmjobs.report.collect import Skip
from mmjobs.report.runs import RunRecord, RunSet, headline_of, summary_of

TRAIN_HEADLINES = ("final_loss", "final_eval_loss")


@dataclass(frozen=True)
class Table:
    """A rendered table: `name` is the file stem (`runs` -> runs.md, runs.csv)."""

    name: str
    title: str
    markdown: str
    csv: str


def default_headline_metrics(runs: Sequence[RunRecord]) -> list[str]:
    """Each evaluate run's headline metric (in run order), then the training ones logged."""
    names = [name for run in runs if (name := headline_of(run)[0])]
    names += [m for m in TRAIN_HEADLINES if any(m in run.metrics for run in runs)]
    return list(dict.fromkeys(names))


def run_summary_table(runs: Sequence[RunRecord], runset: RunSet, *,
                      sweep_params: Sequence[str] = (),
                      metrics: Sequence[str] = ()) -> Table:
    """One row per run. Markdown shows 8-character run ids and 4 significant digits; the CSV
    has full ids and full precision."""
    headers = ["Run", "Run ID", "Stage", "Label", "Status", *sweep_params, *metrics]
    md_rows, csv_rows = [], []
    for run in runs:
        settings = [runset.setting(run, key) or "-" for key in sweep_params]
        values = [run.metrics.get(m) for m in metrics]
        head = [run.name, run.run_id, run.stage or "-", run.label or "-", run.status.lower()]
        csv_rows.append([*head, *settings, *("" if v is None else repr(v) for v in values)])
        head[1] = run.short_id
        md_rows.append([*head, *settings, *("-" if v is None else f"{v:.4g}" for v in values)])
    return Table("runs", "Runs", markdown_table(headers, md_rows), _csv(headers, csv_rows))


def chartqa_ap_table(runs: Sequence[RunRecord], names: dict[str, str]) -> Table:
    """ChartMoE's @AP table, one per run named by its label (`names`: run id -> name)."""
    summaries = {names[r.run_id]: summary_of(r) for r in runs}
    return Table("chartqa_ap", "ChartQA relaxed accuracy (@AP)", ap_table(summaries),
                 ap_table(summaries, fmt="csv"))


def scienceqa_runs_table(runs: Sequence[RunRecord], names: dict[str, str]) -> Table:
    """LaVIN's ScienceQA table (NAT ... G7-12, Average), a row per run or sweep setting."""
    summaries = {names[r.run_id]: summary_of(r) for r in runs}
    return Table("scienceqa", "ScienceQA accuracy by category", scienceqa_table(summaries),
                 scienceqa_table(summaries, fmt="csv"))


def main_results_table(runset: RunSet,
                       by_benchmark: dict[str, list[RunRecord]]) -> tuple[Table | None, list[Skip]]:
    """MLLM-DataEngine's Main Results across benchmarks: a row per model, i.e. per (pipeline
    run, label) of the evaluate runs; None when fewer than two of its benchmarks were run.

    Returns:
        The table (or None) and the runs left out (an older run of a benchmark a model
        already has a newer run for).
    """
    wanted = [m for _, m in RESULTS_COLUMNS if m in by_benchmark]
    if len(wanted) < 2:
        return None, []
    models: dict[tuple[str | None, str | None], dict[str, tuple[RunRecord, Any]]] = {}
    skipped: list[Skip] = []
    for metric in wanted:
        for run in by_benchmark[metric]:  # oldest first: a newer run replaces an older one
            row = models.setdefault((run.parent_run_id, run.label), {})
            if metric in row:
                old = row[metric][0]
                skipped.append(Skip(old.run_id, old.name, f"Main Results: superseded by the "
                                    f"newer {metric} run {run.short_id} of the same model"))
            row[metric] = (run, summary_of(run))
    names = _model_names(runset, list(models))
    rows = {names[key]: {m: s for m, (_, s) in row.items()} for key, row in models.items()}
    return Table("results", "Main Results", results_table(rows),
                 results_table(rows, fmt="csv")), skipped


def _model_names(runset: RunSet, keys: list[tuple[str | None, str | None]]) -> dict[Any, str]:
    """A row name per (pipeline run, label): the label, else the pipeline run's name; the
    pipeline run's short id is added where names collide."""
    def base(parent: str | None, label: str | None) -> str:
        if label:
            return label
        run = runset.parents.get(parent or "")
        return run.name if run is not None else (parent or "runs")[:8]

    names = {key: base(*key) for key in keys}
    taken = list(names.values())
    return {key: f"{name} [{(key[0] or '-')[:8]}]" if taken.count(name) > 1 else name
            for key, name in names.items()}


def _csv(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return out.getvalue()
