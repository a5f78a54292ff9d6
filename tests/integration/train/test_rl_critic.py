"""ppo with Align-Anything's critic (`rl.critic: reward_model`) on the tiny Chameleon, as the
chameleon-interleaved recipe runs it: the actor starts from the base model, the critic is a
separate model initialised from the reward model (not the actor, not the base) and trained
at its own learning rate and schedule; after a step the two models' weights differ; a run
killed after a checkpoint resumes to the same actor and critic, bit for bit.

The reward model here is the base with its decoder weights moved and a random value head, so
"initialised from the reward model" is told apart from "a copy of the base"."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mmjobs.config import ModelConfig, load_config
from mmjobs.stages.train import TrainStageConfig, main
from mmjobs.train.methods import RmConfig
from tests.fixtures_models import tiny_chameleon_dir  # noqa: F401
from tests.integration.train.rl_fixtures import build_prompt_shards, prompt_records
from tests.train_fixtures import (
    assert_tensors_equal,
    kill_then_resume,
    read_tensors,
    stage_settings,
)

pytestmark = pytest.mark.integration

STEPS = 10
ACTOR_LR, CRITIC_LR = 1e-3, 3e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chameleon_dir) -> SimpleNamespace:  # noqa: F811
    """Prompt shards and a reward model export that is not the base model."""
    from mmjobs.models.builder import load_model
    from mmjobs.train.reward_model import RewardModel, export_reward_model

    tmp = tmp_path_factory.mktemp("critic")
    shards = build_prompt_shards(tmp, tiny_chameleon_dir, prompt_records(4), "cham")
    spec = ModelConfig(name_or_path=str(tiny_chameleon_dir))
    loaded = load_model(spec, for_training=False)
    torch.manual_seed(0)
    with torch.no_grad():  # "trained": every decoder weight moved
        for name, param in loaded.model.named_parameters():
            if ".layers." in name:
                param.add_(0.05 * torch.randn_like(param))
    export_reward_model(RewardModel(loaded.model), None, RmConfig(finetune="full"),
                        tmp / "rm", base_model=spec, processor=loaded.processor,
                        source_dir=loaded.model_dir, meta={"max_length": 256})
    return SimpleNamespace(tmp=tmp, shards=shards, rm=str(tmp / "rm"))


def _settings(model_dir: Path, setup: SimpleNamespace, out: Path, *, warmup_ratio: float = 0.1,
              **train) -> dict:
    return stage_settings(
        model_dir, setup.shards, str(out), mode="ppo", finetune="full", lr=ACTOR_LR,
        lr_schedule="cosine", warmup_ratio=warmup_ratio, per_device_batch_size=2,
        checkpoint_every_steps=2, keep_last_checkpoints=1,
        rl={"rollout_batch_size": 2, "max_new_tokens": 6, "critic": "reward_model",
            "critic_lr": CRITIC_LR, "critic_lr_schedule": "constant",
            "reward": {"kind": "model", "model": setup.rm}}, **train)


def _decoder(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()
            if k.startswith(prefix) and ".layers." in k}


def test_the_critic_starts_as_the_reward_model_and_parts_from_the_actor(
        setup, tiny_chameleon_dir, one_thread):  # noqa: F811
    from mmjobs.train.rl import RLRecipe
    from mmjobs.train.schedules import schedule_factor

    # Two steps of one update each, no warmup: both groups move from the first update.
    cfg = load_config(TrainStageConfig, _settings(tiny_chameleon_dir, setup,
                                                  setup.tmp / "inproc", max_steps=2,
                                                  warmup_ratio=0.0))
    recipe = RLRecipe(model=cfg.model, data=cfg.data, train=cfg.train, output=cfg.output,
                      fingerprint="critic-test", resume=False)
    recipe.setup()
    try:
        policy = recipe.accelerator.unwrap_model(recipe.model)
        assert policy.critic is not None and policy.value_head is None
        actor = {k: v.detach().clone() for k, v in policy.vlm.state_dict().items()}
        critic = {k: v.detach().clone() for k, v in policy.critic.state_dict().items()}
        rm = read_tensors(Path(setup.rm) / "reward_model")
        base = read_tensors(tiny_chameleon_dir)
        # Initialised from the reward model: its decoder and value head, not the base's.
        rm_model = {k.split(":", 1)[1]: v for k, v in rm.items() if k.startswith("model/")}
        for name, value in _decoder(critic, "vlm.").items():
            assert torch.equal(value.float(), rm_model[name].float()), name
        assert torch.equal(critic["value_head.weight"], rm["value_head.safetensors:weight"])
        base_model = {k.split(":", 1)[1]: v for k, v in base.items()}
        assert all(torch.equal(v.float(), base_model[k].float())
                   for k, v in _decoder(actor, "").items())  # the actor: the base
        # Its own optimizer groups (lr, weight decay) and schedule.
        groups = {g["name"]: g for g in recipe.optimizer.param_groups}
        assert groups["critic."]["weight_decay"] == 0.0
        critic_ids = {id(p) for p in policy.critic.parameters()}
        assert {id(p) for p in groups["critic."]["params"]} <= critic_ids
        assert not critic_ids & {id(p) for p in groups["default"]["params"]}
        steps = recipe._scheduler_steps()
        constant = schedule_factor("constant", num_training_steps=steps, warmup_ratio=0.0)
        cosine = schedule_factor("cosine", num_training_steps=steps, warmup_ratio=0.0)

        recipe.train()
        after_actor = _decoder(policy.vlm.state_dict(), "")
        after_critic = _decoder(policy.critic.state_dict(), "vlm.")
        moved = [k for k, v in after_critic.items() if not torch.equal(v, critic["vlm." + k])]
        assert moved, "the critic did not train"
        assert any(not torch.equal(v, actor[k]) for k, v in after_actor.items())
        # Separate models: after a step no decoder weight of the two is the same tensor value.
        same = [k for k, v in after_actor.items() if torch.equal(v, after_critic[k])]
        assert not same, same[:3]
        # Each its own schedule: after the updates, the critic's constant, the actor's cosine.
        done = recipe.scheduler.last_epoch
        lrs = {g["name"]: g["lr"] for g in recipe.optimizer.param_groups}
        assert lrs["critic."] == pytest.approx(CRITIC_LR * constant(done))
        assert lrs["default"] == pytest.approx(ACTOR_LR * cosine(done))
    finally:
        recipe.cleanup()


@pytest.fixture(scope="module")
def reference(setup, tiny_chameleon_dir) -> dict[str, torch.Tensor]:  # noqa: F811
    """An uninterrupted run's final actor and critic (in-process, one thread)."""
    out = setup.tmp / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJOBS_HOME", str(setup.tmp / "home-ref"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{setup.tmp / 'ref.db'}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = main(load_config(TrainStageConfig, _settings(
                tiny_chameleon_dir, setup, out, max_steps=STEPS)))
        finally:
            torch.set_num_threads(threads)
    assert result.critic == result.final + "/critic/reward_model"
    return read_tensors(out / "final")


def test_actor_and_critic_resume_bit_exactly(setup, tiny_chameleon_dir, reference,  # noqa: F811
                                             tmp_path):
    from mmjobs.train.reward_model import load_reward_model

    out = tmp_path / "out"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_settings(tiny_chameleon_dir, setup, out,
                                               max_steps=STEPS)))
    killed_at, resumed = kill_then_resume(config, str(out), tmp_path)
    assert resumed >= killed_at > 0
    tensors = read_tensors(out / "final")
    assert any(k.startswith("critic/reward_model/model/") for k in tensors)
    assert any(k.startswith("model/") for k in tensors)
    assert "value_head.safetensors:weight" not in tensors  # no head on the actor
    assert_tensors_equal(tensors, reference)
    # The exported critic is a reward model the train stage can score with.
    critic = load_reward_model(str(out / "final" / "critic"))
    assert critic.value_head.weight.shape[0] == 1
