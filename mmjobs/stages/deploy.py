"""Stage `deploy`: run a trained model as a review server on the cluster and wait until it is up.

    python -m mmjobs.stages.deploy --set model=s3://mmjobs/store/chart-demo/run-1/merge \\
        --set image=ghcr.io/mmjobs/mmjobs-eval:0.1.0 --set secrets.bearer=review-key

Creates (or updates) a Deployment running `mmjobs serve` on `model` and a ClusterIP Service in
front of it, through the Kubernetes API with the pod's service account (in-cluster config;
kubeconfig elsewhere), then follows the rollout until every replica answers /readyz. The
manifests are `mmjobs.serve.k8s`'s: labelled app.kubernetes.io/part-of=mmjobs and
app.kubernetes.io/component=serve, the restricted security context of every mmjobs pod,
credentials as secretKeyRefs only. Pipelines add this step after the model is merged and
evaluated when the recipe sets `stages.deploy.enabled: true` (see pipelines/chart_demo.py).

The server is named after the experiment (`mmjobs-serve-<experiment>`, or `name`), so each
run's deploy step updates the same server to its model instead of starting another one. If a
pod crash-loops (the model failed to load: its log tail is the reason), cannot start its
container (a missing Secret), or the rollout is not done within `timeout_s`, the stage fails
with the pods' reasons; the objects stay for `kubectl describe`. The result's `output` is the
server's in-cluster URL: the chat page at `/`, the OpenAI-compatible API at `/v1`.

With `models` (the lavin-sweep pipeline sets one entry per swept setting) the one Deployment
serves them all: clients pick one by `model`, the chat page has a selector of the settings.

The service account needs create/get/patch on deployments and services and list on pods in
the namespace: the Helm chart's runner Role grants them with `serve.pipelineDeploy=true`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from mmjobs import kube
from mmjobs.logs import get_logger
from mmjobs.serve import k8s
from mmjobs.serve.config import ServeConfig, default_model_name
from mmjobs.serve.k8s import ServerSpec
from mmjobs.serve.rollout import DeployError, ServerObjects
from mmjobs.stage_contract import Input, Stage, StageConfig, StageResult

NAME = "deploy"
log = get_logger(__name__)


class DeployConfig(StageConfig, ServerSpec):
    """Deploy a model as a server on Kubernetes (Deployment + Service running `mmjobs serve`)
    and wait until it is ready."""

    enabled: bool = Field(False, description="Pipelines: add the deploy step (cluster runs "
                          "only; `mmjobs run` skips it). The stage itself ignores it.")
    name: str | None = Field(
        None, max_length=k8s.MAX_NAME, pattern=k8s.DNS_1035,
        description="Deployment and Service name; default mmjobs-serve-<experiment> (one "
        "server per experiment, updated by each run).")
    namespace: str | None = Field(None, description="Namespace; default the pod's own (its "
                                  "service account's), else $MMJOBS_NAMESPACE.")
    timeout_s: float = Field(1800.0, gt=0, description="How long the rollout may take: image "
                             "pull, model download and load. Also the Deployment's "
                             "progressDeadlineSeconds.")
    poll_s: float = Field(5.0, gt=0, description="Seconds between status reads.")
    max_restarts: int = Field(2, ge=0, description="Container restarts (crash loop) after "
                              "which the step fails without waiting for the timeout.")

    @field_validator("serve")
    @classmethod
    def _serve_settings(cls, serve: dict[str, Any]) -> dict[str, Any]:
        reserved = [k for k in serve if k in k8s.RESERVED_SETTINGS]
        if reserved:
            raise PydanticCustomError(
                "reserved_setting", "{keys}: set by the deployment (it listens on 0.0.0.0:"
                "{port}; model and adapter are fields of their own; the bearer key comes from "
                "secrets.bearer); remove them", {"keys": ", ".join(reserved), "port": k8s.PORT})
        try:  # the server's own checks, now rather than in a crash-looping pod
            ServeConfig.model_validate({**serve, "model": "<model>"})  # models: ServerSpec
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'serve'}: "
                                 f"{err['msg']}" for err in e.errors())
            raise PydanticCustomError("serve_setting", "{problems}",
                                      {"problems": problems}) from None
        return serve


class DeployResult(StageResult):
    """The server: `output` is its in-cluster URL (chat page at /, API at /v1)."""

    name: str
    namespace: str
    model_name: str  # the default (first) model
    model_names: list[str] = Field(default_factory=list)  # every model the server serves
    action: str  # created | updated
    ready_replicas: int


def main(cfg: DeployConfig, *, api: Any = None) -> DeployResult:
    """Create or update the server and wait until it is ready; see the module docstring.

    Args:
        api: a kubernetes `ApiClient` (default: in-cluster config, else kubeconfig).

    Raises:
        DeployError: no image or namespace, the API refused the objects (e.g. RBAC), an
            object of that name is not an mmjobs server, or the rollout failed or timed out
            (naming the pods' reasons).
    """
    if not cfg.image:
        raise DeployError("image: required, an image with `mmjobs serve` (pipelines set the "
                          "recipe's eval image)")
    namespace = cfg.namespace or kube.current_namespace()
    if not namespace:
        raise DeployError(f"no namespace: set `namespace` ({kube.NAMESPACE_FILE} is missing and "
                          f"{kube.NAMESPACE_ENV} is not set)")
    name = cfg.name or k8s.server_name(cfg.experiment)
    annotations = {"mmjobs.io/experiment": cfg.experiment,
                   "mmjobs.io/pipeline-run-id": cfg.pipeline_run_id}
    if cfg.model:
        annotations["mmjobs.io/model"] = cfg.model
        names = [cfg.serve.get("served_model_name") or default_model_name(cfg.model)]
        what = cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")
    else:  # several: a new list (or a model's new URI) rolls the pods
        annotations["mmjobs.io/models"] = json.dumps(
            {m.name: m.model + (f" + {m.adapter}" if m.adapter else "") for m in cfg.models})
        names = [m.name for m in cfg.models]
        what = f"{len(names)} models ({', '.join(names)})"
    if cfg.adapter:
        annotations["mmjobs.io/adapter"] = cfg.adapter
    try:
        client = kube.api_client(api)
    except kube.KubeAccessError as e:
        raise DeployError(str(e)) from None
    server = ServerObjects(client, name, namespace)
    action = server.apply_deployment(k8s.deployment(cfg, name=name, namespace=namespace,
                                                    annotations=annotations,
                                                    progress_deadline_s=int(cfg.timeout_s)))
    server.apply_service(k8s.service(name=name, namespace=namespace))
    log.info("%s: %s for %s; waiting until it is ready (up to %g s)", server, action, what,
             cfg.timeout_s)
    ready = server.wait(timeout_s=cfg.timeout_s, poll_s=cfg.poll_s,
                        max_restarts=cfg.max_restarts)
    address = k8s.url(name, namespace)
    log.info("%s: ready (%d replicas) at %s (chat page /, OpenAI API %s/v1)", server, ready,
             address, address)
    return DeployResult(output=address, name=name, namespace=namespace, action=action,
                        model_name=names[0], model_names=names, ready_replicas=ready)


# A light launcher (the server itself runs the recipe's eval image); no output of its own.
STAGE = Stage(name=NAME, config=DeployConfig, result=DeployResult, main=main, image="data",
              own_output=False,
              # model: "" when the config lists `models` (a sweep's settings) instead.
              inputs=(Input("model", default=""), Input("adapter", default="")),
              errors=(DeployError,))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
