"""The recipe's `cluster:` and `images:` sections: what the stage pods get on Kubernetes.

Only compiling for a cluster reads them (`pipelines/cluster.py`); credentials are referenced
by Secret name, never held. `mmjobs.recipe.RecipeConfig` holds both sections.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from mmjobs.config_base import StrictModel


class SecretNames(StrictModel):
    """Names of Kubernetes Secrets mounted as env vars; never the credentials themselves."""

    s3: str = Field("mmjobs-s3", description="Secret with AWS_* keys for the object store.")
    mlflow: str = Field("mmjobs-mlflow", description="Secret with MLFLOW_TRACKING_* keys.")


def _quantity(value: Any) -> Any:
    # YAML reads `cpu: 8` as an int; Kubernetes quantities are strings.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return str(value) if is_number else value


_URL_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]+@", re.IGNORECASE)


class StageResources(StrictModel):
    """Resources of one stage's pods; unset fields inherit from the cluster section."""

    gpus: int | None = Field(None, ge=0, description="NVIDIA GPUs (nvidia.com/gpu) per pod.")
    cpu: str | None = Field(None, description="CPU request and limit, e.g. '8'.")
    memory: str | None = Field(None, description="Memory request and limit, e.g. '64Gi'.")
    shm_size: str | None = Field(None, description="/dev/shm size (memory-backed emptyDir).")
    retries: int | None = Field(None, ge=0, le=10, description="Retries after a failure "
                                "(preemption); default: cluster.retries for resumable stages.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)


class CpuStepResources(StrictModel):
    """What steps without GPUs (prepare, pretokenize, report, ...) get, unless
    `cluster.stages` says otherwise: the cluster-wide cpu, memory, shm_size, node_selector and
    tolerations are the GPU steps' (a GPU node's), so a CPU step neither waits for a GPU node
    nor asks for its CPUs and memory."""

    cpu: str | None = Field("4", description="CPU request and limit.")
    memory: str | None = Field("16Gi", description="Memory request and limit.")
    shm_size: str = Field("1Gi", description="/dev/shm size (counts against memory).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector "
                                          "of CPU steps (default: none).")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations of CPU steps (default: none).")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)


# Kubeflow Trainer's MPI-policy runtimes: they start ranks from a launcher over SSH, not with
# torchrun, so multi-node mmjobs training cannot use them.
MPI_RUNTIMES = ("deepspeed-distributed", "mpi-distributed", "mlx-distributed")


class ClusterConfig(StrictModel):
    """Kubernetes resources for the stage pods (ignored by the local runner)."""

    gpus: int = Field(0, ge=0, description="NVIDIA GPUs per node (nvidia.com/gpu).")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory per GPU in GiB, for `mmjobs plan`'s fits check. None: "
        "from the node selector nvidia.com/gpu.product (e.g. NVIDIA-A100-SXM4-80GB), else 80 "
        "assumed (the plan says so).")
    nodes: int = Field(1, ge=1, description="Nodes for training; >1 launches a TrainJob.")
    trainer: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob", description="What runs multi-node training (nodes > 1): a Kubeflow Trainer "
        "v2 TrainJob (trainer.kubeflow.org/v1alpha1), or a PyTorchJob (kubeflow.org/v1) on "
        "clusters with the training-operator v1.")
    training_runtime: str = Field(
        "torch-distributed", description="ClusterTrainingRuntime a TrainJob runs on. Ranks "
        "start with torchrun (DeepSpeed runs inside it, see train.deepspeed), so it must be a "
        "torch-policy runtime such as torch-distributed; the MPI-based deepspeed-distributed "
        "and mpi-distributed runtimes launch over SSH and are refused.")
    cpu: str | None = Field(None, description="CPU request/limit of GPU steps (per node), "
                            "e.g. '8' or '7500m'; CPU steps: cpu_steps.")
    memory: str | None = Field(None, description="Memory request/limit of GPU steps (per "
                               "node), e.g. '64Gi'; CPU steps: cpu_steps.")
    shm_size: str = Field("16Gi", description="/dev/shm size of GPU steps; DataLoader workers "
                          "need it.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Pod nodeSelector of GPU steps and multi-node jobs "
        "(CPU steps: cpu_steps.node_selector).")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations of GPU steps and multi-node jobs, "
        "as in the Kubernetes API (CPU steps: cpu_steps.tolerations).")
    cpu_steps: CpuStepResources = Field(
        default_factory=CpuStepResources, description="Resources and placement of the steps "
        "without GPUs (prepare, pretokenize, merge, report, ...; also a multi-node training "
        "step's launcher pod), unless cluster.stages says otherwise.")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secret names for pulling private stage images."
    )
    secrets: SecretNames = Field(
        default_factory=SecretNames, description="Names of the credential Secrets."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain (non-secret) environment variables for every stage pod, e.g. "
        "MMJOBS_STORE, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI. Credentials never go here: "
        "they come from the Secrets named in `secrets`.")
    retries: int = Field(
        2, ge=0, le=10, description="Retries of stages that resume after a pod is preempted "
        "(those declared resumable: training, inference, tokenization); other stages get 0 "
        "unless cluster.stages sets them.")
    caching: bool = Field(True, description="KFP's step cache. It never matches across "
                          "runs: every step's inputs hold its run's KFP job id, as outputs are "
                          "store paths rewritten in place (equal inputs need not mean equal "
                          "contents); across runs compiled with the same --run-id the stages "
                          "reuse committed outputs whose fingerprints match.")
    stages: dict[str, StageResources] = Field(
        default_factory=dict,
        description="Per-stage resources, keyed by stage kind (train, infer, ...) or by step "
        "name (sft, align-table, ...); a step's entry wins over its stage kind's, which wins "
        "over the cluster-wide values above.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)

    @field_validator("training_runtime")
    @classmethod
    def _torch_runtime(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value):
            raise PydanticCustomError("runtime_name", "'{value}' is not a Kubernetes object "
                                      "name", {"value": value})
        if value in MPI_RUNTIMES:
            raise PydanticCustomError(
                "mpi_runtime", "'{value}' is an MPI runtime (an SSH launcher starts the ranks); "
                "mmjobs starts its ranks with torchrun: use torch-distributed (DeepSpeed runs "
                "inside it with train.deepspeed)", {"value": value})
        return value

    @field_validator("env")
    @classmethod
    def _plain_env(cls, env: dict[str, str]) -> dict[str, str]:
        # Secret-looking *keys* are already refused for the whole recipe at load time
        # (config_errors.find_credential_keys); values can still carry credentials in URLs.
        bad = [key for key, value in env.items() if _URL_USERINFO.search(value)]
        if bad:
            raise PydanticCustomError(
                "credential_in_url", "{keys}: a URL with user:password@ holds a credential; "
                "put it in a Kubernetes Secret (cluster.secrets names it) and keep the plain "
                "URL here", {"keys": ", ".join(bad)})
        return env


class ImagesConfig(StrictModel):
    """Container images the stages run in on a cluster: `<repository>:<tag>`."""

    data: str = Field("ghcr.io/mmjobs/mmjobs-data", description="Image repository for data "
                      "stages (datasets, tokenization, tiny models, imports, deploying).")
    train: str = Field("ghcr.io/mmjobs/mmjobs-train", description="Image repository for model "
                       "stages (training, connectors, merging).")
    eval: str = Field("ghcr.io/mmjobs/mmjobs-eval", description="Image repository for "
                      "evaluation stages (inference, scoring, reports, serving).")
    tag: str | None = Field(None, description="Tag of all three; default: the mmjobs version.")

    def image(self, kind: Literal["data", "train", "eval"]) -> str:
        """The full image reference for an image kind, e.g. `ghcr.io/mmjobs/mmjobs-train:0.1.0`."""
        from mmjobs import __version__

        return f"{getattr(self, kind)}:{self.tag or __version__}"
