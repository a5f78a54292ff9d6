"""Manifests of multi-node training jobs: a Kubeflow Trainer TrainJob or a PyTorchJob.

Pure functions from a train stage config and the cluster settings (`JobSettings`, from the
recipe's `cluster:` section) to the custom resource as a dict; `mmjobs.train.multinode`
creates and follows it. The hand-written equivalents are k8s/examples/trainjob.yaml and
k8s/examples/pytorchjob.yaml; both are checked against the same CRD schemas and policy.

Every rank runs `torchrun --module mmjobs.stages.train --set KEY=VALUE ...`: the stage's CLI
with each top-level config field as one `--set` (values are YAML, which the CLI parses back
exactly). torchrun reads the node count, node rank and master address from the `PET_*`
variables that the Trainer's torch plugin and the training-operator set. Credentials reach
the pods only as `secretKeyRef`s to the Secrets named in `cluster.secrets`.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any, Literal

import yaml
from pydantic import Field

from mmjobs.config import SecretNames, StrictModel

TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs")
# Selected by the allow-training-ranks NetworkPolicy (k8s/base, charts/mmjobs): ranks talk.
LABELS = {"app.kubernetes.io/part-of": "mmjobs", "app.kubernetes.io/component": "training"}
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
UID = 10001  # the stage images' non-root user
PATCH_MANAGER = "mmjobs.io/launcher"
# JobSet names pods `<job>-node-<i>-<j>-<suffix>` and that must stay a 63-character DNS label.
MAX_NAME = 40


class JobSettings(StrictModel):
    """Cluster settings of a multi-node training job (never credentials: Secret names only).

    Built by the pipeline from the recipe's `cluster:` section (per-step resources resolved)
    and handed to the train component as JSON.
    """

    kind: Literal["trainjob", "pytorchjob"] = Field("trainjob", description="cluster.trainer")
    runtime: str = Field("torch-distributed", description="cluster.training_runtime")
    cpu: str | None = Field(None, description="CPU request = limit per node.")
    memory: str | None = Field(None, description="Memory request = limit per node.")
    shm_size: str = Field("16Gi", description="/dev/shm (memory emptyDir) size.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    image_pull_secrets: list[str] = Field(default_factory=list)
    secrets: SecretNames = Field(default_factory=SecretNames)
    env: dict[str, str] = Field(default_factory=dict, description="Plain env (cluster.env).")
    backoff_limit: int = Field(3, ge=0, description="PyTorchJob pod restarts before failing.")


def job_name(experiment: str, run_id: str, step: str) -> str:
    """A deterministic DNS-1035 label for the job of `step` in a pipeline run.

    The same step of the same run (KFP retries) gets the same name, so a retry finds the job
    its previous attempt created; a hash of all three keeps truncated names distinct.
    """
    digest = hashlib.sha256(f"{experiment}\0{run_id}\0{step}".encode()).hexdigest()[:8]
    parts = (_slug(experiment)[:10].strip("-"), _slug(step)[:16].strip("-"))
    room = MAX_NAME - len("mmjobs--") - len(digest)
    readable = "-".join(p for p in parts if p)[:room].strip("-")
    return f"mmjobs-{readable}-{digest}" if readable else f"mmjobs-{digest}"


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


def stage_args(config: dict[str, Any]) -> list[str]:
    """`--set KEY=VALUE` for every top-level field of a stage config (a JSON-mode dump).

    Values are flow-style YAML, which `load_config` parses back to the same values (JSON
    would not: PyYAML reads `1e-05` as a string).
    """
    args: list[str] = []
    for key, value in config.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)
        args += ["--set", f"{key}={text.strip().removesuffix('...').strip()}"]
    return args


def env_vars(settings: JobSettings, image: str) -> list[dict[str, Any]]:
    """The ranks' env: plain settings as values, credentials as secretKeyRefs only."""
    secret_keys = (*S3_SECRET_KEYS, *MLFLOW_SECRET_KEYS)
    plain = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", "MMJOBS_IMAGE": image, **settings.env}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()
                                 if k not in secret_keys]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": settings.secrets.s3, "key": k}}}
            for k in S3_SECRET_KEYS]
    # MLflow servers without authentication have no such Secret.
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": settings.secrets.mlflow,
                                                       "key": k, "optional": True}}}
            for k in MLFLOW_SECRET_KEYS]
    return env


def resources(settings: JobSettings, gpus: int) -> dict[str, Any]:
    """Requests = limits (extended resources such as GPUs require it)."""
    amounts = {"cpu": settings.cpu, "memory": settings.memory,
               "nvidia.com/gpu": str(gpus) if gpus else None}
    amounts = {k: v for k, v in amounts.items() if v is not None}
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _volumes(settings: JobSettings) -> list[dict[str, Any]]:
    # DataLoader workers and NCCL share memory through /dev/shm (container default 64 MiB);
    # the root filesystem is read-only, so caches and staged outputs go to /tmp.
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
            {"name": "tmp", "emptyDir": {}}]


