"""The parent run's reference, name and tags, and the local roll-up through the function the
cluster's report step shares (`mmjobs.pipeline_parent`, `mmjobs.report.rollup.roll_up_run`);
the cluster's find-or-create race runs against a real server in
tests/integration/test_cluster_parent.py."""

from __future__ import annotations

import types

import pytest
from mlflow.tracking import MlflowClient

from mmjobs import settings
from mmjobs.config import ConfigError
from mmjobs.pipeline_parent import cluster_ref, parse_ref, shared_parent
from mmjobs.run_results import roll_up_parent_run
from mmjobs.stage_contract import KFP_RUN_ID_TOKEN, StageConfig, stage_tracking
from mmjobs.tracking import Tracker
from tests.unit.test_tracking_lineage import _pipeline_run


def test_a_cluster_reference_names_the_job_and_the_pipeline():
    assert parse_ref("0f3c9a") is None and parse_ref(None) is None  # a run id, or none
    assert parse_ref(cluster_ref("chartmoe", "7d1c-2f4e")) == ("7d1c-2f4e", "chartmoe")
    spec = shared_parent(cluster_ref("chartmoe", "7d1c-2f4e"), "chartmoe-7b")
    assert spec["name"] == "chartmoe-7b 7d1c-2f4e"
    assert {k: spec["tags"][k] for k in ("recipe", "mmjobs.stage", "pipeline_run_id",
                                         "pipeline", "mmjobs.kfp_run_id")} == {
        "recipe": "chartmoe-7b", "mmjobs.stage": "pipeline", "pipeline_run_id": "7d1c-2f4e",
        "pipeline": "chartmoe", "mmjobs.kfp_run_id": "7d1c-2f4e"}


def test_a_step_run_outside_kfp_with_the_unfilled_token_is_a_config_error():
    """A compiled step's config run by hand without kfp_run_id: one message, no parent keyed
    by the literal token."""
    cfg = StageConfig(experiment="x", parent_run_id=cluster_ref("chart-demo"))
    assert KFP_RUN_ID_TOKEN in cfg.parent_run_id
    with (pytest.raises(ConfigError, match=r"parent_run_id: .* needs kfp_run_id"),
          stage_tracking(cfg, "prepare")):
        pass
    assert MlflowClient(settings.tracking_uri()).get_experiment_by_name("x") is None


def test_local_roll_up_goes_through_the_shared_function():
    tracker = Tracker("lineage")
    parent_id, _ = _pipeline_run(tracker, 0.5)
    parent = types.SimpleNamespace(run_id=parent_id)
    model = roll_up_parent_run(types.SimpleNamespace(recipe="chart-demo"), parent, tracker)
    assert model == "chart-demo/1 (/s/run-1/merge)"
    metrics = MlflowClient(settings.tracking_uri()).get_run(parent_id).data.metrics
    assert metrics["trained.chartqa.average_0.05"] == 0.5
