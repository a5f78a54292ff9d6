"""Kubernetes settings of a stage's pod, applied only when compiling for a cluster.

KFP's local runner refuses platform settings (secrets, volumes, tolerations), so pipelines
call `apply_cluster_settings` for every task when compiling and skip it when running locally.
Everything comes from the recipe's `cluster:` section; credentials are only ever referenced by
Secret name, never put into the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl, kubernetes

from mmjobs.config import ClusterConfig
from mmjobs.recipe import RecipeConfig
from mmjobs.stages import registry

S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SHM_VOLUME = "dshm"


@dataclass(frozen=True)
class Resources:
    """What one step's pod gets."""

    gpus: int
    cpu: str | None
    memory: str | None
    shm_size: str
    retries: int


def resources_for(cluster: ClusterConfig, stage: str, step: str,
                  gpu: bool | None = None) -> Resources:
    """The step's resources: `cluster.stages.<step>` over `cluster.stages.<stage>` over the
    defaults: a GPU step's (`cluster.gpus` for stages that declare `gpu`, unless an entry sets
    gpus: 0) are the cluster-wide cpu/memory/shm_size, a CPU step's `cluster.cpu_steps`.
    Retries only for stages that declare `resumable`: they resume after preemption, so a
    retry loses little work. `gpu` overrides the stage's declaration (False: a CPU step unless
    an entry sets gpus)."""
    spec = registry.get(stage)
    entries = [cluster.stages[key].model_dump(exclude_none=True)
               for key in (stage, step) if key in cluster.stages]
    gpus = cluster.gpus if (spec.gpu if gpu is None else gpu) else 0
    for entry in entries:
        gpus = entry.get("gpus", gpus)
    base = cluster if gpus else cluster.cpu_steps
    resolved = {
        "gpus": gpus,
        "cpu": base.cpu,
        "memory": base.memory,
        "shm_size": base.shm_size,
        "retries": cluster.retries if spec.resumable else 0,
    }
    for entry in entries:
        resolved.update(entry)
    return Resources(**resolved)


def apply_cluster_settings(task: dsl.PipelineTask, stage: str, recipe: RecipeConfig,
                           step: str | None = None, *, gpu: bool | None = None
                           ) -> dsl.PipelineTask:
    """Add the pod settings for `stage` (run as `step`) from `recipe.cluster` to `task`.

    GPUs (`nvidia.com/gpu`), CPU/memory requests = limits, `/dev/shm` as a memory-backed
    emptyDir (PyTorch DataLoader workers share batches through it; the container default is
    64 MiB), node selectors and tolerations (the cluster's on GPU steps, `cpu_steps`' on the
    others, so CPU steps never wait for GPU nodes), image pull secrets, S3 and MLflow
    credentials from Secrets as env vars, plain env vars from `cluster.env`, the stage's
    `pod_env` (e.g. evaluate's $MMJOBS_POT_IMAGE: the eval image, for its PoT pod), retries
    and caching. `gpu`: see `resources_for`.
    """
    cluster = recipe.cluster
    spec = registry.get(stage)
    res = resources_for(cluster, stage, step or stage, gpu)
    # Multi-node training runs in a TrainJob with these resources per node; the step's own
    # pod only creates and follows it.
    launcher = spec.multinode and cluster.nodes > 1
    if res.gpus and not launcher:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(res.gpus)
    if res.cpu and not launcher:
        task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    if res.memory and not launcher:
        task.set_memory_request(res.memory).set_memory_limit(res.memory)
    kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm",
                               medium="Memory", size_limit=res.shm_size)
    placement = cluster if res.gpus and not launcher else cluster.cpu_steps
    for key, value in placement.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in placement.tolerations:
        kubernetes.add_toleration(
            task, key=toleration.get("key"), operator=toleration.get("operator"),
            value=toleration.get("value"), effect=toleration.get("effect"),
            toleration_seconds=toleration.get("tolerationSeconds",
                                              toleration.get("toleration_seconds")))
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    kubernetes.use_secret_as_env(task, secret_name=cluster.secrets.s3,
                                 secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    # MLflow servers without authentication have no such Secret: optional.
    kubernetes.use_secret_as_env(task, secret_name=cluster.secrets.mlflow,
                                 secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS},
                                 optional=True)
    for name, value in cluster.env.items():
        task.set_env_variable(name, value)
    for name, image in spec.pod_env.items():
        task.set_env_variable(name, recipe.images.image(image))
    if res.retries:
        task.set_retry(num_retries=res.retries, backoff_duration="60s", backoff_factor=2.0)
    task.set_caching_options(cluster.caching)
    return task
