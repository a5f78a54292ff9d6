"""Manifests of a model server on Kubernetes: a Deployment running `mmjobs serve` and its Service.

Pure functions from a `ServerSpec` to the objects as dicts; `mmjobs.stages.deploy` creates or
updates them and waits for the rollout. The Helm chart's optional server
(charts/mmjobs/templates/serve-deployment.yaml) has the same pod: `python3 -m mmjobs.cli serve
MODEL --host=0.0.0.0 --port=8000`, readiness on /readyz (200 once the model is loaded),
liveness on /healthz, the restricted security context of every mmjobs pod (UID 10001,
read-only root filesystem, no capabilities, RuntimeDefault seccomp, /tmp an emptyDir) and
credentials only as `secretKeyRef`s: the S3 and MLflow Secrets of `cluster.secrets`, and the
bearer key clients must send, handed to the server with `--api-key-env`.

A server of several models (`models`: the settings of a sweep) is one Deployment whose pod
serves them all (`mmjobs serve --set models=[...]`; the chat page selects among them), with
the list in the `mmjobs.io/models` annotation.

Pods are labelled app.kubernetes.io/part-of=mmjobs and app.kubernetes.io/component=serve,
which the chart's serve NetworkPolicy selects (clients in the namespace may reach port 8000;
the pod may reach DNS, S3 and MLflow).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from mmjobs.config import SecretNames, StrictModel
from mmjobs.serve.config import ServedModel

PORT = 8000
KEY_ENV = "MMJOBS_SERVE_API_KEY"  # the variable the bearer key reaches the server in
UID = 10001  # the mmjobs images' non-root user
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
APP_NAME = "mmjobs-serve"  # app.kubernetes.io/name of servers made by the deploy stage
MANAGER = "mmjobs-deploy"  # app.kubernetes.io/managed-by
MAX_NAME = 40  # pods are <name>-<10>-<5>: stays a 63-character DNS label
# `mmjobs serve` settings the manifest sets itself (they are not `serve` settings).
RESERVED_SETTINGS = ("model", "adapter", "models", "run", "host", "port", "key_env")
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def _quantity(value: Any) -> Any:
    # YAML reads `cpu: 8` as an int; Kubernetes quantities are strings.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class ServerSecrets(SecretNames):
    """Secrets the server's pod reads (by name; never the values)."""

    # Not `api_key`: recipe keys that look like credentials are refused, and this is a name.
    bearer: str | None = Field(
        None, description="Secret holding the key clients must send as 'Authorization: Bearer "
        "<key>' (item `bearer_item`); unset: no auth, anyone who reaches the Service may use "
        "the model.")
    bearer_item: str = Field("api-key", min_length=1, description="Key of the bearer key "
                             "inside the `bearer` Secret.")


class ServerSpec(StrictModel):
    """What runs: the model, the image, the pod's resources and placement."""

    model: str | None = Field(None, description="Merged model URI (s3:// committed dir), or "
                              "the base model when `adapter` is set; or set `models`.")
    adapter: str | None = Field(None, description="LoRA adapter dir, or a training output "
                                "holding final/adapter.")
    models: list[ServedModel] = Field(
        default_factory=list, description="Several models behind this one server, each "
        "{name, model, adapter} (a sweep's settings; pipelines fill it in): one pod loads "
        "them all (serve.max_loaded_models caps how many at once), the chat page selects.")
    image: str | None = Field(None, description="Image with `mmjobs serve` (the eval image); "
                              "pipelines fill in the recipe's eval image.")
    serve: dict[str, Any] = Field(
        default_factory=dict, description="More `mmjobs serve` settings (the serve stage's "
        "config, e.g. {max_batch_size: 16, dtype: bfloat16}); model, adapter, host, port and "
        "key_env are set by the deployment.")
    replicas: int = Field(1, ge=1, description="Server pods (each loads the model).")
    gpus: int = Field(0, ge=0, description="NVIDIA GPUs per pod (nvidia.com/gpu).")
    cpu: str = Field("2", description="CPU request per pod.")
    memory: str = Field("16Gi", description="Memory request = limit per pod; loading a model "
                        "needs about its size in host memory.")
    tmp_size: str = Field("50Gi", description="Size limit of the /tmp emptyDir, where the model "
                          "is downloaded from the store: at least the model's size.")
    secrets: ServerSecrets = Field(default_factory=ServerSecrets, description="Secret names "
                                   "(S3, MLflow, the bearer key).")
    env: dict[str, str] = Field(default_factory=dict, description="Plain env, e.g. "
                                "MMJOBS_STORE, AWS_ENDPOINT_URL (cluster.env).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod "
                                              "tolerations (Kubernetes spelling).")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Image pull "
                                          "Secret names.")

    @model_validator(mode="after")
    def _one_source(self) -> ServerSpec:
        if bool(self.model) == bool(self.models):
            raise ValueError("set either model (one model) or models (several, by name)"
                             + (", not both" if self.model else ""))
        if self.adapter and self.models:
            raise ValueError("adapter goes with model; with models, set each entry's adapter")
        return self

    @field_validator("cpu", "memory", "tmp_size", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)

    @field_validator("env")
    @classmethod
    def _no_credential_env(cls, env: dict[str, str]) -> dict[str, str]:
        taken = [k for k in env if k in (*S3_SECRET_KEYS, *MLFLOW_SECRET_KEYS, KEY_ENV)]
        if taken:
            raise ValueError(f"{', '.join(taken)} come from Secrets (secrets.s3, secrets.mlflow, "
                             "secrets.bearer), never from plain env; remove them")
        return env


