"""One training step's plan: the real-size model on the meta device, set up as the trainer
sets it up, with its parameters, memory per GPU and FLOPs.

`plan_step` builds the step's model from its real config (`mmjobs.plan.models`), checks every
LoRA target against it, freezes and wraps it with the trainer's own code
(`mmjobs.train.model_setup.prepare_for_training`: peft on the meta model; the reward model's and
PPO's value heads), counts what trains, and estimates (`mmjobs.plan.memory`) the memory per GPU
for the step's ZeRO stage, micro-batch and sequence length.

**FLOPs** are the trainer's own model FLOPs (`mmjobs.train.metrics.FlopsModel`, which its MFU
uses): per text token 2·N_lm forward + 2·N_lm backward to the activations + 2·N_lm_trainable
weight gradients (6·N for full fine-tuning, about 4·N with LoRA or a frozen LM under a trained
connector) + 12·layers·width·S attention, and per image the vision tower forward (x3 when it
trains) and the connector; N_lm excludes the input embeddings. dpo adds the reference's
forward (2·N_lm per token of both sequences); ppo/grpo add, per rollout token, the forwards of
sampling, the rollout policy's log-probs, the reference and the reward model (4 x 2·N_lm).
Gradient checkpointing's recomputation (another forward) is not counted, as in MFU.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mmjobs.plan.hardware import H100_PEAK_FLOPS, HEADROOM, PLANNING_MFU, GpuMemory
from mmjobs.plan.memory import (
    GIB,
    Activations,
    ModelStates,
    TextDims,
    VisionDims,
    activation_bytes,
    model_states,
)
from mmjobs.plan.models import PlanError, ResolvedModel, build_meta_model
from mmjobs.plan.settings import RL_MODES, TrainSettings, train_settings
from mmjobs.plan.steps import TrainStep

DEFAULT_SEQ_LEN = 2048  # the pretokenize stage's default max_length


@dataclass(frozen=True)
class StepPlan:
    """The plan of one train step (bytes per GPU; FLOPs per GPU). `model_params` counts the
    model as published; `total_params` adds what training adds (adapters, the copy of a
    `modules_to_save` module, value heads)."""

    step: str
    mode: str
    trains: str
    model: ResolvedModel
    model_params: int
    total_params: int
    trainable_params: int
    components: dict[str, dict[str, int]]
    settings: TrainSettings
    gpus: int
    nodes: int
    seq_len: int
    image_tokens: int
    states: ModelStates
    activations: Activations
    gpu: GpuMemory
    flops_per_token: float
    flops_per_step: float
    samples_per_step: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        """Estimated GPU memory per GPU."""
        return self.states.total + self.activations.total

    @property
    def fits(self) -> str:
        """`yes` within the headroom, `tight` within the GPU's memory, `no` beyond it."""
        used = self.total_bytes / (self.gpu.gib * GIB)
        return "yes" if used <= HEADROOM else "tight" if used <= 1.0 else "no"

    def h100_samples_per_s(self) -> float:
        """Samples per second one H100 computes at `PLANNING_MFU` (what a data loader feeding
        it must deliver)."""
        per_sample = self.flops_per_step / max(self.samples_per_step, 1)
        return PLANNING_MFU * H100_PEAK_FLOPS / per_sample if per_sample else 0.0


