"""The training-time loader over pretokenized shards.

Input: a committed directory (local path or `s3://`) written by the pretokenize stage:
`shard-00000.parquet, ...` with columns `id: string, input_ids: list<int32>,
labels: list<int32>` (-100 = no loss), `images: list<binary>` (encoded PNG/JPEG bytes; empty
for text-only rows and for image-token models), `num_image_tokens: int32`, `length: int32`,
plus `card.json`. Preference shards (DPO, reward models; see `mmjobs.data.pretokenized`) hold
one pair per row (`chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, ...); the dataset
reads either layout and `build_dataloader` picks `PreferenceCollator` for pairs.

**Local cache.** The shards are read from memory-mapped Arrow IPC copies made once per
content (`mmjobs.data.shard_cache`), so a row read touches only that row's pages and
DataLoader workers share them.

**Work split.** `ShardDataset.__getitem__` decodes the images with PIL and runs the image
processor; DataLoader workers call it, so decoding never happens in the training process when
`num_workers > 0`. The batch sampler (`sampler.ResumableBatchSampler`) and the position
counter run in the main process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from mmjobs.data.images import ImageModeError, decode_rgb, processor_min_edge
from mmjobs.data.modality import modality_plan
from mmjobs.data.packing import IGNORE_INDEX, PackedCollator, concat_image_features
from mmjobs.data.sampler import Mode, ResumableBatchSampler, check_batching_args
from mmjobs.data.shard_cache import materialize_shards, shard_kind
from mmjobs.layout import SHARDS_CARD as CARD_NAME
from mmjobs.logs import get_logger

log = get_logger(__name__)

ImageProcessor = Callable[..., Any]


# --------------------------------------------------------------------------- dataset


def _decode_image(data: bytes, row_id: str, min_edge: int | None = None) -> Any:
    """8-bit RGB via `mmjobs.data.images` (16-bit scaled, alpha over white), as in inference;
    a large JPEG at a reduced scale that still covers `min_edge` (see `decode_rgb`)."""
    try:
        return decode_rgb(data, min_edge)
    except ImageModeError as e:
        raise ValueError(f"row {row_id!r}: image cannot be used: {e}") from e
    except Exception as e:
        raise ValueError(f"row {row_id!r}: image bytes do not decode ({e})") from e


def run_image_processor(processor: ImageProcessor, images: list[Any]) -> dict[str, torch.Tensor]:
    """Apply `processor` to one sample's PIL images; return tensors with images on dim 0.

    transformers image processors (anything with `.preprocess`) are called as
    `processor(images, return_tensors="pt")`; other callables as `processor(images)` and may
    return a tensor (taken as `pixel_values`, [n, C, H, W]) or a mapping of tensors.
    """
    if hasattr(processor, "preprocess"):
        out = processor(images, return_tensors="pt")
    else:
        out = processor(images)
    if isinstance(out, torch.Tensor):
        return {"pixel_values": out}
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in out.items()}


class ShardDataset(Dataset):
    """Map-style dataset over pretokenized shards, read lazily from memory-mapped Arrow files.

    `dataset[i]` of sample shards (`kind == "sample"`) returns:
        id                str
        input_ids         np.ndarray int32 [L]
        labels            np.ndarray int32 [L]  (-100 = no loss)
        length            int  (L)
        num_image_tokens  int
        num_images        int
        image_features    dict of tensors, dim 0 = images (e.g. pixel_values [n, C, H, W]),
                          if the row has images and an image_processor was given
        images            list of PIL RGB images, if the row has images and there is no
                          image_processor

    and of preference shards (`kind == "preference"`):
        id, length                   as above (length = the longer side)
        chosen, rejected             dicts with input_ids, labels (np.ndarray int32 [L_side]),
                                     num_image_tokens, num_images, and image_features or
                                     images of that side (the prompt's images, then the
                                     response's); a side without response images shares the
                                     prompt's processed features with the other side

    `lengths` and `num_images` come from the `length` column and the image list offsets, so
    they never touch image bytes (`num_images` counts every image stored in the row).

    Args:
        shards_uri: committed pretokenized directory (local path or s3://).
        image_processor: callable applied to each row's decoded images (see
            `run_image_processor`); e.g. a transformers `CLIPImageProcessor` (pass a
            processor's `.image_processor`, not the whole multimodal processor).
        cache_dir: local cache for converted shards (default `$MMJOBS_HOME/cache/loader`).
    """

    def __init__(self, shards_uri: str | os.PathLike, *,
                 image_processor: ImageProcessor | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.uri = str(shards_uri)
        self.image_processor = image_processor
        # Large JPEGs decode at the scale the processor needs (none without a processor).
        self.image_min_edge = (processor_min_edge(image_processor)
                               if image_processor is not None else None)
        self.root = materialize_shards(shards_uri, cache_dir)
        card = self.root / CARD_NAME
        self.card: dict[str, Any] = json.loads(card.read_text()) if card.is_file() else {}
        self.files = sorted(self.root.glob("shard-*.arrow"))
        self.kind = "sample"
        starts, where, lengths, num_images = [], [], [], []
        total = 0
        for shard_no, path in enumerate(self.files):
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            self.kind = shard_kind(reader.schema.names)
            image_columns = [c for c in ("images", "chosen_images", "rejected_images")
                             if c in reader.schema.names]
            for batch_no in range(reader.num_record_batches):
                batch = reader.get_batch(batch_no)
                starts.append(total)
                where.append((shard_no, batch_no))
                lengths.append(batch.column("length").to_numpy(zero_copy_only=False))
                num_images.append(sum(pc.list_value_length(batch.column(c)).fill_null(0)
                                      .to_numpy(zero_copy_only=False) for c in image_columns))
                total += batch.num_rows
        self._starts = np.asarray(starts, dtype=np.int64)
        self._where = where
        self.lengths: np.ndarray = (np.concatenate(lengths).astype(np.int64) if lengths
                                    else np.zeros(0, np.int64))
        self.num_images: np.ndarray = (np.concatenate(num_images).astype(np.int64)
                                       if num_images else np.zeros(0, np.int64))
        self._readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._batches: dict[tuple[int, int], pa.RecordBatch] = {}
        self._pid = os.getpid()

    @property
    def has_images(self) -> bool:
        """True if any row carries image bytes."""
        return bool(self.num_images.any())

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps and readers do not pickle (spawn/forkserver workers); reopen lazily.
        state = dict(self.__dict__)
        state["_readers"], state["_batches"] = {}, {}
        return state

    def _batch(self, key: tuple[int, int]) -> pa.RecordBatch:
        if self._pid != os.getpid():  # forked worker: do not share the parent's file handles
            self._readers, self._batches, self._pid = {}, {}, os.getpid()
        batch = self._batches.get(key)
        if batch is None:
            shard_no, batch_no = key
            reader = self._readers.get(shard_no)
            if reader is None:
                reader = pa.ipc.open_file(pa.memory_map(str(self.files[shard_no])))
                self._readers[shard_no] = reader
            # Zero-copy views into the memory map: caching them costs metadata only.
            batch = self._batches[key] = reader.get_batch(batch_no)
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} rows")
        index = int(index) % n
        at = int(np.searchsorted(self._starts, index, side="right")) - 1
        batch = self._batch(self._where[at])
        row = index - int(self._starts[at])
        if self.kind == "preference":
            return self._pair(batch, row)
        row_id = batch.column("id")[row].as_py()
        input_ids = batch.column("input_ids")[row].values.to_numpy(zero_copy_only=False)
        labels = batch.column("labels")[row].values.to_numpy(zero_copy_only=False)
        sample: dict[str, Any] = {
            "id": row_id, "input_ids": input_ids, "labels": labels, "length": len(input_ids),
            "num_image_tokens": int(batch.column("num_image_tokens")[row].as_py() or 0),
            "num_images": int(self.num_images[index]),
        }
        if sample["num_images"]:
            images = [_decode_image(b, row_id, self.image_min_edge)
                      for b in batch.column("images")[row].as_py()]
            if self.image_processor is None:
                sample["images"] = images
            else:
                sample["image_features"] = run_image_processor(self.image_processor, images)
        return sample

    def _pair(self, batch: pa.RecordBatch, row: int) -> dict[str, Any]:
        """One preference row: both sides, each with the prompt's images + its own."""
        row_id = batch.column("id")[row].as_py()

        def decode(column: str) -> list[Any]:
            return [_decode_image(b, row_id, self.image_min_edge)
                    for b in batch.column(column)[row].as_py()]

        prompt = decode("images")
        prompt_features: dict[str, torch.Tensor] | None = None
        out: dict[str, Any] = {"id": row_id, "length": int(batch.column("length")[row].as_py())}
        for side in ("chosen", "rejected"):
            ids = batch.column(f"{side}_input_ids")[row].values.to_numpy(zero_copy_only=False)
            labels = batch.column(f"{side}_labels")[row].values.to_numpy(zero_copy_only=False)
            own = decode(f"{side}_images")
            images = prompt + own
            item: dict[str, Any] = {
                "input_ids": ids, "labels": labels, "num_images": len(images),
                "num_image_tokens": int(batch.column(f"{side}_num_image_tokens")[row].as_py()
                                        or 0)}
            if images and self.image_processor is None:
                item["images"] = images
            elif own:
                item["image_features"] = run_image_processor(self.image_processor, images)
            elif images:  # usually only the prompt has images: process them once for both
                if prompt_features is None:
                    prompt_features = run_image_processor(self.image_processor, prompt)
                item["image_features"] = prompt_features
            out[side] = item
        return out


# --------------------------------------------------------------------------- collation


class PaddedCollator:
    """Collate samples into right-padded rows (random and length_grouped modes).

    Returns:
        input_ids       [B, L] int64, padded with pad_token_id; L = longest sample in the batch
        labels          [B, L] int64, padded with -100
        attention_mask  [B, L] int64, 1 on real tokens
        num_images      [B]    int64, rows of pixel_values per sample, in order
        pixel_values    [sum num_images, C, H, W] (plus other processor outputs), if any
        ids             list[str]

    transformers' padding collators (`DataCollatorWithPadding`, `DataCollatorForSeq2Seq`) pad
    through a tokenizer object; pretokenized training has none, and the padding is five lines.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        width = max((len(s["input_ids"]) for s in samples), default=0)
        shape = (len(samples), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.int64)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros(shape, dtype=torch.int64)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, :n] = torch.from_numpy(np.asarray(s["input_ids"], dtype=np.int64))
            labels[row, :n] = torch.from_numpy(np.asarray(s["labels"], dtype=np.int64))
            attention_mask[row, :n] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "num_images": torch.tensor([s["num_images"] for s in samples], dtype=torch.int64),
            "ids": [s["id"] for s in samples],
        }
        batch.update(concat_image_features(samples))
        return batch


class PreferenceCollator:
    """Collate preference pairs into one right-padded batch of 2B rows.

    Rows `0..B-1` are the chosen sequences and rows `B..2B-1` the rejected ones of the same
    pairs, so one forward pass scores both sides (what TRL's DPO trainer does too); both halves
    are padded to the same width.

    Returns:
        input_ids       [2B, L] int64, padded with pad_token_id
        labels          [2B, L] int64, -100 outside the responses and on padding
        attention_mask  [2B, L] int64
        num_images      [2B]    int64, images of each row
        pixel_values    [sum num_images, C, H, W] (plus other processor outputs), if any: the
                        chosen rows' images in row order, then the rejected rows' — a prompt
                        image therefore appears twice, once for each side's forward pass
        ids             list[str], the B pair ids
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.padded = PaddedCollator(pad_token_id)

    def __call__(self, pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = []
        for side in ("chosen", "rejected"):
            for pair in pairs:
                row = {"id": pair["id"], **pair[side]}
                rows.append(row)
        batch = self.padded(rows)
        batch["ids"] = [p["id"] for p in pairs]
        return batch


# --------------------------------------------------------------------------- loader


class ShardDataLoader:
    """A DataLoader whose position survives restarts: `state_dict()` → `{epoch, batch_index,
    seed}` counts the batches the training loop has received (not what workers prefetched).

    `for batch in loader` yields the rest of the current epoch, then advances to the next, so a
    loop resumed from `load_state_dict` at batch k of epoch e sees batches k, k+1, ... of e,
    exactly as the uninterrupted run did.
    """

    def __init__(self, dataset: ShardDataset, sampler: ResumableBatchSampler,
                 collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]], *,
                 num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None) -> None:
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn
        self.epoch, self.batch_index = 0, 0
        self._loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers else None,
            # Workers stay up across epochs: forking and reopening memory maps every epoch
            # would stall the first batches.
            persistent_workers=num_workers > 0)

    def __len__(self) -> int:
        """Batches in the current epoch on this rank."""
        return len(self.sampler.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.set_position(self.epoch, self.batch_index)
        for batch in self._loader:
            self.batch_index += 1  # before yielding: a checkpoint taken now resumes after it
            yield batch
        self.epoch, self.batch_index = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch`."""
        self.epoch, self.batch_index = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """`{epoch, batch_index, seed}` of the next batch the training loop will receive."""
        epoch, index = self.epoch, self.batch_index
        if index >= len(self.sampler.rank_batches(epoch)):
            epoch, index = epoch + 1, 0  # the epoch was consumed; resume at the next one
        return {"epoch": epoch, "batch_index": index, "seed": self.sampler.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`; the saved seed wins over the configured one."""
        self.sampler.load_state_dict(dict(state))
        self.epoch, self.batch_index = self.sampler.epoch, self.sampler.batch_index


def build_dataloader(shards_uri: str | os.PathLike, *, batch_size: int, mode: Mode,
                     max_length: int | None, seed: int, num_workers: int,
                     image_processor: ImageProcessor | None = None, rank: int = 0,
                     world_size: int = 1, pad_token_id: int | None = None,
                     drop_last: bool = False, even_batches: bool = True,
                     on_overlong: str = "error", pack_window: int = 8192,
                     cache_dir: str | os.PathLike | None = None,
                     pin_memory: bool = False, group_by_modality: bool = False,
                     modality_must_match: bool = False) -> ShardDataLoader:
    """Build the training loader over a committed pretokenized directory.

    Args:
        shards_uri: local path or s3:// URI of the pretokenize stage's committed output.
        batch_size: samples per batch (random, length_grouped); packed: at most
            `batch_size * max_length` tokens per batch.
        mode: `random` | `length_grouped` | `packed` (see `mmjobs.data.sampler`).
        max_length: the longest sample allowed (required when packed; None = no limit in
            the padded modes).
        seed: order seed; the batches of epoch e depend only on (seed, e, rank, world_size).
        num_workers: DataLoader worker processes (image decode and processing run there).
        image_processor: applied to each sample's images in the workers (required if the
            shards hold images; None for text-only or image-token models).
        rank, world_size: data-parallel share of this process.
        pad_token_id: padding id for the padded modes (default: card.json's `pad_token_id`,
            else 0; padded positions carry label -100 and attention_mask 0 anyway).
        drop_last, even_batches, on_overlong, pack_window: see `ResumableBatchSampler`.
        cache_dir: local cache for converted shards.
        pin_memory: pin batches for faster host-to-GPU copies.
        group_by_modality: when the rows mix text-only and image samples, make every
            micro-step's batches all-image or all-text across ranks (`mmjobs.data.modality`).
        modality_must_match: the caller's collectives need that (DeepSpeed; see
            `modality.ranks_need_same_modality`); mixed rows without the grouping get a warning.

    Returns:
        A `ShardDataLoader`; padded modes yield `PaddedCollator` batches, packed mode yields
        `PackedCollator` batches ([1, T] padding-free rows), and preference shards yield
        `PreferenceCollator` batches (2 x batch_size rows; not in packed mode).

    Raises:
        ValueError: bad arguments (all reported together).
        storage.IncompleteDirectoryError: `shards_uri` is not committed.
    """
    errors = check_batching_args(batch_size=batch_size, mode=mode, max_length=max_length,
                                 rank=rank, world_size=world_size, on_overlong=on_overlong,
                                 pack_window=pack_window)
    if num_workers < 0:
        errors.append(f"num_workers={num_workers}: must be >= 0")
    if errors:
        raise ValueError("build_dataloader: invalid arguments:\n  " + "\n  ".join(errors))
    dataset = ShardDataset(shards_uri, image_processor=image_processor, cache_dir=cache_dir)
    if dataset.has_images and image_processor is None:
        raise ValueError(f"{shards_uri}: {int((dataset.num_images > 0).sum())} rows carry images "
                         "but image_processor=None; pass the model's image processor (e.g. "
                         "processor.image_processor)")
    if dataset.kind == "preference" and mode == "packed":
        raise ValueError(f"{shards_uri}: preference pairs cannot be packed (the chosen and "
                         "rejected sides are scored as padded rows); use mode random or "
                         "length_grouped")
    modality = modality_plan(dataset.num_images, group=group_by_modality,
                             must_match=modality_must_match, source=shards_uri)
    sampler = ResumableBatchSampler(
        dataset.lengths, batch_size=batch_size, mode=mode, seed=seed, max_length=max_length,
        rank=rank, world_size=world_size, drop_last=drop_last, even_batches=even_batches,
        on_overlong=on_overlong, pack_window=pack_window, modality=modality)
    pad = pad_token_id if pad_token_id is not None else dataset.card.get("pad_token_id")
    pad = int(pad) if pad is not None else 0
    if mode == "packed":
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = PackedCollator()
    elif dataset.kind == "preference":
        collate = PreferenceCollator(pad)
    else:
        collate = PaddedCollator(pad)
    log.info("loader: %d rows from %s, mode=%s, batch_size=%d, %d batches/epoch on rank %d/%d",
             len(dataset), shards_uri, mode, batch_size, len(sampler), rank, world_size)
    return ShardDataLoader(dataset, sampler, collate, num_workers=num_workers,
                           pin_memory=pin_memory)
