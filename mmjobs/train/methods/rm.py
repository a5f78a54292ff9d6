"""`mode: rm` — a reward model: the VLM plus a scalar value head, trained on preference pairs.

Objective: `mmjobs.train.reward_model.RewardObjective` (Bradley-Terry, optionally centred
(TRL) or L2-regularised (Align-Anything));
export: `final/reward_model/` (`mmjobs.train.reward_model.export_reward_model`), which ppo and
grpo score with (`train.rl.reward.model`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.config_base import StrictModel
from mmjobs.train.methods.common import EvalPass, FineTuneBase, Problems


class RmPreference(StrictModel):
    """The reward model's loss (train.preference in mode rm)."""

    rm_center_rewards_coef: float = Field(
        0.0, ge=0, description="Weight of a penalty on (r_chosen + r_rejected)^2 that keeps "
        "rewards centred on 0 (TRL's center_rewards_coefficient, e.g. 0.01); 0 = plain "
        "Bradley-Terry.")
    rm_regularization: float = Field(
        0.0, ge=0, description="Weight of an L2 penalty on the rewards themselves: the mean "
        "of r_chosen^2 and r_rejected^2 over the pairs (Align-Anything's rm.yaml "
        "`regularization`, 0.001 in its configs: align_anything/trainers/text_to_text/rm.py "
        "adds regularization * stack([r_rejected, r_chosen]).square().mean()); 0 = off.")


class RmConfig(EvalPass, FineTuneBase):
    """rm: train a reward model (VLM + scalar head) on preference pairs; its eval pass reports
    the pairwise accuracy."""

    mode: Literal["rm"] = Field("rm", description="Reward model training.")
    preference: RmPreference = Field(default_factory=RmPreference,
                                     description="The reward model's loss.")

    def problems(self) -> Problems:
        return super().problems() + self.packed_problem("preference pairs")
