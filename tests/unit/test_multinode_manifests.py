"""The TrainJob and PyTorchJob that multi-node training launches (mmjobs.train.k8s_jobs).

- Both validate against the vendored CRD schemas and the official Kubernetes schemas of every
  version the chart supports, and pass the same policy checks as k8s/examples/.
- Ranks can talk (the NetworkPolicy's labels), run as non-root on a read-only root with a
  writable /tmp and a memory /dev/shm, request GPUs with requests == limits, land where the
  recipe says (node selector, tolerations, pull secrets).
- Credentials reach the ranks only as secretKeyRefs; values in the launcher's environment
  never appear in the manifest.
- The job name is a deterministic DNS label; the ranks' `--set` arguments parse back into the
  exact stage config.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from mmjobs.config import ClusterConfig, ConfigError, load_config
from mmjobs.stages.train import TrainStageConfig
from mmjobs.train import k8s_jobs, multinode
from mmjobs.train.k8s_jobs import JobSettings
from tests.k8s import policy
from tests.k8s.validation import KUBE_VERSIONS, validate_manifest

KINDS = ("trainjob", "pytorchjob")
FAKE_SECRET = "fake/secret+value/must-never-appear"
IMAGE = "ghcr.io/mmjobs/mmjobs-train:0.1.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def stage_config(**overrides: Any) -> TrainStageConfig:
    data = {"experiment": "llava-dataengine", "pipeline_run_id": "run-0123456789ab",
            "output": "s3://mmjobs/store/llava-dataengine/run-0123456789ab/sft",
            "recipe": "llava-dataengine", "parent_run_id": "0f3c",
            "model": {"name_or_path": "s3://mmjobs/store/models/llava-1.5-7b",
                      "dtype": "bfloat16"},
            "data": "s3://mmjobs/store/cache/pretokenized/abc123",
            "train": {"mode": "sft", "finetune": "lora", "lr": 2e-5, "deepspeed": "zero3",
                      "lr_schedule_options": {"gamma": 1e-05}, "max_steps": 100}}
    return TrainStageConfig.model_validate({**data, **overrides})


def settings(kind: str = "trainjob", **overrides: Any) -> JobSettings:
    return JobSettings.model_validate({
        "kind": kind, "cpu": "32", "memory": "480Gi", "shm_size": "64Gi",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "tolerations": [GPU_TOLERATION, {"key": "spot", "operator": "Equal", "value": "true",
                                          "effect": "NoExecute", "toleration_seconds": 30}],
        "image_pull_secrets": ["ghcr-pull"],
        "secrets": {"s3": "team-s3", "mlflow": "team-mlflow"},
        "env": {"MMJOBS_STORE": "s3://mmjobs/store",
                "MLFLOW_TRACKING_URI": "http://mlflow.mmjobs.svc:5000"},
        **overrides})


def manifest(kind: str = "trainjob", *, nodes: int = 2, gpus: int = 8,
             **overrides: Any) -> dict[str, Any]:
    return multinode.build_manifest(stage_config(), nodes=nodes, gpus_per_node=gpus,
                                    image=IMAGE, namespace="team-a",
                                    settings=settings(kind, **overrides))


def pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates (PyTorchJob replicas, the TrainJob's patched `node` job)."""
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    (patch,) = doc["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"  # the torch runtime's trainer job
    return [job["template"]["spec"]["template"]]


def trainer_container(doc: dict[str, Any]) -> dict[str, Any]:
    """Where image, command, env and resources go (TrainJob: `spec.trainer`)."""
    if doc["kind"] == "TrainJob":
        trainer = doc["spec"]["trainer"]
        return {**trainer, "resources": trainer["resourcesPerNode"]}
    return pods(doc)[0]["spec"]["containers"][0]


# --------------------------------------------------------------------------- schemas, policy


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_jobs_validate_against_the_crd_and_kubernetes_schemas(kind: str, version: str) -> None:
    for nodes, gpus in ((2, 8), (4, 1), (3, 0)):
        doc = manifest(kind, nodes=nodes, gpus=gpus)
        assert validate_manifest(doc, version) == []


@pytest.mark.parametrize("kind", KINDS)
def test_jobs_pass_the_manifest_policy(kind: str) -> None:
    """The same checks as k8s/examples: restricted security context, /tmp, resources."""
    assert policy.policy_violations([manifest(kind)]) == []


def test_trainjob_round_trips_through_the_official_models() -> None:
    models = pytest.importorskip("kubeflow_trainer_api.models")
    doc = manifest("trainjob")
    assert models.TrainerV1alpha1TrainJob.from_dict(doc).to_dict() == doc


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize("kind", KINDS)
def test_pods_carry_the_labels_the_training_network_policy_selects(kind: str) -> None:
    doc = manifest(kind)
    for pod in pods(doc):
        assert pod["metadata"]["labels"] == {"app.kubernetes.io/part-of": "mmjobs",
                                             "app.kubernetes.io/component": "training"}
    assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "training"
    assert doc["metadata"]["namespace"] == "team-a"


@pytest.mark.parametrize("kind", KINDS)
def test_pods_run_non_root_with_read_only_root_and_memory_shm(kind: str) -> None:
    doc = manifest(kind)
    for pod in pods(doc):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory",
                                                           "sizeLimit": "64Gi"}
        assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e.get("value") for e in trainer_container(doc)["env"]}
    assert env["HOME"] == "/tmp"  # caches on the writable volume


