"""Typed recipe configs (pydantic v2): YAML loading, dotted ``--set`` overrides, dumping.

A recipe is one YAML file (``pipelines/recipes/*.yaml``) validated by `RecipeConfig`. Loading
reports every problem at once in a `ConfigError` (unknown keys with suggestions, bad values,
missing fields, credentials in the file), for the file and the overrides together.

Example::

    cfg = load_recipe("pipelines/recipes/chart-demo.yaml", ["train.lr=2e-5"])
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mmjobs.config_cluster import (
    ClusterConfig,
    ImagesConfig,
    SecretNames,
    StageResources,
)
from mmjobs.config_errors import (
    ConfigError,
    StrictModel,
    apply_override,
    parse_override,
    read_yaml,
    validation_errors,
)

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ImagesConfig",
    "LayerDropoutConfig",
    "LoraConfig",
    "ModelConfig",
    "PreferenceConfig",
    "RLConfig",
    "RecipeConfig",
    "RewardConfig",
    "SecretNames",
    "StageResources",
    "StrictModel",
    "TrainConfig",
    "dump_recipe",
    "flatten",
    "load_config",
    "load_recipe",
    "validate_main",
]

M = TypeVar("M", bound=BaseModel)
# Recipe names end up in Kubernetes and KFP object names, which must be DNS-1123 labels.
_KEBAB = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

SourceFormat = Literal[
    "llava", "chartmoe", "aihub-chart", "chart-align", "scienceqa", "dataengine",
    "preference", "prompt-only", "synthetic-charts", "canonical",
]  # fmt: skip


class ModelConfig(StrictModel):
    """Which model to load and how."""

    name_or_path: str = Field(
        description="Local directory, s3:// prefix in the store, or a Hugging Face hub id."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped with the checkpoint. Off unless a recipe sets it; "
        "InternLM-XComposer2 needs it.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; 'auto' uses the checkpoint's (float32 on CPU)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; flash_attention_2 needs a GPU image."
    )


class DataConfig(StrictModel):
    """Where the training data comes from and how it is cut."""

    source_format: SourceFormat = Field(
        description="Format of the raw input, converted to the canonical format by `prepare`."
    )
    input: str | None = Field(None, description="Raw data location: local path or s3:// URI.")
    max_length: int = Field(2048, gt=0, description="Token budget per sample (text + image).")
    max_reject_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fail `prepare` if more than this fraction of samples is malformed.",
    )


class LoraConfig(StrictModel):
    """LoRA adapter settings (used when train.finetune is 'lora')."""

    r: int = Field(8, gt=0, description="Adapter rank; higher adds capacity and memory.")
    alpha: int = Field(16, gt=0, description="Scaling numerator; effective scale is alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (suffixes) that get adapters. Only modules inside parts "
        "that are not frozen get them (the vision tower's q/k/v_proj stay untouched while "
        "freeze_vision_tower is on).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapters, e.g. the projector. The "
        "connector is added automatically unless train.freeze_connector is true.",
    )


DropoutScheduleKind = Literal[
    "constant", "increasing", "decreasing", "increasing_geometric", "decreasing_geometric",
]  # fmt: skip


class LayerDropoutConfig(StrictModel):
    """Per-decoder-layer LoRA dropout (the LaVIN study's Inc./Dec. Drop. Prob schedules).

    Give a `preset` (the study's rows) or a `kind` with its parameters; see
    `mmjobs.train.dropout_schedules.layer_dropout_values` for the formulas.
    """

    preset: Literal["inc", "inc_v2", "dec", "dec_v2"] | None = Field(
        None, description="One of the LaVIN rows (inc: p=0.1 x1.01 up to 0.2, inc_v2: x1.03, "
        "dec: p=0.2 x0.99 down to 0.1, dec_v2: x0.97). Excludes `kind`.")
    kind: DropoutScheduleKind | None = Field(
        None, description="constant (p), increasing/decreasing (linear p_min..p_max over the "
        "depth), increasing_geometric/decreasing_geometric (p * factor**i held at limit).")
    p: float | None = Field(None, ge=0, lt=1, description="Base probability (constant, "
                            "geometric kinds).")
    p_min: float | None = Field(None, ge=0, lt=1, description="Lowest probability (linear).")
    p_max: float | None = Field(None, ge=0, lt=1, description="Highest probability (linear).")
    factor: float | None = Field(None, gt=0, description="Per-layer multiplier (geometric).")
    limit: float | None = Field(None, ge=0, lt=1, description="Ceiling/floor (geometric).")

    @model_validator(mode="after")
    def _preset_or_kind(self) -> LayerDropoutConfig:
        if (self.preset is None) == (self.kind is None):
            raise PydanticCustomError(
                "preset_or_kind", "give exactly one of `preset` (inc, inc_v2, dec, dec_v2) or "
                "`kind` with its parameters")
        return self


class PreferenceConfig(StrictModel):
    """Preference training (train.mode dpo or rm); ignored by the other modes."""

    beta: float = Field(
        0.1, gt=0, description="DPO: strength of the pull towards the reference model; higher "
        "keeps the policy closer to it (IPO: the regularisation tau). 0.1 is the usual start.")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="DPO loss: sigmoid (the DPO paper; with label_smoothing > 0 "
        "conservative DPO) or ipo (squared loss on per-token log-ratio differences, TRL's "
        "length-normalised form).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO (sigmoid loss only): the assumed "
        "probability that a preference label is flipped. 0 = plain DPO.")
    reference: Literal["implicit_lora", "frozen_copy"] = Field(
        "implicit_lora", description="DPO reference model: implicit_lora computes reference "
        "log-probs with the LoRA adapters disabled (the base weights; no second copy in "
        "memory; needs finetune: lora); frozen_copy loads a second, frozen copy of the base "
        "model (needed for finetune: full; doubles the weight memory).")
    rm_center_rewards_coef: float = Field(
        0.0, ge=0, description="Reward model: weight of a penalty on (r_chosen + r_rejected)^2 "
        "that keeps rewards centred on 0 (TRL's center_rewards_coefficient, e.g. 0.01); "
        "0 = plain Bradley-Terry.")


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


class RLConfig(StrictModel):
    """Rollout-based training (train.mode ppo or grpo); ignored by the other modes.

    One train step = sample `num_generations` responses to each of `rollout_batch_size`
    prompts per process, score them, then `ppo_epochs` passes over those responses in
    optimizer updates of `per_device_batch_size` x `grad_accum` responses per process. Defaults
    follow Align-Anything's PPO config (configs/train/text_image_to_text_image/ppo.yaml, the
    seed's framework) where it has the setting, TRL's otherwise. See `mmjobs.train.rl`.
    """

    rollout_batch_size: int = Field(
        4, gt=0, description="Prompts per process per step (Align-Anything: "
        "per_device_prompt_batch_size). rollout_batch_size x num_generations must be a "
        "multiple of per_device_batch_size x grad_accum.")
    num_generations: int | None = Field(
        None, ge=1, description="Responses sampled per prompt. null: 1 for ppo, 8 for grpo "
        "(grpo needs >= 2: its advantages compare the responses to one prompt; Align-Anything's "
        "GRPO uses 10).")
    max_new_tokens: int = Field(128, gt=0, description="Longest response sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (Align-Anything: "
                               "1.0); log-probs are taken at the same temperature. Sampling "
                               "is from the full distribution (no top-k/top-p truncation).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's responses "
                            "(Align-Anything: update_iters 1).")
    clip_range: float = Field(0.2, gt=0, lt=1, description="Clip of the policy ratio, "
                              "1 +- clip_range (Align-Anything: clip_range_ratio 0.2).")
    value_clip_range: float = Field(5.0, gt=0, description="ppo: clip of value updates around "
                                    "the rollout's values (Align-Anything: clip_range_value).")
    vf_coef: float = Field(0.1, ge=0, description="ppo: weight of the value loss; the critic "
                           "shares the policy's backbone, so this balances it against the "
                           "policy loss (TRL: 0.1).")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount (Align-Anything: 1.0).")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE lambda (Align-Anything: "
                       "gae_lambda 0.95).")
    whiten_advantages: bool = Field(True, description="ppo: normalise advantages to mean 0, "
                                    "std 1 over each step's responses.")
    scale_rewards: bool = Field(True, description="grpo: divide advantages by the group's "
                                "reward std (TRL scale_rewards=group; false = Dr. GRPO).")
    kl_coef: float | None = Field(
        None, ge=0, description="Weight of the KL penalty to the reference policy: ppo "
        "subtracts kl_coef x (log pi - log pi_ref) from each token's reward, grpo adds "
        "kl_coef x the k3 estimate to the loss. null: 0.02 for ppo (Align-Anything kl_coeff), "
        "0.01 for grpo (Align-Anything's GRPO beta). The start value when target_kl is set.")
    target_kl: float | None = Field(
        None, gt=0, description="Adaptive KL control (Ziegler et al. 2019): kl_coef is adjusted "
        "every step towards this KL per response (nats); null: fixed kl_coef.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL: responses over which the "
                            "coefficient may change by up to 20%.")
    reference: Literal["auto", "implicit_lora", "frozen_copy"] = Field(
        "auto", description="Reference policy for the KL penalty: implicit_lora uses the base "
        "weights with the LoRA adapters switched off (no second copy), frozen_copy loads a "
        "frozen copy of the base model; auto: implicit_lora for finetune lora, else "
        "frozen_copy.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward settings.")
    ptx_coef: float = Field(
        0.0, ge=0, description="Weight of a next-token loss on SFT data (the train stage's "
        "ptx_data) mixed into every update, to keep the model's pre-RL skills (InstructGPT's "
        "PPO-ptx; Align-Anything: ptx_coeff 16.0 when ptx data is given). 0: off.")

    def generations(self, mode: str) -> int:
        """Responses per prompt in `mode` (ppo, grpo)."""
        if self.num_generations is not None:
            return self.num_generations
        return 8 if mode == "grpo" else 1

    def initial_kl_coef(self, mode: str) -> float:
        """The KL coefficient at step 0 in `mode` (ppo, grpo)."""
        if self.kl_coef is not None:
            return self.kl_coef
        return 0.01 if mode == "grpo" else 0.02

    def reference_kind(self, finetune: str) -> str:
        """`implicit_lora` or `frozen_copy` (resolves `auto`)."""
        if self.reference != "auto":
            return self.reference
        return "implicit_lora" if finetune == "lora" else "frozen_copy"

    def problems(self, train: TrainConfig) -> list[str]:
        """Errors of these settings within `train` (mode ppo or grpo)."""
        errors = []
        mode, reward = train.mode, self.reward
        per_step = self.rollout_batch_size * self.generations(mode)
        per_update = train.per_device_batch_size * train.grad_accum
        if mode == "grpo" and self.generations(mode) < 2:
            errors.append("rl.num_generations: grpo compares responses to the same prompt, so "
                          "it needs at least 2; use 4 or more")
        if per_step % per_update:
            errors.append(f"rl.rollout_batch_size x num_generations = {per_step} responses per "
                          f"step is not a multiple of per_device_batch_size x grad_accum = "
                          f"{per_update} responses per optimizer update; change one of them")
        if self.reference_kind(train.finetune) == "implicit_lora" and train.finetune != "lora":
            errors.append("rl.reference: implicit_lora needs finetune: lora (the reference is "
                          "the base weights with the adapters off); use frozen_copy or auto")
        if train.batching == "packed":
            errors.append(f"batching: packed does not apply to {mode} prompts; use random or "
                          "length_grouped")
        if reward.kind == "model" and not reward.model:
            errors.append("rl.reward.model: kind model needs the URI of a reward model export "
                          "(train.mode rm's final/); or use kind length or keyword")
        if reward.kind != "model" and reward.model:
            errors.append(f"rl.reward.model is set but rl.reward.kind is {reward.kind}; remove "
                          "one of them")
        if reward.kind == "keyword" and not any(reward.keywords):
            errors.append("rl.reward.keywords: kind keyword needs at least one non-empty keyword")
        return errors


class TrainConfig(StrictModel):
    """Optimisation settings for the training stages."""

    mode: Literal["align", "sft", "dpo", "rm", "ppo", "grpo"] = Field(
        "sft", description="align trains the projector only; sft on conversations; dpo "
        "(direct preference optimisation) and rm (a reward model: the VLM plus a scalar value "
        "head) on preference pairs (see `preference`); ppo and grpo on prompts, with "
        "responses sampled during training and scored by a reward (see `rl`)."
    )
    finetune: Literal["full", "lora"] = Field(
        "lora", description="Full weights or LoRA (sft, dpo, rm). Ignored in align mode, where "
        "the connector always trains in full.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1, gt=0, description="Passes over the data (fractions allowed).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps; -1 uses epochs.")
    per_device_batch_size: int = Field(4, gt=0, description="Micro-batch size per GPU/process "
                                       "(samples; packed bins when batching=packed; pairs in "
                                       "dpo/rm, i.e. twice as many sequences per forward).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_schedule: Literal[
        "cosine", "linear", "constant", "cyclic_triangular", "cyclic_triangular2",
        "step", "exponential",
    ] = Field("cosine", description="Learning-rate schedule after warmup.")  # fmt: skip
    lr_schedule_options: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="Options of the chosen schedule (checked at the start of training): cosine "
        "min_lr_ratio; cyclic_* base_lr, max_lr, step_size_up, step_size_down, cycle_momentum; "
        "step gamma, step_size; exponential gamma, min_lr (see mmjobs.train.schedules).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    seed: int = Field(42, description="Seed for data order and initialisation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    layer_dropout: LayerDropoutConfig | None = Field(
        None, description="Per-layer LoRA dropout schedule (LoRA only); replaces lora.dropout "
        "in the decoder layers.")
    freeze_vision_tower: bool = Field(
        True, description="Keep the vision encoder frozen (LLaVA-1.5 does in both stages).")
    freeze_connector: bool | None = Field(
        None, description="Freeze the vision-to-text connector. None: trained (align needs it "
        "trainable; sft trains it in full, next to LoRA adapters via modules_to_save).")
    freeze_language_model: bool | None = Field(
        None, description="Freeze the language model. None: frozen in align mode, trained in "
        "sft (in full, or through adapters with finetune=lora).")
    batching: Literal["random", "length_grouped", "packed"] = Field(
        "length_grouped", description="random: shuffled padded batches; length_grouped: "
        "similar lengths together (less padding, same samples per step); packed: samples "
        "concatenated into rows of max_length tokens with position_ids restarting per sample "
        "(no padding; SDPA block-diagonal mask, or flash-attn varlen when installed).")
    max_length: int | None = Field(
        None, ge=8, description="Tokens per packed row (packed) or longest sample allowed "
        "(padded modes). None: the pretokenized card's max_length.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% "
        "slower.")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU. fp16 "
        "is not offered (loss scaling overflows on these models); use bf16 or no.")
    deepspeed: Literal["none", "zero2", "zero3", "zero3_offload"] = Field(
        "none", description="DeepSpeed ZeRO stage (under torchrun): zero2 shards optimizer "
        "state and gradients, zero3 also parameters, zero3_offload also moves them to CPU "
        "memory (slowest, least GPU memory).")
    checkpoint_every_steps: int = Field(
        200, ge=0, description="Commit a resumable checkpoint every N optimizer steps (0: only "
        "on preemption). Uploads run in the background.")
    keep_last_checkpoints: int = Field(
        2, ge=1, description="Committed checkpoints kept; older ones are deleted once a newer "
        "one is committed.")
    log_every_steps: int = Field(1, ge=1, description="Log step metrics every N steps.")
    eval_every_steps: int = Field(
        0, ge=0, description="Eval loss on eval_data every N steps (0: only at the end, when "
        "eval_data is set).")
    dataloader_workers: int = Field(
        2, ge=0, description="DataLoader worker processes decoding images (0: in the "
        "training process).")
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="DPO and reward-model settings (modes "
        "dpo, rm).")
    rl: RLConfig = Field(default_factory=RLConfig, description="PPO and GRPO settings (modes "
                         "ppo, grpo).")

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        # Combinations no single field can check; all reported in one message.
        errors = []
        if self.mode == "align":
            if self.freeze_connector:
                errors.append("freeze_connector: true leaves nothing to train in align mode; "
                              "remove it")
            if self.freeze_language_model is False or not self.freeze_vision_tower:
                errors.append("align mode trains the connector only; remove "
                              "freeze_language_model / freeze_vision_tower, or use mode: sft")
            if self.layer_dropout is not None:
                errors.append("layer_dropout sets LoRA adapter dropout; align has no adapters")
        elif self.finetune == "full" and self.layer_dropout is not None:
            errors.append("layer_dropout needs finetune: lora (it sets adapter dropout)")
        if self.mode in ("dpo", "rm") and self.batching == "packed":
            errors.append(f"batching: packed does not apply to preference pairs (mode "
                          f"{self.mode}); use random or length_grouped")
        pref = self.preference
        if self.mode == "dpo" and self.finetune == "full" and pref.reference == "implicit_lora":
            errors.append("preference.reference: implicit_lora takes the reference from the "
                          "base weights with the LoRA adapters disabled, so it needs finetune: "
                          "lora; set preference.reference: frozen_copy for full fine-tuning")
        if self.mode == "dpo" and pref.loss == "ipo" and pref.label_smoothing > 0:
            errors.append("preference.label_smoothing applies to the sigmoid loss (conservative "
                          "DPO); remove it or use preference.loss: sigmoid")
        if self.mode in ("ppo", "grpo"):
            errors.extend(self.rl.problems(self))
        if self.mode != "align" and self.freeze_vision_tower and self.freeze_connector and \
                self.freeze_language_model:
            errors.append("every component is frozen; unfreeze at least one")
        if errors:
            raise PydanticCustomError("train_combination", "; ".join(errors))
        return self


class EvalConfig(StrictModel):
    """Evaluation settings."""

    benchmarks: list[str] = Field(default_factory=list, description="Benchmarks to run.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    max_new_tokens: int = Field(64, gt=0, description="Generation length cap per answer.")


class RecipeConfig(StrictModel):
    """A whole recipe: what to train and evaluate, and on what resources."""

    recipe: str = Field(
        description="Kebab-case recipe name, e.g. 'chart-demo'.",
        json_schema_extra={"pattern": _KEBAB},
    )
    description: str = Field("", description="One line on what the recipe reproduces.")
    experiment: str | None = Field(
        None,
        validate_default=True,
        description="MLflow experiment name; defaults to the recipe name.",
    )
    model: ModelConfig = Field(description="Base model.")
    data: DataConfig | None = Field(None, description="Training data; absent for eval-only.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Kubernetes resources."
    )
    pipeline: str | None = Field(
        None, validate_default=True,
        description="Which pipeline runs this recipe (a name in pipelines.PIPELINES, e.g. "
        "chartmoe); defaults to the recipe name.")
    images: ImagesConfig = Field(default_factory=ImagesConfig,
                                 description="Stage images for cluster runs.")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-step settings, keyed by the pipeline's step names (e.g. prepare, "
        "align, sft, infer). Each is checked against its stage's config (e.g. the train "
        "stage's for sft) without the fields the pipeline wires (inputs, outputs, run ids); "
        "see `mmjobs.pipeline_runner.check_stages`. Values here win over the recipe-level "
        "model/data/train/eval defaults.")
    sweep: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings a sweep pipeline fans out over (lavin-sweep): kebab-case setting "
        "name -> overrides of the swept step's section, e.g. {cyclical-lr: {train: "
        "{lr_schedule: cyclic_triangular2}}}. Checked like `stages` sections.")

    imports: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Inputs the pipeline copies into the store before any other step: "
        "kebab-case name -> an import step's settings (source: hub id, URL or store path; to: "
        "the store URI the recipe then names in model/data/stages; revision, include, sha256, "
        "...: see `mmjobs import --help`). Each runs as step `import-<name>`; an identical "
        "earlier import is reused.")

    @field_validator("sweep", "imports")
    @classmethod
    def _kebab_settings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [name for name in value if not re.fullmatch(_KEBAB, name)]
        if bad:  # setting names become output folders and KFP task names
            raise PydanticCustomError("kebab_case", "names must be kebab-case, got "
                                      "{bad}", {"bad": ", ".join(map(repr, bad))})
        return value

    @field_validator("recipe")
    @classmethod
    def _kebab_case(cls, value: str) -> str:
        # A custom error instead of `pattern=`: the message says what a valid name looks like.
        if not re.fullmatch(_KEBAB, value):
            raise PydanticCustomError(
                "kebab_case",
                "must be kebab-case: lowercase letters, digits and '-', e.g. 'chart-demo'",
            )
        return value

    @field_validator("experiment")
    @classmethod
    def _default_experiment(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator rather than a model validator: assigning inside an "after" model
        # validator re-triggers validation under validate_assignment.
        return value if value is not None else info.data.get("recipe")

    @field_validator("pipeline")
    @classmethod
    def _default_pipeline(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not re.fullmatch(_KEBAB, value):
            raise PydanticCustomError("kebab_case", "must be a kebab-case pipeline name, e.g. "
                                      "'chart-demo'")
        return value if value is not None else info.data.get("recipe")


def load_config(
    model_cls: type[M],
    data_or_path: Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    source: str | None = None,
) -> M:
    """Validate a config from a YAML file or a mapping, with dotted overrides applied.

    Args:
        model_cls: the pydantic model to validate against (a `StrictModel` subclass).
        data_or_path: YAML file path, or already-parsed data (not modified).
        overrides: ``KEY=VALUE`` strings, e.g. ``train.lr=2e-5``; VALUE is parsed as YAML.
        source: label for messages; defaults to the path, or ``config`` for a mapping.

    Returns:
        The validated model instance.

    Raises:
        ConfigError: listing every problem in the file and the overrides.
    """
    if isinstance(data_or_path, str | Path):
        source = source or str(data_or_path)
        data, file_errors = read_yaml(Path(data_or_path), source)
    else:
        source = source or "config"
        data, file_errors = copy.deepcopy(dict(data_or_path)), []
    if not file_errors and not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        fields = ", ".join(f"{name}:" for name in model_cls.model_fields)
        file_errors.append(f"{source}: expected a mapping of keys ({fields}) at the top, got {got}")

    # Errors are tagged with an origin (-1 = file, i = overrides[i]) so the file's come first.
    tagged: list[tuple[int, str]] = [(-1, e) for e in file_errors]
    applied: list[tuple[int, tuple[str, ...], str]] = []
    for i, text in enumerate(overrides):
        parsed = parse_override(model_cls, text)
        if isinstance(parsed, str):
            tagged.append((i, parsed))
            continue
        path, value, label = parsed
        applied.append((i, path, label))
        if not file_errors:
            apply_override(data, path, value)

    if not file_errors:
        tagged.extend(validation_errors(model_cls, data, applied))
    if tagged:
        tagged.sort(key=lambda item: item[0])  # stable: keeps order within each origin
        raise ConfigError(source, [message for _, message in tagged])
    return model_cls.model_validate(data)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load and validate a recipe YAML file; raises `ConfigError` listing every problem."""
    return load_config(RecipeConfig, path, overrides)


def dump_recipe(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (defaults included); `load_recipe` reads it back."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Dotted scalar params for MLflow: ``{"train.lr": 2e-4, "eval.benchmarks": "[...]"}``.

    Nested models become dotted keys; lists, dicts and None become JSON strings.
    """
    out: dict[str, str | int | float | bool] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, prefix=f"{key}."))
        elif isinstance(value, str | int | float | bool):
            out[key] = value
        else:
            out[key] = json.dumps(_jsonable(value), sort_keys=True, ensure_ascii=False)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def validate_main(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> int:
    """Back end of ``mmjobs validate FILE...``: one line per valid file, full errors otherwise.

    Returns:
        0 if every file is valid, 1 otherwise.
    """
    status = 0
    for path in paths:
        try:
            cfg = load_recipe(path, overrides)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            status = 1
        else:
            print(f"OK {path} (recipe {cfg.recipe})")
    return status