def plan_step(step: TrainStep, model: ResolvedModel, gpu: GpuMemory, *,
              dtype: str = "auto", attn_implementation: str = "auto") -> StepPlan:
    """Plan `step` training `model` on GPUs of `gpu` memory.

    Args:
        dtype, attn_implementation: the recipe's `model.dtype` / `model.attn_implementation`.

    Raises:
        PlanError: a LoRA target does not exist in the model (or only in frozen parts), or
            nothing is left to train; the message names the step.
    """
    import torch

    from mmjobs.models.builder import trainable_parameter_summary
    from mmjobs.train.metrics import flops_model

    settings = train_settings(step.config["train"])
    base = build_meta_model(model.config)
    base_params = sum(p.numel() for p in base.parameters())
    check_lora_targets(base, settings, step.name)
    with torch.device("meta"), _quiet("mmjobs.train.model_setup"):
        trained = _set_up(base, settings, step.name)
    params = dict(trained.named_parameters())  # tied weights once
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    components = trainable_parameter_summary(trained)

    config = model.config
    dims = _text_dims(config, base)
    vision, image_tokens = _vision_dims(config, dims.hidden)
    card = settings.max_length or step.card_max_length or DEFAULT_SEQ_LEN
    rl = settings.mode in RL_MODES
    seq_len = card + settings.max_new_tokens if rl else card  # prompt + response
    sequences = settings.sequences_per_micro_batch
    images = sequences if vision is not None else 0  # LLaVA-1.5 data: one image a sample
    frozen = settings.frozen
    activations = activation_bytes(
        dims, sequences=sequences, seq_len=seq_len,
        checkpointing=settings.gradient_checkpointing,
        logit_positions=0 if settings.mode == "rm" else
        settings.max_new_tokens if rl else None,
        eager=attn_implementation == "eager", vision=vision, images=images,
        vision_trains=components["vision_tower"]["trainable"] > 0,
        connector_trains=components["connector"]["trainable"] > 0,
        rollout_tokens=settings.rollout_sequences * seq_len if rl else 0)
    copies, notes = _frozen_copies(settings, base_params, dims.hidden)
    gpus = step.gpus * step.nodes
    states = model_states(total=total, trainable=trainable,
                          largest_layer=largest_layer_params(trained),
                          zero=settings.deepspeed, gpus=gpus, nodes=step.nodes,
                          weight_bytes=4 if dtype == "float32" else 2, frozen_copies=copies)
    flops = flops_model(base, components, image_tokens)
    per_micro = flops.step_flops([seq_len] * sequences, images)
    extra = _forward_only_flops(settings, flops, seq_len)
    samples = settings.per_device_batch_size * settings.grad_accum
    per_step = per_micro * settings.grad_accum + extra
    if rl:  # a step samples rollout_sequences and updates on them ppo_epochs times
        micro_batches = settings.rollout_sequences * settings.ppo_epochs / sequences
        ptx = flops.step_flops([card] * sequences, images) if settings.ptx else 0.0
        per_step = (per_micro + ptx) * micro_batches + extra
        samples = settings.rollout_sequences
    if settings.deepspeed == "zero3_offload":
        notes.append(f"zero3_offload keeps {states.host / GIB:.0f} GiB of model states in host "
                     "memory per node (DeepSpeed's estimate, buffer factor 1.5)")
    if not gpus:
        notes.append("the step requests no GPU (cluster.gpus is 0): planned as one GPU")
    return StepPlan(
        step=step.name, mode=settings.mode, trains=_trains(settings, frozen), model=model,
        model_params=base_params, total_params=total, trainable_params=trainable,
        components=components,
        settings=settings, gpus=max(gpus, 1), nodes=step.nodes, seq_len=seq_len,
        image_tokens=image_tokens, states=states, activations=activations, gpu=gpu,
        flops_per_token=flops.per_token(seq_len), flops_per_step=per_step,
        samples_per_step=samples, notes=notes)


def check_lora_targets(model: Any, settings: TrainSettings, step: str) -> None:
    """Every `train.lora.target_modules` entry must name modules in a trained part of `model`.

    Raises:
        PlanError: naming the step, the target and, when it exists only in frozen parts, them.
    """
    from mmjobs.models.compose import component_of
    from mmjobs.train.model_setup import lora_targets

    if settings.finetune != "lora":
        return
    everywhere = {c: False for c in settings.frozen}
    for target in settings.lora_targets:
        if lora_targets(model, [target], settings.frozen):
            continue
        found = sorted({component_of(n) for n in lora_targets(model, [target], everywhere)})
        where = type(model).__name__
        if found:
            raise PlanError(f"step {step}: train.lora.target_modules: {target!r} is only in "
                            f"the frozen {' and '.join(found)} of {where}; unfreeze it "
                            f"(train.freeze_{found[0]}: false) or remove the target")
        raise PlanError(f"step {step}: train.lora.target_modules: {target!r} is not a module "
                        f"of {where}; its linear layers are named "
                        f"{', '.join(_linear_names(model, settings.frozen))}")


