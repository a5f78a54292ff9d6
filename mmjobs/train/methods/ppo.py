"""`mode: ppo` — proximal policy optimisation with a critic, on prompts.

Actor: the policy (LoRA or full); critic: a value head on the same backbone. Token rewards are
KL-penalised, advantages come from GAE over the critic's values (`mmjobs.train.ppo`), run by
`mmjobs.train.rl.RLRecipe`; export: the policy as sft exports it, plus
`final/value_head.safetensors`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.train.methods.rl import RLBase, RLTrainBase


class PpoRL(RLBase):
    """PPO's rollout, critic and KL settings (train.rl in mode ppo)."""

    num_generations: int = Field(1, ge=1, description="Responses sampled per prompt.")
    kl_coef: float = Field(
        0.02, ge=0, description="Weight of the KL penalty to the reference policy: kl_coef x "
        "(log pi - log pi_ref) is subtracted from each token's reward (Align-Anything "
        "kl_coeff 0.02). The start value when target_kl is set.")
    value_clip_range: float = Field(5.0, gt=0, description="Clip of value updates around "
                                    "the rollout's values (Align-Anything: clip_range_value).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss; the critic "
                           "shares the policy's backbone, so this balances it against the "
                           "policy loss (TRL: 0.1).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (Align-Anything: 1.0).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Align-Anything: "
                       "gae_lambda 0.95).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 "
                                    "over each step's responses.")


class PpoConfig(RLTrainBase):
    """ppo: sample responses to prompts, score them, update actor and critic (PPO)."""

    mode: Literal["ppo"] = Field("ppo", description="PPO with a value head on prompts.")
    rl: PpoRL = Field(default_factory=PpoRL, description="Rollouts, critic, KL and reward.")
