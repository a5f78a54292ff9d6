"""Batch orders for training: deterministic per (seed, epoch), resumable, sharded by rank.

Every rank computes the same *global* list of batches for an epoch from `(seed, epoch)` alone,
then takes batches `rank, rank + world_size, ...`. So ranks get disjoint batches that together
cover the epoch, nobody communicates, and a restarted job recomputes exactly the same lists —
which is what makes `{epoch, batch_index, seed}` a complete resume position.

Modes:
- `random`: a seeded permutation cut into batches of `batch_size` (padded to the batch maximum
  by the collator).
- `length_grouped`: transformers' `get_length_grouped_indices` (mega-batches of
  `50 * batch_size` samples sorted by length, longest batch first), cut into batches; padding
  drops because neighbours have similar lengths.
- `packed`: a seeded permutation, packed window by window into bins of `max_length` tokens
  (best-fit decreasing, `packing.pack_sequences`); bins are shuffled and `batch_size` bins make
  one batch (flattened into one row by `packing.PackedCollator`).

With `modality` (one label per sample, `mmjobs.data.modality`) on data that mixes text-only and
image samples, each mode orders every modality on its own and the batches form micro-step units
that are all-image or all-text across ranks (what DeepSpeed ZeRO-3 needs; see that module).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from mmjobs.data.modality import micro_step_units, order_units
from mmjobs.data.packing import pack_sequences
from mmjobs.logs import get_logger

log = get_logger(__name__)

Mode = Literal["random", "length_grouped", "packed"]
MODES: tuple[str, ...] = ("random", "length_grouped", "packed")
OVERLONG: tuple[str, ...] = ("error", "drop")


def check_batching_args(*, batch_size: int, mode: str, max_length: int | None, rank: int,
                        world_size: int, on_overlong: str = "error",
                        pack_window: int = 8192) -> list[str]:
    """Return every problem with these batching arguments (empty list: all fine)."""
    errors = []
    if batch_size < 1:
        errors.append(f"batch_size={batch_size}: must be >= 1")
    if mode not in MODES:
        errors.append(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    if mode == "packed" and max_length is None:
        errors.append("max_length=None: packed mode needs max_length (tokens per bin)")
    if max_length is not None and max_length < 1:
        errors.append(f"max_length={max_length}: must be >= 1 (or None for no limit)")
    if world_size < 1:
        errors.append(f"world_size={world_size}: must be >= 1")
    elif not 0 <= rank < world_size:
        errors.append(f"rank={rank}: must be in [0, world_size={world_size})")
    if on_overlong not in OVERLONG:
        errors.append(f"on_overlong={on_overlong!r}: must be one of {', '.join(OVERLONG)}")
    if pack_window < 1:
        errors.append(f"pack_window={pack_window}: must be >= 1")
    return errors


def _seed_for(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch); unlike `seed + epoch`, (1, 0) and (0, 1) differ."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class ResumableBatchSampler(Sampler[list[int]]):
    """Yield this rank's batches (lists of dataset indices) of the current epoch.

    Iterating starts at `batch_index` of `epoch` and, once the epoch is exhausted, moves on to
    the next epoch, so plain `for` loops over several epochs get fresh orders. The position here
    is where the sampler has *drawn* to; a DataLoader with workers draws ahead of what the
    training loop consumed, so checkpoint `ShardDataLoader.state_dict()`, which counts consumed
    batches, rather than this one.

    Args:
        lengths: tokens per sample, shape [n] (`ShardDataset.lengths`).
        batch_size: samples per batch (random, length_grouped) or bins per batch (packed).
        mode: `random`, `length_grouped` or `packed`.
        seed: base seed; the order of epoch `e` depends only on (seed, e).
        max_length: bin capacity (packed, required); in the padded modes an upper bound on
            sample length (None: no limit).
        rank, world_size: this process's share; batches `rank::world_size` of the global list.
        drop_last: drop the last global batch if it is short (fewer samples/bins than
            batch_size).
        even_batches: give every rank the same number of batches by repeating the epoch's first
            batches on the ranks that are short (as `DistributedSampler` does), so DDP ranks
            never wait on a peer that has run out. False: ranks are strictly disjoint and
            covering but may differ by one batch.
        on_overlong: samples longer than max_length: `error` (default; truncating would cut
            image tokens away from their pixels) or `drop` (skipped, with a warning).
        pack_window: samples packed together; bins only form within a window, so larger windows
            pack tighter and each epoch still gets new bins.
        mega_batch_mult: length_grouped mega-batch size in batches (None: transformers'
            default, 50, or fewer on tiny datasets so there are at least 4 mega-batches).
        modality: per-sample modality labels, shape [n] (`modality.sample_modalities`); when
            they mix, every micro-step's `world_size` batches share one modality (see
            `mmjobs.data.modality`; every rank then gets the same number of batches, and
            drop_last drops each modality's incomplete last micro-step). None, or a single
            modality: no grouping.

    Raises:
        ValueError: bad arguments, or overlong samples with on_overlong="error".
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, *, batch_size: int,
                 mode: Mode = "random", seed: int = 0, max_length: int | None = None,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 even_batches: bool = True, on_overlong: str = "error",
                 pack_window: int = 8192, mega_batch_mult: int | None = None,
                 modality: Sequence[int] | np.ndarray | None = None) -> None:
        errors = check_batching_args(batch_size=batch_size, mode=mode, max_length=max_length,
                                     rank=rank, world_size=world_size, on_overlong=on_overlong,
                                     pack_window=pack_window)
        if modality is not None and len(modality) != len(lengths):
            errors.append(f"modality: {len(modality)} labels for {len(lengths)} samples; give "
                          "one per sample")
        if errors:
            raise ValueError("invalid batching arguments:\n  " + "\n  ".join(errors))
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.modality = None if modality is None else np.asarray(modality)
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        self.max_length, self.rank, self.world_size = max_length, rank, world_size
        self.drop_last, self.even_batches = drop_last, even_batches
        self.pack_window, self.mega_batch_mult = pack_window, mega_batch_mult
        self.eligible = self._eligible(on_overlong)
        self.epoch = 0
        self.batch_index = 0
        self._cached: tuple[tuple[int, int], list[list[int]]] | None = None

    def _eligible(self, on_overlong: str) -> np.ndarray:
        """Indices of samples that can be batched (all of them unless too long)."""
        if self.max_length is None:
            return np.arange(len(self.lengths))
        too_long = np.flatnonzero(self.lengths > self.max_length)
        if too_long.size and on_overlong == "error":
            raise ValueError(
                f"{too_long.size} of {len(self.lengths)} samples are longer than "
                f"max_length={self.max_length} (longest {int(self.lengths.max())} tokens, first "
                f"index {int(too_long[0])}); raise max_length, filter them when pretokenizing, "
                "or pass on_overlong='drop' to skip them")
        if too_long.size:
            log.warning("dropping %d of %d samples longer than max_length=%d",
                        too_long.size, len(self.lengths), self.max_length)
        return np.flatnonzero(self.lengths <= self.max_length)

    # ------------------------------------------------------------------ epoch plans

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order (a pure function of seed and epoch)."""
        seed, size = _seed_for(self.seed, epoch), self.batch_size
        if self.groups_modalities:
            return self._modality_grouped_batches(seed)
        if self.mode == "packed":
            bins = self._packed_bins(np.random.default_rng(seed), self.eligible)
            batches = [[i for b in bins[k:k + size] for i in b]
                       for k in range(0, len(bins), size)]
            if self.drop_last and len(bins) % size:
                batches.pop()  # the last batch holds fewer than batch_size bins
            return batches
        order = self._order(self.eligible, seed).tolist()
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    @property
    def groups_modalities(self) -> bool:
        """True if batches are grouped by modality (labels given, and the data mixes them)."""
        return self.modality is not None and np.unique(self.modality[self.eligible]).size > 1

    def _order(self, idx: np.ndarray, seed: int) -> np.ndarray:
        """The samples `idx` in the order of a padded mode (random, length_grouped)."""
        if self.mode == "random":
            return idx[np.random.default_rng(seed).permutation(len(idx))]
        if len(idx) == 0:
            return idx
        g = torch.Generator().manual_seed(seed)
        pos = get_length_grouped_indices(self.lengths[idx].tolist(), self.batch_size,
                                         mega_batch_mult=self.mega_batch_mult, generator=g)
        return idx[np.asarray(pos, dtype=np.int64)]

    def _modality_grouped_batches(self, seed: int) -> list[list[int]]:
        """Each modality ordered on its own, cut into micro-step units of world_size batches,
        the units shuffled together (`mmjobs.data.modality`)."""
        assert self.modality is not None  # checked by groups_modalities
        rng = np.random.default_rng(seed)
        units: list[list[list[int]]] = []
        labels = self.modality[self.eligible]
        args = {"batch_size": self.batch_size, "world_size": self.world_size,
                "drop_last": self.drop_last}
        for value in np.unique(labels):  # sorted: the same draws in the same order every time
            idx, sub_seed = self.eligible[labels == value], int(rng.integers(2**63))
            if self.mode == "packed":  # batch_size bins per batch, flattened into samples
                bins = self._packed_bins(np.random.default_rng(sub_seed), idx)
                units += [[[i for b in batch for i in b] for batch in unit]
                          for unit in micro_step_units(bins, **args)]
            else:
                units += micro_step_units(self._order(idx, sub_seed).tolist(), **args)
        longest = None  # length_grouped: the longest sample's micro-step first, as transformers
        if self.mode == "length_grouped" and len(self.eligible):
            longest = int(self.eligible[np.argmax(self.lengths[self.eligible])])
        return order_units(units, rng, longest=longest)

    def _packed_bins(self, rng: np.random.Generator, idx: np.ndarray) -> list[list[int]]:
        """Shuffle the samples `idx`, pack each window of them into bins, shuffle the bins."""
        assert self.max_length is not None  # checked in __init__
        order = idx[rng.permutation(len(idx))]
        bins: list[list[int]] = []
        for start in range(0, len(order), self.pack_window):
            window = order[start:start + self.pack_window]
            bins.extend(window[b].tolist() for b in pack_sequences(self.lengths[window],
                                                                  self.max_length))
        # Best-fit decreasing emits long-first bins; shuffle so batch order carries no length
        # trend across the epoch.
        return [bins[i] for i in rng.permutation(len(bins))]

    def packed_bins(self, epoch: int) -> list[list[int]]:
        """All ranks' bins of `epoch` in batch order (packed mode; for inspection and tests)."""
        if self.mode != "packed":
            raise ValueError(f"packed_bins: mode is {self.mode!r}, not 'packed'")
        if self.groups_modalities:
            raise ValueError("packed_bins: bins are planned per modality when batches are "
                             "grouped by modality; read global_batches instead")
        return self._packed_bins(np.random.default_rng(_seed_for(self.seed, epoch)),
                                 self.eligible)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order (cached for the last epoch asked)."""
        key = (epoch, self.seed)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        batches = self.global_batches(epoch)
        n, w = len(batches), self.world_size
        if self.even_batches and w > 1 and n % w:
            per_rank = -(-n // w)
            batches = batches + [batches[i % n] for i in range(per_rank * w - n)]
        mine = batches[self.rank::w]
        self._cached = (key, mine)
        return mine

    # ------------------------------------------------------------------ iteration and state

    def __len__(self) -> int:
        """Batches of the current epoch on this rank (all of them, not just the remaining)."""
        return len(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches(self.epoch)
        while self.batch_index < len(batches):
            self.batch_index += 1
            yield batches[self.batch_index - 1]
        self.epoch, self.batch_index = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (DistributedSampler API)."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batch_index: int) -> None:
        """Start the next iteration at batch `batch_index` of `epoch`."""
        if epoch < 0 or batch_index < 0:
            raise ValueError(f"set_position: epoch={epoch}, batch_index={batch_index} must be "
                             ">= 0")
        self.epoch, self.batch_index = epoch, batch_index

    def state_dict(self) -> dict[str, int]:
        """`{epoch, batch_index, seed}` of the next batch to draw (end of epoch → next epoch)."""
        epoch, index = self.epoch, self.batch_index
        if index >= len(self.rank_batches(epoch)):
            epoch, index = epoch + 1, 0
        return {"epoch": epoch, "batch_index": index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a `state_dict()` position; the saved seed wins over the configured one."""
        missing = {"epoch", "batch_index", "seed"} - set(state)
        if missing:
            raise ValueError(f"load_state_dict: missing keys {sorted(missing)}; expected the "
                             "dict returned by state_dict()")
        if int(state["seed"]) != self.seed:
            log.warning("resuming with the checkpoint's seed %s instead of the configured %s, so "
                        "the batch order continues the interrupted run", state["seed"], self.seed)
            self.seed = int(state["seed"])
        self.set_position(int(state["epoch"]), int(state["batch_index"]))