_MOUNTS = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]


def _pod_placement(settings: JobSettings) -> dict[str, Any]:
    placement: dict[str, Any] = {}
    if settings.node_selector:
        placement["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        placement["tolerations"] = [_toleration(t) for t in settings.tolerations]
    if settings.image_pull_secrets:
        placement["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    return placement


def _toleration(toleration: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes spelling (recipes may write toleration_seconds)."""
    out = {k: v for k, v in toleration.items() if k != "toleration_seconds"}
    if "toleration_seconds" in toleration:
        out.setdefault("tolerationSeconds", toleration["toleration_seconds"])
    return out


def _metadata(name: str, namespace: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(LABELS),
            "annotations": dict(annotations)}


def trainjob(*, name: str, namespace: str, config: dict[str, Any], nodes: int, gpus: int,
             image: str, settings: JobSettings,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A TrainJob (trainer.kubeflow.org/v1alpha1) running the train stage on `nodes` nodes.

    The runtime's `node` job gets the pod settings it lacks through `runtimePatches`
    (labels, security context, volumes, placement); image, command, env and resources go
    into `trainer`, which overrides the runtime's trainer container.
    """
    trainer: dict[str, Any] = {
        "image": image, "numNodes": nodes, "numProcPerNode": max(gpus, 1),
        "command": ["torchrun", "--module", "mmjobs.stages.train"],
        "args": stage_args(config), "env": env_vars(settings, image)}
    if res := resources(settings, gpus):
        trainer["resourcesPerNode"] = res
    pod = {"securityContext": _pod_security(), **_pod_placement(settings),
           "volumes": _volumes(settings),
           "containers": [{"name": "node", "securityContext": _container_security(),
                           "volumeMounts": [dict(m) for m in _MOUNTS]}]}
    node_job = {"name": "node", "template": {"spec": {"template": {
        "metadata": {"labels": dict(LABELS)}, "spec": pod}}}}
    return {
        "apiVersion": f"{TRAINJOB_API[0]}/{TRAINJOB_API[1]}", "kind": "TrainJob",
        "metadata": _metadata(name, namespace, annotations or {}),
        "spec": {
            "runtimeRef": {"apiGroup": TRAINJOB_API[0], "kind": "ClusterTrainingRuntime",
                           "name": settings.runtime},
            "trainer": trainer,
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {
                "template": {"spec": {"replicatedJobs": [node_job]}}}}],
        },
    }


def pytorchjob(*, name: str, namespace: str, config: dict[str, Any], nodes: int, gpus: int,
               image: str, settings: JobSettings,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A PyTorchJob (kubeflow.org/v1): one Master and `nodes - 1` Workers, same pod each.

    The operator sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT and
    PET_NPROC_PER_NODE (from `nprocPerNode`); the command repeats node and process counts.
    """
    nprocs = max(gpus, 1)
    container = {
        "name": "pytorch",  # the only container name the operator manages
        "image": image,
        "command": ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={nprocs}",
                    "--module", "mmjobs.stages.train"],
        "args": stage_args(config), "env": env_vars(settings, image),
        "securityContext": _container_security(),
        "volumeMounts": [dict(m) for m in _MOUNTS]}
    if res := resources(settings, gpus):
        container["resources"] = res

    def replica(count: int) -> dict[str, Any]:
        # ExitCode: 128-255 (SIGTERM checkpoint 143, OOM kill 137) restart the pod, which
        # resumes from the last checkpoint; 1-127 (config errors exit 2) fail the job.
        return {"replicas": count, "restartPolicy": "ExitCode", "template": {
            "metadata": {"labels": dict(LABELS)},
            "spec": {"automountServiceAccountToken": False,  # ranks never call the API
                     "securityContext": _pod_security(), **_pod_placement(settings),
                     "containers": [copy.deepcopy(container)], "volumes": _volumes(settings)}}}

    replicas = {"Master": replica(1)}
    if nodes > 1:
        replicas["Worker"] = replica(nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_API[0]}/{PYTORCHJOB_API[1]}", "kind": "PyTorchJob",
        "metadata": _metadata(name, namespace, annotations or {}),
        "spec": {"nprocPerNode": str(nprocs),
                 # Keep finished pods for `kubectl logs`; the job object goes after a day.
                 "runPolicy": {"cleanPodPolicy": "None", "ttlSecondsAfterFinished": 86400,
                               "backoffLimit": settings.backoff_limit},
                 "pytorchReplicaSpecs": replicas},
    }