def server_name(experiment: str) -> str:
    """The default Deployment/Service name for an experiment's review server.

    One per experiment (not per run): each run's deploy step updates it to its model, so
    servers do not pile up holding GPUs. A DNS-1035 label of at most `MAX_NAME` characters; a
    hash keeps truncated names of different experiments apart.
    """
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", experiment.lower())).strip("-")
    name = f"{APP_NAME}-{slug}" if slug else APP_NAME
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(experiment.encode()).hexdigest()[:8]
    return f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"


def selector(name: str) -> dict[str, str]:
    """The (immutable) Deployment selector and Service selector of server `name`."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name}


def labels(name: str) -> dict[str, str]:
    """Labels of every object and pod of server `name` (the NetworkPolicy selects part-of and
    component)."""
    return {**selector(name), "app.kubernetes.io/component": "serve",
            "app.kubernetes.io/part-of": "mmjobs", "app.kubernetes.io/managed-by": MANAGER}


def url(name: str, namespace: str, port: int = PORT) -> str:
    """The in-cluster URL of server `name` (chat page at /, OpenAI API at /v1)."""
    return f"http://{name}.{namespace}.svc.cluster.local:{port}"


def serve_args(spec: ServerSpec) -> list[str]:
    """Arguments of `python3 -m mmjobs.cli serve`: the model, where to listen, the key variable
    and every `serve` setting as `--set KEY=VALUE` (flow YAML, parsed back exactly)."""
    args = ([spec.model] if spec.model else []) + ["--host=0.0.0.0", f"--port={PORT}"]
    if spec.adapter:
        args.append(f"--adapter={spec.adapter}")
    if spec.secrets.bearer:
        args.append(f"--api-key-env={KEY_ENV}")
    settings = dict(spec.serve)
    if spec.models:
        settings["models"] = [m.model_dump(exclude_none=True) for m in spec.models]
    for key, value in settings.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)
        args += ["--set", f"{key}={text.strip().removesuffix('...').strip()}"]
    return args


def env_vars(spec: ServerSpec, image: str) -> list[dict[str, Any]]:
    """Plain settings as values; S3/MLflow credentials and the bearer key as secretKeyRefs."""
    plain = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", "MMJOBS_IMAGE": image, **spec.env}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.secrets.s3, "key": k}}}
            for k in S3_SECRET_KEYS]
    # MLflow servers without authentication have no such Secret.
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.secrets.mlflow, "key": k,
                                                       "optional": True}}}
            for k in MLFLOW_SECRET_KEYS]
    if spec.secrets.bearer:
        env.append({"name": KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": spec.secrets.bearer, "key": spec.secrets.bearer_item}}})
    return env


def resources(spec: ServerSpec) -> dict[str, Any]:
    """CPU request, memory request = limit, GPUs as requests = limits (extended resources)."""
    requests: dict[str, str] = {"cpu": spec.cpu, "memory": spec.memory}
    limits: dict[str, str] = {"memory": spec.memory}
    if spec.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.gpus)
    return {"requests": requests, "limits": limits}


def probes() -> dict[str, Any]:
    """Startup and liveness on /healthz (answers while the model loads), readiness on /readyz
    (200 once it is loaded): the Service sends traffic only to pods that can answer."""
    def get(path: str) -> dict[str, Any]:
        return {"path": path, "port": "http"}

    return {
        "startupProbe": {"httpGet": get("/healthz"), "periodSeconds": 5,
                         "failureThreshold": 60},
        "readinessProbe": {"httpGet": get("/readyz"), "periodSeconds": 10,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": get("/healthz"), "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 3},
    }


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def toleration(toleration: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes spelling (recipes may write toleration_seconds)."""
    out = {k: v for k, v in toleration.items() if k != "toleration_seconds"}
    if "toleration_seconds" in toleration:
        out.setdefault("tolerationSeconds", toleration["toleration_seconds"])
    return out


def deployment(spec: ServerSpec, *, name: str, namespace: str,
               annotations: dict[str, str] | None = None,
               progress_deadline_s: int = 1800) -> dict[str, Any]:
    """The Deployment of server `name` (apps/v1).

    Args:
        annotations: on the Deployment and its pod template (e.g. the model URI and pipeline
            run): a new model rolls the pods.
        progress_deadline_s: after this long without progress the Deployment reports
            ProgressDeadlineExceeded (the deploy stage's timeout).

    Raises:
        ValueError: `spec.image` is unset.
    """
    if not spec.image:
        raise ValueError("the server needs an image with `mmjobs serve` (the eval image)")
    container: dict[str, Any] = {
        "name": "serve",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "mmjobs.cli", "serve"],
        "args": serve_args(spec),
        "env": env_vars(spec, spec.image),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        **probes(),
        # A crash (e.g. the model failed to load) leaves its log tail in the pod status,
        # where the deploy stage and `kubectl describe` show it.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
        "resources": resources(spec),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "securityContext": pod_security(),
        "containers": [container],
        # The root filesystem is read-only: the model is downloaded to /tmp (MMJOBS_HOME).
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": spec.tmp_size}}],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [toleration(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    notes = dict(annotations or {})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name),
                     "annotations": notes},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(name)},
            # No surge: an update never needs a second GPU per replica (the old pod goes first).
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "progressDeadlineSeconds": max(int(progress_deadline_s), 1),
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": labels(name), "annotations": dict(notes)},
                         "spec": pod},
        },
    }


def service(*, name: str, namespace: str, port: int = PORT) -> dict[str, Any]:
    """The ClusterIP Service of server `name` (v1)."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {"type": "ClusterIP", "selector": selector(name),
                 "ports": [{"name": "http", "port": port, "targetPort": "http",
                            "protocol": "TCP"}]},
    }
