"""The import, serve and deploy stages as KFP components, and chart-demo's optional deploy step.

- every stage kind has a component and a STAGES entry with the right image, and steps of
  import, serve and deploy compile in a pipeline;
- the import component imports a local folder into the store as KFP would call it;
- chart-demo gets a deploy step only with `stages.deploy.enabled: true` and only on a
  cluster: after the evaluations and the report, fed the merged model, never cached, with the
  recipe's eval image, GPUs, Secret names and env in its config (no credential values); the
  local runner skips it with one message; a disabled section is still checked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from mmjobs import pipeline_runner, storage
from mmjobs.config import ConfigError
from mmjobs.recipe import load_recipe
from mmjobs.stages import registry
from pipelines.builder import Build
from pipelines.components import component, component_function

RECIPE = "pipelines/recipes/chart-demo.yaml"
FAKE_SECRET = "fake/secret+value/must-never-appear"


def compiled(tmp_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe(RECIPE, out, overrides)
    spec, platform = list(yaml.safe_load_all(out.read_text()))[:2]
    return spec, platform


def test_every_stage_kind_has_a_component_and_an_image():
    for stage in registry.names():
        assert callable(component(stage, "img:1")), stage
    stages = {name: registry.get(name) for name in ("import", "serve", "deploy")}
    assert {k: s.image for k, s in stages.items()} == {
        "import": "data", "serve": "eval", "deploy": "data"}
    for stage in stages.values():
        assert stage.own_output is False
        assert stage.config.__name__ in {"ImportConfig", "ServeConfig", "DeployConfig"}


def test_import_serve_and_deploy_steps_compile(tmp_path: Path):
    recipe = load_recipe(RECIPE, ["stages.import-base.source=hf://llava-hf/llava-1.5-7b-hf",
                                  "stages.import-base.to=s3://mmjobs/models/llava-1.5-7b",
                                  "stages.import-base.revision=main",
                                  "stages.serve.max_batch_size=4"])

    @dsl.pipeline(name="import-serve-deploy")
    def pipeline():
        b = Build(recipe, run_id="r1", store_root="s3://mmjobs/store", for_cluster=True)
        imported = b.step("import-base", "import")
        b.step("serve", "serve", model=imported.output)
        b.step("deploy", "deploy", config=b.config("deploy", "deploy", defaults={
            "image": recipe.images.image("eval")}), model=imported.output)
        assert b.errors == []

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images == {"exec-import": "ghcr.io/mmjobs/mmjobs-data:0.1.0",
                      "exec-serve": "ghcr.io/mmjobs/mmjobs-eval:0.1.0",
                      "exec-deploy": "ghcr.io/mmjobs/mmjobs-data:0.1.0"}
    tasks = spec["root"]["dag"]["tasks"]
    config = json.loads(tasks["import"]["inputs"]["parameters"]["config_json"][
        "runtimeValue"]["constant"])
    assert config["to"] == "s3://mmjobs/models/llava-1.5-7b" and "output" not in config
    for name in ("serve", "deploy"):
        model = tasks[name]["inputs"]["parameters"]["model"]["taskOutputParameter"]
        assert model["producerTask"] == "import"


def test_import_component_copies_a_folder_into_the_store(tmp_path: Path):
    import_source = component_function("import")
    source = tmp_path / "raw"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    target = tmp_path / "store" / "datasets" / "raw"
    uri = import_source(json.dumps({"source": str(source), "to": str(target),
                                    "experiment": "exp", "pipeline_run_id": "r1"}))
    assert uri == str(target) and storage.is_committed(uri)
    assert [f.path for f in storage.read_manifest(uri).files] == ["a.txt"]


# --------------------------------------------------------------------------- chart-demo deploy


def test_deploy_step_only_when_enabled(tmp_path: Path):
    spec, _ = compiled(tmp_path, [])
    assert "deploy" not in spec["root"]["dag"]["tasks"]
    spec, _ = compiled(tmp_path, ["stages.deploy.enabled=false", "stages.deploy.replicas=2"])
    assert "deploy" not in spec["root"]["dag"]["tasks"]


def test_enabled_deploy_step_runs_last_on_the_merged_model(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    spec, platform = compiled(tmp_path, ["stages.deploy.enabled=true",
                                         "stages.deploy.secrets.bearer=review-key",
                                         "stages.deploy.serve.max_batch_size=16"])
    assert FAKE_SECRET not in json.dumps(spec)
    tasks = spec["root"]["dag"]["tasks"]
    step = tasks["deploy"]
    assert set(step["dependentTasks"]) == {"merge", "evaluate", "evaluate-2", "report"}
    assert step["inputs"]["parameters"]["model"]["taskOutputParameter"] == {
        "producerTask": "merge", "outputParameterKey": "Output"}
    assert step["cachingOptions"].get("enableCache", False) is False
    assert spec["deploymentSpec"]["executors"]["exec-deploy"]["container"]["image"] == \
        "ghcr.io/mmjobs/mmjobs-data:0.1.0"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-deploy"][
        "container"].get("resources", {})  # the launcher needs no GPU; the server does
    config = json.loads(step["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])
    assert config["image"] == "ghcr.io/mmjobs/mmjobs-eval:0.1.0"
    assert (config["gpus"], config["cpu"], config["memory"]) == (1, "4", "16Gi")
    assert config["secrets"] == {"s3": "mmjobs-s3", "mlflow": "mmjobs-mlflow",
                                 "bearer": "review-key"}
    assert config["env"]["MMJOBS_STORE"] == "s3://mmjobs/store"
    assert config["serve"] == {"max_batch_size": 16}
    assert (config["experiment"], config["enabled"]) == ("chart-demo", True)
    # The step pod reads the S3/MLflow Secrets like every step (by name).
    executor = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-deploy"]
    assert {s["secretName"] for s in executor["secretAsEnv"]} == {"mmjobs-s3", "mmjobs-mlflow"}


def test_deploy_section_is_checked_even_when_disabled():
    with pytest.raises(ConfigError) as caught:
        pipeline_runner.load(RECIPE, ["stages.deploy.replicas=0", "stages.deploy.model=s3://x",
                                      "stages.deploy.serve.port=9000",
                                      "stages.deploy.enabled=maybe"])
    errors = caught.value.errors
    assert "stages.deploy.model: set by the pipeline (wired from an upstream step); remove it" \
        in errors
    assert any(e.startswith("stages.deploy.replicas: got 0") for e in errors)
    assert any(e.startswith("stages.deploy.enabled: got 'maybe'") for e in errors)
    assert any("port: set by the deployment" in e for e in errors)


def test_local_runner_skips_the_deploy_step_with_one_message(tmp_path: Path):
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("mmjobs.pipelines.chart_demo")
    handler = Collect()
    logger.addHandler(handler)
    try:
        recipe = load_recipe(RECIPE, ["stages.deploy.enabled=true"])
        pipeline_runner.load(RECIPE, ["stages.deploy.enabled=true"])  # checks: silent
        for _ in range(2):  # the runner wires the pipeline more than once
            _, build = pipeline_runner.build_pipeline(recipe, run_id="run-local",
                                                      store_root=str(tmp_path / "store"),
                                                      parent_run_id="parent-1")
    finally:
        logger.removeHandler(handler)
    assert "deploy" not in {s.name for s in build.steps}
    merged = storage.join(str(tmp_path / "store"), "chart-demo", "run-local", "merge")
    assert messages == [f"deploy step skipped: it starts a server on a cluster (mmjobs compile "
                        f"/ submit); here, serve the trained model with `mmjobs serve {merged}`"]
