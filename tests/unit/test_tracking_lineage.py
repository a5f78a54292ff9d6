"""What a pipeline run shows in MLflow beyond metrics, on the embedded sqlite database: step-named
stage runs, dataset inputs with fingerprints, logged models pointing at store URIs, and the
parent run's roll-up (headline metrics, the final model, registered versions)."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from mmjobs import settings, storage
from mmjobs.report.rollup import rollup
from mmjobs.stage_contract import StageConfig, input_fingerprint, stage_tracking
from mmjobs.tracking import Tracker, flush_spool
from tests.servers import LOOPBACK, free_port


def _committed(tmp_path: Path, name: str, meta: dict | None = None) -> str:
    src = tmp_path / "src" / name
    src.mkdir(parents=True)
    (src / "rows.jsonl").write_text('{"id": 1}\n')
    uri = str(tmp_path / "store" / name)
    storage.put_dir(src, uri, meta=meta or {})
    return uri


class _TrainLike(StageConfig):
    data: str
    eval_data: str | None = None


def test_stage_run_is_named_by_step_and_logs_its_datasets(tmp_path):
    shards = _committed(tmp_path, "pretokenize", {"rows": 12, "stage": "pretokenize"})
    held_out = _committed(tmp_path, "prepare-test", {"rows_accepted": 3})
    cfg = _TrainLike(experiment="lineage", step="sft", data=shards, eval_data=held_out)
    with stage_tracking(cfg, "train") as run:
        pass
    client = MlflowClient(settings.tracking_uri())
    got = client.get_run(run.run_id)
    # MLflow 3's UI opens the experiment on its model-training pages, not the GenAI ones.
    experiment = client.get_experiment(got.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert got.info.run_name == "sft"
    assert got.data.tags["mmjobs.stage"] == "train" and got.data.tags["mmjobs.step"] == "sft"
    inputs = {d.dataset.name: d for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"pretokenize", "prepare-test"}
    train_set = inputs["pretokenize"]
    assert train_set.dataset.digest == input_fingerprint(shards)
    assert json.loads(train_set.dataset.source) == {"uri": shards}
    assert json.loads(train_set.dataset.profile) == {"rows": 12}
    assert {t.key: t.value for t in train_set.tags} == {"mlflow.data.context": "training"}
    assert {t.value for t in inputs["prepare-test"].tags} == {"evaluation"}
    # Run on its own (no pipeline step), the run is named by the stage.
    with stage_tracking(_TrainLike(experiment="lineage", data=shards), "train") as alone:
        pass
    assert MlflowClient(settings.tracking_uri()).get_run(alone.run_id).info.run_name == "train"


def test_logged_model_points_at_the_store_and_is_relinked_not_duplicated():
    tracker = Tracker("lineage")
    with tracker.start_run("sft") as first:
        first.log_model(name="sft", uri="/store/run/sft/final", fingerprint="fp1",
                        model_type="adapter", params={"lr": 0.002, "lora": {"r": 64}})
    with tracker.start_run("sft") as again:  # a re-run reusing the committed output
        again.log_model(name="sft", uri="/store/run/sft/final", fingerprint="fp1",
                        model_type="adapter")
    with tracker.start_run("merge.v2") as other:
        other.log_model(name="merge.v2", uri="/store/run/merge", fingerprint="fp2",
                        model_type="merged")
    client = MlflowClient(settings.tracking_uri())
    exp = client.get_experiment_by_name("lineage").experiment_id
    models = {m.tags["mmjobs.uri"]: m for m in client.search_logged_models([exp])}
    assert set(models) == {"/store/run/sft/final", "/store/run/merge"}
    sft = models["/store/run/sft/final"]
    assert (sft.name, sft.model_type, sft.source_run_id) == ("sft", "adapter", first.run_id)
    assert sft.params == {"lr": "0.002", "lora.r": "64"} and sft.status.to_proto() == 2  # READY
    assert models["/store/run/merge"].name == "merge-v2"  # MLflow refuses dots in model names
    for run in (first, again):
        outputs = client.get_run(run.run_id).outputs.model_outputs
        assert [o.model_id for o in outputs] == [sft.model_id]


def test_datasets_and_models_logged_during_an_outage_are_delivered_later(tmp_path):
    spool = tmp_path / "spool"
    down = Tracker("lineage", f"http://{LOOPBACK}:{free_port()}", spool_dir=spool,
                   end_timeout=0.2)
    run = down.start_run("align")
    run.log_dataset(name="pretokenize", uri="/store/p", digest="d" * 20, context="training")
    run.log_model(name="align", uri="/store/align/final", fingerprint="fp", model_type="connector")
    assert "1 dataset, 1 model, run start, run end still pending" in run.end()
    down.close(timeout=0)
    assert "flushed" in flush_spool(spool, settings.tracking_uri())
    client = MlflowClient(settings.tracking_uri())
    (created,) = client.search_runs([client.get_experiment_by_name("lineage").experiment_id])
    assert [d.dataset.name for d in created.inputs.dataset_inputs] == ["pretokenize"]
    (model,) = client.search_logged_models([created.info.experiment_id])
    assert model.source_run_id == created.info.run_id and model.model_type == "connector"


def _pipeline_run(tracker: Tracker, accuracy: float) -> tuple[str, dict[str, str]]:
    """A parent run with the demo's lineage: sft -> merge -> infer-trained -> evaluate, and an
    untrained evaluation of a base model no step made."""
    parent = tracker.start_run("chart-demo run-1", tags={"pipeline_run_id": "run-1"})
    ids = {}
    with tracker.start_run("merge", parent=parent, tags={"mmjobs.stage": "merge"}) as merge:
        merge.log_model(name="merge", uri="/s/run-1/merge", fingerprint="m1", model_type="merged")
    for label, model, value in (("untrained", "/s/run-1/make-model", 0.0),
                                ("trained", "/s/run-1/merge", accuracy)):
        with tracker.start_run(f"infer-{label}", parent=parent,
                               tags={"mmjobs.stage": "infer"}) as infer:
            infer.log_params({"output": f"/s/run-1/infer-{label}", "model": model,
                              "adapter": None})
        with tracker.start_run(f"evaluate-{label}", parent=parent,
                               tags={"mmjobs.stage": "evaluate",
                                     "headline_metric": "chartqa.average_0.05"}) as ev:
            ev.log_params({"predictions": f"/s/run-1/infer-{label}", "label": label})
            ev.log_metrics({"chartqa.average_0.05": value, "chartqa.human_0.05": value})
        ids[label] = ev.run_id
    parent.end()
    return parent.run_id, ids


def test_rollup_puts_headlines_on_the_parent_and_registers_the_evaluated_model():
    tracker = Tracker("lineage")
    parent_id, _ = _pipeline_run(tracker, 0.75)
    client = MlflowClient(settings.tracking_uri())
    summary = rollup(client, parent_id, registered_model="chart-demo")
    parent = client.get_run(parent_id)
    assert parent.data.metrics == {"untrained.chartqa.average_0.05": 0.0,
                                   "trained.chartqa.average_0.05": 0.75,
                                   "chartqa.average_0.05": 0.75, "chartqa.human_0.05": 0.75}
    model = summary.final_model
    assert model.tags["mmjobs.uri"] == "/s/run-1/merge"
    assert parent.data.tags["mmjobs.final_model.uri"] == "/s/run-1/merge"
    assert parent.data.tags["mmjobs.final_model.version"] == "chart-demo/1"
    assert [o.model_id for o in parent.outputs.model_outputs] == [model.model_id]
    (version,) = client.search_model_versions("name = 'chart-demo'")
    assert version.source == "/s/run-1/merge" and version.run_id == model.source_run_id
    assert version.tags["chartqa.average_0.05"] == "0.75"
    assert version.tags["evaluation"] == "trained"
    linked = client.get_logged_model(model.model_id)
    assert json.loads(linked.tags["mlflow.modelVersions"]) == [{"name": "chart-demo",
                                                                 "version": "1"}]
    assert {m.key: m.value for m in linked.metrics}["trained.chartqa.average_0.05"] == 0.75
    # Rolling up again (a re-run reusing the same model) adds no version.
    rollup(client, parent_id, registered_model="chart-demo")
    assert len(client.search_model_versions("name = 'chart-demo'")) == 1


def test_rollup_without_trained_models_logs_headlines_only():
    tracker = Tracker("lineage")
    parent = tracker.start_run("pipeline")
    with tracker.start_run("evaluate", parent=parent,
                           tags={"mmjobs.stage": "evaluate", "headline_metric": "mme.total"}) as e:
        e.log_metrics({"mme.total": 1500.0})
    parent.end()
    client = MlflowClient(settings.tracking_uri())
    summary = rollup(client, parent.run_id, registered_model="x")
    assert summary.final_model is None
    assert client.get_run(parent.run_id).data.metrics == {"evaluate.mme.total": 1500.0}
    assert client.search_registered_models() == []
