"""`mmjobs stage train` in ppo and grpo modes as a subprocess: SIGKILL after a committed
checkpoint, resume, and end bit-identical to an uninterrupted run.

Rollouts are sampled from each rank's torch RNG, which checkpoints save, so the resumed run
samples the responses the killed one would have; the data position (prompts and ptx data),
optimizer, schedule, value head and KL coefficient are restored too. ppo runs the full
wiring of the chameleon-interleaved recipe's RL stage on the tiny LLaVA: its reward comes from
a reward model trained by the train stage in rm mode (LoRA, `final/` passed as
`train.rl.reward.model`), the adaptive KL controller is on and SFT data is mixed in (ptx).
grpo uses a programmatic reward.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmjobs import storage
from mmjobs.config import load_config
from mmjobs.stages.train import TrainStageConfig, main
from tests.integration.train.rl_fixtures import prompt_shards  # noqa: F401
from tests.train_fixtures import (
    assert_tensors_equal,
    kill_then_resume,
    read_tensors,
    stage_settings,
)

pytestmark = pytest.mark.integration

STEPS = 24
TRAIN = {"max_steps": STEPS, "per_device_batch_size": 4, "grad_accum": 2, "lr": 5e-3,
         "checkpoint_every_steps": 3, "keep_last_checkpoints": 2,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
MODES = {
    "ppo": {"mode": "ppo", "rl": {"rollout_batch_size": 4, "num_generations": 2,
                                  "ppo_epochs": 2, "max_new_tokens": 5, "target_kl": 1.0,
                                  "kl_horizon": 64, "ptx_coef": 0.5,
                                  "reward": {"kind": "model"}}},
    "grpo": {"mode": "grpo", "rl": {"rollout_batch_size": 2, "num_generations": 4,
                                    "max_new_tokens": 5,
                                    "reward": {"kind": "keyword", "keywords": ["e"],
                                               "max_count": 5}}},
}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_llava_dir, rm_shards) -> str:
    """A LoRA reward model from the train stage (rm mode, a few steps): its final/ URI."""
    tmp = tmp_path_factory.mktemp("rm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJOBS_HOME", str(tmp / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        result = main(load_config(TrainStageConfig, stage_settings(
            tiny_llava_dir, rm_shards[0], str(tmp / "out"), mode="rm", max_steps=3)))
    return result.final


def _settings(mode: str, model_dir: Path, prompts: str, sft_shards: str, reward_model: str,
              out: str) -> dict:
    cfg = stage_settings(model_dir, prompts, out, **TRAIN, **MODES[mode])
    if mode == "ppo":
        cfg["train"]["rl"]["reward"]["model"] = reward_model
        cfg["ptx_data"] = sft_shards
    return cfg


@pytest.fixture(scope="module", params=sorted(MODES))
def reference(request, tmp_path_factory, tiny_llava_dir, prompt_shards,  # noqa: F811
              chart_shards, reward_model):
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
            result = main(load_config(TrainStageConfig, _settings(
                mode, tiny_llava_dir, prompt_shards, chart_shards, reward_model,
                str(tmp / "out"))))
        finally:
            torch.set_num_threads(threads)
    return SimpleNamespace(mode=mode, result=result, tensors=read_tensors(result.final),
                           tracking=f"sqlite:///{tmp / 'mlflow.db'}")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llava_dir,
                                                          prompt_shards,  # noqa: F811
                                                          chart_shards, reward_model,
                                                          reference):
    out = str(tmp_path / "out")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_settings(reference.mode, tiny_llava_dir, prompt_shards,
                                               chart_shards, reward_model, out)))
    killed_at, resumed = kill_then_resume(config, out, tmp_path)
    assert resumed >= killed_at > 0
    tensors = read_tensors(Path(out) / "final")
    if reference.mode == "ppo":
        assert "value_head.safetensors:weight" in tensors
    assert any("lora_A" in k for k in tensors)
    assert_tensors_equal(tensors, reference.tensors)


def test_the_checkpoint_holds_the_rl_state(reference):
    from mlflow import MlflowClient

    state = storage.join(reference.result.checkpoints, f"step-{STEPS - 3}")
    files = {f.path for f in storage.read_manifest(state).files}
    assert {"rl_state.json", "ranks/rank-0/rng.pt", "ranks/rank-0/loader.json"} <= files
    client = MlflowClient(reference.tracking)
    kl_coef = [m.value for m in sorted(client.get_metric_history(
        reference.result.mlflow_run_id, "kl_coef"), key=lambda m: m.step)]
    assert len(kl_coef) == STEPS
    if reference.mode == "ppo":
        assert "ranks/rank-0/ptx_loader.json" in files
        assert len(set(kl_coef)) > 1  # adaptive: the coefficient moved
        ptx = client.get_metric_history(reference.result.mlflow_run_id, "ptx_loss")
        assert len(ptx) == STEPS and all(m.value > 0 for m in ptx)
    else:
        assert set(kl_coef) == {0.01}  # grpo's default beta, fixed
