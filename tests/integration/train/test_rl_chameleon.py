"""ppo on the tiny Chameleon as the chameleon-interleaved recipe runs it: prompt shards with the
images as VQ tokens, full fine-tuning with a frozen reference copy, a reward model on the same
base. The frozen reference is loaded the way the policy is (image-code tokens scorable), so the
KL of the first rollout — sampled by the untrained policy — is exactly 0 and stays finite."""

from __future__ import annotations

import math

import pytest
import torch

from mmjobs.config import ModelConfig, load_config
from mmjobs.stages.train import TrainStageConfig, main
from mmjobs.train.methods import RmConfig
from tests.fixtures_models import tiny_chameleon_dir  # noqa: F401
from tests.integration.train.rl_fixtures import build_prompt_shards, prompt_records
from tests.train_fixtures import stage_settings

pytestmark = pytest.mark.integration


def test_ppo_with_a_reward_model_on_chameleon(tmp_path, tiny_chameleon_dir,  # noqa: F811
                                              one_thread):
    from mlflow import MlflowClient

    from mmjobs import settings
    from mmjobs.models.builder import load_model
    from mmjobs.train.reward_model import RewardModel, export_reward_model

    shards = build_prompt_shards(tmp_path, tiny_chameleon_dir, prompt_records(4), "cham")
    spec = ModelConfig(name_or_path=str(tiny_chameleon_dir))
    loaded = load_model(spec, for_training=False)
    torch.manual_seed(0)
    export_reward_model(RewardModel(loaded.model), None, RmConfig(finetune="full"),
                        tmp_path / "rm", base_model=spec, processor=loaded.processor,
                        source_dir=loaded.model_dir, meta={"max_length": 256})
    result = main(load_config(TrainStageConfig, stage_settings(
        tiny_chameleon_dir, shards, str(tmp_path / "out"), mode="ppo", finetune="full",
        lr=1e-4, max_steps=3, per_device_batch_size=2, checkpoint_every_steps=2,
        rl={"rollout_batch_size": 2, "max_new_tokens": 8,
            "reward": {"kind": "model", "model": str(tmp_path / "rm")}})))
    assert result.model == result.final + "/model"
    assert result.value_head == result.final + "/value_head.safetensors"
    client = MlflowClient(settings.tracking_uri())
    history = {k: [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, k),
                                           key=lambda m: m.step)]
               for k in ("kl", "loss", "reward_mean", "value_loss")}
    assert history["kl"][0] == 0.0
    for key, values in history.items():
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (key, values)
