"""A cluster run's steps share one MLflow parent run, which its report step rolls up and ends,
against a real MLflow server on loopback (`mmjobs.pipeline_parent`).

On a cluster no runner makes the parent before the steps start: each step's compiled config
names it by the KFP job id, and the first step to open its run creates it.
"""

from __future__ import annotations

import json
import multiprocessing
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from mmjobs import pipeline_runner
from mmjobs.pipeline_parent import (
    KFP_JOB_TAG,
    cluster_ref,
    consolidate,
    shared_parent,
)
from mmjobs.stage_contract import KFP_RUN_ID_TOKEN, StageConfig, stage_tracking
from mmjobs.stages import registry
from mmjobs.tracking import PARENT_TAG, Tracker, flush_spool
from tests.servers import LOOPBACK, MLflowServer, free_port

pytestmark = pytest.mark.integration
CHART_DEMO = "pipelines/recipes/chart-demo.yaml"
PARALLEL_STEPS = 6


@pytest.fixture
def server(mlflow_server: MLflowServer, monkeypatch: pytest.MonkeyPatch) -> MLflowServer:
    """The session's MLflow server, as the steps' MLFLOW_TRACKING_URI (a pod's setting)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server


def _parents(client: MlflowClient, experiment: str, job: str, *, deleted: bool = False) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{KFP_JOB_TAG}` = '{job}'",
                              run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY)


def _children(client: MlflowClient, experiment: str, parent_id: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'")


def _first_step(barrier: Any, results: Any, experiment: str, job: str, step: str) -> None:
    """One pod's step: wait for the others, then open its stage run (creating the parent)."""
    cfg = StageConfig(experiment=experiment, pipeline_run_id=job, recipe="chart-demo",
                      parent_run_id=cluster_ref("chart-demo", job), step=step)
    barrier.wait(timeout=60)
    with stage_tracking(cfg, "prepare") as run:
        results.put(run.run_id)


def test_parallel_first_steps_create_one_parent_and_all_nest_under_it(server):
    experiment, job = f"cluster-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    client = MlflowClient(server.uri)
    client.create_experiment(experiment)  # made elsewhere: the parallel steps all tag it too
    ctx = multiprocessing.get_context("fork")  # pods: separate processes, separate clients
    barrier, results = ctx.Barrier(PARALLEL_STEPS), ctx.Queue()
    steps = [ctx.Process(target=_first_step, args=(barrier, results, experiment, job,
                                                   f"prepare-{i}"))
             for i in range(PARALLEL_STEPS)]
    for step in steps:
        step.start()
    ids = [results.get(timeout=120) for _ in steps]
    for step in steps:
        step.join(timeout=60)
    assert [step.exitcode for step in steps] == [0] * PARALLEL_STEPS
    assert all(ids)
    # Loaded machines can let two candidates survive the race (each step listed before the
    # other's create landed); the report step's `consolidate` mends that before the roll-up.
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    kept = consolidate(client, exp_id, job)
    (parent,) = _parents(client, experiment, job)
    assert parent.info.run_id == kept
    children = _children(client, experiment, parent.info.run_id)
    assert sorted(r.info.run_id for r in children) == sorted(ids)
    # Named and tagged as `mmjobs run` names its parent, plus the job id it is found by.
    assert parent.info.run_name == f"chart-demo {job}"
    tags = parent.data.tags
    assert (tags["recipe"], tags["mmjobs.stage"], tags["pipeline_run_id"], tags["pipeline"]) == (
        "chart-demo", "pipeline", job, "chart-demo")
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # Steps that lost the race deleted their own candidate; none is left active.
    losers = [r for r in _parents(client, experiment, job, deleted=True)
              if r.info.run_id != parent.info.run_id]
    assert all(r.info.lifecycle_stage == "deleted" for r in losers)


def test_consolidate_moves_the_children_of_a_second_parent_under_the_earliest(server):
    """What clock skew between pods can leave (each step kept its own parent) is mended by
    the report step before it rolls up."""
    experiment, job = f"cluster-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    client = MlflowClient(server.uri)
    exp_id = client.create_experiment(experiment)
    tags = shared_parent(cluster_ref("chart-demo", job), "chart-demo")["tags"]
    early = client.create_run(exp_id, start_time=1000, tags=tags).info.run_id
    late = client.create_run(exp_id, start_time=2000, tags=tags).info.run_id
    stray = client.create_run(exp_id, tags={PARENT_TAG: late}).info.run_id
    assert consolidate(client, exp_id, job) == early
    assert [r.info.run_id for r in _children(client, experiment, early)] == [stray]
    assert client.get_run(late).info.lifecycle_stage == "deleted"
    assert consolidate(client, exp_id, job) == early  # nothing left to mend


def test_a_failed_step_ends_the_parent_failed_a_finished_one_leaves_it_running(server):
    """A cluster run that fails before its report step must not stay RUNNING in MLflow."""
    experiment, job = f"cluster-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    client = MlflowClient(server.uri)

    def step(name: str) -> StageConfig:
        return StageConfig(experiment=experiment, pipeline_run_id=job, recipe="chart-demo",
                           parent_run_id=cluster_ref("chart-demo", job), step=name)

    with stage_tracking(step("prepare"), "prepare") as prepare:
        pass
    [parent] = _parents(client, experiment, job)
    assert client.get_run(prepare.run_id).info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"

    with pytest.raises(RuntimeError, match="out of data"), \
            stage_tracking(step("sft"), "train") as sft:
        raise RuntimeError("out of data")
    assert client.get_run(sft.run_id).info.status == "FAILED"
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    assert _parents(client, experiment, job)[0].info.run_id == parent.info.run_id


