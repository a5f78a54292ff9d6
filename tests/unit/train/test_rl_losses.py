"""PPO and GRPO numerics: GAE against its definition, the clipped losses, the GRPO loss against
TRL's on the same batch, programmatic rewards, KL control, and the rl config checks."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmjobs.config import ConfigError, RewardConfig, TrainConfig, load_config
from mmjobs.train.grpo import group_advantages, grpo_token_losses
from mmjobs.train.ppo import (
    AdaptiveKLController,
    gae,
    kl_penalized_rewards,
    ppo_losses,
    whiten,
)
from mmjobs.train.rollouts import KeywordReward, LengthReward, Rollout, final_scores
from tests.train_fixtures import train_settings


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).float()


def test_gae_equals_the_discounted_sum_of_td_errors():
    gen = torch.Generator().manual_seed(0)
    lengths, width, gamma, lam = [5, 2, 7, 1], 7, 0.9, 0.8
    mask = _mask(lengths, width)
    rewards = torch.randn(4, width, generator=gen) * mask
    values = torch.randn(4, width, generator=gen)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        v = [float(values[i, t]) for t in range(n)] + [0.0]  # the episode ends after token n
        deltas = [float(rewards[i, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert float(advantages[i, t]) == pytest.approx(expected, abs=1e-5)
            assert float(returns[i, t]) == pytest.approx(expected + v[t], abs=1e-5)
        assert not advantages[i, n:].any() and not returns[i, n:].any()


def test_token_rewards_are_the_kl_penalty_plus_the_score_on_the_last_token():
    mask = _mask([3, 1], 3)
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, 0.0, 0.0]])
    rewards = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, 0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0],
                                                      [-0.05 - 1.0, 0.0, 0.0]]))


def test_whiten_gives_mean_zero_and_unit_std_on_the_mask():
    mask = _mask([4, 2], 4)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0]])
    out = whiten(values, mask)
    picked = out[mask.bool()]
    assert float(picked.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(picked.std()) == pytest.approx(1.0, abs=1e-4)
    assert not out[~mask.bool()].any()


def test_ppo_losses_clip_the_ratio_and_the_value_update():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = ppo_losses(logps, old, adv, clip_range=0.2, values=torch.tensor([[3.0, 0, 0, 0]]),
                     old_values=torch.zeros(1, 4), returns=torch.tensor([[1.0, 0, 0, 0]]),
                     value_clip_range=0.5)
    # max(-A r, -A clip(r)): r=1.5,A=1 -> -1.2 (clipped); r=0.5,A=-1 -> 0.8 (clipped);
    # r=1.1 inside the range; r=1.5,A=-1 -> 1.5 (pessimistic side is the unclipped one).
    torch.testing.assert_close(out.policy, torch.tensor([[-1.2, 0.8, -1.1, 1.5]]))
    assert out.clipped.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # value: max((3-1)^2, (0 + clip(3, -0.5, 0.5) - 1)^2) / 2 = max(4, 0.25) / 2
    assert float(out.value[0, 0]) == pytest.approx(2.0)
    logps.requires_grad_(True)
    ppo_losses(logps, old, adv, clip_range=0.2).policy.sum().backward()
    assert logps.grad.tolist()[0][:2] == [0.0, 0.0]  # clipped tokens pass no gradient


def test_adaptive_kl_moves_towards_the_target_and_fixed_kl_stays():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    assert ctl.update(4.0, responses=10) == pytest.approx(0.1 * 1.02)  # error clipped at 0.2
    assert ctl.update(1.0, responses=10) == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    assert fixed.update(50.0, responses=1000) == 0.1


def test_group_advantages_are_relative_to_the_prompts_responses():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(scores, 4)
    std = float(torch.tensor([1.0, 0.0, 1.0, 0.0]).std())  # unbiased, as TRL's nanstd
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4))
    assert adv[4:].tolist() == [0.0] * 4  # a group with one score teaches nothing
    torch.testing.assert_close(group_advantages(scores, 4, scale=False)[:4],
                               torch.tensor([0.5, -0.5, 0.5, -0.5]))


def _trl_grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, beta, epsilon):
    """TRL 1.16's `GRPOTrainer._compute_loss` on the batch (loss_type bnpo: the token mean of
    the batch, what ours is for one micro-batch), through a minimal trainer object whose
    log-prob pass returns the batch's log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    vars(trainer).update(
        model=SimpleNamespace(training=True), beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon, loss_type="bnpo", importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, aux_loss_enabled=False,
        use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        accelerator=SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                                    gather_for_metrics=lambda t: t, num_processes=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(
        logps), None)
    n, width = logps.shape
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long),
              "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, width, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages,
              "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps}
    loss = trainer._compute_loss(None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_grpo_loss_equals_trls_on_the_same_batch():
    gen = torch.Generator().manual_seed(1)
    mask = _mask([5, 3, 6, 2], 6)
    old = -torch.rand(4, 6, generator=gen) * 3
    logps = (old + torch.randn(4, 6, generator=gen) * 0.3).requires_grad_(True)
    ref = old + torch.randn(4, 6, generator=gen) * 0.2
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5])
    ours = grpo_token_losses(logps, old, ref, adv, beta=0.04, clip_range=0.2)
    loss = (ours.loss * mask).sum() / mask.sum()
    theirs, metrics = _trl_grpo_loss(logps, old, ref, adv, mask, beta=0.04, epsilon=0.2)
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    assert float((ours.kl * mask).sum() / mask.sum()) == pytest.approx(metrics["kl"], rel=1e-6)
    assert float((ours.clipped * mask).sum() / mask.sum()) == pytest.approx(
        metrics["clip_ratio/region_mean"], rel=1e-6)
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the batch exercises the clip
    ours_grad = torch.autograd.grad(loss, logps, retain_graph=True)[0]
    theirs_grad = torch.autograd.grad(theirs, logps)[0]
    torch.testing.assert_close(ours_grad, theirs_grad)


