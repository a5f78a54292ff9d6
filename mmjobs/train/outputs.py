"""What a training run leaves behind, read back without torch: `final/` and train_info.json,
and the fingerprint of the inputs that made it.

A training output holds `checkpoints/step-N/` and, committed last, `final/` with the trained
parts (`adapter/`, `model/`, `connector/` or `reward_model/`, see `mmjobs.layout`) and
`train_info.json` (steps, losses, eval metrics, and where each part is inside `final/`). The
train stage reads it to answer for a reused result, the multi-node launcher to answer for its
job's; `publish_final` then shows it in MLflow (artifacts, the model registry).
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from mmjobs import storage
from mmjobs.layout import ADAPTER_DIR, CONNECTOR_DIR, MODEL_DIR, REWARD_MODEL_DIR, TRAIN_INFO
from mmjobs.logs import get_logger
from mmjobs.stage_contract import fingerprint, input_fingerprint
from mmjobs.train.methods import RL_MODES, TrainConfig, fingerprinted_settings

log = get_logger(__name__)
PARTS = (ADAPTER_DIR, MODEL_DIR, CONNECTOR_DIR, REWARD_MODEL_DIR)  # the trained parts in final/


if TYPE_CHECKING:
    from mmjobs.config import ModelConfig


def inputs_fingerprint(*versioned: Any, model: ModelConfig, data: str, eval_data: str | None,
                       train: TrainConfig, ptx_data: str | None) -> str:
    """Fingerprint of everything that decides the trained weights (after `versioned`: the
    stage's name and version): the model's settings and contents, the data, the settings."""
    try:
        model_fp = input_fingerprint(model.name_or_path)
    except (storage.StoreError, FileNotFoundError):
        model_fp = model.name_or_path  # a hub id: its name (and revision) is the identity
    # The settings in the shape they had before per-method configs: earlier results and
    # checkpoints stay reusable.
    parts: list[Any] = [*versioned, model.model_dump(mode="json"), model_fp,
                        input_fingerprint(data),
                        input_fingerprint(eval_data) if eval_data else None,
                        fingerprinted_settings(train)]
    if train.mode in RL_MODES:  # what the rewards and the ptx loss are computed from
        reward_model = train.rl.reward.model
        parts += [input_fingerprint(reward_model) if reward_model else None,
                  input_fingerprint(ptx_data) if ptx_data else None]
    return fingerprint(*parts)


class TrainingPreempted(Exception):
    """SIGTERM arrived; a checkpoint was committed at `step` and training stopped."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"preempted (SIGTERM): checkpoint step-{step} committed at "
                         f"{checkpoint}; re-run the same command to resume")
        self.step, self.checkpoint = step, checkpoint


def read_train_info(final: str, *, strict: bool = True) -> dict[str, Any]:
    """train_info.json of a committed `final/`, with `parts`: each trained part's URI.

    Raises (with `strict`; else an empty info): `storage.StoreError` if it cannot be read,
    `ValueError` if it is not JSON.
    """
    info: dict[str, Any] = {}
    with contextlib.suppress(*(() if strict else (storage.StoreError, ValueError))):
        info = json.loads(storage.read_text(storage.join(final, TRAIN_INFO)))
    info["parts"] = {k: storage.join(final, v) for k, v in (info.get("outputs") or {}).items()}
    return info


def log_final_model(run: Any, final: str, *, name: str, fingerprint: str, parts: Any,
                    train: TrainConfig) -> None:
    """Record `final/` as an MLflow logged model of the run (an entry pointing at the store
    URI: nothing is uploaded), typed by what was trained (`parts`: the trained parts found in
    final/) and carrying the training settings as its params."""
    kind = next((p for p in ("adapter", "connector", "reward_model", "model") if p in parts),
                "model")
    run.log_model(name=name, uri=final, fingerprint=fingerprint, model_type=kind,
                  params=train.model_dump(mode="json"))


def publish_final(run: Any, final: str, *, log_artifacts: bool,
                  registered_model_name: str | None) -> None:
    """Record `final/` in the MLflow run: its URI as a param, optionally a copy as artifacts
    (local stores only: large models belong in the store) and a new version of a registered
    model. The registry is optional; a failure there is a warning, never a failed stage."""
    run.log_params({"train.final_uri": final})
    if log_artifacts and not storage.is_s3(final):
        run.log_artifact(storage.parse(final).key, artifact_path=None)
    elif log_artifacts:
        log.warning("log_model_artifacts: final/ is in S3 (%s); not copying it into MLflow",
                    final)
    if registered_model_name and run.run_id:
        try:
            from mlflow import MlflowClient

            from mmjobs import settings

            client = MlflowClient(settings.tracking_uri())
            with contextlib.suppress(Exception):  # already exists
                client.create_registered_model(registered_model_name)
            version = client.create_model_version(registered_model_name, source=final,
                                                  run_id=run.run_id)
            run.set_tags({"registered_model": f"{registered_model_name}/{version.version}"})
            log.info("registered %s as %s version %s", final, registered_model_name,
                     version.version)
        except Exception as e:  # the registry is optional; the result is in the store
            log.warning("could not register %s as %s: %s", final, registered_model_name, e)
