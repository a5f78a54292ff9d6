"""Sequence packing: bin planning and the padding-free collator for packed batches.

A packed batch concatenates whole samples into one row with no padding (transformers'
"padding-free" layout, as `DataCollatorWithFlattening` produces it):

    input_ids     [1, T]  int64   samples back to back, T <= batch_size * max_length
    labels        [1, T]  int64   the sample's labels, first token of every sample = -100
    position_ids  [1, T]  int64   0, 1, ... restarting at every sample start
    cu_seqlens    [N + 1] int32   sample boundaries, for flash-attn varlen kernels

`position_ids` lets transformers separate the samples by itself: its flash-attention path
detects packed rows from `position_ids` when the batch size is 1, and its SDPA/eager mask
builder (`masking_utils.find_packed_sequence_indices`) turns the resets into a block-diagonal
causal mask. Setting each sample's first label to -100 stops the loss at sample `k`'s last token
from predicting sample `k + 1`'s first token (the model shifts labels by one internally).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

IGNORE_INDEX = -100


def pack_sequences(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Pack samples into bins of at most `capacity` tokens (best-fit decreasing).

    Samples are taken longest first; each goes into the open bin with the least room that still
    fits it, or into a new bin. Best-fit decreasing uses at most 11/9 OPT + 1 bins, like
    first-fit decreasing, and with a sorted list of free capacities each placement is one
    binary search, so a 10k-sample window packs in milliseconds.

    Args:
        lengths: token count of each sample, shape [n]; every entry must be <= capacity.
        capacity: bin capacity in tokens (the sampler packs whole batches:
            `batch_size * max_length`).

    Returns:
        Bins as lists of positions into `lengths`; every position appears in exactly one bin.
        Within a bin, samples are in decreasing length order.

    Raises:
        ValueError: a length is < 1 or > capacity.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return []
    if int(lens.min()) < 1 or int(lens.max()) > capacity:
        raise ValueError(f"pack_sequences: lengths must be in [1, {capacity}], got "
                         f"[{int(lens.min())}, {int(lens.max())}]")
    order = np.argsort(-lens, kind="stable")  # stable: ties keep the caller's (shuffled) order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin number), ascending
    for pos in order.tolist():
        size = int(lens[pos])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([pos])
            remaining, number = capacity - size, len(bins) - 1
        else:
            remaining, number = free.pop(at)
            bins[number].append(pos)
            remaining -= size
        if remaining > 0:
            bisect.insort(free, (remaining, number))
    return bins


def concat_image_features(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate each sample's image-processor outputs along dim 0, in sample order.

    Each sample's `image_features` maps names (`pixel_values`, and whatever else its processor
    returns, e.g. `image_sizes` or `image_grid_thw`) to tensors whose dim 0 counts that sample's
    images (or patches). Samples without images contribute nothing, so `pixel_values` is
    [sum of num_images, C, H, W] for CLIP-style processors and its rows follow the image
    placeholder tokens of `input_ids` in order.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for sample in samples:
        for key, value in (sample.get("image_features") or {}).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values, dim=0) for key, values in parts.items()}


class PackedCollator:
    """Collate the samples of one packed batch into a single padding-free row.

    Uses transformers' `DataCollatorWithFlattening` for `input_ids`, `labels` (first token of
    each sample set to -100), `position_ids` and the flash-attention kwargs `cu_seq_lens_q/k`,
    `max_length_q/k` (which transformers models read from `**kwargs`), and adds:

        cu_seqlens     [N + 1] int32  same as cu_seq_lens_q, the name flash-attn uses
        seq_lens       [N]     int32  tokens of each sample
        max_seqlen     int            longest sample
        num_images     [N]     int64  images of each sample (rows of pixel_values, in order)
        pixel_values   [sum num_images, C, H, W]  (plus other processor outputs), if any
        ids            list[str]      sample ids, in row order

    Pass only model inputs to the model: `seq_lens`, `num_images` and `ids` are metadata.
    """

    def __init__(self) -> None:
        self._flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=True)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self._flatten([{"input_ids": s["input_ids"], "labels": s["labels"]}
                               for s in samples], return_tensors="pt")
        seq_lens = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.int32)
        batch["cu_seqlens"] = batch["cu_seq_lens_q"]
        batch["seq_lens"] = seq_lens
        batch["max_seqlen"] = int(seq_lens.max()) if len(samples) else 0
        batch["num_images"] = torch.tensor([s["num_images"] for s in samples], dtype=torch.int64)
        batch["ids"] = [s["id"] for s in samples]
        batch.update(concat_image_features(samples))
        return dict(batch)
