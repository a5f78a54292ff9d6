"""Stage `train`: align a connector, fine-tune (full / LoRA), DPO, a reward model, PPO or GRPO.

    python -m mmjobs.stages.train --set model.name_or_path=s3://b/models/llava \\
        --set data=s3://b/cache/pretokenized/<fp> --set train.mode=sft --set train.finetune=lora
    torchrun --nproc_per_node 8 -m mmjobs.stages.train --config train.yaml   # DDP / DeepSpeed
    python -m mmjobs.stages.train ... --set data=s3://b/cache/pretokenized/<pairs> \
        --set train.mode=dpo --set train.preference.beta=0.1     # or train.mode=rm
    python -m mmjobs.stages.train ... --set data=s3://b/cache/pretokenized/<prompts> \
        --set train.mode=ppo --set train.rl.reward.model=s3://b/exp/run/rm/final   # or grpo

align and sft train on conversation shards; dpo and rm on preference shards (pretokenize of a
`kind: preference` dataset). rm reports its pairwise accuracy on `eval_data`. ppo and grpo
train on prompt shards (pretokenize of a `kind: prompt` dataset), sampling and scoring
responses as they go (`mmjobs.train.rl`); `ptx_data` (SFT shards) adds a next-token loss.

Outputs under `output` (default `{store}/{experiment}/{pipeline_run_id}/train`):
`checkpoints/step-N/`, resumable state every `train.checkpoint_every_steps` (the newest is
resumed from automatically, `resume: true`; the last `train.keep_last_checkpoints` are kept),
and `final/`, committed last, with what was trained and `train_info.json` (see
`mmjobs.train.outputs`). With `cluster.nodes` > 1 the pipeline step launches this stage as a
multi-node job instead (`launch`, `mmjobs.train.multinode`).

A re-run whose `final/` was made from the same inputs (fingerprint) is a no-op. SIGTERM (pod
preemption) commits a checkpoint at the next step boundary and exits with code 143; running
the same command again resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from pydantic import Field, model_validator

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.config_base import config_problems
from mmjobs.layout import CHECKPOINTS_DIR, FINAL_DIR
from mmjobs.logs import get_logger
from mmjobs.recipe import RecipeConfig
from mmjobs.stage_contract import (
    Input,
    Knob,
    Stage,
    StageConfig,
    StageResult,
    output_uri,
    reusable_output,
    stage_tracking,
)
from mmjobs.train.methods import (
    SftConfig,
    TrainConfig,
    stage_input_problems,
    step_defaults,
    unused_in_steps,
)
from mmjobs.train.outputs import TrainingPreempted, inputs_fingerprint

NAME = "train"
VERSION = 1  # bump when the training semantics change for the same config
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what Kubernetes and shells expect
# TrainResult's fields naming a trained part under final/.
_PARTS = ("adapter", "model", "connector", "reward_model", "value_head", "critic")
log = get_logger(__name__)


class TrainStageConfig(StageConfig):
    """Train a vision-language model on pretokenized shards. train.mode picks the method and
    which train.* settings apply: align (the connector alone), sft (full or LoRA), dpo and rm
    (a reward model) on preference pairs, ppo and grpo on prompts. The settings of each mode:
    README "Training" (mmjobs.train.methods)."""

    model: ModelConfig = Field(description="Base model to train.")
    data: str = Field(description="URI of the pretokenize stage's committed shards.")
    eval_data: str | None = Field(None, description="Pretokenized shards for the eval loss "
                                                    "(train.eval_every_steps and at the end); "
                                                    "for rm also the pairwise accuracy. "
                                                    "Modes align, sft, dpo, rm.")
    ptx_data: str | None = Field(None, description="ppo/grpo: pretokenized SFT shards whose "
                                 "next-token loss is mixed into every update with weight "
                                 "train.rl.ptx_coef (Align-Anything's ptx).")
    train: TrainConfig = Field(default_factory=SftConfig, description="Training settings of "
                               "one mode (train.mode: align, sft, dpo, rm, ppo or grpo; "
                               "default sft).")
    resume: bool = Field(True, description="Continue from the newest committed checkpoint "
                         "under output. false: start over, deleting existing checkpoints.")
    log_model_artifacts: bool = Field(
        False, description="Also copy final/ into MLflow as run artifacts (off by default: "
        "large models belong in the store; its URI is logged as the tag train.final_uri).")
    registered_model_name: str | None = Field(
        None, description="Register final/ as a new version of this MLflow registered model.")

    @model_validator(mode="after")
    def _inputs_for_the_mode(self) -> TrainStageConfig:
        problems = stage_input_problems(self.train, eval_data=self.eval_data,
                                        ptx_data=self.ptx_data)
        if problems:
            raise config_problems(problems)
        return self


class TrainResult(StageResult):
    """Where the trained result is (`output` is the stage folder, `final` the committed
    result) and how training went."""

    final: str
    adapter: str | None = None
    model: str | None = None
    connector: str | None = None
    reward_model: str | None = None
    value_head: str | None = None
    critic: str | None = None  # ppo, rl.critic reward_model: the trained critic (a reward model)
    checkpoints: str
    steps: int
    final_loss: float | None = None
    eval_loss: float | None = None
    eval_metrics: dict[str, float] = Field(default_factory=dict, description="Mean eval stats "
                                           "at the end, e.g. eval_accuracy of a reward model.")
    resumed_from_step: int | None = None
    tokens: int = 0
    seconds: float = 0.0


def train_fingerprint(cfg: TrainStageConfig) -> str:
    """Fingerprint of everything that decides the trained weights."""
    return inputs_fingerprint(NAME, VERSION, model=cfg.model, data=cfg.data,
                              eval_data=cfg.eval_data, train=cfg.train, ptx_data=cfg.ptx_data)


def main(cfg: TrainStageConfig) -> TrainResult:
    """Train (or resume, or reuse a finished result); see the module docstring.

    Raises:
        TrainingPreempted: SIGTERM stopped training after committing a checkpoint.
        ConfigError: bad combinations in `cfg.train`.
    """
    from mmjobs.train.distributed import NullRun, env_dist_info
    from mmjobs.train.outputs import log_final_model, publish_final
    from mmjobs.train.run import run_training

    out = output_uri(cfg, NAME)
    final = storage.join(out, FINAL_DIR)
    fp = train_fingerprint(cfg)
    main_rank = env_dist_info().is_main
    tags = {"train.output": out, "train.final_uri": final, "train.mode": cfg.train.mode}
    tracking = stage_tracking(cfg, NAME, tags=tags) if main_rank else contextlib.nullcontext(
        NullRun())
    with tracking as run:
        manifest = reusable_output(final, fp, cfg.force)
        if manifest is not None:
            run.set_tags({"cached": "true"})
            log.info("train: %s already holds the result for these inputs; nothing to do", final)
            result = _final_result(out, manifest.meta, cached=True, run_id=run.run_id)
            log_final_model(run, final, name=cfg.step or NAME, fingerprint=fp, train=cfg.train,
                            parts=[p for p in _PARTS if getattr(result, p)])
            return result
        summary, outputs = run_training(model=cfg.model, data=cfg.data,
                                        eval_data=cfg.eval_data, train=cfg.train, output=out,
                                        fingerprint=fp, resume=cfg.resume, run=run,
                                        ptx_data=cfg.ptx_data, about=_about(cfg))
        if main_rank:
            publish_final(run, outputs["final"], log_artifacts=cfg.log_model_artifacts,
                          registered_model_name=cfg.registered_model_name)
            log_final_model(run, final, name=cfg.step or NAME, fingerprint=fp, train=cfg.train,
                            parts=[p for p in _PARTS if outputs.get(p)])
        run_id = run.run_id
    return TrainResult(output=out, mlflow_run_id=run_id, final=final,
                       **{part: outputs.get(part) for part in _PARTS},
                       checkpoints=storage.join(out, CHECKPOINTS_DIR), steps=summary.steps,
                       final_loss=summary.final_loss, eval_loss=summary.eval_loss,
                       eval_metrics=summary.eval_metrics or {},
                       resumed_from_step=summary.resumed_from_step, tokens=summary.tokens,
                       seconds=round(summary.seconds, 3))


def _about(cfg: TrainStageConfig) -> dict[str, Any]:
    """What the model cards in final/ say made the model (beyond data and settings)."""
    return {"recipe": cfg.recipe, "experiment": cfg.experiment,
            "pipeline_run": cfg.pipeline_run_id}


def _final_result(out: str, meta: dict[str, Any], *, cached: bool, run_id: str | None = None,
                  launched: bool = False) -> TrainResult:
    """The result of a committed `final/` (reused here, or left by a multi-node job)."""
    from mmjobs.train.outputs import PARTS, read_train_info

    final = storage.join(out, FINAL_DIR)
    info = read_train_info(final, strict=launched)
    parts = {k: v for k, v in info["parts"].items() if k in PARTS or not launched}
    return TrainResult(output=out, cached=cached, mlflow_run_id=run_id, final=final,
                       checkpoints=storage.join(out, CHECKPOINTS_DIR),
                       steps=int(info.get("steps", meta.get("steps", 0))),
                       final_loss=info.get("final_loss"),
                       eval_metrics=info.get("eval_metrics") or {}, **parts)


# --------------------------------------------------------------------------- multi-node


def job_manifest(cfg: TrainStageConfig, **job: Any) -> dict[str, Any]:
    """The TrainJob / PyTorchJob `launch` creates (see `mmjobs.train.multinode.build_manifest`
    for `job`'s keys)."""
    from mmjobs.train.multinode import build_manifest

    return build_manifest(cfg, out=output_uri(cfg, NAME), **job)


def launch(cfg: TrainStageConfig, **job: Any) -> TrainResult:
    """Run this stage as a multi-node job (TrainJob or PyTorchJob) and wait for its result;
    `job`: nodes, gpus_per_node, image, settings, ... of `launch_multinode`."""
    from mmjobs.train.multinode import launch_multinode

    out = output_uri(cfg, NAME)
    try:
        fp = train_fingerprint(cfg)
    except (storage.StoreError, FileNotFoundError) as e:  # the job's stage checks again
        log.warning("train: cannot fingerprint the inputs here (%s); launching anyway", e)
        fp = None
    meta, cached = launch_multinode(cfg, out=out, fingerprint=fp, **job)
    return _final_result(out, meta, cached=cached, launched=True)


def component(cfg: TrainStageConfig, *, metrics: Any = None, nodes: int = 1,
              gpus_per_node: int = 0, image: str = "", launch_json: str = "{}") -> str:
    """The KFP component's body. With nodes > 1 the step launches a Kubeflow Trainer TrainJob
    (`launch_json`: its cluster settings, `mmjobs.train.k8s_jobs.JobSettings`: Secret names,
    never secrets) and follows it; it runs this stage under torchrun on every node. Shows the
    run's final numbers in the KFP UI (`metrics`: a Metrics artifact; the curves are in
    MLflow). Returns the model directory of a full fine-tune, else the training output
    (`final/adapter` or `final/connector` inside: merge, apply-connector and
    build-moe-connector find them)."""
    if nodes > 1:
        result = launch(cfg, nodes=nodes, gpus_per_node=gpus_per_node, image=image,
                        settings=json.loads(launch_json or "{}"))
    else:
        result = main(cfg)
    if metrics is not None:
        for name, value in kfp_metrics(result).items():
            metrics.log_metric(name, value)
    return result.model or result.output


def kfp_metrics(result: TrainResult) -> dict[str, float]:
    """The training run's final numbers as the KFP UI's Metrics show them."""
    values: dict[str, float | int | None] = {
        "steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
        "tokens": result.tokens, "seconds": round(result.seconds, 1),
        "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else None,
        **result.eval_metrics}
    return {name: float(value) for name, value in values.items() if value is not None}


def recipe_defaults(recipe: RecipeConfig, step: str) -> dict[str, Any]:
    """The recipe's `model` (but its name: the pipeline wires the base) and `train` sections."""
    model = recipe.model.model_dump(exclude={"name_or_path"}, exclude_defaults=True)
    return {"model": model, "train": recipe.train.model_dump(mode="json", exclude_defaults=True)}


def recipe_check(recipe: RecipeConfig, steps: dict[str, dict[str, Any]]) -> list[str]:
    """Recipe-level train settings that no train step of the pipeline takes."""
    return unused_in_steps(recipe.train.model_dump(mode="json", exclude_defaults=True), steps)


STAGE = Stage(name=NAME, config=TrainStageConfig, result=TrainResult, main=main, image="train",
              gpu=True, resumable=True, multinode=True,
              inputs=(Input("data"), Input("model", path="model.name_or_path"),
                      Input("ptx_data", default=""),  # ppo/grpo: SFT shards, train.rl.ptx_coef
                      Input("nodes", path=None, type=int, default=1),
                      Input("gpus_per_node", path=None, type=int, default=0),
                      Input("image", path=None, default=""),
                      Input("launch_json", path=None, default="{}")),
              outputs={"metrics": "Metrics", "trained": "Model"},
              component=component, recipe_defaults=recipe_defaults,
              step_defaults=step_defaults, recipe_check=recipe_check,
              # SIGTERM committed a checkpoint: Kubernetes restarts or reschedules the pod.
              exit_codes={TrainingPreempted: EXIT_PREEMPTED},
              knobs=(Knob("train.lr", float, description="Peak learning rate."),
                     Knob("train.epochs", float, description="Passes over the data."),
                     Knob("train.max_steps", int, description="Stop after this many "
                          "optimizer steps; -1: train for `epochs`.")))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
