"""`mode: ppo` — proximal policy optimisation with a critic, on prompts.

Actor: the policy (LoRA or full). Critic (`rl.critic`): `value_head`, a value head on the
actor's backbone (TRL's layout: one forward pass, the value loss weighted by `vf_coef`), or
`reward_model`, a separate model initialised from the reward model `rl.reward.model` and
trained in full at its own learning rate (Align-Anything's layout:
align_anything/trainers/text_image_to_text_image/ppo.py loads `reward_critic_model_name_or_path`
with a value head; configs/train/text_image_to_text_image/ppo.yaml gives it `critic_lr` 5e-6,
a constant schedule and no weight decay). Token rewards are KL-penalised, advantages come from
GAE over the critic's values (`mmjobs.train.ppo`), run by `mmjobs.train.rl.RLRecipe`; export:
the policy as sft exports it, plus `final/value_head.safetensors` (value_head) or
`final/critic/reward_model/` (reward_model, loadable with `load_reward_model`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.train.methods.common import Problems
from mmjobs.train.methods.rl import RLBase, RLTrainBase

# The critic's schedules: those that are one factor per step whatever the group's peak lr
# (mmjobs.train.schedules.schedule_factor), so actor and critic share one LambdaLR.
CriticSchedule = Literal["constant", "cosine", "linear"]
VF_COEF_DEFAULT = 0.1


class PpoRL(RLBase):
    """PPO's rollout, critic and KL settings (train.rl in mode ppo)."""

    num_generations: int = Field(1, ge=1, description="Responses sampled per prompt.")
    kl_coef: float = Field(
        0.02, ge=0, description="Weight of the KL penalty to the reference policy: kl_coef x "
        "(log pi - log pi_ref) is subtracted from each token's reward (Align-Anything "
        "kl_coeff 0.02). The start value when target_kl is set.")
    value_clip_range: float = Field(5.0, gt=0, description="Clip of value updates around "
                                    "the rollout's values (Align-Anything: clip_range_value).")
    vf_coef: float = Field(VF_COEF_DEFAULT, ge=0, description="critic value_head: weight of "
                           "the value loss; the critic shares the policy's backbone, so this "
                           "balances it against the policy loss (TRL: 0.1). Not used by "
                           "critic reward_model, whose parameters only the value loss reaches.")
    critic: Literal["value_head", "reward_model"] = Field(
        "value_head", description="value_head: a zero-initialised Linear(hidden, 1) on the "
        "actor's final hidden states (one backbone); reward_model: a separate critic model, a "
        "copy of the reward model rl.reward.model (its VLM and value head; a LoRA reward "
        "model is merged first) trained in full next to the actor (Align-Anything's "
        "reward_critic; frozen parts as train.freeze_* say).")
    critic_lr: float | None = Field(
        None, gt=0, description="critic reward_model: peak learning rate of the critic "
        "(Align-Anything: critic_lr 5e-6); null: train.lr.")
    critic_lr_schedule: CriticSchedule = Field(
        "constant", description="critic reward_model: the critic's schedule after the "
        "train.warmup_ratio warmup (Align-Anything: critic_lr_scheduler_type constant).")
    critic_weight_decay: float = Field(
        0.0, ge=0, description="critic reward_model: AdamW weight decay of the critic "
        "(Align-Anything: critic_weight_decay 0.0).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (Align-Anything: 1.0).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Align-Anything: "
                       "gae_lambda 0.95).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 "
                                    "over each step's responses.")


class PpoConfig(RLTrainBase):
    """ppo: sample responses to prompts, score them, update actor and critic (PPO)."""

    mode: Literal["ppo"] = Field("ppo", description="PPO with a value head on prompts.")
    rl: PpoRL = Field(default_factory=PpoRL, description="Rollouts, critic, KL and reward.")

    def problems(self) -> Problems:
        problems = super().problems()
        rl = self.rl
        if rl.critic == "reward_model":
            if rl.reward.kind != "model":
                problems.append(("rl.critic", "reward_model initialises the critic from the "
                                 f"reward model, but rl.reward.kind is {rl.reward.kind}; use "
                                 "critic: value_head, or a reward model (kind: model)"))
            if rl.vf_coef != VF_COEF_DEFAULT:
                problems.append(("rl.vf_coef", "weights the shared value head's loss; critic "
                                 "reward_model trains a separate model at rl.critic_lr "
                                 "instead; remove vf_coef"))
        return problems
