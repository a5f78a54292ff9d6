"""`mmjobs report` and `mmjobs stage report`: output, exit codes, messages."""

from __future__ import annotations

import json
from pathlib import Path

from mmjobs import settings, storage
from mmjobs.cli import main
from tests.unit.report.conftest import Experiment


def test_report_command_writes_the_report_to_the_store(experiment: Experiment, capsys) -> None:
    assert main(["report", "--experiment", experiment.name]) == 0
    out = capsys.readouterr().out
    where = storage.join(settings.store_root(), experiment.name, "local", "report")
    assert f"report: {where}/report.md (9 runs, 6 plots, 3 tables, 2 left out" in out
    assert storage.is_committed(where)
    assert main(["report", "--experiment", experiment.name]) == 0
    assert "unchanged since the last report: reused" in capsys.readouterr().out


def test_report_command_options(experiment: Experiment, tmp_path: Path, capsys) -> None:
    target = tmp_path / "r"
    assert main(["report", "--experiment", experiment.name, "--run-id", experiment.parent,
                 "--output", str(target), "--title", "2024", "--sweep-param",
                 "train.lr_schedule", "--headline-metric", "scienceqa.IMG",
                 "--set", "max_series=1"]) == 0
    info = json.loads((target / "report.json").read_text(encoding="utf-8"))
    assert info["title"] == "2024" and info["parent_run_id"] == experiment.parent
    assert info["headline_metrics"] == ["scienceqa.IMG"]
    assert {"loss.png", "loss_2.png", "categories_scienceqa_3.png"} <= set(info["plots"])


def test_missing_experiment_or_run_exits_1(experiment: Experiment, capsys) -> None:
    assert main(["report", "--experiment", "no-such-experiment"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmjobs report: experiment 'no-such-experiment' not found")
    assert main(["report", "--experiment", experiment.name, "--run-id", "0" * 32]) == 1
    assert "does not exist in experiment 'lavin-report'" in capsys.readouterr().err
    assert main(["stage", "report", "--set", "experiment=nope"]) == 1
    assert "experiment 'nope' not found" in capsys.readouterr().err


def test_bad_option_is_a_config_error(capsys) -> None:
    assert main(["report", "--experiment", "x", "--set", "max_series=0"]) == 2
    assert "max_series" in capsys.readouterr().err
