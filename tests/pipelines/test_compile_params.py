"""The compiled pipelines as the KFP UI shows them: pipeline parameters (the stages' knobs,
with the recipe's values as defaults) wired into the steps, CPU steps with CPU resources
(every recipe's CPU steps are checked for GPU placement in test_compile.py), and output
folders named by each run's KFP job id unless a run id is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmjobs import pipeline_runner
from mmjobs.stage_contract import KFP_RUN_ID_TOKEN
from pipelines.cluster import resources_for

CHART_DEMO = "pipelines/recipes/chart-demo.yaml"


def compiled(tmp_path: Path, path: str | Path, overrides: list[str] | None = None,
             run_id: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline spec and the Kubernetes platform spec's executors."""
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe(path, out, overrides or [], run_id=run_id)
    docs = list(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def by_step(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}


def test_chart_demo_knobs_are_pipeline_parameters_fed_to_their_steps(tmp_path: Path) -> None:
    spec, _ = compiled(tmp_path, CHART_DEMO, ["stages.sft.train.lr=1.0e-4"])
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {name: p.get("defaultValue") for name, p in params.items()}
    # The recipe's values (the --set one included); the schema's where the recipe has none;
    # 0 / "" for "none" (no row limit, a generator's input).
    assert defaults == {
        "align_lr": 1e-3, "align_epochs": 1.0, "align_max_steps": 150,
        "sft_lr": 1e-4, "sft_epochs": 1.0, "sft_max_steps": 1000,
        "prepare_input": "", "prepare_test_input": "", "infer_limit": 0}
    assert {name: p["parameterType"] for name, p in params.items()
            if name.startswith("sft_")} == {"sft_lr": "NUMBER_DOUBLE",
                                            "sft_epochs": "NUMBER_DOUBLE",
                                            "sft_max_steps": "NUMBER_INTEGER"}
    assert "Peak learning rate" in params["sft_lr"]["description"]
    tasks = by_step(spec)
    sft = tasks["sft"]["inputs"]["parameters"]
    assert sft["set__train__lr"] == {"componentInputParameter": "sft_lr"}
    assert sft["set__train__max_steps"] == {"componentInputParameter": "sft_max_steps"}
    assert tasks["align"]["inputs"]["parameters"]["set__train__lr"] == {
        "componentInputParameter": "align_lr"}
    for step in ("infer-untrained", "infer-trained"):  # one section, one parameter
        assert tasks[step]["inputs"]["parameters"]["set__limit"] == {
            "componentInputParameter": "infer_limit"}
    # The compiled config still holds the recipe's value (what a run without a form gets).
    config = json.loads(sft["config_json"]["runtimeValue"]["constant"])
    assert config["train"]["lr"] == 1e-4


def test_a_real_base_model_is_a_parameter_and_sweeps_share_what_they_agree_on(
        tmp_path: Path) -> None:
    spec, _ = compiled(tmp_path, "pipelines/recipes/chartwiz.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["base_model"]["defaultValue"] == pipeline_runner.load_recipe(
        "pipelines/recipes/chartwiz.yaml").model.name_or_path
    tasks = by_step(spec)
    assert tasks["pretokenize"]["inputs"]["parameters"]["model"] == {
        "componentInputParameter": "base_model"}
    assert params["finetune_lr"]["defaultValue"] == 2e-5
    assert params["prepare_input"]["defaultValue"] == "s3://mmjobs-data/aihub-chart/train"

    # lavin-sweep: the settings differ in schedules, not in lr: one sft_lr for the loop.
    spec, _ = compiled(tmp_path, "pipelines/recipes/lavin-sweep.yaml",
                       ["sweep.fast={train: {lr: 0.01}}"])
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "sft_max_steps" in params and "sft_lr" not in params  # `fast` sets its own lr
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    sft = body["train"]["inputs"]["parameters"]
    assert "set__train__lr" not in sft
    assert sft["set__train__max_steps"] == {
        "componentInputParameter": "pipelinechannel--sft_max_steps"}


def test_cpu_steps_get_cpu_defaults_not_the_gpu_node_s(tmp_path: Path) -> None:
    spec, platform = compiled(tmp_path, "pipelines/recipes/chameleon-interleaved.yaml")
    executors = spec["deploymentSpec"]["executors"]
    tasks = by_step(spec)

    def executor(step: str) -> tuple[dict[str, Any], dict[str, Any]]:
        name = tasks[step]["componentRef"]["name"].replace("comp-", "exec-")
        return executors[name]["container"].get("resources", {}), platform[name]

    report, report_pod = executor("report")  # was 64 CPUs / 512Gi on a GPU node
    assert (report["cpuLimit"], report["memoryLimit"]) == (4.0, pytest.approx(17.179869184))
    assert report_pod["emptyDirMounts"][0]["sizeLimit"] == "1Gi"
    prepare, _ = executor("prepare-sft")  # cluster.stages.prepare
    assert (prepare["cpuLimit"], prepare["memoryLimit"]) == (16.0, pytest.approx(68.719476736))
    sft, sft_pod = executor("sft")
    assert sft["cpuLimit"] == 64.0 and sft["accelerator"]["resourceCount"] == "8"
    assert sft_pod["emptyDirMounts"][0]["sizeLimit"] == "64Gi"
    # A CPU step can be placed too (cluster.cpu_steps), and a GPU stage set to 0 GPUs is one.
    cpu_pool = "cluster.cpu_steps={cpu: 2, memory: 4Gi, node_selector: {pool: cpu}}"
    recipe = pipeline_runner.load_recipe("pipelines/recipes/llava-dataengine.yaml", [cpu_pool])
    merge = resources_for(recipe.cluster, "merge", "merge")  # gpus: 0, memory: 128Gi
    assert (merge.gpus, merge.cpu, merge.memory) == (0, "2", "128Gi")
    spec, platform = compiled(tmp_path, CHART_DEMO, [cpu_pool])
    executors = spec["deploymentSpec"]["executors"]
    for step, task in by_step(spec).items():
        name = task["componentRef"]["name"].replace("comp-", "exec-")
        gpu = "accelerator" in executors[name]["container"].get("resources", {})
        assert platform[name].get("nodeSelector", {}).get("labels") == (
            None if gpu else {"pool": "cpu"}), step


def test_outputs_go_under_kfp_s_job_id_unless_a_run_id_is_given(tmp_path: Path) -> None:
    recipe = pipeline_runner.load_recipe(CHART_DEMO)
    out = tmp_path / "p.yaml"
    assert pipeline_runner.compile_recipe(CHART_DEMO, out) is None
    text = out.read_text(encoding="utf-8")
    assert pipeline_runner.default_run_id(recipe) not in text
    spec = next(yaml.safe_load_all(text))
    for step, task in by_step(spec).items():
        params = task["inputs"]["parameters"]
        assert params["kfp_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
        config = json.loads(params["config_json"]["runtimeValue"]["constant"])
        assert config["pipeline_run_id"] == KFP_RUN_ID_TOKEN, step
        if config.get("output"):
            assert f"/{KFP_RUN_ID_TOKEN}/{step}" in config["output"], step
    # A deliberate run id: baked in, so runs naming it share (and reuse) their outputs.
    spec, _ = compiled(tmp_path, CHART_DEMO, run_id="resume-me")
    sft = by_step(spec)["sft"]["inputs"]["parameters"]
    # The job id still names the MLflow parent run this KFP run's steps share.
    assert sft["kfp_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert json.loads(sft["config_json"]["runtimeValue"]["constant"])["parent_run_id"] == (
        f"kfp:{KFP_RUN_ID_TOKEN}:chart-demo")
    assert "/resume-me/sft" in json.loads(sft["config_json"]["runtimeValue"]["constant"])[
        "output"]
