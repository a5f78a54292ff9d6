"""Compiling a recipe with `cluster.nodes > 1`: the train step carries what the launcher needs.

The train task gets the node and GPU counts, the image and `launch_json` (the job's cluster
settings: resources, placement, Secret *names*, plain env); its own pod asks for no GPU (the
TrainJob's pods have them); no credential from the compiling shell reaches the IR; and the job
the component would launch from these parameters is a valid TrainJob / PyTorchJob.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmjobs import pipeline_runner
from mmjobs.config import ConfigError
from mmjobs.stages import train as train_stage
from mmjobs.stages.train import TrainStageConfig
from mmjobs.train.k8s_jobs import JobSettings
from tests.k8s.validation import KUBE_VERSIONS, validate_manifest

RECIPE = "pipelines/recipes/llava-dataengine.yaml"
FAKE_KEY_ID = "AKIAFAKEMULTINODETEST"
FAKE_SECRET = "fake/multinode+secret/must-never-appear"


def compile_ir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               overrides: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(IR text, pipeline spec, platform spec) of the recipe compiled with `overrides`."""
    for name, value in {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                        "MLFLOW_TRACKING_PASSWORD": FAKE_SECRET}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe(RECIPE, out, overrides)
    text = out.read_text(encoding="utf-8")
    spec, platform = list(yaml.safe_load_all(text))[:2]
    return text, spec, platform


def params(spec: dict[str, Any], task: str) -> dict[str, Any]:
    return {k: v["runtimeValue"]["constant"]
            for k, v in spec["root"]["dag"]["tasks"][task]["inputs"]["parameters"].items()
            if "runtimeValue" in v}


def test_train_step_gets_launch_settings_and_no_credentials(tmp_path, monkeypatch) -> None:
    text, spec, platform = compile_ir(tmp_path, monkeypatch, [
        "cluster.nodes=2", "cluster.image_pull_secrets=[ghcr-pull]",
        "cluster.secrets.s3=team-s3"])
    assert FAKE_KEY_ID not in text and FAKE_SECRET not in text

    train = params(spec, "train")
    assert (train["nodes"], train["gpus_per_node"]) == (2, 8)
    assert train["image"] == "ghcr.io/mmjobs/mmjobs-train:0.1.0"
    launch = json.loads(train["launch_json"])
    assert launch == {
        "kind": "trainjob", "runtime": "torch-distributed", "cpu": "64", "memory": "512Gi",
        "shm_size": "64Gi", "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                         "effect": "NoSchedule"}],
        "image_pull_secrets": ["ghcr-pull"],
        "secrets": {"s3": "team-s3", "mlflow": "mmjobs-mlflow"},
        "env": {"MMJOBS_STORE": "s3://mmjobs/store",
                "AWS_ENDPOINT_URL": "http://minio.mmjobs.svc:9000",
                "MLFLOW_TRACKING_URI": "http://mlflow.mmjobs.svc:5000"}}
    JobSettings.model_validate(launch)  # what the component parses it with

    # The launching pod creates and follows the job: no GPU, CPU or memory of its own, but
    # the store credentials (it reads the committed result) as Secret references.
    executors = spec["deploymentSpec"]["executors"]
    assert "accelerator" not in executors["exec-train"]["container"].get("resources", {})
    secrets = {s["secretName"] for s in
               platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
               ["secretAsEnv"]}
    assert secrets == {"team-s3", "mmjobs-mlflow"}
    # Other GPU steps keep their GPUs; steps other than train get no launch settings.
    assert executors["exec-infer"]["container"]["resources"]["accelerator"]["count"] == "1"
    assert "launch_json" not in params(spec, "merge")


@pytest.mark.parametrize("trainer", ["trainjob", "pytorchjob"])
def test_the_job_launched_from_the_compiled_step_is_valid(trainer, tmp_path, monkeypatch) -> None:
    _, spec, _ = compile_ir(tmp_path, monkeypatch, ["cluster.nodes=3",
                                                    f"cluster.trainer={trainer}"])
    train = params(spec, "train")
    config = json.loads(train["config_json"])
    config["data"] = "s3://mmjobs/store/cache/pretokenized/abc"  # wired at run time
    config["model"] = {**config.get("model", {}), "name_or_path": "s3://mmjobs/models/llava"}
    cfg = TrainStageConfig.model_validate(config)
    doc = train_stage.job_manifest(cfg, nodes=train["nodes"], gpus_per_node=train["gpus_per_node"],
                                   image=train["image"], namespace="mmjobs",
                                   settings=JobSettings.model_validate_json(train["launch_json"]))
    assert doc["kind"] == {"trainjob": "TrainJob", "pytorchjob": "PyTorchJob"}[trainer]
    for version in KUBE_VERSIONS:
        assert validate_manifest(doc, version) == []


def test_single_node_compiles_without_launch_settings(tmp_path, monkeypatch) -> None:
    _, spec, _ = compile_ir(tmp_path, monkeypatch, [])
    assert "launch_json" not in params(spec, "train")
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["count"] == "8"


def test_mpi_runtimes_are_refused_at_compile_time(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.training_runtime.*MPI runtime"):
        pipeline_runner.compile_recipe(RECIPE, tmp_path / "p.yaml", [
            "cluster.nodes=2", "cluster.training_runtime=deepspeed-distributed"])
