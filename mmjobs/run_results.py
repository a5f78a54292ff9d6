"""What a local pipeline run produced, and where it is: the results side of `mmjobs run`.

`mmjobs.pipeline_runner.run_local` runs the steps; afterwards it calls, in order,
`roll_up_parent_run` (the MLflow parent run's headline metrics and final model),
`collect_results` (headlines of the evaluate steps and the run's `results.md`, built by
`results_markdown`) and `cached_stages` (which stage runs reused committed outputs), and
`print_outcome` shows the `RunOutcome` on the console.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmjobs import settings, storage
from mmjobs.logs import get_logger
from mmjobs.recipe import RecipeConfig

log = get_logger(__name__)
__all__ = ["RESULTS_FILE", "RunOutcome", "cached_stages", "collect_results", "print_outcome",
           "results_markdown", "roll_up_parent_run"]
RESULTS_FILE = "results.md"


@dataclass
class RunOutcome:
    """What a local run produced."""

    run_id: str
    run_dir: str
    mlflow_run_id: str | None
    seconds: float
    results: str | None
    headlines: dict[str, tuple[str | None, float | None]] = field(default_factory=dict)
    stages_cached: dict[str, bool] = field(default_factory=dict)
    report: str | None = None
    log: str | None = None  # every line the steps printed (the console shows a summary)
    model: str | None = None  # the final model's registered version and store URI


def print_outcome(recipe_path: str | Path, outcome: RunOutcome) -> None:
    """The closing summary of `mmjobs run`: where everything is."""
    cached = sum(outcome.stages_cached.values())
    print()
    print(f"{Path(recipe_path).name}: finished in {_duration(outcome.seconds)} "
          f"(run {outcome.run_id}; {len(outcome.stages_cached)} stage runs, {cached} reused "
          "committed outputs)")
    for label, (metric, value) in outcome.headlines.items():
        shown = "-" if value is None else f"{value:.4g}"
        print(f"  {label:<24} {metric} = {shown}")
    if outcome.results:
        print(f"  results   {outcome.results}")
    if outcome.report:
        print(f"  report    {outcome.report}")
    if outcome.model:
        print(f"  model     {outcome.model}")
    print(f"  store     {outcome.run_dir}")
    if outcome.log:
        print(f"  log       {outcome.log}")
    tracking = settings.tracking_uri()
    hint = "browse: mmjobs ui" if tracking.startswith("sqlite:") else f"open {tracking}"
    print(f"  MLflow    parent run {outcome.mlflow_run_id} ({tracking}; {hint})")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def collect_results(build: Any, outcome: RunOutcome) -> None:
    """Headline numbers of every evaluate step, and the run's results table (results.md)."""
    import json

    from mmjobs.eval.report import headline

    summaries: dict[str, dict[str, Any]] = {}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for step in build.steps:
        if step.stage == "report" and step.output:
            outcome.report = storage.join(step.output, "report.md")
        if step.stage != "evaluate" or not step.output:
            continue
        try:
            summary = json.loads(storage.read_text(storage.join(step.output, "summary.json")))
        except (storage.StoreError, ValueError) as e:
            log.warning("no summary for %s: %s", step.name, e)
            continue
        label = step.label or step.name
        summaries[label] = summary
        outcome.headlines[label] = headline(summary)
        rows.setdefault(step.row or label, {})[summary.get("metric") or "judge"] = summary
    if summaries:
        amounts = ({row: _data_amount(uri) for row, uri in build.row_data.items()}
                   if build.row_data else None)
        text = results_markdown(build.recipe.recipe, summaries, rows, data_amounts=amounts,
                                submissions=_submissions(build))
        outcome.results = storage.join(outcome.run_dir, RESULTS_FILE)
        storage.write_text(outcome.results, text)


def _data_amount(dataset: str | None) -> int | None:
    """Accepted samples of a committed canonical dataset (its card), None without one."""
    import json

    from mmjobs.layout import DATASET_CARD

    if dataset is None:
        return None
    try:
        card = json.loads(storage.read_text(storage.join(dataset, DATASET_CARD)))
        return int(card["counts"]["accepted"])
    except (storage.StoreError, ValueError, KeyError, TypeError) as e:
        log.warning("no data amount for %s: %s", dataset, e)
        return None


