"""The memory estimates against what they estimate: autograd's saved tensors of transformers'
own decoder layers, the profiler's peak of the loss, and DeepSpeed's and accelerate's
estimators on the same parameter counts."""

from __future__ import annotations

import pytest
import torch

from mmjobs.plan.memory import (
    LOGIT_BYTES,
    TextDims,
    activation_bytes,
    decoder_layer_elements,
    model_states,
)

TOKENS = (2, 64)  # batch, sequence length of the measured forward passes


def _saved_activation_bytes(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters and buffers excluded."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=inputs, use_cache=False)
    return sum(saved.values())


def _per_layer(build, checkpointing: bool = False) -> float:
    """Saved bytes per decoder layer: (3 layers - 1 layer) / 2, so embeddings, the final norm
    and the head cancel out."""
    sizes = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = build(layers).to(torch.bfloat16)
        for name, param in model.named_parameters():  # frozen ends, like a LoRA run's
            if "embed" in name or "lm_head" in name or "vqmodel" in name:
                param.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        inputs = torch.randint(8, 200, TOKENS)
        sizes.append(_saved_activation_bytes(model, inputs))
    return (sizes[1] - sizes[0]) / 2


def _llama(hidden: int, intermediate: int, heads: int, kv_heads: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(layers: int):
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
            num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=256,
            attn_implementation=attn))

    return build


@pytest.mark.parametrize("hidden,intermediate,heads,kv_heads,attn", [
    (256, 688, 4, 4, "sdpa"),  # LLaVA / vicuna's shape, scaled down
    (256, 688, 8, 2, "sdpa"),  # grouped-query attention
    (512, 1376, 8, 8, "eager"),
    (256, 688, 8, 2, "eager"),
])
def test_decoder_layer_activations_are_what_autograd_keeps(hidden, intermediate, heads, kv_heads,
                                                           attn):
    measured = _per_layer(_llama(hidden, intermediate, heads, kv_heads, attn))
    dims = TextDims(layers=1, hidden=hidden, intermediate=intermediate, heads=heads,
                    kv_heads=kv_heads, vocab=256)
    tokens = TOKENS[0] * TOKENS[1]
    estimate = decoder_layer_elements(dims, eager_seq_len=TOKENS[1] if attn == "eager" else 0)
    # Left out: per-head softmax statistics (fp32, a few bytes per token and head).
    assert estimate * 2 * tokens == pytest.approx(measured, rel=0.01)


