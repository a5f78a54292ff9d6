"""From loader batches to model inputs, and the token-summed loss the trainer normalises.

Loader batches (see `mmjobs.data.loader`) come in two layouts:

    padded  input_ids, labels, attention_mask [B, L]; pixel_values [sum num_images, C, H, W]
    packed  input_ids, labels, position_ids [1, T]; cu_seq_lens_q/k [N + 1], max_length_q/k;
            pixel_values as above

plus metadata that is not a model input (`ids`, `num_images`, `seq_lens`, `cu_seqlens`,
`max_seqlen`). Packed rows rely on `position_ids` restarting at 0 for every sample: with SDPA
or eager attention transformers builds a block-diagonal causal mask from them; with
flash-attention-2 the `cu_seq_lens_*` kwargs select the varlen kernel. Those kwargs are passed
only to flash-attention models (other kernels do not take them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
METADATA_KEYS = frozenset({"ids", "num_images", "seq_lens", "cu_seqlens", "max_seqlen"})
FLASH_KEYS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


def model_inputs(batch: Mapping[str, Any], *, device: torch.device, float_dtype: torch.dtype,
                 flash_attention: bool) -> dict[str, Any]:
    """The model's keyword inputs for `batch`, on `device`; labels are left out (the loss is
    computed by `loss_sum`). Floating tensors (pixel values) are cast to `float_dtype`, the
    dtype of the vision weights, since a bf16 model does not take fp32 pixels.

    `use_cache=False` always: with a KV cache object present transformers skips the
    packed-sequence detection and lets packed samples attend to each other.
    """
    drop = METADATA_KEYS | {"labels"} | (frozenset() if flash_attention else FLASH_KEYS)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in drop:
            continue
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(float_dtype)
        out[key] = value
    out["use_cache"] = False
    return out


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled (assistant) tokens.

    Args:
        logits: [B, T, V] model outputs.
        labels: [B, T] token ids, -100 where no loss is taken (prompt, images, padding,
            and the first token of every packed sample).

    Returns:
        (sum of the token losses as a float32 scalar tensor, number of labelled tokens).

    The sum, not the mean, so the trainer can divide by the labelled tokens of the whole
    optimizer step over all ranks: every assistant token then weighs the same, however the
    tokens fall into micro-batches, packed rows and ranks.
    """
    labels = labels.to(logits.device)
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, int((shift_labels != IGNORE_INDEX).sum())


def label_tokens(batch: Mapping[str, Any]) -> int:
    """Labelled tokens `loss_sum` will count in `batch` (known before the forward pass)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sample_lengths(batch: Mapping[str, Any]) -> torch.Tensor:
    """Real token count of each sample, [N] (padding excluded)."""
    if "seq_lens" in batch:
        return batch["seq_lens"].to(torch.int64)
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1)
    return torch.tensor([batch["input_ids"].shape[1]] * batch["input_ids"].shape[0])


def num_images(batch: Mapping[str, Any]) -> int:
    """Images in `batch`."""
    n = batch.get("num_images")
    return int(n.sum()) if torch.is_tensor(n) else 0
