"""The report stage end to end on a synthetic experiment in the embedded MLflow database:
files in the store, valid non-trivial PNGs, the seed tables' numbers, the report's own MLflow
run and its artifacts, reuse, and the runs left out with their reasons."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from mmjobs import settings, storage
from mmjobs.stages.report import ReportConfig, main
from tests.unit.report.conftest import LAVIN, Experiment

PLOTS = ("loss.png", "lr.png", "categories_chartqa.png", "categories_scienceqa.png",
         "sweep_scienceqa_scienceqa_Avg_by_train_lr_schedule.png",
         "sweep_chartqa_chartqa_average_0_05_by_label.png")
TABLES = ("runs", "chartqa_ap", "scienceqa")


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))


def assert_real_png(path: Path) -> None:
    assert path.stat().st_size > 8_000, f"{path.name} is suspiciously small"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, f"{path.name} is nearly blank"


def test_report_of_a_pipeline_run(experiment: Experiment) -> None:
    result = main(ReportConfig(experiment=experiment.name, parent_run_id=experiment.parent))
    out = Path(result.output)
    assert not result.cached and storage.is_committed(result.output)
    assert result.runs == 9 and result.skipped == 2
    assert sorted(Path(p).name for p in result.plots) == sorted(PLOTS)
    for name in PLOTS:
        assert_real_png(out / name)
    for name in TABLES:
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file()
    assert not (out / "results.csv").exists()  # one Main Results benchmark only: no table

    # LaVIN's table, a row per lr_schedule, named by the setting.
    rows = read_csv(out / "scienceqa.csv")
    assert rows[0] == ["Method", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12",
                       "Average"]
    assert {r[0]: [float(x) for x in r[1:]] for r in rows[1:]} == LAVIN
    # ChartMoE's @AP table, one per label: Human / Augmented / Averaged by tolerance.
    ap = read_csv(out / "chartqa_ap.csv")
    assert ap[0] == ["setting", "@AP", "0.05", "0.1", "0.2"]
    assert [r[:2] for r in ap[1:4]] == [["untrained", "Human"], ["untrained", "Augmented"],
                                        ["untrained", "Averaged"]]
    assert ap[4][1:] == ["Human", "0.7040", "0.7376", "0.7720"] and ap[6][0] == "trained"
    assert ap[6][1:3] == ["Averaged", "0.8048"]
    # The summary table: every run, its setting and its headline metric.
    runs = {r[1]: r for r in read_csv(out / "runs.csv")}
    header = read_csv(out / "runs.csv")[0]
    assert header[:6] == ["Run", "Run ID", "Stage", "Label", "Status", "train.lr_schedule"]
    assert {"chartqa.average_0.05", "scienceqa.Avg", "final_loss"} <= set(header)
    step = runs[experiment.scienceqa["step"]]
    assert step[5] == "step" and float(step[header.index("scienceqa.Avg")]) == 87.13
    assert runs[experiment.failed_eval][4] == "failed"

    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    for name in PLOTS:
        assert f"]({name})" in md
        # report.html carries the same plot inline: MLflow's viewer shows it (see html.py).
        encoded = base64.b64encode((out / name).read_bytes()).decode()
        assert f'data-file="{name}" src="data:image/png;base64,{encoded}"' in page
    assert "<td>cosine</td><td>88.45</td>" in page and "](" not in page
    assert "| cosine            | 88.45 |" in md
    assert "**trained**" in md and "| Human     | 0.7040 |" in md
    info = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert info["sweep_params"] == ["train.lr_schedule"]
    assert info["counts"]["by_stage"] == {"evaluate": 6, "train": 3}
    skipped = {s["run_id"]: s["reason"] for s in info["skipped"]}
    assert "without a `loss` metric" in skipped[experiment.no_loss]
    assert "no mme metrics (status failed)" in skipped[experiment.failed_eval]

    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["mmjobs.stage"] == "report" and run.info.run_name == "report"
    assert run.data.tags["mlflow.parentRunId"] == experiment.parent
    assert run.data.metrics["report.runs"] == 9
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {*PLOTS, "report.md", "report.html", "report.json", "runs.csv", "scienceqa.csv",
            "chartqa_ap.csv", "config.yaml"} <= artifacts


@pytest.mark.slow
def test_unchanged_runs_reuse_the_report_until_a_run_changes(experiment: Experiment) -> None:
    cfg = ReportConfig(experiment=experiment.name, parent_run_id=experiment.parent)
    first = main(cfg)
    again = main(cfg)
    assert again.cached and again.output == first.output and again.plots == first.plots
    client = MlflowClient(settings.tracking_uri())
    artifacts = {a.path for a in client.list_artifacts(again.mlflow_run_id)}
    assert {"report.md", "loss.png"} <= artifacts  # the reused report is logged again
    client.log_batch(experiment.scienceqa["step"],
                     metrics=[Metric("scienceqa.Avg", 90.0, 0, 1)])
    changed = main(cfg)
    assert not changed.cached
    rows = read_csv(Path(changed.output) / "scienceqa.csv")
    assert rows[3][0] == "step" and rows[3][-1] == "90.00"


@pytest.mark.slow
def test_whole_experiment_leaves_out_pipeline_and_report_runs(experiment: Experiment,
                                                              tmp_path: Path) -> None:
    main(ReportConfig(experiment=experiment.name, parent_run_id=experiment.parent))
    result = main(ReportConfig(experiment=experiment.name, output=str(tmp_path / "all"),
                               title="All of it", sweep_params=["train.lr_schedule"],
                               headline_metrics=["scienceqa.Avg", "scienceqa.IMG"]))
    info = json.loads((tmp_path / "all" / "report.json").read_text(encoding="utf-8"))
    assert result.runs == 9
    assert info["counts"]["pipeline_runs"] == 1 and info["counts"]["earlier_reports"] == 1
    assert info["parent_run_id"] is None and info["title"] == "All of it"
    assert info["headline_metrics"] == ["scienceqa.Avg", "scienceqa.IMG"]
    names = {Path(p).name for p in result.plots}
    assert {"sweep_scienceqa_scienceqa_Avg_by_train_lr_schedule.png",
            "sweep_scienceqa_scienceqa_IMG_by_train_lr_schedule.png"} <= names
    assert (tmp_path / "all" / "report.md").read_text(encoding="utf-8").startswith(
        "# All of it\n")
    # No report run is nested under a pipeline run here: it is a top-level run.
    client = MlflowClient(settings.tracking_uri())
    assert "mlflow.parentRunId" not in client.get_run(result.mlflow_run_id).data.tags


def test_unknown_experiment_and_parent_fail_clearly(experiment: Experiment) -> None:
    from mmjobs.report import ReportError

    with pytest.raises(ReportError, match=r"experiment 'nope' not found at sqlite:.*"
                                          r"experiments there: .*lavin-report"):
        main(ReportConfig(experiment="nope"))
    assert MlflowClient(settings.tracking_uri()).get_experiment_by_name("nope") is None
    with pytest.raises(ReportError, match="run 'f00' does not exist in experiment"):
        main(ReportConfig(experiment=experiment.name, parent_run_id="f00"))
