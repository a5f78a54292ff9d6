"""PPO and GRPO learn: the train stage (in-process, tiny LLaVA, CPU) raises the mean reward of a
programmatic reward within a fixed number of steps while the KL to the reference stays
bounded, and logs its RL metrics to MLflow every step.

The reward is `keyword` with keyword "e", counted up to 6 times in a 6-token response. The
tiny model is random (near-uniform over 1,000 BPE tokens), so a reward has to be reachable by
exploring at random: about one sampled token in ten contains an "e" (mean reward ~0.07 at the
start). Both runs are deterministic on one thread; the margins below cover other CPUs.
Observed on the development machine (2 cores, one thread): ppo mean reward 0.077 over the first
five steps -> 0.554 over the last five, KL at most 8.2 nats per response; grpo 0.068 -> 0.622,
KL at most 11.4. Without the KL penalty both reach a reward near 1.0 with KL near 40.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmjobs.config import load_config
from mmjobs.stages.train import TrainStageConfig, main
from tests.integration.train.rl_fixtures import prompt_shards  # noqa: F401
from tests.train_fixtures import stage_settings

pytestmark = pytest.mark.integration

STEPS = 25
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]}
KEYWORD = {"kind": "keyword", "keywords": ["e"], "max_count": 6}
COMMON = {"max_steps": STEPS, "lr": 5e-3, "lr_schedule": "constant", "warmup_ratio": 0.0,
          "per_device_batch_size": 8, "checkpoint_every_steps": 0, "lora": LORA}
MODES = {
    # 8 prompts x 2 responses, 2 epochs of 2 updates per step; fixed KL penalty.
    "ppo": {"mode": "ppo", "rl": {"rollout_batch_size": 8, "num_generations": 2,
                                  "ppo_epochs": 2, "max_new_tokens": 6, "kl_coef": 0.05,
                                  "reward": KEYWORD}},
    # 4 prompts x 8 responses, 4 updates per step; k3 KL in the loss.
    "grpo": {"mode": "grpo", "rl": {"rollout_batch_size": 4, "num_generations": 8,
                                    "max_new_tokens": 6, "kl_coef": 0.2, "reward": KEYWORD}},
}
METRICS = {"ppo": ("reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "value_loss",
                   "clip_fraction", "approx_kl", "entropy", "response_length",
                   "finished_fraction", "loss", "lr", "grad_norm"),
           "grpo": ("reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "kl_k3",
                    "clip_fraction", "entropy", "response_length", "finished_fraction", "loss",
                    "lr", "grad_norm")}


@pytest.fixture(scope="module", params=sorted(MODES))
def trained(request, tmp_path_factory, tiny_llava_dir, prompt_shards):  # noqa: F811
    import torch
    from mlflow import MlflowClient

    mode = request.param
    tmp = tmp_path_factory.mktemp(f"{mode}-learn")
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJOBS_HOME", str(tmp / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            settings = stage_settings(tiny_llava_dir, prompt_shards, str(tmp / "out"),
                                      **COMMON, **MODES[mode])
            result = main(load_config(TrainStageConfig, settings))
        finally:
            torch.set_num_threads(threads)
    client = MlflowClient(tracking)
    history = {key: [m.value for m in sorted(client.get_metric_history(
        result.mlflow_run_id, key), key=lambda m: m.step)] for key in METRICS[mode]}
    return SimpleNamespace(mode=mode, result=result, history=history)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_the_mean_reward_rises_while_the_kl_stays_bounded(trained):
    rewards, kl = trained.history["reward_mean"], trained.history["kl"]
    first, last = _mean(rewards[:5]), _mean(rewards[-5:])
    print(f"{trained.mode}: reward {first:.3f} -> {last:.3f}, max KL {max(kl):.2f}, "
          f"last-5 KL {_mean(kl[-5:]):.2f}")
    assert first < 0.15, rewards  # the untrained policy rarely writes an "e"
    assert last > first + 0.2 and last > 2.5 * first, rewards
    assert kl[0] == 0.0  # the first rollout comes from the reference itself
    assert max(kl) < 15.0, kl  # nats per 6-token response (~40 without the penalty)


def test_every_step_logs_its_rl_metrics(trained):
    for key, values in trained.history.items():
        assert len(values) == STEPS, key
    assert trained.history["response_length"][0] <= 6.0
    assert all(0.0 <= v <= 1.0 for v in trained.history["clip_fraction"])
    assert trained.history["entropy"][0] > 6.0  # near-uniform over ~1,000 tokens at first
    result = trained.result
    assert result.steps == STEPS and result.adapter == result.final + "/adapter"
    if trained.mode == "ppo":
        assert result.value_head == result.final + "/value_head.safetensors"
    else:
        assert result.value_head is None
