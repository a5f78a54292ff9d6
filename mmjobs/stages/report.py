"""Stage `report`: plots and comparison tables across an experiment's runs.

    python -m mmjobs.stages.report --set experiment=lavin-sweep \\
        --set 'sweep_params=[train.lr_schedule, train.layer_dropout.preset]'
    mmjobs report --experiment chart-demo --run-id <pipeline run id>

Reads the runs of `experiment` from MLflow (or only the stage runs of the pipeline run
`parent_run_id`) and writes, to `output` (default `{store}/{experiment}/{pipeline_run_id}/
report`, committed with a manifest): `report.md`, `report.json`, the tables as `.md` + `.csv`
(runs summary; ChartQA @AP, ScienceQA categories and Main Results where the metrics allow)
and PNG plots (loss and LR curves, per-category bars, metric vs sweep setting); see
`mmjobs.report.build`. The same files are logged as artifacts of the stage's own MLflow run.
Runs that lack what a part needs are left out of it and listed with the reason.

On a cluster run (`parent_run_id` a `kfp:` reference, see `mmjobs.pipeline_parent`) the step
first does what `mmjobs run` does locally: it logs the compiled recipe on the parent run
(params and recipe.yaml, which the pipeline compiles into this step's config), rolls it up
(headline metrics, final model, registered versions: `mmjobs.report.rollup.roll_up_run`) and,
after the report, ends it FINISHED (FAILED if the report fails).

A re-run over unchanged runs (same run ids, statuses, metrics, params and tags) with the same
settings reuses the committed report.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.logs import get_logger
from mmjobs.pipeline_parent import finish, log_recipe, parse_ref, resolve
from mmjobs.report import (
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    ReportError,
    ReportOptions,
    build_report,
)
from mmjobs.report.collect import Collected, collect
from mmjobs.report.rollup import roll_up_run
from mmjobs.stage_contract import (
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    run_stage,
)

NAME = "report"
log = get_logger(__name__)
VERSION = 1  # bump when the report's contents change: invalidates reused reports
_NOT_FINGERPRINTED = {"pipeline_run_id", "output", "recipe", "force", "recipe_yaml"}


class ReportConfig(StageConfig):
    """Plots and comparison tables across an experiment's runs (or one pipeline run's)."""

    parent_run_id: str | None = Field(
        None, description="Report only on this pipeline (parent) run's stage runs; the "
        "report's own run is nested under it. None: every run of the experiment (the report "
        "run then nests under $MMJOBS_PARENT_RUN_ID, if set). On a cluster run, the parent "
        "its steps share (kfp:<job id>:<pipeline>): the report rolls it up and ends it.")
    sweep_params: list[str] = Field(
        default_factory=list, description="Params (or tags) that tell sweep runs apart, e.g. "
        "train.lr_schedule; read from each run, else its pipeline run, else the training "
        "runs of its pipeline run. Empty: detected (sweep.setting tag, or sweep.*/train.* "
        "params that differ), else the runs' labels.")
    headline_metrics: list[str] = Field(
        default_factory=list, description="Metrics for the runs table and sweep plots, e.g. "
        "scienceqa.Avg. Empty: each evaluate run's headline metric, plus final_loss.")
    title: str | None = Field(None, description="Report title; default names the experiment.")
    max_series: int = Field(12, ge=1, description="Runs per figure; more are split over "
                            "several figures (loss.png, loss_2.png, ...).")
    max_runs: int = Field(5000, ge=1, description="Read at most this many runs (the newest).")
    recipe_yaml: str | None = Field(
        None, description="Cluster runs (set by the pipeline): the recipe as compiled, logged "
        "on the parent run as recipe.yaml and params, as `mmjobs run` logs it locally.")


class ReportResult(StageResult):
    """Where the report is and what went into it."""

    report_md: str
    report_json: str
    plots: list[str]
    tables: list[str]
    runs: int
    skipped: int


def main(cfg: ReportConfig) -> ReportResult:
    """Run the stage; see the module docstring.

    Raises:
        ReportError: the experiment, or the parent run in it, does not exist.
        mmjobs.storage.StoreError: the report cannot be written.
    """
    if parse_ref(cfg.parent_run_id) is None:
        return _report(cfg)
    # A cluster run: the report step, which ends every pipeline, closes the parent run its
    # steps share, as `mmjobs run` does locally (roll-up, registered models, end status).
    parent = _cluster_parent(cfg)
    try:
        if cfg.recipe_yaml:
            log_recipe(parent, _recipe_params(cfg.recipe_yaml), cfg.recipe_yaml)
        roll_up_run(parent, registered_model=cfg.recipe)
        result = _report(cfg.model_copy(update={"parent_run_id": parent}))
    except BaseException:
        finish(parent, "FAILED")
        raise
    finish(parent, "FINISHED")
    return result


def _recipe_params(recipe_yaml: str) -> dict[str, Any]:
    """The compiled recipe's params as `mmjobs run` logs them (`mmjobs.config.flatten`); none,
    with a warning, if this version cannot read it (recipe.yaml is still logged)."""
    import yaml
    from pydantic import ValidationError

    from mmjobs.config import flatten
    from mmjobs.recipe import RecipeConfig

    try:
        return flatten(RecipeConfig.model_validate(yaml.safe_load(recipe_yaml)))
    except (ValidationError, yaml.YAMLError) as e:
        log.warning("the compiled recipe's params are not logged on the parent run: %s",
                    str(e).splitlines()[0])
        return {}


def _cluster_parent(cfg: ReportConfig) -> str:
    """The run id of the parent run of this cluster run (`mmjobs.pipeline_parent`)."""
    ref = str(cfg.parent_run_id)
    try:
        parent = resolve(cfg.experiment, ref, cfg.recipe)
    except Exception as e:  # MLflow unreachable or refusing: nothing to report on
        raise ReportError(f"cannot find the MLflow parent run of {ref} in experiment "
                          f"{cfg.experiment!r}: {e}") from e
    if parent is None:
        raise ReportError(f"experiment {cfg.experiment!r} does not exist, so no step of {ref} "
                          "tracked anything; check the steps' MLFLOW_TRACKING_URI")
    return parent


def _report(cfg: ReportConfig) -> ReportResult:
    # Collect before opening the stage's run: a mistyped experiment name must fail here,
    # not get created by the tracker.
    collected = collect(cfg.experiment, cfg.parent_run_id, max_runs=cfg.max_runs)
    fp = fingerprint(NAME, VERSION, cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED),
                     _state(collected))
    scope = cfg.parent_run_id or "experiment"

    def report(stage: StageRun) -> dict[str, Any]:
        options = ReportOptions(title=cfg.title or _title(cfg), sweep_params=cfg.sweep_params,
                                headline_metrics=cfg.headline_metrics,
                                max_series=cfg.max_series)
        with stage.commit({"stage": NAME, "scope": scope}) as scratch:
            build_report(collected, scratch, options)
            return _log_files(stage.run, scratch)

    def reused(out: str, manifest: storage.Manifest, run: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="mmjobs-report-") as tmp:
            storage.get_dir(out, tmp)
            return _log_files(run, Path(tmp))

    return run_stage(cfg, NAME, fp, report, result=_result, reused=reused,
                     tags={"report.scope": scope}, uncommit_first=True)


def _title(cfg: ReportConfig) -> str:
    if cfg.parent_run_id:
        return f"{cfg.experiment}: pipeline run {cfg.parent_run_id[:8]}"
    return f"{cfg.experiment}: all runs"


def _state(collected: Collected) -> list[Any]:
    """What the report depends on in MLflow (histories aside: their last value is a metric)."""
    return [(r.run_id, r.status, r.end_time, sorted(r.metrics.items()), sorted(r.params.items()),
             sorted(r.tags.items()))
            for r in (*collected.runs, *collected.parents.values())]


def _log_files(run: Any, folder: Path) -> dict[str, Any]:
    """Log the report's files as artifacts of the stage run; return report.json's content."""
    import json

    info = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != storage.MANIFEST_NAME:
            run.log_artifact(path)
    run.log_metrics({"report.runs": info["counts"]["runs"],
                     "report.skipped": info["counts"]["skipped"],
                     "report.plots": len(info["plots"])})
    return info


def _result(out: str, info: dict[str, Any], cached: bool, run_id: str | None) -> ReportResult:
    return ReportResult(
        output=out, cached=cached, mlflow_run_id=run_id,
        report_md=storage.join(out, REPORT_MD), report_json=storage.join(out, REPORT_JSON),
        plots=[storage.join(out, name) for name in info["plots"]],
        tables=[storage.join(out, t["csv"]) for t in info["tables"].values()],
        runs=info["counts"]["runs"], skipped=info["counts"]["skipped"])


def component(cfg: ReportConfig, *, report: Any, page: Any) -> str:
    """The KFP component's body: run the stage, then show the report in the KFP UI
    (`report`: a Markdown artifact, its text; `page`: an HTML one, with the plots inline)."""
    result = main(cfg)
    for artifact, name in ((report, REPORT_MD), (page, REPORT_HTML)):  # report.html: plots inline
        Path(artifact.path).write_text(storage.read_text(storage.join(result.output, name)),
                                       encoding="utf-8")
    return result.output


STAGE = Stage(name=NAME, config=ReportConfig, result=ReportResult, main=main, image="eval",
              outputs={"report": "Markdown", "page": "HTML"}, component=component,
              errors=(ReportError,))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
