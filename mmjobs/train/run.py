"""One training run from start to committed `final/`: pick the recipe for the mode, set it
up, train, save, clean up, and log the summary.

    summary, outputs = run_training(model=..., data=..., eval_data=None, train=SftConfig(),
                                    output=OUT, fingerprint=FP, resume=True, run=mlflow_run)

The train stage calls this around its output handling (reuse, tracking, publishing); ppo and
grpo run `mmjobs.train.rl.RLRecipe`, every other mode `mmjobs.train.trainer.TrainRecipe`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mmjobs import storage
from mmjobs.config import ConfigError
from mmjobs.layout import SHARDS_CARD
from mmjobs.train.methods import RL_MODES, TrainConfig
from mmjobs.train.outputs import TrainingPreempted

if TYPE_CHECKING:
    from mmjobs.config import ModelConfig
    from mmjobs.train.trainer import TrainSummary


def run_training(*, model: ModelConfig, data: str, eval_data: str | None, train: TrainConfig,
                 output: str, fingerprint: str, resume: bool, run: Any,
                 ptx_data: str | None = None, about: dict[str, Any] | None = None
                 ) -> tuple[TrainSummary, dict[str, str]]:
    """Train to a committed `{output}/final/` and log the summary's metrics to `run`.

    `about` (recipe, experiment, pipeline run) goes into the model cards in `final/`.

    Returns:
        (the run's `TrainSummary`, `save_final`'s URIs: `final` and the trained parts).

    Raises:
        TrainingPreempted: SIGTERM stopped training after committing a checkpoint (the run is
            tagged with the step and ended KILLED).
    """
    from mmjobs.train.trainer import TrainRecipe

    common = {"model": model, "data": data, "eval_data": eval_data, "train": train,
              "output": output, "fingerprint": fingerprint, "resume": resume, "run": run,
              "about": about}
    if train.mode in RL_MODES:
        from mmjobs.train.rl import RLRecipe

        recipe: TrainRecipe = RLRecipe(ptx_data=ptx_data, **common)
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
    return summary, outputs


def check_data_kind(mode: str, data: str, card: dict[str, Any], eval_data: str | None) -> None:
    """Preference modes train on pair shards, ppo/grpo on prompt shards, the others on
    conversation shards.

    Raises:
        ConfigError: naming the data URI whose shards do not fit the mode.
    """
    want = {"dpo": "preference", "rm": "preference", "ppo": "prompt",
            "grpo": "prompt"}.get(mode, "sample")
    kinds = [(data, card.get("kind", "sample"))]
    if eval_data is not None:
        eval_card = json.loads(storage.read_text(storage.join(eval_data, SHARDS_CARD)))
        kinds.append((eval_data, eval_card.get("kind", "sample")))
    how = {"preference": "prepare a preference dataset (canonical-preference, preference) and "
                         "pretokenize it",
           "prompt": "prepare a prompt-only dataset (canonical-prompt, prompt-only) and "
                     "pretokenize it"}.get(want, "pretokenize a conversation dataset")
    errors = [f"{uri} holds {kind} shards but train.mode {mode} trains on {want} shards; {how}"
              for uri, kind in kinds if kind != want]
    if errors:
        raise ConfigError("train stage data", errors)
