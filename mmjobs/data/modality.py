"""Modality-grouped batch plans: at every micro-step, all ranks hold image batches or all hold
text-only batches.

Why it matters. Under DeepSpeed ZeRO-3 each parameter is a shard that the ranks gather together
(a collective) just before its module runs. A rank whose micro-batch has no image skips the
vision tower, so its next gather is for a language-model layer while a rank with images gathers
vision-tower weights: the collectives pair up wrongly and the job hangs (NCCL) or aborts with a
size mismatch (gloo). ZeRO-2 breaks the same way when the connector or the vision tower trains:
its gradient buckets hold their gradients only on the ranks that ran them. DDP copes
(`find_unused_parameters`), and a single process has nobody to disagree with.

LLaVA's answer is `group_by_modality_length` (`get_modality_length_grouped_indices` in
llava/train/llava_trainer.py): indices are split by the sign of their length (positive with an
image, negative without), each modality is length-grouped and cut into megabatches of one
optimizer step (world_size x grad_accum x per-device batch), and the megabatches are shuffled.
The two modalities' leftovers are joined into a mixed tail, placed first and last. That tail is
harmless there because LLaVA also gives every text-only sample a zero image, so its vision tower
runs on every rank anyway; the grouping is mostly for speed. mmjobs feeds no dummy images, so
here the grouping is strict, tails included:

- The unit kept homogeneous is one data-parallel micro-step: `world_size` consecutive global
  batches (the sampler deals global batch k to rank k mod world_size, so every rank's i-th batch
  belongs to unit i). The micro-steps of one optimizer step may differ in modality: each
  micro-step's forward and backward is a complete set of collectives of its own.
- Within a modality the samples are ordered as the batching mode orders them (random,
  length_grouped, packed bins), cut into batches and the batches into units; the units of both
  modalities are then shuffled together (with length_grouped, the unit holding the longest
  sample goes first, so an out-of-memory shows up at step 1, as in transformers).
- A modality's last, incomplete unit is spread over `world_size` smaller batches when it has at
  least one item per rank; otherwise it is merged with the unit before it into two units of
  smaller batches (when batch_size >= 2). Only when neither works (batch_size 1, or a modality
  with fewer items than ranks) are a few of that modality's items repeated to give every rank
  one; at most world_size - 1 repeats per modality and epoch. `drop_last` drops incomplete units
  instead, so every batch is full.

"Image" means the row carries image bytes for the vision tower (`ShardDataset.num_images > 0`).
Image-token models (Chameleon) store images as tokens and run no vision tower, so to them every
row is text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from mmjobs.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")

TEXT, IMAGE = 0, 1
MODALITY_NAMES = {TEXT: "text-only", IMAGE: "image"}


def sample_modalities(num_images: Sequence[int] | np.ndarray) -> np.ndarray:
    """Modality per sample, shape [n] int8: IMAGE where the row has images, else TEXT."""
    return (np.asarray(num_images) > 0).astype(np.int8)


def modality_counts(modality: np.ndarray) -> dict[str, int]:
    """`{"image": n, "text-only": m}`: samples per modality (absent modalities count 0)."""
    return {name: int((modality == value).sum()) for value, name in MODALITY_NAMES.items()}


def modality_plan(num_images: Sequence[int] | np.ndarray, *, group: bool, must_match: bool,
                  source: object = "data") -> np.ndarray | None:
    """The modality labels to hand the sampler (None: no grouping), logging the decision.

    Args:
        num_images: images per row (`ShardDataset.num_images`).
        group: group by modality if the rows mix modalities.
        must_match: the ranks' collectives need it (`ranks_need_same_modality`); mixed rows
            without grouping then get a warning that says what will happen.
        source: what the rows are, for the log lines.
    """
    modality = sample_modalities(num_images)
    counts = modality_counts(modality)
    if min(counts.values()) == 0:
        return None  # one modality: nothing to group, and the order stays the ungrouped one
    if group:
        log.info("%s: %d image and %d text-only rows: batches grouped by modality (each "
                 "micro-step all-image or all-text across ranks)", source, counts["image"],
                 counts["text-only"])
        return modality
    if must_match:
        log.warning("%s mixes %d image and %d text-only rows and group_by_modality is off, but "
                    "these ranks must agree on the modality at every micro-step (DeepSpeed "
                    "ZeRO-3; ZeRO-2 with a trainable connector or vision tower): the first "
                    "micro-step with images on some ranks only desynchronises their collectives "
                    "(a hang until the process-group timeout, or a size-mismatch abort). Set "
                    "train.group_by_modality: true, or leave it unset", source, counts["image"],
                    counts["text-only"])
    return None


def ranks_need_same_modality(deepspeed: str, *, vision_side_trains: bool,
                             world_size: int) -> bool:
    """Do the ranks' collectives depend on whether a micro-batch has images?

    True for several ranks under ZeRO-3 (parameter gathers in the forward pass) and under ZeRO-2
    when the connector or the vision tower trains (gradient buckets); False for DDP (it finds
    unused parameters) and for one process.
    """
    if world_size < 2 or deepspeed == "none":
        return False
    return deepspeed.startswith("zero3") or vision_side_trains


def split_even(items: Sequence[T], parts: int) -> list[list[T]]:
    """`items` cut into `parts` contiguous runs whose sizes differ by at most one (longer
    first); contiguous, so a length-grouped order stays grouped."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        out.append(list(items[start:stop]))
        start = stop
    return out


def micro_step_units(items: Sequence[T], *, batch_size: int, world_size: int,
                     drop_last: bool = False) -> list[list[list[T]]]:
    """Cut one modality's ordered items into micro-step units of `world_size` batches.

    Args:
        items: the modality's items in batching order: sample indices (padded modes) or bins
            (packed mode; lists of sample indices).
        batch_size: items per batch.
        world_size: batches per unit (one per rank).
        drop_last: drop the incomplete last unit instead of spreading it out.

    Returns:
        Units; each unit is `world_size` non-empty batches of at most `batch_size` items.
        Every item appears exactly once, except for the repeats described in the module
        docstring.
    """
    per_unit = batch_size * world_size
    full = len(items) // per_unit
    units = [split_even(items[u * per_unit:(u + 1) * per_unit], world_size)
             for u in range(full)]
    rest = list(items[full * per_unit:])
    if rest and not drop_last:
        if len(rest) >= world_size:
            units.append(split_even(rest, world_size))
        elif units and batch_size >= 2:
            # (B·W + k) items over 2W batches: each gets between B/2 >= 1 and B items.
            pooled = [item for batch in units.pop() for item in batch] + rest
            halves = split_even(pooled, 2 * world_size)
            units += [halves[:world_size], halves[world_size:]]
        else:
            fill = world_size - len(rest)
            log.info("repeating %d item(s) so each of %d ranks gets one of this modality's last "
                     "%d", fill, world_size, len(rest))
            units.append(split_even(rest + [items[i % len(items)] for i in range(fill)],
                                    world_size))
    return units


def order_units(units: list[list[list[int]]], rng: np.random.Generator, *,
                longest: int | None = None) -> list[list[int]]:
    """Shuffle the units (all modalities together) and flatten them into the global batch
    list; the unit holding sample `longest`, if given, is swapped to the front.

    Returns:
        Global batches; batch k goes to rank k mod world_size.
    """
    shuffled = [units[i] for i in rng.permutation(len(units))]
    if longest is not None:
        first = next((k for k, unit in enumerate(shuffled)
                      if any(longest in batch for batch in unit)), 0)
        shuffled[0], shuffled[first] = shuffled[first], shuffled[0]
    return [batch for unit in shuffled for batch in unit]