def _rollout(texts: list[str], lengths: list[int], finished: list[bool]) -> Rollout:
    n, width = len(texts), max(lengths)
    empty = torch.zeros(n, width, dtype=torch.long)
    return Rollout(input_ids=empty, attention_mask=empty, images={},
                   num_images=torch.zeros(n, dtype=torch.long),
                   prompt_lengths=torch.ones(n, dtype=torch.long), positions=empty,
                   response_ids=empty, mask=_mask(lengths, width),
                   finished=torch.tensor(finished), prompt_ids=["p"] * n, texts=texts)


def test_length_and_keyword_rewards():
    ro = _rollout(["one two three", "a b c d e f g h", "", "Verified. verified!"],
                  [4, 9, 1, 6], [True, True, True, False])
    words = LengthReward(RewardConfig(kind="length", unit="words", min_length=2,
                                      max_length=4, tolerance=8))
    assert words(ro).tolist() == [1.0, 0.5, 0.75, 1.0]
    tokens = LengthReward(RewardConfig(kind="length", unit="tokens", min_length=5,
                                       max_length=6, tolerance=4))
    assert tokens.lengths(ro).tolist() == [3.0, 8.0, 0.0, 6.0]  # the end token not counted
    assert tokens(ro).tolist() == [0.5, 0.5, 0.0, 1.0]
    chars = LengthReward(RewardConfig(kind="length", unit="chars", min_length=0,
                                      max_length=13, tolerance=2))
    assert chars(ro).tolist() == [1.0, 0.0, 1.0, 0.0]
    keyword = KeywordReward(RewardConfig(kind="keyword", keywords=["verified"], max_count=2))
    assert keyword(ro).tolist() == [0.0, 0.0, 0.0, 1.0]
    exact = KeywordReward(RewardConfig(kind="keyword", keywords=["verified", "one"],
                                       ignore_case=False, max_count=3))
    assert exact(ro).tolist() == pytest.approx([1 / 3, 0.0, 0.0, 1 / 3])
    scored = final_scores(torch.tensor([100.0, -3.0, 0.5, 1.0]), ro.finished,
                          RewardConfig(clip=2.0, missing_eos_penalty=0.5))
    assert scored.tolist() == [2.0, -2.0, 0.5, 0.5]


def test_rl_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, train_settings(
            mode="grpo", finetune="full", batching="packed", per_device_batch_size=3,
            rl={"num_generations": 1, "rollout_batch_size": 4, "reference": "implicit_lora",
                "reward": {"kind": "model"}}))
    text = str(err.value)
    for needle in ("rl.num_generations", "not a multiple of per_device_batch_size",
                   "implicit_lora needs finetune: lora", "batching: packed",
                   "rl.reward.model"):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="min_length 9 is above max_length 3"):
        load_config(TrainConfig, train_settings(
            mode="ppo", rl={"reward": {"kind": "length", "min_length": 9, "max_length": 3}}))
    keyword = {"kind": "keyword", "keywords": ["x"]}
    cfg = load_config(TrainConfig, train_settings(mode="grpo", per_device_batch_size=8, rl={
        "rollout_batch_size": 2, "reward": keyword}))
    assert (cfg.rl.num_generations, cfg.rl.kl_coef) == (8, 0.01)  # each mode's own defaults
    ppo = load_config(TrainConfig, train_settings(mode="ppo", rl={"reward": keyword}))
    assert (ppo.rl.num_generations, ppo.rl.kl_coef) == (1, 0.02)
    assert cfg.rl.reference_kind("lora") == "implicit_lora"
    assert cfg.rl.reference_kind("full") == "frozen_copy"


def test_the_train_stage_takes_rl_modes_and_ptx_data_only_with_them():
    from mmjobs.stages.train import TrainStageConfig

    base = {"model": {"name_or_path": "m"}, "data": "d", "ptx_data": "s3://b/sft-shards"}
    keyword = {"reward": {"kind": "keyword", "keywords": ["x"]}}
    for mode in ("ppo", "grpo"):
        cfg = load_config(TrainStageConfig, {**base, "train": {"mode": mode, "rl": keyword}})
        assert (cfg.train.mode, cfg.ptx_data) == (mode, "s3://b/sft-shards")
    with pytest.raises(ConfigError, match=r"rl\.reward\.model: kind model needs the URI"):
        load_config(TrainStageConfig, {**base, "train": {"mode": "ppo"}})
    with pytest.raises(ConfigError, match=r"ptx_data is used by train\.mode ppo and grpo only"):
        load_config(TrainStageConfig, {**base, "train": {"mode": "sft"}})


def test_rl_settings_only_fingerprint_the_rl_modes(tmp_path, tiny_llava_dir, fixed_batch_shards):
    from mmjobs.stages.train import TrainStageConfig, train_fingerprint

    def fp(**train) -> str:
        return train_fingerprint(load_config(TrainStageConfig, {
            "model": {"name_or_path": str(tiny_llava_dir)}, "data": fixed_batch_shards,
            "output": str(tmp_path), "train": train_settings(**train)}))

    with pytest.raises(ConfigError, match=r"rl: not a setting of mode sft \(it is for ppo, "
                                          r"grpo\); remove it"):
        fp(rl={"max_new_tokens": 7})  # sft has no rl settings (its results stay reusable)
    keyword = {"kind": "keyword", "keywords": ["x"]}
    assert fp(mode="ppo", rl={"reward": keyword}) != fp(
        mode="ppo", rl={"reward": keyword, "max_new_tokens": 7})