def test_a_step_spooled_while_mlflow_was_down_nests_under_the_shared_parent(server, tmp_path):
    experiment, job = f"cluster-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    shared = shared_parent(cluster_ref("chart-demo", job), "chart-demo")
    spool = tmp_path / "spool"
    down = Tracker(experiment, f"http://{LOOPBACK}:{free_port()}", spool_dir=spool,
                   end_timeout=0)
    with down.start_run("sft", shared_parent=shared) as run:
        run.log_metrics({"loss": 0.5})
    down.close(timeout=0)
    # Meanwhile another pod reached MLflow and made the parent.
    up = Tracker(experiment, server.uri)
    with up.start_run("prepare", shared_parent=shared) as first:
        pass
    up.close()
    assert "flushed" in flush_spool(spool, server.uri)
    client = MlflowClient(server.uri)
    (parent,) = _parents(client, experiment, job)
    names = sorted(r.info.run_name for r in _children(client, experiment, parent.info.run_id))
    assert names == ["prepare", "sft"]
    assert client.get_run(first.run_id).data.tags[PARENT_TAG] == parent.info.run_id


def _compiled_configs(tmp_path: Path, name: str) -> dict[str, str]:
    """Each step's config_json as `mmjobs compile` writes it for chart-demo (recipe name and
    experiment `name`: the server's model registry is shared by the session's tests)."""
    out = tmp_path / "chart-demo.yaml"
    pipeline_runner.compile_recipe(CHART_DEMO, out, [
        f"recipe={name}", "pipeline=chart-demo", f"experiment={name}",
        f"cluster.env.MMJOBS_STORE={tmp_path / 'store'}"])
    spec = next(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    configs = {}
    for task in spec["root"]["dag"]["tasks"].values():
        params = task["inputs"]["parameters"]
        if "config_json" in params:
            assert params["kfp_run_id"] == {
                "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
            configs[task["taskInfo"]["name"]] = params["config_json"]["runtimeValue"]["constant"]
    return configs


def _step(compiled: str, job: str) -> StageConfig:
    """The run fields of a compiled step config, the job id filled in (`run_component`)."""
    config = json.loads(compiled.replace(KFP_RUN_ID_TOKEN, job))
    return StageConfig(**{k: config[k] for k in StageConfig.model_fields if k in config})


def test_a_compiled_cluster_run_nests_rolls_up_and_registers_in_its_report_step(
        server, tmp_path):
    """The compiled chart-demo pipeline's step configs on one KFP job: the steps that carry
    the lineage (merge -> infer -> evaluate; their bodies reduced to what they log) open their
    runs through the stage contract, then the real report step runs through the component
    entry point with its compiled config, logs the recipe on the parent, rolls it up,
    registers the model, ends it."""
    experiment, job = f"cluster-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    configs = _compiled_configs(tmp_path, experiment)
    assert json.loads(configs["sft"])["parent_run_id"] == f"kfp:{KFP_RUN_ID_TOKEN}:chart-demo"
    merge = _step(configs["merge"], job)
    with stage_tracking(merge, "merge") as run:
        run.log_model(name="merge", uri=merge.output, fingerprint="m1", model_type="merged")
    for label, model, score in (("untrained", "/base/model", 0.1),
                                ("trained", merge.output, 0.6)):
        infer = _step(configs[f"infer-{label}"], job)
        with stage_tracking(infer, "infer") as run:
            run.log_params({"model": model, "adapter": None})
        evaluate = _step(configs[f"evaluate-{label}"], job)
        with stage_tracking(evaluate, "evaluate", tags={"headline_metric": "chartqa.overall"}
                            ) as run:
            run.log_params({"predictions": infer.output, "label": label})
            run.log_metrics({"chartqa.overall": score})
    page = types.SimpleNamespace(path=str(tmp_path / "report.html"))
    md = types.SimpleNamespace(path=str(tmp_path / "report.md"))
    out = registry.run_component("report", configs["report"], kfp_run_id=job, report=md,
                                 page=page)
    assert out == str(tmp_path / "store" / experiment / job / "report")
    client = MlflowClient(server.uri)
    (parent,) = _parents(client, experiment, job)
    names = sorted(r.info.run_name for r in _children(client, experiment, parent.info.run_id))
    assert names == ["evaluate-trained", "evaluate-untrained", "infer-trained",
                     "infer-untrained", "merge", "report"]
    assert parent.info.status == "FINISHED"
    # The compiled recipe, as `mmjobs run` logs it on a local parent.
    recipe = pipeline_runner.load(CHART_DEMO, [f"recipe={experiment}", "pipeline=chart-demo",
                                               f"experiment={experiment}",
                                               f"cluster.env.MMJOBS_STORE={tmp_path / 'store'}"])
    assert parent.data.params["recipe"] == experiment
    assert parent.data.params["train.lr"] == str(recipe.train.lr)
    assert parent.data.params["model.name_or_path"] == recipe.model.name_or_path
    logged = yaml.safe_load(Path(client.download_artifacts(
        parent.info.run_id, "recipe.yaml", str(tmp_path))).read_text(encoding="utf-8"))
    assert logged["train"]["lr"] == recipe.train.lr and logged["recipe"] == experiment
    assert parent.data.metrics == {"trained.chartqa.overall": 0.6,
                                   "untrained.chartqa.overall": 0.1, "chartqa.overall": 0.6}
    assert parent.data.tags["mmjobs.final_model.uri"] == merge.output
    assert parent.data.tags["mmjobs.final_model.version"] == f"{experiment}/1"
    (version,) = client.search_model_versions(f"name = '{experiment}'")
    assert version.tags["evaluation"] == "trained"
    assert "# " in Path(md.path).read_text(encoding="utf-8")  # the KFP UI's report
