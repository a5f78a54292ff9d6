"""What ppo and grpo share: rollout sampling, the KL to a reference, the reward, ptx.

One train step = sample `num_generations` responses to each of `rollout_batch_size` prompts
per process, score them, then `ppo_epochs` passes over those responses in optimizer updates of
`per_device_batch_size` x `grad_accum` responses per process (`mmjobs.train.rl.RLRecipe`).
Defaults follow Align-Anything's PPO config (configs/train/text_image_to_text_image/ppo.yaml,
the seed's framework) where it has the setting, TRL's otherwise. The method-specific settings
are in `mmjobs.train.methods.ppo` and `.grpo`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from mmjobs.config_base import StrictModel
from mmjobs.train.methods.common import FineTuneBase, Problems


class RewardConfig(StrictModel):
    """Where the reward of a PPO/GRPO response comes from (train.rl.reward).

    kind `model` scores with a reward model trained by the train stage (mode rm); `length` and
    `keyword` are programmatic rewards in [0, 1] for simple tasks and tests (see
    `mmjobs.train.rollouts`).
    """

    kind: Literal["model", "length", "keyword"] = Field(
        "model", description="model: a reward model export (`model`); length: 1 inside "
        "[min_length, max_length] `unit`s, falling linearly to 0 at `tolerance` units outside; "
        "keyword: min(occurrences of `keywords`, max_count) / max_count.")
    model: str | None = Field(
        None, description="kind model: URI of a reward model export (a train stage's final/ or "
        "final/reward_model from mode rm; loaded with load_reward_model). It scores the "
        "policy's own tokens, so it must share the policy's tokenizer (same base model family).")
    unit: Literal["tokens", "words", "chars"] = Field(
        "words", description="kind length: what is counted in the response (tokens before the "
        "end-of-sequence token, whitespace-separated words, or characters).")
    min_length: int = Field(1, ge=0, description="kind length: shortest length rewarded 1.")
    max_length: int = Field(64, ge=0, description="kind length: longest length rewarded 1.")
    tolerance: float = Field(16.0, gt=0, description="kind length: distance outside the range "
                             "at which the reward reaches 0.")
    keywords: list[str] = Field(default_factory=list, description="kind keyword: strings "
                                "counted in the response text (every occurrence counts).")
    max_count: int = Field(1, ge=1, description="kind keyword: occurrences that earn the full "
                           "reward (1: any occurrence).")
    ignore_case: bool = Field(True, description="kind keyword: match case-insensitively.")
    clip: float | None = Field(
        50.0, gt=0, description="Clip scores to [-clip, clip] before use (Align-Anything's "
        "clip_range_score, 50.0); null: no clipping.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtract this from the score of responses that reached "
        "max_new_tokens without ending (TRL's missing_eos_penalty); null: no penalty.")

    @model_validator(mode="after")
    def _range(self) -> RewardConfig:
        if self.min_length > self.max_length:
            raise PydanticCustomError(
                "length_range", "min_length {lo} is above max_length {hi}; swap them",
                {"lo": self.min_length, "hi": self.max_length})
        return self

    def problems(self) -> Problems:
        """Combinations of the reward settings, as `(setting, message)` relative to `rl`."""
        problems = []
        if self.kind == "model" and not self.model:
            problems.append(("reward.model", "kind model needs the URI of a reward model export "
                             "(train.mode rm's final/); or use kind length or keyword"))
        if self.kind != "model" and self.model:
            problems.append(("reward.model", f"is set but rl.reward.kind is {self.kind}; "
                             "remove one of them"))
        if self.kind == "keyword" and not any(self.keywords):
            problems.append(("reward.keywords", "kind keyword needs at least one non-empty "
                             "keyword"))
        return problems


class RLBase(StrictModel):
    """Rollout settings ppo and grpo share (train.rl)."""

    rollout_batch_size: int = Field(
        4, gt=0, description="Prompts per process per step (Align-Anything: "
        "per_device_prompt_batch_size). rollout_batch_size x num_generations must be a "
        "multiple of per_device_batch_size x grad_accum.")
    max_new_tokens: int = Field(128, gt=0, description="Longest response sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (Align-Anything: "
                               "1.0); log-probs are taken at the same temperature. Sampling "
                               "is from the full distribution (no top-k/top-p truncation).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's responses "
                            "(Align-Anything: update_iters 1).")
    clip_range: float = Field(0.2, gt=0, lt=1, description="Clip of the policy ratio, "
                              "1 +- clip_range (Align-Anything: clip_range_ratio 0.2).")
    target_kl: float | None = Field(
        None, gt=0, description="Adaptive KL control (Ziegler et al. 2019): kl_coef is adjusted "
        "every step towards this KL per response (nats); null: fixed kl_coef.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL: responses over which the "
                            "coefficient may change by up to 20%.")
    reference: Literal["auto", "implicit_lora", "frozen_copy"] = Field(
        "auto", description="Reference policy for the KL penalty: implicit_lora uses the base "
        "weights with the LoRA adapters switched off (no second copy), frozen_copy loads a "
        "whole (also under ZeRO-3) "
        "frozen copy of the base model; auto: implicit_lora for finetune lora, else "
        "frozen_copy.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward settings.")
    ptx_coef: float = Field(
        0.0, ge=0, description="Weight of a next-token loss on SFT data (the train stage's "
        "ptx_data) mixed into every update, to keep the model's pre-RL skills (InstructGPT's "
        "PPO-ptx; Align-Anything: ptx_coeff 16.0 when ptx data is given). 0: off.")
    # Each method declares these two with its own default.
    num_generations: int
    kl_coef: float

    def reference_kind(self, finetune: str) -> str:
        """`implicit_lora` or `frozen_copy` (resolves `auto`)."""
        if self.reference != "auto":
            return self.reference
        return "implicit_lora" if finetune == "lora" else "frozen_copy"


class RLTrainBase(FineTuneBase):
    """What a ppo or grpo config checks about its rollouts, updates and reference."""

    rl: RLBase

    def problems(self) -> Problems:
        problems = super().problems() + self.packed_problem("prompts")
        rl = self.rl
        per_step = rl.rollout_batch_size * rl.num_generations
        per_update = self.per_device_batch_size * self.grad_accum
        if per_step % per_update:
            problems.append(("rl.rollout_batch_size", f"rollout_batch_size x num_generations "
                             f"= {per_step} responses per step is not a multiple of "
                             f"per_device_batch_size x grad_accum = {per_update} responses per "
                             "optimizer update; change one of them"))
        reference = rl.reference_kind(self.finetune)
        if reference == "implicit_lora" and self.finetune != "lora":
            problems.append(("rl.reference", "implicit_lora needs finetune: lora (the reference "
                             "is the base weights with the adapters off); use frozen_copy or "
                             "auto"))
        problems += [(f"rl.{path}", message) for path, message in rl.reward.problems()]
        return problems
