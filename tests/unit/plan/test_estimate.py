"""One step's plan on the real-size LLaVA-1.5-7B and Chameleon-7B: what trains (LoRA applied by
the trainer's own code on the meta model), the published memory figures, the LoRA target
checks."""

from __future__ import annotations

from typing import Any

import pytest

from mmjobs.plan.estimate import StepPlan, plan_step
from mmjobs.plan.hardware import GpuMemory
from mmjobs.plan.models import PlanError, ResolvedModel, resolve_model
from mmjobs.plan.steps import TrainStep

LLAVA_LORA = {"mode": "sft", "finetune": "lora", "per_device_batch_size": 16,
              "gradient_checkpointing": True, "deepspeed": "zero3",
              "lora": {"r": 128, "alpha": 256,
                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"]}}


@pytest.fixture(scope="module")
def llava() -> ResolvedModel:
    found = resolve_model("llava-hf/llava-1.5-7b-hf")
    assert isinstance(found, ResolvedModel)
    return found


def _plan(model: ResolvedModel, train: dict[str, Any], *, gpus: int = 8, gib: float = 80,
          seq: int = 2048, name: str = "sft") -> StepPlan:
    step = TrainStep(name=name, section=name, config={"train": train}, model_from=None,
                     card_max_length=seq, gpus=gpus, nodes=1)
    return plan_step(step, model, GpuMemory(gib, "test", False), dtype="bfloat16",
                     attn_implementation="flash_attention_2")


def test_lora_r128_on_llava_trains_what_llava_trains(llava):
    plan = _plan(llava, LLAVA_LORA)
    # LLaVA's finetune_lora.sh: lora_r 128 on find_all_linear_names (every nn.Linear of the
    # LLM but lm_head: q, k, v, o, gate, up, down in 32 layers), projector in full. An adapter
    # on a d_in -> d_out layer has r * (d_in + d_out) parameters.
    h, i, r = 4096, 11008, 128
    per_layer = 4 * r * (h + h) + 2 * r * (h + i) + r * (i + h)
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert plan.trainable_params == 32 * per_layer + projector == 340_795_392
    assert plan.components["connector"]["trainable"] == projector
    assert plan.components["vision_tower"]["trainable"] == 0
    assert plan.model_params == 7_063_427_072
    # peft keeps the projector's original next to its trained copy (modules_to_save).
    assert plan.total_params == plan.model_params + 32 * per_layer + projector


def test_llava_lora_fits_8_x_24gb_with_zero3_at_llavas_per_gpu_batch(llava):
    # LLaVA's README: LoRA "7B training in 8-RTX3090" (24 GB), keeping
    # per_device_train_batch_size x gradient_accumulation_steps of finetune_lora.sh (16 x 1).
    at_4 = _plan(llava, {**LLAVA_LORA, "per_device_batch_size": 4, "grad_accum": 4}, gib=24)
    assert at_4.fits == "yes", at_4.total_bytes / 2**30
    # 16 sequences of 2048 tokens per GPU do not: the logits alone are 16 x 2048 x 32064 x 10 B.
    at_16 = _plan(llava, LLAVA_LORA, gib=24)
    assert at_16.fits == "no"
    assert at_16.activations.logits == 16 * 2048 * 32064 * 10


def test_llava_full_finetuning_needs_80gb_gpus(llava):
    # LLaVA's README: LLaVA-1.5 is trained on 8 A100s with 80 GB (finetune.sh: ZeRO-3, 16 per
    # GPU, gradient checkpointing, 2048 tokens).
    full = {**LLAVA_LORA, "finetune": "full"}
    plan = _plan(llava, full)
    assert plan.trainable_params == 7_063_427_072 - 303_507_456  # all but the vision tower
    assert plan.fits == "yes"
    assert _plan(llava, full, gib=24).fits == "no"
    # Model states alone (ZeRO-3, 8 GPUs): 18 bytes per trained parameter / 8 + 16-bit frozen.
    states = plan.states
    assert states.weights + states.gradients + states.optimizer == pytest.approx(
        (2 * 7_063_427_072 + 16 * plan.trainable_params) / 8)


def test_align_trains_the_connector_only(llava):
    plan = _plan(llava, {"mode": "align", "per_device_batch_size": 32, "deepspeed": "zero2"})
    assert plan.trainable_params == plan.components["connector"]["total"] == 20_979_712
    assert plan.trains == "connector"
    assert plan.activations.vision > 0  # the connector's activations; the frozen tower keeps none


def test_a_lora_target_the_model_does_not_have_fails_naming_step_and_module(llava):
    train = {**LLAVA_LORA, "lora": {"r": 8, "target_modules": ["q_proj", "wqkv"]}}
    with pytest.raises(PlanError, match=r"step sft-chart: .*'wqkv' is not a module of "
                                        r"LlavaForConditionalGeneration.*q_proj"):
        _plan(llava, train, name="sft-chart")


def test_a_lora_target_only_in_a_frozen_part_fails_naming_it(llava):
    train = {**LLAVA_LORA, "lora": {"r": 8, "target_modules": ["q_proj", "fc1"]}}  # CLIP's MLP
    with pytest.raises(PlanError, match=r"step sft: .*'fc1' is only in the frozen vision_tower"
                                        r".*freeze_vision_tower: false"):
        _plan(llava, train)


@pytest.fixture(scope="module")
def chameleon() -> ResolvedModel:
    found = resolve_model("PKU-Alignment/AA-chameleon-7b-base")
    assert isinstance(found, ResolvedModel)
    return found


def test_preference_and_rl_steps_count_their_frozen_models(chameleon):
    base = {"finetune": "full", "freeze_connector": True, "per_device_batch_size": 2,
            "gradient_checkpointing": True}
    dpo = _plan(chameleon, {**base, "mode": "dpo", "deepspeed": "zero2",
                            "preference": {"reference": "frozen_copy"}}, seq=4096)
    assert dpo.states.frozen_copies == 2 * 7_043_090_432  # a 16-bit reference on every GPU
    assert dpo.settings.sequences_per_micro_batch == 4  # chosen + rejected
    rm = _plan(chameleon, {**base, "mode": "rm", "deepspeed": "zero3"}, seq=4096)
    lm_head = 65536 * 4096  # the reward model's head replaces it: frozen
    assert rm.trainable_params == 7_013_666_816 - lm_head + 4096 + 1
    assert rm.activations.logits == 0
    ppo = _plan(chameleon, {**base, "mode": "ppo", "deepspeed": "zero2",
                            "rl": {"rollout_batch_size": 4, "max_new_tokens": 1536,
                                   "reward": {"kind": "model", "model": "s3://b/rm"}}},
                seq=4096)
    assert ppo.states.frozen_copies == 2 * (2 * 7_043_090_432 + 4096 + 1)  # reference + reward
    assert ppo.seq_len == 4096 + 1536
    assert ppo.activations.rollout_cache == 4 * ppo.seq_len * 2 * 32 * 4096 * 2
    # Align-Anything's critic: a trained copy of the reward model next to the actor.
    critic = _plan(chameleon, {**base, "mode": "ppo", "deepspeed": "zero2",
                               "rl": {"rollout_batch_size": 4, "max_new_tokens": 1536,
                                      "critic": "reward_model",
                                      "reward": {"kind": "model", "model": "s3://b/rm"}}},
                   seq=4096)
    assert critic.trainable_params == ppo.trainable_params - (4096 + 1) + rm.trainable_params
    assert critic.states.frozen_copies == ppo.states.frozen_copies
    assert any("critic" in note for note in critic.notes)


def test_flops_follow_the_trainers_model(llava):
    full = _plan(llava, {**LLAVA_LORA, "finetune": "full"})
    lora = _plan(llava, LLAVA_LORA)
    # Full fine-tuning: 6 x N_lm per token (N_lm without the input embeddings) + attention;
    # the trainer's FlopsModel also counts 2 x the (trained) embedding table for its gradient.
    embeddings = 32064 * 4096
    n_lm = 6_738_939_904 - embeddings
    attention = 12 * 32 * 4096 * 2048
    assert full.flops_per_token == pytest.approx(6 * n_lm + 2 * embeddings + attention,
                                                 rel=1e-9)
    # LoRA: no weight gradients for the frozen base: about 4 x N_lm.
    assert lora.flops_per_token < 0.75 * full.flops_per_token
    assert full.flops_per_step > 16 * 2048 * full.flops_per_token  # + 16 images