def largest_layer_params(model: Any) -> int:
    """The most parameters one module holds directly (DeepSpeed's `largest_layer_params`)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
               default=0)


# --------------------------------------------------------------------------- pieces


def _set_up(model: Any, settings: TrainSettings, step: str) -> Any:
    """Freeze/wrap as the trainer does, plus the rm and ppo heads (or ppo's separate critic:
    a trainable copy of the same-sized reward model, `mmjobs.train.reward_model.load_critic`)."""
    import copy

    from mmjobs.train.model_setup import prepare_for_training

    critic = None
    if settings.separate_critic:
        from mmjobs.models.builder import freeze
        from mmjobs.train.reward_model import RewardModel

        critic_vlm = copy.deepcopy(model)  # before LoRA wraps the actor's modules
        freeze(critic_vlm, **settings.frozen)
        critic = RewardModel(critic_vlm, init_head=False)
    try:
        trained = prepare_for_training(model, settings.config)
    except ValueError as e:
        raise PlanError(f"step {step}: {e}") from None
    if settings.mode == "rm":
        from mmjobs.train.reward_model import RewardModel

        return RewardModel(trained, init_head=False)
    if settings.mode in RL_MODES:
        from mmjobs.train.rl import PolicyWithValueHead

        return PolicyWithValueHead(trained, value_head=settings.mode == "ppo" and not critic,
                                   critic=critic)
    return trained


def _frozen_copies(settings: TrainSettings, base_params: int, hidden: int
                   ) -> tuple[int, list[str]]:
    """Parameters of the frozen models next to the trained one (on every GPU), and notes."""
    copies, notes = 0, []
    if settings.reference == "frozen_copy":
        copies += base_params
        notes.append("reference: a frozen copy of the model on every GPU")
    elif settings.reference == "implicit_lora":
        notes.append("reference: the base weights with the adapters off (no copy)")
    if settings.reward_model:
        copies += base_params + hidden + 1
        notes.append("reward model: a frozen copy of the (same-sized) rm model on every GPU")
    if settings.separate_critic:
        notes.append("critic: a trained copy of the reward model (its parameters, gradients "
                     "and optimizer states are counted with the actor's)")
    return copies, notes


def _forward_only_flops(settings: TrainSettings, flops: Any, seq_len: int) -> float:
    """FLOPs of the step's gradient-free forwards (reference, rollouts; module docstring)."""
    per_token_forward = 2 * flops.lm_params + 4 * flops.num_layers * flops.hidden_size * seq_len
    if settings.mode == "dpo":
        tokens = settings.sequences_per_micro_batch * seq_len * settings.grad_accum
        return float(per_token_forward * tokens)
    if settings.mode in RL_MODES:
        # sampling, rollout log-probs, reference (+ reward model, + a separate critic)
        forwards = 3 + settings.reward_model + settings.separate_critic
        return float(forwards * per_token_forward * settings.rollout_sequences * seq_len)
    return 0.0


def _trains(settings: TrainSettings, frozen: dict[str, bool]) -> str:
    if settings.finetune == "connector":
        return "connector"
    parts = [c.replace("_", " ") for c, is_frozen in frozen.items() if not is_frozen]
    if settings.finetune == "mma":
        return "LaVIN MMA adapters (LLaMA + CLIP blocks, adapter_proj, modality token)"
    if settings.finetune == "lora":
        rest = [p for p in parts if p != "language model"]
        return f"LoRA r{settings.lora_r}" + (f" + {' + '.join(rest)}" if rest else "")
    return "full: " + " + ".join(parts)


def _text_dims(config: Any, model: Any) -> TextDims:
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    return TextDims(layers=int(text.num_hidden_layers), hidden=int(text.hidden_size),
                    intermediate=int(text.intermediate_size), heads=heads,
                    kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                    vocab=int(text.vocab_size),
                    qk_norm=any(n.endswith(".q_norm") for n, _ in model.named_modules()))


def _vision_dims(config: Any, text_hidden: int) -> tuple[VisionDims | None, int]:
    """(the vision tower's dims or None, image tokens per image in the sequence)."""
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) == "deplot_llava":
        # ChartWiz's Pix2Struct encoder: every one of max_patches positions is a token.
        tokens = int(config.image_seq_length)
        return VisionDims(layers=int(vision.num_hidden_layers), hidden=int(vision.hidden_size),
                          intermediate=int(vision.d_ff), patches=tokens, image_tokens=tokens,
                          text_hidden=text_hidden), tokens
    if vision is not None and hasattr(vision, "patch_size"):
        grid = (int(vision.image_size) // int(vision.patch_size)) ** 2
        # LLaVA's processor expands <image> to the patches the strategy keeps ("default"
        # drops CLS, "full" keeps it); `image_seq_length` is only a default (576) in configs.
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        tokens = grid + (1 if full else 0)
        return VisionDims(layers=int(vision.num_hidden_layers), hidden=int(vision.hidden_size),
                          intermediate=int(vision.intermediate_size), patches=grid + 1,
                          image_tokens=tokens, text_hidden=text_hidden), tokens
    vq = getattr(config, "vq_config", None)
    if vq is not None:  # Chameleon: images are VQ tokens made at pretokenize time
        grid = int(vq.resolution) // 2 ** (len(vq.channel_multiplier) - 1)
        return None, grid * grid
    return None, 0


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence INFO logs of `name` (the trainer's own setup lines) and transformers'
    deprecation notices about the calls it makes, while planning."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            yield
    finally:
        logger.setLevel(level)


def _linear_names(model: Any, frozen: dict[str, bool]) -> list[str]:
    """Names (last part) of the linear layers in the trained parts, for the error message."""
    from torch import nn

    from mmjobs.models.compose import component_of

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not frozen[component_of(n)]}
    return sorted(names)
