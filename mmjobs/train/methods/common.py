"""What the training methods share: the optimisation settings, the adapter settings, an eval pass.

`TrainBase` holds the settings every mode has (learning rate, schedule, batching, precision,
DeepSpeed, checkpoints). `FineTuneBase` adds what decides which weights train (`finetune`,
`lora`, `layer_dropout`, `freeze_*`): every mode but align, which always trains the connector
alone. `EvalPass` adds `eval_every_steps` to the modes with a held-out loss (align, sft, dpo,
rm). Each method's class (`mmjobs.train.methods.<mode>`) adds its own section and checks.

Every class checks its combinations in one place, `problems()`, and reports them all in one
error, each line naming the setting to change (`mmjobs.config_base.config_problems`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from mmjobs.config_base import StrictModel, config_problems

Problems = list[tuple[str, str]]

# Train settings that do not change the trained weights (a resume may change them freely).
NOT_FINGERPRINTED = frozenset({"checkpoint_every_steps", "keep_last_checkpoints",
                               "log_every_steps", "eval_every_steps", "dataloader_workers"})


class TrainBase(StrictModel):
    """Settings every training mode has: optimisation, batching, precision, checkpoints."""

    mode: str = Field(description="The training method; selects which settings apply.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1, gt=0, description="Passes over the data (fractions allowed).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps; -1 uses epochs.")
    per_device_batch_size: int = Field(4, gt=0, description="Micro-batch size per GPU/process "
                                       "(samples; packed bins when batching=packed; pairs in "
                                       "dpo/rm, i.e. twice as many sequences per forward; "
                                       "responses in ppo/grpo updates).")
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
    batching: Literal["random", "length_grouped", "packed"] = Field(
        "length_grouped", description="random: shuffled padded batches; length_grouped: "
        "similar lengths together (less padding, same samples per step); packed (align, sft): "
        "samples concatenated into rows of max_length tokens with position_ids restarting per "
        "sample (no padding; SDPA block-diagonal mask, or flash-attn varlen when installed).")
    group_by_modality: bool | None = Field(
        None, description="On data mixing text-only and image rows: every micro-step's batches "
        "all-image or all-text across ranks (LLaVA's group_by_modality_length), each modality "
        "ordered by `batching`. None: on where the ranks need it (DeepSpeed ZeRO-3, or ZeRO-2 "
        "with a trainable connector or vision tower), off elsewhere; false there lets the "
        "ranks' collectives desynchronise (a warning says so).")
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
    dataloader_workers: int = Field(
        2, ge=0, description="DataLoader worker processes decoding images (0: in the "
        "training process).")

    @model_serializer(mode="wrap")
    def _keep_mode(self, handler: SerializerFunctionWrapHandler) -> Any:
        # `mode` picks the class when the dump is read back; a dump that leaves out defaults
        # (multi-node job configs, recipe defaults) must keep it, or a dpo config reads as sft.
        data = handler(self)
        return {"mode": self.mode, **data} if isinstance(data, dict) else data

    def problems(self) -> Problems:
        """Combinations of settings no single field can check, as `(setting, message)` pairs
        (empty when the config is consistent); each method adds its own."""
        return []

    def packed_problem(self, what: str) -> Problems:
        """The problem of `batching: packed` in a mode whose batches are not conversations."""
        if self.batching != "packed":
            return []
        return [("batching", f"packed does not apply to {what} (mode {self.mode}); use random "
                             "or length_grouped")]

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainBase:
        problems = self.problems()
        if problems:
            raise config_problems(problems)
        return self


class EvalPass(StrictModel):
    """The held-out loss pass of align, sft, dpo and rm (the train stage's `eval_data`)."""

    eval_every_steps: int = Field(
        0, ge=0, description="Eval loss on eval_data every N steps (0: only at the end, when "
        "eval_data is set).")


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


class FineTuneBase(TrainBase):
    """What trains besides the connector: full weights or LoRA adapters, and what is frozen
    (every mode but align; see `mmjobs.train.model_setup`)."""

    finetune: Literal["full", "lora"] = Field(
        "lora", description="Full weights or LoRA adapters.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    layer_dropout: LayerDropoutConfig | None = Field(
        None, description="Per-layer LoRA dropout schedule (LoRA only); replaces lora.dropout "
        "in the decoder layers.")
    freeze_vision_tower: bool = Field(
        True, description="Keep the vision encoder frozen (LLaVA-1.5 does in both stages).")
    freeze_connector: bool | None = Field(
        None, description="Freeze the vision-to-text connector. None: trained (in full, next "
        "to LoRA adapters via modules_to_save).")
    freeze_language_model: bool | None = Field(
        None, description="Freeze the language model. None: trained (in full, or through "
        "adapters with finetune=lora).")

    def problems(self) -> Problems:
        problems = super().problems()
        if self.finetune == "full" and self.layer_dropout is not None:
            problems.append(("layer_dropout", "needs finetune: lora (it sets adapter dropout)"))
        if self.freeze_vision_tower and self.freeze_connector and self.freeze_language_model:
            problems.append(("freeze_language_model", "every component is frozen (vision "
                             "tower, connector, language model); unfreeze at least one"))
        return problems
