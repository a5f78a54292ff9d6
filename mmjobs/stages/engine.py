"""Stage `engine`: start, stop or clean up the serving engine a pipeline evaluates through.

    python -m mmjobs.stages.engine --set action=up --set label=trained \\
        --set model=s3://mmjobs/store/chart-demo/run-1/merge \\
        --set image=vllm/vllm-openai:v0.11.0 --set fetch_image=ghcr.io/mmjobs/mmjobs-eval:0.1.0

Pipelines add these steps when the recipe sets `eval.engine` (see `pipelines/engines.py`):
`engine-up-<label>` before the infer steps of model `<label>` (its output, the engine's /v1
URL, is their `endpoint.url`), `engine-down-<label>` after them, also when one fails, and
`engine-cleanup` as the exit handler of the eval steps: it deletes every engine of the run
still there, whatever happened (an engine that never got ready, a cancelled step).

On a cluster (`local: false`) `up` creates the engine's Deployment + Service
(`mmjobs.serve.engine_k8s`: an init container copies the model from the store, the engine
image serves it) and waits until `ready_path` answers, failing with the pods' reasons (a
crash loop quotes the engine's log tail). `down` deletes them; `cleanup` deletes every engine
labelled with this run. Both are idempotent. Engines are named per run and model
(`mmjobs-engine-<label>-<hash>`), so concurrent runs never share or delete each other's.

Locally (`mmjobs run`, `local: true`) `mmjobs serve` on 127.0.0.1 stands in for the engine
(`mmjobs.serve.engine_local`): the infer steps still answer through the endpoint.

The service account needs create/get/patch/list/delete on deployments and services and list
on pods: the chart's runner Role grants them with `serve.pipelineDeploy=true`.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field, model_validator

from mmjobs import kube
from mmjobs.logs import get_logger
from mmjobs.serve import engine_k8s, engine_local
from mmjobs.serve.engine_k8s import EnginePlacement
from mmjobs.serve.engine_pod import engine_name, run_key
from mmjobs.serve.rollout import DeployError
from mmjobs.stage_contract import Input, Stage, StageConfig, StageResult

NAME = "engine"
log = get_logger(__name__)


class EngineStageConfig(StageConfig, EnginePlacement):
    """Start (`up`), stop (`down`) or clean up (`cleanup`) a pipeline's serving engine."""

    action: Literal["up", "down", "cleanup"] = Field(description="up: start and wait until "
                                                     "ready; down: delete this model's "
                                                     "engine; cleanup: every engine of the run.")
    label: str = Field("model", min_length=1, description="Which evaluated model's engine "
                       "(names it, with the experiment and run).")
    model: str | None = Field(None, description="up: the merged model (committed dir).")
    local: bool = Field(False, description="Run `mmjobs serve` on 127.0.0.1 instead "
                        "(`mmjobs run`: no cluster).")
    namespace: str | None = Field(None, description="Namespace; default the pod's own, else "
                                  "$MMJOBS_NAMESPACE.")
    poll_s: float = Field(5.0, gt=0, description="Seconds between status reads.")

    @model_validator(mode="after")
    def _model_for_up(self) -> EngineStageConfig:
        if self.action == "up" and not self.model:
            raise ValueError("action=up needs `model`, the model the engine serves")
        return self


class EngineResult(StageResult):
    """`output`: the engine's /v1 URL (up), else what was deleted, comma-separated."""

    name: str | None = None
    model_name: str | None = None
    deleted: list[str] = Field(default_factory=list)


def main(cfg: EngineStageConfig, *, api: Any = None) -> EngineResult:
    """Run the action; see the module docstring.

    Args:
        api: a kubernetes `ApiClient` (default: in-cluster config, else kubeconfig).

    Raises:
        DeployError: the API refused, or the engine did not become ready (the pods' reasons).
        LocalEngineError: the local stand-in did not start (its log tail).
    """
    run = run_key(cfg.experiment, cfg.pipeline_run_id)
    name = engine_name(cfg.experiment, cfg.pipeline_run_id, cfg.label)
    if cfg.local:
        return _local(cfg, name, run)
    namespace = cfg.namespace or kube.current_namespace()
    if not namespace:
        raise DeployError(f"no namespace: set `namespace` ({kube.NAMESPACE_FILE} is missing and "
                          f"{kube.NAMESPACE_ENV} is not set)")
    try:
        client = kube.api_client(api)
    except kube.KubeAccessError as e:
        raise DeployError(str(e)) from None
    if cfg.action == "up":
        assert cfg.model  # the config refuses up without it
        notes = {"mmjobs.io/experiment": cfg.experiment, "mmjobs.io/model": cfg.model,
                 "mmjobs.io/pipeline-run-id": cfg.pipeline_run_id}
        address = engine_k8s.start(cfg, client, name=name, namespace=namespace, run=run,
                                   model=cfg.model, annotations=notes, poll_s=cfg.poll_s)
        log.info("engine %s/%s: ready at %s (model %s)", namespace, name, address,
                 cfg.served_model_name)
        return EngineResult(output=address, name=name, model_name=cfg.served_model_name)
    if cfg.action == "down":
        deleted = engine_k8s.delete(client, name=name, namespace=namespace)
    else:
        deleted = engine_k8s.delete_run(client, namespace=namespace, run=run)
    log.info("engine %s: deleted %s", name if cfg.action == "down" else f"run {run}",
             ", ".join(deleted) or "nothing (already gone)")
    return EngineResult(output=",".join(deleted), name=name, deleted=deleted)


def _local(cfg: EngineStageConfig, name: str, run: str) -> EngineResult:
    if cfg.action == "up":
        assert cfg.model
        address = engine_local.start(name, cfg.model, served_name=cfg.served_model_name,
                                     serve=cfg.local_serve, timeout_s=cfg.startup_timeout_s,
                                     run=run)
        return EngineResult(output=address, name=name, model_name=cfg.served_model_name)
    stopped = ([name] if engine_local.stop(name) else []) if cfg.action == "down" else \
        engine_local.stop_all(run=run)
    return EngineResult(output=",".join(stopped), name=name, deleted=stopped)


# A light launcher (the engine runs its own image); no output of its own.
STAGE = Stage(name=NAME, config=EngineStageConfig, result=EngineResult, main=main,
              image="data", own_output=False, inputs=(Input("model", default=""),),
              errors=(DeployError, engine_local.LocalEngineError))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
