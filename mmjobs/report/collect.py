"""Read an experiment's runs from MLflow (MlflowClient only, never the fluent API).

    collected = collect("lavin-sweep")                       # the whole experiment
    collected = collect("chart-demo", parent_run_id=run_id)  # one pipeline run's stages

Runs are fetched page by page (`search_runs` with page tokens), so experiments with hundreds
or thousands of runs work; the per-step histories the plots need (`loss`, `lr`, `eval_loss`)
are fetched only for runs that logged them. A run whose history cannot be read is reported as
skipped, never fails the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmjobs import settings
from mmjobs.logs import get_logger
from mmjobs.report.runs import PARENT_TAG, RunRecord

log = get_logger(__name__)
HISTORY_KEYS = ("loss", "lr", "eval_loss")
PAGE_SIZE = 500  # runs per search_runs call (MLflow's own default page is 1000)
REPORT_STAGE = "report"


class ReportError(Exception):
    """The report cannot be made (unknown experiment or parent run); the message says why."""


@dataclass(frozen=True)
class Skip:
    """A run left out of part of a report, and why."""

    run_id: str
    run: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id, "run": self.run, "reason": self.reason}


@dataclass
class Collected:
    """What a report is made from.

    Attributes:
        runs: stage runs (oldest first); pipeline runs and earlier reports are not among them.
        parents: pipeline (parent) runs by id, for settings they carry.
        skipped: runs left out while collecting (e.g. a history that could not be read).
    """

    experiment: str
    experiment_id: str
    tracking_uri: str
    parent_run_id: str | None
    runs: list[RunRecord]
    parents: dict[str, RunRecord] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    reports: int = 0  # earlier report runs, left out


def client(tracking_uri: str | None = None) -> Any:
    """An `MlflowClient` for `tracking_uri` (default `mmjobs.settings.tracking_uri()`)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri or settings.tracking_uri())


def collect(experiment: str, parent_run_id: str | None = None, *,
            tracking_uri: str | None = None, max_runs: int = 5000,
            history_keys: Sequence[str] = HISTORY_KEYS, page_size: int = PAGE_SIZE) -> Collected:
    """The runs of `experiment` (or of one pipeline run in it) with the histories to plot.

    Args:
        experiment: MLflow experiment name.
        parent_run_id: only this pipeline run's child runs; None: every run.
        tracking_uri: default `mmjobs.settings.tracking_uri()`.
        max_runs: stop fetching after this many runs (newest are kept), with a warning.
        history_keys: metrics whose per-step history is fetched, when a run logged them.
        page_size: runs per `search_runs` request.

    Raises:
        ReportError: the experiment (or the parent run, in this experiment) does not exist.
    """
    uri = tracking_uri or settings.tracking_uri()
    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        known = [e.name for e in mlflow_client.search_experiments(max_results=20)]
        raise ReportError(f"experiment {experiment!r} not found at {uri}; experiments there: "
                          f"{', '.join(known) or 'none'} (check --experiment, or "
                          "MLFLOW_TRACKING_URI / MMJOBS_HOME)")
    parents: dict[str, RunRecord] = {}
    filter_string = ""
    if parent_run_id:
        parent = _get_run(mlflow_client, parent_run_id)
        if parent is None or parent.info.experiment_id != exp.experiment_id:
            where = "does not exist" if parent is None else "belongs to another experiment"
            raise ReportError(f"run {parent_run_id!r} {where} in experiment {experiment!r} at "
                              f"{uri}; pass the pipeline (parent) run id from that experiment")
        parents[parent_run_id] = _record(parent)
        filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    records = [_record(r) for r in _search(mlflow_client, exp.experiment_id, filter_string,
                                           max_runs, page_size)]
    records.sort(key=lambda r: (r.start_time, r.run_id))
    runs, reports = _stage_runs(records, parents)
    collected = Collected(experiment=experiment, experiment_id=exp.experiment_id,
                          tracking_uri=uri, parent_run_id=parent_run_id, runs=runs,
                          parents=parents, reports=reports)
    for run in runs:
        for key in history_keys:
            if key in run.metrics:
                try:
                    run.history[key] = _history(mlflow_client, run.run_id, key)
                except Exception as e:  # one unreadable history must not sink the report
                    collected.skipped.append(Skip(run.run_id, run.name,
                                                  f"history of {key!r} unreadable: {e}"))
    log.info("report: %d stage runs in %s%s (%d pipeline runs, %d earlier reports left out)",
             len(runs), experiment, f" under {parent_run_id}" if parent_run_id else "",
             len(parents), reports)
    return collected


def _search(mlflow_client: Any, experiment_id: str, filter_string: str, max_runs: int,
            page_size: int) -> list[Any]:
    """Every active run matching `filter_string`, following page tokens, newest first."""
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=page_size,
            order_by=["attributes.start_time DESC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token or len(runs) >= max_runs:
            break
    if token and len(runs) >= max_runs:
        log.warning("report: experiment has more than %d runs; reporting the newest %d "
                    "(raise max_runs, or pass a parent run id)", max_runs, max_runs)
    return runs[:max_runs]


def _stage_runs(records: list[RunRecord],
                parents: dict[str, RunRecord]) -> tuple[list[RunRecord], int]:
    """Split runs into stage runs and pipeline runs (into `parents`); drop report runs.

    A pipeline run is a run other runs name as parent, or a run with neither a stage tag nor
    metrics (a pipeline whose stages never started).
    """
    referenced = {r.parent_run_id for r in records if r.parent_run_id}
    runs: list[RunRecord] = []
    reports = 0
    for run in records:
        if run.stage == REPORT_STAGE:
            reports += 1
        elif run.run_id in referenced or (run.stage is None and not run.metrics
                                          and not run.parent_run_id):
            parents[run.run_id] = run
        else:
            runs.append(run)
    return runs, reports


def _get_run(mlflow_client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        return None


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(run_id=info.run_id, name=info.run_name or info.run_id[:8],
                     status=info.status, start_time=info.start_time or 0,
                     end_time=info.end_time, params=dict(data.params), tags=dict(data.tags),
                     metrics=dict(data.metrics))


def _history(mlflow_client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs sorted by step; for a step logged twice (a resumed run), the last."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in mlflow_client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, value) for step, (_, value) in sorted(by_step.items())]
