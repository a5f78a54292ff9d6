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
- `checkpoints/step-N/` — resumable state every `train.checkpoint_every_steps`, committed with
  a manifest; the newest is resumed from automatically (`resume: true`), the last
  `train.keep_last_checkpoints` are kept;
- `final/` — committed last: `adapter/` (LoRA, peft format, with the connector when it
  trained), `model/` (full fine-tune, with the processor), `connector/` (align;
  `mmjobs.train.moe.save_connector` format) or `reward_model/` (rm; see
  `mmjobs.train.reward_model`, loaded with `load_reward_model`), plus `train_info.json`; ppo
  adds the critic's `value_head.safetensors` next to the policy's adapter/ or model/.

A re-run whose `final/` was made from the same inputs (fingerprint) is a no-op. SIGTERM (pod
preemption) commits a checkpoint at the next step boundary and exits with code 143; running
the same command again resumes from it.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

from pydantic import Field, model_validator

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.config_base import config_problems
from mmjobs.logs import get_logger
from mmjobs.stages.common import (
    StageConfig,
    StageResult,
    fingerprint,
    input_fingerprint,
    output_uri,
    reusable_output,
    stage_cli,
    stage_tracking,
)
from mmjobs.train.methods import (
    RL_MODES,
    SftConfig,
    TrainConfig,
    fingerprinted_settings,
    stage_input_problems,
)

STAGE = "train"
VERSION = 1  # bump when the training semantics change for the same config
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what Kubernetes and shells expect
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
    try:
        model_fp = input_fingerprint(cfg.model.name_or_path)
    except (storage.StoreError, FileNotFoundError):
        model_fp = cfg.model.name_or_path  # a hub id: its name (and revision) is the identity
    # The settings in the shape they had before per-method configs: earlier results and
    # checkpoints stay reusable.
    parts: list[Any] = [STAGE, VERSION, cfg.model.model_dump(mode="json"), model_fp,
                        input_fingerprint(cfg.data),
                        input_fingerprint(cfg.eval_data) if cfg.eval_data else None,
                        fingerprinted_settings(cfg.train)]
    if cfg.train.mode in RL_MODES:  # what the rewards and the ptx loss are computed from
        reward_model = cfg.train.rl.reward.model
        parts += [input_fingerprint(reward_model) if reward_model else None,
                  input_fingerprint(cfg.ptx_data) if cfg.ptx_data else None]
    return fingerprint(*parts)


def main(cfg: TrainStageConfig) -> TrainResult:
    """Train (or resume, or reuse a finished result); see the module docstring.

    Raises:
        TrainingPreempted: SIGTERM stopped training after committing a checkpoint.
        ConfigError: bad combinations in `cfg.train`.
    """
    from mmjobs.train.checkpoint import CHECKPOINTS_DIR, TrainingPreempted
    from mmjobs.train.distributed import NullRun, env_dist_info
    from mmjobs.train.trainer import FINAL_DIR, TrainRecipe

    out = output_uri(cfg, STAGE)
    final = storage.join(out, FINAL_DIR)
    fp = train_fingerprint(cfg)
    main_rank = env_dist_info().is_main
    tags = {"train.output": out, "train.final_uri": final, "train.mode": cfg.train.mode}
    tracking = stage_tracking(cfg, STAGE, tags=tags) if main_rank else contextlib.nullcontext(
        NullRun())
    with tracking as run:
        manifest = reusable_output(final, fp, cfg.force)
        if manifest is not None:
            run.set_tags({"cached": "true"})
            return _cached_result(out, final, manifest.meta, run.run_id)
        common = {"model": cfg.model, "data": cfg.data, "eval_data": cfg.eval_data,
                  "train": cfg.train, "output": out, "fingerprint": fp, "resume": cfg.resume,
                  "run": run}
        if cfg.train.mode in RL_MODES:
            from mmjobs.train.rl import RLRecipe

            recipe: TrainRecipe = RLRecipe(ptx_data=cfg.ptx_data, **common)
        else:
            recipe = TrainRecipe(**common)
        try:
            recipe.setup()
            summary = recipe.train()
            outputs = recipe.save_final()
        except TrainingPreempted as e:
            run.set_tags({"preempted_at_step": e.step})
            run.end("KILLED")
            raise
        finally:
            recipe.cleanup()
        run.log_metrics({"final_loss": summary.final_loss or 0.0, "train_steps": summary.steps,
                         "train_seconds": summary.seconds, "train_tokens": summary.tokens,
                         **({"final_eval_loss": summary.eval_loss}
                            if summary.eval_loss is not None else {}),
                         **{f"final_{k}": v for k, v in (summary.eval_metrics or {}).items()}},
                        step=summary.steps)
        if main_rank:
            _log_outputs(cfg, run, outputs)
        run_id = run.run_id
    return TrainResult(output=out, mlflow_run_id=run_id, final=final,
                       adapter=outputs.get("adapter"), model=outputs.get("model"),
                       connector=outputs.get("connector"),
                       reward_model=outputs.get("reward_model"),
                       value_head=outputs.get("value_head"),
                       checkpoints=storage.join(out, CHECKPOINTS_DIR), steps=summary.steps,
                       final_loss=summary.final_loss, eval_loss=summary.eval_loss,
                       eval_metrics=summary.eval_metrics or {},
                       resumed_from_step=summary.resumed_from_step, tokens=summary.tokens,
                       seconds=round(summary.seconds, 3))