@pytest.mark.parametrize("kind", KINDS)
def test_pods_land_where_the_recipe_says(kind: str) -> None:
    for pod in pods(manifest(kind)):
        spec = pod["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
        assert GPU_TOLERATION in spec["tolerations"]
        assert {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                "tolerationSeconds": 30} in spec["tolerations"]
        assert spec["imagePullSecrets"] == [{"name": "ghcr-pull"}]


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_requests_equal_limits(kind: str) -> None:
    resources = trainer_container(manifest(kind, gpus=8))["resources"]
    assert resources["requests"] == resources["limits"] == {
        "cpu": "32", "memory": "480Gi", "nvidia.com/gpu": "8"}
    cpu_only = trainer_container(manifest(kind, gpus=0))["resources"]
    assert "nvidia.com/gpu" not in cpu_only["limits"]


def test_node_and_process_counts() -> None:
    trainjob = manifest("trainjob", nodes=4, gpus=8)
    assert trainjob["spec"]["trainer"]["numNodes"] == 4
    assert trainjob["spec"]["trainer"]["numProcPerNode"] == 8
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                              "kind": "ClusterTrainingRuntime",
                                              "name": "torch-distributed"}
    assert trainjob["spec"]["trainer"]["command"] == ["torchrun", "--module",
                                                      "mmjobs.stages.train"]
    pytorchjob = manifest("pytorchjob", nodes=4, gpus=8)
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert {k: r["replicas"] for k, r in replicas.items()} == {"Master": 1, "Worker": 3}
    assert pytorchjob["spec"]["nprocPerNode"] == "8"
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the only container the operator manages
        assert container["command"][:3] == ["torchrun", "--nnodes=4", "--nproc-per-node=8"]
        assert replica["restartPolicy"] == "ExitCode"
        assert replica["template"]["spec"]["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("kind", KINDS)
def test_credentials_only_as_secret_refs(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, FAKE_SECRET)  # the launcher pod has them
    doc = manifest(kind)
    assert FAKE_SECRET not in json.dumps(doc)
    env = {e["name"]: e for e in trainer_container(doc)["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {
        "secretKeyRef": {"name": "team-s3", "key": "AWS_ACCESS_KEY_ID"}}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-mlflow", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        assert "value" not in env[name]
    assert env["MMJOBS_STORE"] == {"name": "MMJOBS_STORE", "value": "s3://mmjobs/store"}
    assert env["MMJOBS_IMAGE"]["value"] == IMAGE


def test_plain_env_cannot_shadow_a_secret_ref() -> None:
    env = k8s_jobs.env_vars(settings(env={"AWS_SECRET_ACCESS_KEY": "plain"}), IMAGE)
    (entry,) = [e for e in env if e["name"] == "AWS_SECRET_ACCESS_KEY"]
    assert "valueFrom" in entry


# --------------------------------------------------------------------------- names, arguments


def test_job_name_is_a_deterministic_dns_label() -> None:
    name = k8s_jobs.job_name("llava-dataengine", "run-0123456789ab", "sft")
    assert name == k8s_jobs.job_name("llava-dataengine", "run-0123456789ab", "sft")
    assert DNS_1035.match(name) and len(name) <= k8s_jobs.MAX_NAME
    assert name.startswith("mmjobs-llava-data-sft-")
    others = {k8s_jobs.job_name("llava-dataengine", "run-0123456789ab", "align"),
              k8s_jobs.job_name("llava-dataengine", "run-other", "sft"),
              k8s_jobs.job_name("other", "run-0123456789ab", "sft")}
    assert name not in others and len(others) == 3
    long = k8s_jobs.job_name("A_Very/Long Experiment.Name" * 5, "run-" + "x" * 80,
                             "sft-cyclical-increasing-dropout-schedule" * 3)
    assert DNS_1035.match(long) and len(long) <= k8s_jobs.MAX_NAME <= 63
    # Leading digits or nothing readable still give a valid label.
    assert DNS_1035.match(k8s_jobs.job_name("___", "1", "2024"))


def test_manifest_name_comes_from_experiment_run_and_step() -> None:
    doc = manifest("trainjob")
    assert doc["metadata"]["name"] == k8s_jobs.job_name("llava-dataengine", "run-0123456789ab",
                                                        "sft")
    assert doc["metadata"]["annotations"]["mmjobs.io/output"] == (
        "s3://mmjobs/store/llava-dataengine/run-0123456789ab/sft")


@pytest.mark.parametrize("kind", KINDS)
def test_rank_arguments_parse_back_to_the_stage_config(kind: str) -> None:
    cfg = stage_config(eval_data=None, registered_model_name="llava-sft: v1")
    doc = multinode.build_manifest(cfg, nodes=2, gpus_per_node=8, image=IMAGE,
                                   namespace="team-a", settings=settings(kind))
    args = trainer_container(doc)["args"]
    assert args[::2] == ["--set"] * (len(args) // 2)
    parsed = load_config(TrainStageConfig, {}, args[1::2])
    assert parsed == cfg
    assert parsed.train.lr_schedule_options == {"gamma": 1e-05}  # a float, not a string
    # Every mode keeps its config class (the dump leaves defaults out, never the mode).
    ppo = stage_config(eval_data=None, train={
        "mode": "ppo", "deepspeed": "zero2", "rl": {"kl_coef": 0.02, "reward": {
            "kind": "model", "model": "s3://mmjobs/store/rm/final"}}})
    doc = multinode.build_manifest(ppo, nodes=2, gpus_per_node=8, image=IMAGE,
                                   namespace="team-a", settings=settings(kind))
    parsed = load_config(TrainStageConfig, {}, trainer_container(doc)["args"][1::2])
    assert parsed == ppo and parsed.train.mode == "ppo"


def test_output_defaults_to_the_store_layout_resolved_by_the_launcher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMJOBS_STORE", "s3://bucket/root")
    cfg = stage_config(output=None)
    doc = multinode.build_manifest(cfg, nodes=2, gpus_per_node=1, image=IMAGE,
                                   namespace="ns", settings=settings())
    args = doc["spec"]["trainer"]["args"]
    assert "output=s3://bucket/root/llava-dataengine/run-0123456789ab/train" in args


# --------------------------------------------------------------------------- recipe settings


def test_cluster_config_chooses_trainer_and_refuses_mpi_runtimes() -> None:
    cluster = ClusterConfig(nodes=2, trainer="pytorchjob")
    assert cluster.trainer == "pytorchjob" and cluster.training_runtime == "torch-distributed"
    with pytest.raises(ConfigError, match="MPI runtime"):
        load_config(ClusterConfig, {"training_runtime": "deepspeed-distributed"})
    with pytest.raises(ConfigError, match="trainer"):
        load_config(ClusterConfig, {"trainer": "mpijob"})


def test_output_layout_constants_match_the_trainer() -> None:
    from mmjobs.train.checkpoint import CHECKPOINTS_DIR
    from mmjobs.train.trainer import FINAL_DIR, INFO_FILE

    assert (multinode.FINAL_DIR, multinode.INFO_FILE, multinode.CHECKPOINTS_DIR) == (
        FINAL_DIR, INFO_FILE, CHECKPOINTS_DIR)