def _submissions(build: Any) -> list[dict[str, Any]]:
    """The evaluation-server upload files the run's infer steps wrote (their infer.json)."""
    import json

    from mmjobs.layout import INFER_SUMMARY

    found = []
    for step in build.steps:
        if step.stage != "infer" or not step.output:
            continue
        try:
            summary = json.loads(storage.read_text(storage.join(step.output, INFER_SUMMARY)))
        except (storage.StoreError, ValueError):
            continue
        if summary.get("submission"):
            found.append({**summary["submission"], "step": step.name,
                          "uri": storage.join(step.output, summary["submission"]["file"])})
    return found


def results_markdown(title: str, summaries: dict[str, dict[str, Any]],
                     rows: dict[str, dict[str, dict[str, Any]]], *,
                     data_amounts: dict[str, int | None] | None = None,
                     submissions: Sequence[dict[str, Any]] = ()) -> str:
    """The run's evaluations as the seed tables: ChartMoE's @AP table for ChartQA, LaVIN's
    NAT…Average table for ScienceQA, MLLM-DataEngine's Main Results across benchmarks (with
    `data_amounts`, its Incremental Dataset / Data Amount columns), the per-task table of the
    `chartwiz` metric, the Chameleon Plus win / lose / equal table for pairwise judges, and the
    evaluation-server upload files (`submissions`, from the infer steps)."""
    from mmjobs.eval.report import (
        PAIRWISE_MODES,
        ap_table,
        headline,
        results_table,
        scienceqa_table,
        win_lose_table,
    )

    parts = [f"# {title}: results", ""]
    by_metric: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    for label, summary in summaries.items():
        by_metric[summary.get("metric") or "judge"][label] = summary
    if len({m for r in rows.values() for m in r}) > 2:
        parts += ["## Main results", "", results_table(rows, data_amounts=data_amounts), ""]
    for metric, group in by_metric.items():
        if metric == "chartqa":
            parts += ["## ChartQA relaxed accuracy (@AP)", "", ap_table(group), ""]
        elif metric == "scienceqa":
            parts += ["## ScienceQA accuracy (%)", "", scienceqa_table(group), ""]
        elif metric == "chartwiz":  # per task: relaxed on numbers, exact otherwise
            from mmjobs.eval.metrics.chartwiz import render as chartwiz_table

            for label, summary in group.items():
                parts += [f"## ChartWiz chart QA accuracy (%): {label}", "",
                          chartwiz_table(summary), ""]
        elif metric == "judge" and any((s.get("judge") or {}).get("mode") in PAIRWISE_MODES
                                       for s in group.values()):
            parts += ["## Judged against the baseline: win / lose / equal", "",
                      win_lose_table(group), ""]
    if submissions:
        parts += ["## Evaluation-server uploads", "",
                  "| step | file | questions | answered | unanswered |",
                  "| --- | --- | --- | --- | --- |"]
        parts += [f"| {u['step']} | {u['uri']} | {u['questions']} | {u['answered']} | "
                  f"{u['unanswered']} |" for u in submissions]
        parts.append("")
    parts += ["## Headline per evaluation", "", "| evaluation | metric | value |",
              "| --- | --- | --- |"]
    for label, summary in summaries.items():
        name, value = headline(summary)
        parts.append(f"| {label} | {name} | {'-' if value is None else f'{value:.4g}'} |")
    return "\n".join(parts) + "\n"


def roll_up_parent_run(recipe: RecipeConfig, parent: Any, tracker: Any) -> str | None:
    """The parent run's headline metrics and final model, the evaluated models registered
    under the recipe's name (`mmjobs.report.rollup.roll_up_run`, which the report step of a
    cluster run calls too); returns "name/version (URI)" of the final model. MLflow trouble
    here is a warning: the run's results are in the store."""
    tracker.flush(timeout=10)  # the stage runs' data is in; the parent must exist
    if not parent.run_id:
        log.warning("MLflow parent run not created (tracking unreachable): no headline "
                    "metrics or registered model for this run")
        return None
    from mmjobs.report.rollup import roll_up_run

    return roll_up_run(parent.run_id, registered_model=recipe.recipe)


def cached_stages(experiment: str, parent_run_id: str | None) -> dict[str, bool]:
    """Child runs of the parent run -> whether each reused a committed output."""
    if not parent_run_id:
        return {}
    try:
        from mlflow import MlflowClient

        client = MlflowClient(settings.tracking_uri())
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=1000)
    except Exception as e:  # a summary nicety: never fail the run over it
        log.warning("could not list the stage runs: %s", e)
        return {}
    # Stages mark reuse with the tag cached=true; pretokenize logs it as the metric cached=1.
    return {f"{r.info.run_name} {r.info.run_id[:8]}":
            r.data.tags.get("cached") == "true" or r.data.metrics.get("cached") == 1.0
            for r in runs}
