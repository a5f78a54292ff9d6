"""`mode: grpo` — group relative policy optimisation: no critic, on prompts.

Each response's advantage is its score relative to the other responses to the same prompt;
the k3 estimate of the KL to the reference is added to the loss (`mmjobs.train.grpo`), run by
`mmjobs.train.rl.RLRecipe`; export: the policy as sft exports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.train.methods.common import Problems
from mmjobs.train.methods.rl import RLBase, RLTrainBase


class GrpoRL(RLBase):
    """GRPO's rollout, advantage and KL settings (train.rl in mode grpo)."""

    num_generations: int = Field(
        8, ge=1, description="Responses sampled per prompt, at least 2: the advantages compare "
        "the responses to one prompt (Align-Anything's GRPO uses 10).")
    kl_coef: float = Field(
        0.01, ge=0, description="Weight of the k3 KL estimate to the reference policy added to "
        "the loss (Align-Anything's GRPO beta 0.01). The start value when target_kl is set.")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std "
                                "(TRL scale_rewards=group; false = Dr. GRPO).")


class GrpoConfig(RLTrainBase):
    """grpo: sample groups of responses to prompts, score them against each other (GRPO)."""

    mode: Literal["grpo"] = Field("grpo", description="GRPO on prompts (no critic).")
    rl: GrpoRL = Field(default_factory=GrpoRL, description="Rollouts, groups, KL and reward.")

    def problems(self) -> Problems:
        problems = super().problems()
        if self.rl.num_generations < 2:
            problems.insert(0, ("rl.num_generations", "grpo compares responses to the same "
                                "prompt, so it needs at least 2; use 4 or more"))
        return problems