def _log_outputs(cfg: TrainStageConfig, run: Any, outputs: dict[str, str]) -> None:
    """Artifacts and model registration (optional; tracking never fails the stage)."""
    final = outputs["final"]
    run.log_params({"train.final_uri": final})
    if cfg.log_model_artifacts and not storage.is_s3(final):
        run.log_artifact(storage.parse(final).key, artifact_path=None)
    elif cfg.log_model_artifacts:
        log.warning("log_model_artifacts: final/ is in S3 (%s); not copying it into MLflow",
                    final)
    if cfg.registered_model_name and run.run_id:
        try:
            from mlflow import MlflowClient

            from mmjobs import settings

            client = MlflowClient(settings.tracking_uri())
            with contextlib.suppress(Exception):  # already exists
                client.create_registered_model(cfg.registered_model_name)
            version = client.create_model_version(cfg.registered_model_name, source=final,
                                                  run_id=run.run_id)
            run.set_tags({"registered_model": f"{cfg.registered_model_name}/{version.version}"})
            log.info("registered %s as %s version %s", final, cfg.registered_model_name,
                     version.version)
        except Exception as e:  # the registry is optional; the result is in the store
            log.warning("could not register %s as %s: %s", final, cfg.registered_model_name, e)


def _cached_result(out: str, final: str, meta: dict[str, Any], run_id: str | None) -> TrainResult:
    from mmjobs.train.checkpoint import CHECKPOINTS_DIR
    from mmjobs.train.trainer import INFO_FILE

    info = {}
    with contextlib.suppress(storage.StoreError, ValueError):
        import json

        info = json.loads(storage.read_text(storage.join(final, INFO_FILE)))
    parts = {k: storage.join(final, v) for k, v in info.get("outputs", {}).items()}
    log.info("train: %s already holds the result for these inputs; nothing to do", final)
    return TrainResult(output=out, cached=True, mlflow_run_id=run_id, final=final,
                       checkpoints=storage.join(out, CHECKPOINTS_DIR),
                       steps=int(info.get("steps", meta.get("steps", 0))),
                       final_loss=info.get("final_loss"),
                       eval_metrics=info.get("eval_metrics") or {}, **parts)


def cli(argv: list[str] | None = None) -> int:
    """`python -m mmjobs.stages.train` / `mmjobs stage train` (the image entrypoint).

    Exits 143 after a SIGTERM checkpoint (Kubernetes then restarts or reschedules the pod),
    2 on config errors.
    """
    from mmjobs.config import ConfigError
    from mmjobs.train.checkpoint import TrainingPreempted
    from mmjobs.train.distributed import env_dist_info

    # Under torchrun every rank runs this; only rank 0 prints the result line the pipeline
    # component reads.
    quiet = contextlib.redirect_stdout(io.StringIO()) if not env_dist_info().is_main else \
        contextlib.nullcontext()
    try:
        with quiet:
            return stage_cli(STAGE, TrainStageConfig, main, argv)
    except TrainingPreempted as e:
        log.warning("train: %s", e)
        return EXIT_PREEMPTED
    except ConfigError as e:  # combinations found once the data and model are known
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