def test_chameleon_layer_activations_include_its_qk_norms():
    from transformers import ChameleonForConditionalGeneration

    from mmjobs.models.tiny import tiny_chameleon_config

    def build(layers: int):
        config = tiny_chameleon_config()
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, 256, 688
        config._attn_implementation = "sdpa"
        return ChameleonForConditionalGeneration(config)

    measured = _per_layer(build)
    dims = TextDims(layers=1, hidden=256, intermediate=688, heads=4, kv_heads=4, vocab=1000,
                    qk_norm=True)
    assert decoder_layer_elements(dims) * 2 * TOKENS[0] * TOKENS[1] == \
        pytest.approx(measured, rel=0.01)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable`:FutureWarning")
def test_gradient_checkpointing_keeps_each_layers_input_only():
    measured = _per_layer(_llama(256, 688, 4, 4, "sdpa"), checkpointing=True)
    assert measured == 256 * TOKENS[0] * TOKENS[1] * 2  # h 16-bit values per token


def _profiled_peak(fn) -> int:
    """Peak of the bytes allocated while `fn` runs (CPU allocator events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    leaves = sorted((e for e in prof.events() if e.cpu_memory_usage and not e.cpu_children),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for event in leaves:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_the_loss_peaks_at_logit_bytes_per_logit():
    from mmjobs.train.batches import loss_sum

    batch, seq, hidden, vocab = 2, 128, 32, 4096
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16)
    states = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))

    def step() -> None:
        loss, _ = loss_sum(head(states), labels)  # as LanguageModelingObjective calls it
        loss.backward()

    per_logit = _profiled_peak(step) / (batch * seq * vocab)
    assert per_logit == pytest.approx(LOGIT_BYTES, rel=0.05)


def test_activation_totals_add_up():
    dims = TextDims(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                    vocab=32064)
    full = activation_bytes(dims, sequences=4, seq_len=2048, checkpointing=False)
    checkpointed = activation_bytes(dims, sequences=4, seq_len=2048, checkpointing=True)
    layer = decoder_layer_elements(dims) * 2 * 4 * 2048
    assert full.layers == 32 * layer
    assert checkpointed.layers == 32 * 4096 * 2 * 4 * 2048 + layer
    assert full.logits == checkpointed.logits == 4 * 2048 * 32064 * LOGIT_BYTES
    reward = activation_bytes(dims, sequences=4, seq_len=2048, checkpointing=True,
                              logit_positions=0)
    assert reward.logits == 0


# --------------------------------------------------------------------------- model states


LLAVA_PARAMS = 7_063_427_072  # llava-hf/llava-1.5-7b-hf (test_models)
LLAVA_LARGEST = 32064 * 4096  # embed_tokens / lm_head


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (16, 2)])
def test_model_states_equal_deepspeeds_estimates_when_everything_trains(gpus, nodes):
    stage2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime.zero import stage3

    per_node = gpus // nodes
    _, zero2 = stage2.estimate_zero2_model_states_mem_needs(
        LLAVA_PARAMS, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False)
    ours = model_states(total=LLAVA_PARAMS, trainable=LLAVA_PARAMS, largest_layer=LLAVA_LARGEST,
                        zero="zero2", gpus=gpus, nodes=nodes)
    assert ours.total == pytest.approx(zero2, abs=2)  # DeepSpeed truncates to whole bytes
    _, zero3, gathered = stage3.estimate_zero3_model_states_mem_needs(
        LLAVA_PARAMS, LLAVA_LARGEST, num_gpus_per_node=per_node, num_nodes=nodes,
        cpu_offload=False)
    ours = model_states(total=LLAVA_PARAMS, trainable=LLAVA_PARAMS, largest_layer=LLAVA_LARGEST,
                        zero="zero3", gpus=gpus, nodes=nodes)
    assert ours.total == pytest.approx(zero3, abs=2)
    assert ours.gathered == gathered
    host, offload, _ = stage3.estimate_zero3_model_states_mem_needs(
        LLAVA_PARAMS, LLAVA_LARGEST, num_gpus_per_node=per_node, num_nodes=nodes,
        cpu_offload=True, cpu_offload_params=True, zero_init=True)
    ours = model_states(total=LLAVA_PARAMS, trainable=LLAVA_PARAMS, largest_layer=LLAVA_LARGEST,
                        zero="zero3_offload", gpus=gpus, nodes=nodes)
    assert ours.total == offload
    assert ours.host == pytest.approx(host, abs=2)


def test_deepspeeds_printed_tables_show_the_same_gpu_figures(capsys):
    stage2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime.zero import stage3

    stage2.estimate_zero2_model_states_mem_needs_all_cold(LLAVA_PARAMS, num_gpus_per_node=8)
    stage3.estimate_zero3_model_states_mem_needs_all_cold(LLAVA_PARAMS, LLAVA_LARGEST,
                                                          num_gpus_per_node=8)
    printed = capsys.readouterr().out
    for zero in ("zero2", "zero3", "zero3_offload"):
        ours = model_states(total=LLAVA_PARAMS, trainable=LLAVA_PARAMS,
                            largest_layer=LLAVA_LARGEST, zero=zero, gpus=8)
        assert f"{ours.total / 2**30:.2f}GB" in printed, (zero, printed)


def test_frozen_parameters_keep_their_weights_only():
    trainable = 340_795_392  # LLaVA-1.5-7B with LoRA r128 + the projector (test_estimate)
    lora = model_states(total=LLAVA_PARAMS + 340_795_392, trainable=trainable,
                        largest_layer=LLAVA_LARGEST, zero="zero3", gpus=8)
    assert lora.weights == 2 * (LLAVA_PARAMS + trainable) / 8
    assert lora.gradients + lora.optimizer == 16 * trainable / 8


def test_no_deepspeed_matches_accelerates_fp32_adam_estimate():
    # accelerate estimate-memory's "Training using Adam" for float32: 4x the fp32 model size
    # (weights, gradients, two Adam moments) = 16 bytes a parameter; mmjobs without DeepSpeed
    # trains in fp32 master weights too (upcast_trainable), one GPU, everything trainable.
    from accelerate.commands.estimate import estimate_training_usage

    usage = estimate_training_usage(4 * LLAVA_PARAMS, "float32")
    ours = model_states(total=LLAVA_PARAMS, trainable=LLAVA_PARAMS, largest_layer=0,
                        zero="none", gpus=1, weight_bytes=4)
    assert ours.total == max(usage.values()) == 16 * LLAVA_PARAMS
    # Its bf16 figure is the largest single component (2x the fp32 size), not their sum: it
    # leaves out the fp32 master weights and gradients that mixed precision keeps as well.
    assert max(estimate_training_usage(4 * LLAVA_PARAMS, "bfloat16").values()) == \
        8 * LLAVA_PARAMS


def test_accelerates_sizes_of_the_meta_model_agree():
    from accelerate.utils import calculate_maximum_sizes

    from mmjobs.plan.estimate import largest_layer_params
    from mmjobs.plan.models import build_meta_model, resolve_model

    model = build_meta_model(resolve_model("llava-hf/llava-1.5-7b-hf").config)
    total, largest = calculate_maximum_sizes(model)  # bytes in the config's dtype, buffers too
    width = next(model.parameters()).element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert total == width * LLAVA_PARAMS + buffers
    # accelerate's largest "layer" is a no-split module (a whole decoder layer, 202 M
    # parameters); DeepSpeed's (and ours) the largest single module: the 131 M embedding.
    assert largest_layer_params(model) == LLAVA_LARGEST
    assert largest[0] > width * LLAVA_LARGEST
