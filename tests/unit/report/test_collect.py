"""Reading runs from MLflow: pages, scope, run kinds, metric histories."""

from __future__ import annotations

import logging

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mmjobs import settings
from mmjobs.report import collect
from tests.unit.report.conftest import STEPS, Builder, Experiment


def test_collect_follows_pages_and_splits_pipeline_runs(experiment: Experiment) -> None:
    got = collect(experiment.name, page_size=2)
    assert len(got.runs) == 9 and list(got.parents) == [experiment.parent]
    assert [r.start_time for r in got.runs] == sorted(r.start_time for r in got.runs)
    scoped = collect(experiment.name, experiment.parent, page_size=4)
    assert {r.run_id for r in scoped.runs} == {r.run_id for r in got.runs}
    train = next(r for r in scoped.runs if r.run_id == experiment.train["cosine"])
    assert len(train.history["loss"]) == STEPS and [s for s, _ in train.history["eval_loss"]] \
        == [10, 20, 30, 40]
    assert "grad_norm" not in train.history  # only what the plots need is fetched


def test_max_runs_keeps_the_newest(experiment: Experiment, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mmjobs"):
        got = collect(experiment.name, max_runs=3, page_size=2)
    assert len(got.runs) + len(got.parents) <= 3
    assert experiment.failed_eval in {r.run_id for r in got.runs}  # the newest run
    assert "more than 3 runs" in caplog.text


def test_history_keeps_the_last_value_of_a_repeated_step() -> None:
    client = MlflowClient(settings.tracking_uri())
    builder = Builder(client, client.create_experiment("resumed"))
    run_id = builder.run("train", tags={"stage": "train"})
    # Steps 1-3, then a resume from step 2 logs 2 and 3 again, later.
    client.log_batch(run_id, metrics=[Metric("loss", v, ts, s) for s, v, ts in
                                      ((1, 3.0, 10), (2, 2.0, 20), (3, 1.5, 30),
                                       (2, 2.2, 40), (3, 1.4, 50))])
    run = collect("resumed").runs[0]
    assert run.history["loss"] == [(1, 3.0), (2, 2.2), (3, 1.4)]


def test_earlier_reports_and_deleted_runs_are_left_out(experiment: Experiment) -> None:
    client = MlflowClient(settings.tracking_uri())
    builder = Builder(client, experiment.experiment_id)
    builder.run("report", parent=experiment.parent, tags={"stage": "report"})
    client.delete_run(experiment.chartqa["untrained"])
    got = collect(experiment.name)
    assert got.reports == 1 and len(got.runs) == 8
