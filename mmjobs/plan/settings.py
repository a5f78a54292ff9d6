"""What `mmjobs plan` reads from a training step's settings, in one place.

A train step's config is a `train:` mapping validated by the train stage. The planner needs a
handful of its values (mode, what trains, batch, sequence length, precision, ZeRO stage, the
extra models of dpo/ppo/grpo); `train_settings` reads them into a `TrainSettings`, the only
place that knows how the training config is shaped (one class per `train.mode`,
`mmjobs.train.methods`: fields a mode does not have are read with `getattr` defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmjobs.train.methods import train_config

PREFERENCE_MODES = ("dpo", "rm")
RL_MODES = ("ppo", "grpo")


@dataclass(frozen=True)
class TrainSettings:
    """The training settings a plan depends on.

    Attributes:
        mode: align, sft, dpo, rm, ppo or grpo.
        finetune: `full`, `lora`, or `connector` (align trains the connector alone).
        lora_r: adapter rank (LoRA only).
        lora_targets: module-name suffixes that get adapters (LoRA only).
        frozen: `{vision_tower, connector, language_model}` -> frozen?
        per_device_batch_size: micro-batch per GPU: samples (sft/align), pairs (dpo/rm),
            responses (ppo/grpo updates).
        grad_accum: micro-batches per optimizer step.
        max_length: train.max_length, or None (the pretokenized card's).
        gradient_checkpointing, deepspeed, mixed_precision: as in the recipe.
        reference: the frozen reference of dpo/ppo/grpo: `implicit_lora` (the base weights with
            the adapters off: no memory), `frozen_copy` (a second copy of the weights), None.
        reward_model: ppo/grpo score with a reward model (a third copy of the weights).
        separate_critic: ppo's critic is a trained copy of the reward model
            (`rl.critic: reward_model`), not a value head on the actor.
        rollout_sequences: ppo/grpo responses sampled per GPU and step.
        max_new_tokens: ppo/grpo longest sampled response.
        ppo_epochs: ppo/grpo passes over each step's responses.
        ptx: ppo/grpo mix an SFT micro-batch into every update.
        config: the validated training config (what `prepare_for_training` takes).
    """

    mode: str
    finetune: str
    lora_r: int
    lora_targets: tuple[str, ...]
    frozen: dict[str, bool]
    per_device_batch_size: int
    grad_accum: int
    max_length: int | None
    gradient_checkpointing: bool
    deepspeed: str
    mixed_precision: str
    reference: str | None = None
    reward_model: bool = False
    separate_critic: bool = False
    rollout_sequences: int = 0
    max_new_tokens: int = 0
    ppo_epochs: int = 0
    ptx: bool = False
    config: Any = field(default=None, compare=False, repr=False)

    @property
    def sequences_per_micro_batch(self) -> int:
        """Sequences one forward pass sees: a dpo/rm pair is two (chosen, rejected)."""
        return self.per_device_batch_size * (2 if self.mode in PREFERENCE_MODES else 1)


def _validated(train: Mapping[str, Any]) -> Any:
    """The step's `train:` mapping as the train stage validates it."""
    return train_config(dict(train))


def train_settings(train: Mapping[str, Any]) -> TrainSettings:
    """`TrainSettings` of a train step's `train:` mapping (already validated by the pipeline
    build; raises pydantic's ValidationError otherwise)."""
    cfg = _validated(train)
    mode = cfg.mode
    if mode == "align":  # the connector trains alone (mmjobs.train.model_setup)
        frozen = {"vision_tower": True, "connector": False, "language_model": True}
        finetune = "connector"
    else:
        frozen = {"vision_tower": bool(getattr(cfg, "freeze_vision_tower", True)),
                  "connector": bool(getattr(cfg, "freeze_connector", None)),
                  "language_model": bool(getattr(cfg, "freeze_language_model", None))}
        finetune = getattr(cfg, "finetune", "lora")
    lora = getattr(cfg, "lora", None)
    rl = getattr(cfg, "rl", None) if mode in RL_MODES else None
    reference = None
    if mode == "dpo":
        reference = cfg.preference.reference
    elif rl is not None:
        reference = rl.reference_kind(finetune)
    return TrainSettings(
        mode=mode, finetune=finetune,
        lora_r=int(lora.r) if lora is not None else 0,
        lora_targets=tuple(lora.target_modules) if lora is not None and finetune == "lora"
        else (),
        frozen=frozen, per_device_batch_size=int(cfg.per_device_batch_size),
        grad_accum=int(cfg.grad_accum), max_length=cfg.max_length,
        gradient_checkpointing=bool(cfg.gradient_checkpointing), deepspeed=cfg.deepspeed,
        mixed_precision=cfg.mixed_precision, reference=reference,
        reward_model=rl is not None and rl.reward.kind == "model",
        separate_critic=mode == "ppo" and rl.critic == "reward_model",
        rollout_sequences=rl.rollout_batch_size * rl.num_generations if rl else 0,
        max_new_tokens=rl.max_new_tokens if rl else 0, ppo_epochs=rl.ppo_epochs if rl else 0,
        ptx=rl is not None and rl.ptx_coef > 0, config=cfg)
