"""GPU memory of a training step: model states (DeepSpeed's accounting) and activations.

**Model states** per GPU, for P parameters of which T train (F = P - T frozen), N GPUs in all,
mixed precision (16-bit weights, fp32 master weights and Adam moments), in bytes:

| ZeRO | weights | gradients | optimizer | other |
|---|---|---|---|---|
| none (DDP) | 2·F + 4·T (fp32 trained) | 4·T (+4·T DDP buckets, N > 1) | 8·T (m, v) | |
| zero2 | 2·P | (2 + 4)·T / N (16-bit, fp32) | (4 + 8)·T / N | |
| zero3 | 2·P / N | 4·T / N | 12·T / N | 4·L (gathered layer) |
| zero3_offload | 0 | 0 | 0 | 4·L; host: (2·P + 16·T)·1.5 / nodes |

With everything trainable this is DeepSpeed's own estimate (`estimate_zero2_model_states_mem_
needs`: 2·P + 18·P/N; `estimate_zero3_model_states_mem_needs`: 4·L + 18·P/N; offload: 4·L on
the GPU, 18·P·1.5 per node on the CPU), L = the largest layer's parameters (DeepSpeed's
`model_to_params`: the most parameters held directly by one module). Frozen parameters keep
their 16-bit weights only (ZeRO-3 partitions them too). Frozen copies (a dpo/ppo reference,
a ppo reward model) are whole 16-bit models on every GPU.

**Activations** per GPU, for one micro-batch of B sequences of S tokens, 16-bit (2 bytes), with
flash/SDPA attention (no S² scores kept). A Llama-style decoder layer (width h, key/value width
h_kv, MLP width i) keeps per token, for the backward pass, in 16-bit elements: for each of its
two RMSNorms the input upcast to fp32 (2h), the normalised and the weighted output (2h); q, k,
v (h + 2·h_kv) and the attention output (h); the MLP's gate output, activation, up output and
product (4i): (10h + 2·h_kv + 4i) in all; per-head norms on q and k (Chameleon) add their
inputs and outputs (2h + 2·h_kv). That is what autograd saves for transformers' Llama and
Chameleon layers (tests/unit/plan/test_memory.py counts the saved tensors). Without gradient
checkpointing all layers keep that; with it (transformers checkpoints every decoder layer) each
keeps only its input (h) and one layer is recomputed at a time. Eager attention adds the S×S
probabilities (a·S per token: 6 bytes, the fp32 softmax output and its 16-bit copy) and k, v
repeated to every query head. The loss adds the logits: B·S·V elements at 10 bytes at its peak
(16-bit logits, their fp32 copy, the fp32 log-softmax; `mmjobs.train.batches.loss_sum`,
measured with torch's profiler in the same test). A trained vision tower (CLIP-style: 8h + 2i
per patch) and a trained connector add theirs; a frozen tower keeps nothing (no gradient flows
into it). RL steps also hold the rollout's KV cache while sampling (2 · layers · h_kv · 2 bytes
per token), not at the same time as the update's activations: the larger of the two counts.

Not counted: the CUDA context, NCCL buffers, ZeRO's communication buckets, the allocator's
fragmentation and transient workspaces; the plan's 10% headroom is for them. Sequences are
taken at their longest (every sample max_length tokens): the worst batch, not the typical one.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# Bytes per trainable parameter under DeepSpeed: 16-bit weight + fp32 master + Adam m, v.
MIXED_TRAINABLE = 16
LOGIT_BYTES = 10  # peak bytes per logit in loss_sum (measured)
ACT_BYTES = 2


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes on one GPU (and in host memory per node, for zero3_offload)."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float = 0.0
    frozen_copies: float = 0.0
    host: float = 0.0

    @property
    def total(self) -> float:
        """GPU bytes of the model states."""
        return self.weights + self.gradients + self.optimizer + self.gathered + \
            self.frozen_copies


def model_states(*, total: int, trainable: int, largest_layer: int, zero: str, gpus: int,
                 nodes: int = 1, weight_bytes: int = 2, frozen_copies: int = 0) -> ModelStates:
    """Model-state bytes per GPU (see the module docstring).

    Args:
        total, trainable: parameter counts P and T.
        largest_layer: L, the most parameters one module holds directly (ZeRO-3's gather).
        zero: none, zero2, zero3 or zero3_offload.
        gpus: N, GPUs over all nodes (ZeRO partitions over all of them).
        nodes: nodes (zero3_offload's host memory is per node).
        weight_bytes: bytes of a weight in the model's dtype (2 for bf16/fp16, 4 for fp32).
        frozen_copies: parameters of frozen extra models on every GPU (reference, reward).
    """
    frozen = total - trainable
    n = max(gpus, 1)
    extra = float(weight_bytes * frozen_copies)
    if zero == "none":
        buckets = 4 * trainable if n > 1 else 0  # DDP's gradient buckets copy the gradients
        return ModelStates(weights=weight_bytes * frozen + 4 * trainable,
                           gradients=4 * trainable + buckets, optimizer=8 * trainable,
                           frozen_copies=extra)
    if zero == "zero2":
        return ModelStates(weights=weight_bytes * total, gradients=6 * trainable / n,
                           optimizer=12 * trainable / n, frozen_copies=extra)
    if zero == "zero3":
        return ModelStates(weights=weight_bytes * total / n, gradients=4 * trainable / n,
                           optimizer=12 * trainable / n, gathered=4 * largest_layer,
                           frozen_copies=extra)
    if zero == "zero3_offload":
        host = (weight_bytes * total + MIXED_TRAINABLE * trainable) * 1.5 / max(nodes, 1)
        return ModelStates(weights=0, gradients=0, optimizer=0, gathered=4 * largest_layer,
                           frozen_copies=extra, host=host)
    raise ValueError(f"train.deepspeed: {zero!r} is not none, zero2, zero3 or zero3_offload")


@dataclass(frozen=True)
class TextDims:
    """The shape of a decoder-only language model (what its activations depend on)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    qk_norm: bool = False  # per-head norms on q and k (Chameleon)

    @property
    def kv_width(self) -> int:
        """Width of k (and v): kv_heads x head size."""
        return self.hidden * self.kv_heads // max(self.heads, 1)


@dataclass(frozen=True)
class VisionDims:
    """A ViT-style vision tower and its connector, per image."""

    layers: int
    hidden: int
    intermediate: int
    patches: int  # tokens through the tower per image (CLS included)
    image_tokens: int  # tokens the connector emits per image
    text_hidden: int


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one GPU."""

    layers: float
    logits: float
    vision: float = 0.0
    rollout_cache: float = 0.0

    @property
    def total(self) -> float:
        """Peak: the update's activations, or the rollout's KV cache if larger."""
        return max(self.layers + self.logits + self.vision, self.rollout_cache)


def decoder_layer_elements(dims: TextDims, *, eager_seq_len: int = 0) -> float:
    """Elements one decoder layer keeps per token for its backward pass (see the module
    docstring); `eager_seq_len` > 0 adds eager attention's probabilities (in 16-bit elements)."""
    per_token = 10 * dims.hidden + 2 * dims.kv_width + 4 * dims.intermediate
    if dims.qk_norm:  # their inputs and outputs
        per_token += 2 * dims.hidden + 2 * dims.kv_width
    if eager_seq_len:  # the probabilities, and k, v repeated to every query head
        per_token += dims.heads * eager_seq_len * 6 / ACT_BYTES
        per_token += 2 * (dims.hidden - dims.kv_width)
    return per_token


def activation_bytes(dims: TextDims, *, sequences: int, seq_len: int, checkpointing: bool,
                     logit_positions: int | None = None, eager: bool = False,
                     vision: VisionDims | None = None, images: int = 0,
                     vision_trains: bool = False, connector_trains: bool = False,
                     rollout_tokens: int = 0) -> Activations:
    """Activation bytes of a micro-batch of `sequences` x `seq_len` tokens.

    Args:
        logit_positions: positions per sequence whose logits the loss takes (default all;
            0 for a reward model, which reads hidden states only).
        eager: eager attention (keeps the S x S probabilities).
        vision, images: the vision tower / connector shape and images in the micro-batch.
        vision_trains, connector_trains: whether their activations are kept.
        rollout_tokens: RL only: sequences x tokens in the rollout's KV cache.
    """
    tokens = sequences * seq_len
    layer = decoder_layer_elements(dims, eager_seq_len=seq_len if eager else 0) * ACT_BYTES
    if checkpointing:
        kept = dims.layers * dims.hidden * ACT_BYTES * tokens + layer * tokens
    else:
        kept = dims.layers * layer * tokens
    positions = seq_len if logit_positions is None else logit_positions
    logits = float(sequences * positions * dims.vocab * LOGIT_BYTES)
    vision_bytes = 0.0
    if vision is not None and images:
        if vision_trains:
            per_patch = 8 * vision.hidden + 2 * vision.intermediate
            vision_bytes += vision.layers * per_patch * vision.patches * images * ACT_BYTES
        if connector_trains:  # input, hidden before and after the activation
            per_token = vision.hidden + 2 * vision.text_hidden
            vision_bytes += per_token * vision.image_tokens * images * ACT_BYTES
    cache = float(rollout_tokens * 2 * dims.layers * dims.kv_width * ACT_BYTES)
    return Activations(layers=float(kept), logits=logits, vision=vision_bytes,
                       rollout_cache=cache)


def gib(value: float) -> float:
    """Bytes -> GiB."""
    return value / GIB
