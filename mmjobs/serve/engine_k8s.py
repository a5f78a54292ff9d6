"""The Kubernetes objects of a pipeline's serving engine (see `mmjobs.serve.engine_pod` for the
recipe section and the pod's design): a Deployment whose init container copies the model from
the store and whose engine container serves it, and a ClusterIP Service. Pure functions;
`mmjobs.stages.engine` creates, follows and deletes them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mmjobs import kube
from mmjobs.config_cluster import SecretNames
from mmjobs.logs import get_logger
from mmjobs.serve import k8s
from mmjobs.serve.engine_pod import (
    API_KEY_ENV,
    API_KEY_SECRET_KEY,
    CACHE_ENV,
    MANAGER,
    MODEL_DIR,
    RUN_LABEL,
    VLLM_KEY_ENV,
    EngineSecrets,
    EngineSpec,
    labels,
    selector,
    url,
)
from mmjobs.serve.rollout import DeployError, ServerObjects

log = get_logger(__name__)


class EnginePodSecrets(SecretNames, EngineSecrets):
    """The cluster's Secret names (`cluster.secrets`) and the engine's own (`api_key`)."""


class EnginePlacement(EngineSpec):
    """An engine as the pipeline starts it: the recipe's spec plus what the cluster section
    says (the eval image that copies the model, Secret names, store env, placement)."""

    fetch_image: str | None = Field(None, description="Image of the init container that "
                                    "copies the model from the store (the eval image).")
    secrets: EnginePodSecrets = Field(default_factory=EnginePodSecrets,
                                      description="Secret names: the init container reads "
                                      "secrets.s3, the engine secrets.api_key.")
    store_env: dict[str, str] = Field(default_factory=dict, description="Plain env of the "
                                      "init container (cluster.env: MMJOBS_STORE, "
                                      "AWS_ENDPOINT_URL).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod "
                                          "nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod "
                                              "tolerations (Kubernetes spelling).")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Image pull "
                                          "Secret names.")


def _fetch_container(spec: EnginePlacement, model: str) -> dict[str, Any]:
    """The init container copying the committed model dir into the model emptyDir."""
    env = [{"name": k, "value": v} for k, v in {"HOME": "/tmp", "PYTHONUNBUFFERED": "1",
                                                 **spec.store_env}.items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.secrets.s3, "key": k}}}
            for k in k8s.S3_SECRET_KEYS]
    return {"name": "fetch-model", "image": spec.fetch_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-m", "mmjobs.cli", "store", "cp", model, MODEL_DIR],
            "env": env, "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": k8s.container_security(),
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                          "limits": {"memory": "2Gi"}},
            "volumeMounts": [{"name": "model", "mountPath": "/models"},
                             {"name": "tmp", "mountPath": "/tmp"}]}


def deployment(spec: EnginePlacement, *, name: str, namespace: str, run: str, model: str,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The engine's Deployment (apps/v1): one replica, the model copied in by an init
    container, probes on `ready_path`, the restricted security context.

    Raises:
        ValueError: no `fetch_image` (pipelines set the recipe's eval image).
    """
    if not spec.fetch_image:
        raise ValueError("fetch_image: required, the eval image (it copies the model from "
                         "the store); pipelines set it")
    command, args = spec.command_line()
    gpus, cpu, memory = spec.gpus or 0, spec.cpu or "4", spec.memory or "32Gi"
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    probe = {"httpGet": {"path": spec.ready_path, "port": "http"}, "timeoutSeconds": 5}
    engine: dict[str, Any] = {
        "name": "engine", "image": spec.image, "imagePullPolicy": "IfNotPresent",
        **({"command": command} if command else {}), "args": args,
        "env": [{"name": k, "value": v} for k, v in {**CACHE_ENV, **spec.env}.items()]
        + _key_env(spec),
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        # Loading takes minutes: the startup probe allows the whole startup timeout.
        "startupProbe": {**probe, "periodSeconds": 10,
                         "failureThreshold": max(1, int(spec.startup_timeout_s // 10))},
        "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": k8s.container_security(),
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [{"name": "model", "mountPath": "/models", "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # engines never call the Kubernetes API
        "securityContext": k8s.pod_security(),
        "initContainers": [_fetch_container(spec, model)],
        "containers": [engine],
        "volumes": [{"name": "model", "emptyDir": {"sizeLimit": spec.model_size}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                  "sizeLimit": spec.shm_size}}],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [k8s.toleration(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    notes = dict(annotations or {})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, run),
                     "annotations": notes},
        "spec": {"replicas": 1, "selector": {"matchLabels": selector(name)},
                 "strategy": {"type": "Recreate"},  # never two pods holding GPUs
                 "progressDeadlineSeconds": max(int(spec.startup_timeout_s), 1),
                 "revisionHistoryLimit": 1,
                 "template": {"metadata": {"labels": labels(name, run),
                                           "annotations": dict(notes)},
                              "spec": pod}},
    }


def _key_env(spec: EnginePlacement) -> list[dict[str, Any]]:
    """The bearer key from `secrets.api_key`, as the engine reads it (none without one)."""
    if not spec.secrets.api_key:
        return []
    ref = {"secretKeyRef": {"name": spec.secrets.api_key, "key": API_KEY_SECRET_KEY}}
    return [{"name": name, "valueFrom": ref} for name in (API_KEY_ENV, VLLM_KEY_ENV)]


def service(*, name: str, namespace: str, run: str, port: int) -> dict[str, Any]:
    """The engine's ClusterIP Service (v1)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(name, run)},
            "spec": {"type": "ClusterIP", "selector": selector(name),
                     "ports": [{"name": "http", "port": port, "targetPort": "http",
                                "protocol": "TCP"}]}}


# ---------------------------------------------------------------------- in the API


def start(spec: EnginePlacement, api: Any, *, name: str, namespace: str, run: str, model: str,
          annotations: dict[str, str], poll_s: float) -> str:
    """Create (or update) engine `name` serving `model` and wait until its pod is ready; its
    /v1 URL.

    Raises:
        DeployError: the API refused the objects, or the engine did not become ready (a crash
            loop quotes its log tail; an unschedulable pod the scheduler's message).
    """
    server = _objects(api, name, namespace)
    action = server.apply_deployment(deployment(spec, name=name, namespace=namespace, run=run,
                                                model=model, annotations=annotations))
    server.apply_service(service(name=name, namespace=namespace, run=run, port=spec.port))
    log.info("engine %s: %s (%s on %s); waiting until %s answers (up to %g s)", server, action,
             spec.image, model, spec.ready_path, spec.startup_timeout_s)
    server.wait(timeout_s=spec.startup_timeout_s, poll_s=poll_s,
                max_restarts=spec.max_restarts)
    return url(name, namespace, spec.port)


def delete(api: Any, *, name: str, namespace: str) -> list[str]:
    """Delete engine `name`'s Deployment and Service; what was deleted (none: already gone)."""
    return _objects(api, name, namespace).delete()


def delete_run(api: Any, *, namespace: str, run: str) -> list[str]:
    """Delete every engine of run `run` (by its `mmjobs.io/engine-run` label); what was
    deleted."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    wanted = f"{RUN_LABEL}={run},app.kubernetes.io/managed-by={MANAGER}"
    names: set[str] = set()
    for kind, lister in (("deployments", client.AppsV1Api(api).list_namespaced_deployment),
                         ("services", client.CoreV1Api(api).list_namespaced_service)):
        try:
            listed = kube.json_body(lister(namespace, label_selector=wanted,
                                           _preload_content=False))
        except ApiException as e:
            raise DeployError(f"cannot list {kind} in {namespace}: {kube.api_error(e)} (the "
                              "pipeline's service account needs list on deployments and "
                              "services: the chart's serve.pipelineDeploy=true)") from None
        names |= {item["metadata"]["name"] for item in listed.get("items") or []}
    deleted = []
    for name in sorted(names):
        deleted += delete(api, name=name, namespace=namespace)
    return deleted


def _objects(api: Any, name: str, namespace: str) -> ServerObjects:
    return ServerObjects(api, name, namespace, selector=selector(name), manager=MANAGER,
                         rename_hint="engines are named per run and model; delete the old one")
