"""`mmjobs stage train` in dpo and rm modes as a subprocess: SIGKILL after a committed
checkpoint, resume, and end bit-identical to an uninterrupted run; step metrics in MLflow.

Same recipe as the SFT kill test (`test_train_resume.py`): LoRA dropout and gradient
accumulation on, many epochs, one thread, so RNG streams, data position, optimizer, schedule
and (rm) the value head must all be restored exactly.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmjobs.config import load_config
from mmjobs.stages.train import TrainStageConfig, main
from mmjobs.train.preference import DPO_STATS
from mmjobs.train.reward_model import RM_STATS
from tests.train_fixtures import (
    assert_tensors_equal,
    kill_then_resume,
    read_tensors,
    stage_settings,
)

pytestmark = pytest.mark.integration

STEPS = 24
TRAIN = {"max_steps": STEPS, "per_device_batch_size": 2, "grad_accum": 2,
         "checkpoint_every_steps": 3, "keep_last_checkpoints": 2,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
MODES = {"dpo": {"mode": "dpo", "preference": {"beta": 0.2, "label_smoothing": 0.1}},
         "rm": {"mode": "rm", "preference": {"rm_center_rewards_coef": 0.01}}}


def _settings(mode: str, model_dir: Path, dpo_shards: str, rm_shards: tuple[str, str],
              out: str) -> dict:
    data = dpo_shards if mode == "dpo" else rm_shards[0]
    cfg = stage_settings(model_dir, data, out, **TRAIN, **MODES[mode])
    if mode == "rm":
        cfg["eval_data"] = rm_shards[1]
    return cfg


@pytest.fixture(scope="module", params=sorted(MODES))
def reference(request, tmp_path_factory, tiny_llava_dir, dpo_shards, rm_shards):
    """One uninterrupted run per mode (in-process, one thread, its own home and MLflow db)."""
    import torch

    mode = request.param
    tmp = tmp_path_factory.mktemp(f"{mode}-ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJOBS_HOME", str(tmp / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg = load_config(TrainStageConfig, _settings(
                mode, tiny_llava_dir, dpo_shards, rm_shards, str(tmp / "out")))
            result = main(cfg)
        finally:
            torch.set_num_threads(threads)
    final = result.reward_model if mode == "rm" else result.adapter
    return SimpleNamespace(mode=mode, result=result, tensors=read_tensors(final),
                           tracking=f"sqlite:///{tmp / 'mlflow.db'}")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llava_dir, dpo_shards,
                                                          rm_shards, reference):
    out = str(tmp_path / "out")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_settings(reference.mode, tiny_llava_dir, dpo_shards,
                                               rm_shards, out)))
    killed_at, resumed = kill_then_resume(config, out, tmp_path)
    assert resumed >= killed_at > 0
    final = Path(out) / "final" / ("reward_model" if reference.mode == "rm" else "adapter")
    tensors = read_tensors(final)
    if reference.mode == "rm":
        assert "value_head.safetensors:weight" in tensors
    assert_tensors_equal(tensors, reference.tensors)


def test_the_run_logs_its_preference_metrics_to_mlflow(reference):
    from mlflow import MlflowClient

    client = MlflowClient(reference.tracking)
    run_id = reference.result.mlflow_run_id
    stats = DPO_STATS if reference.mode == "dpo" else RM_STATS
    for key in ("loss", "lr", "grad_norm", *stats):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), key
    if reference.mode == "rm":
        assert reference.result.reward_model == reference.result.final + "/reward_model"
        accuracy = client.get_metric_history(run_id, "eval_accuracy")
        assert [m.step for m in accuracy] == [STEPS]
        assert reference.result.eval_metrics["eval_accuracy"] == pytest.approx(
            accuracy[0].value)
        assert client.get_metric_history(run_id, "final_eval_accuracy")
    else:
        assert reference.result.adapter == reference.result.final + "/adapter"
        assert client.get_run(run_id).data.tags["train.mode"] == "dpo"
