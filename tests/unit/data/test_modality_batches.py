"""Modality-grouped batching (`mmjobs.data.modality` + `ResumableBatchSampler(modality=...)`):
every micro-step all-image or all-text across ranks, every sample once per epoch, deterministic,
resumable, on the same shards and loader the trainer uses."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from mmjobs.data.loader import build_dataloader
from mmjobs.data.modality import (
    IMAGE,
    TEXT,
    micro_step_units,
    modality_plan,
    ranks_need_same_modality,
    sample_modalities,
)
from mmjobs.data.sampler import ResumableBatchSampler
from tests.unit.data.test_loader import ColourProcessor, make_rows, write_shards

MODES = ("random", "length_grouped", "packed")
MAX_LEN = 2048


def mix665k_like(n: int = 3327, text_only: int = 203, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA-1.5's mix665k at 1/200 scale: 6.1% language-only rows (ShareGPT; 40,688 of
    665,298), image rows = 576 image tokens + a conversation. Odd counts on purpose.

    Returns:
        (lengths [n], modality [n]) with the text-only rows scattered.
    """
    rng = np.random.default_rng(seed)
    modality = np.full(n, IMAGE, dtype=np.int8)
    modality[rng.choice(n, text_only, replace=False)] = TEXT
    text = np.minimum(rng.geometric(1 / 300, n) + 20, MAX_LEN - 600)
    lengths = np.where(modality == IMAGE, 576 + text // 3, np.minimum(text * 3, MAX_LEN))
    return lengths.astype(np.int64), modality


def rank_plans(lengths, modality, *, world_size: int, epoch: int = 0, **kw
               ) -> list[list[list[int]]]:
    """Every rank's batches of `epoch`."""
    return [ResumableBatchSampler(lengths, rank=r, world_size=world_size, modality=modality,
                                  max_length=MAX_LEN, **kw).rank_batches(epoch)
            for r in range(world_size)]


def assert_micro_steps_homogeneous(per_rank: list[list[list[int]]], modality) -> None:
    """Same number of batches on every rank; at each micro-step every rank's batch is
    non-empty and all its samples, on all ranks, share one modality."""
    assert len({len(batches) for batches in per_rank}) == 1
    for step, batches in enumerate(zip(*per_rank, strict=True)):
        assert all(batches), f"micro-step {step}: an empty batch"
        labels = {int(modality[s]) for batch in batches for s in batch}
        assert len(labels) == 1, f"micro-step {step} mixes modalities: {batches}"


def repeats_allowed(modality, batch_size: int, world_size: int) -> int:
    """How many repeats the module docstring allows in one epoch (0 unless batch_size is 1 or
    a modality has fewer samples than ranks)."""
    counts = Counter(int(m) for m in modality)
    if batch_size >= 2 and min(counts.values()) >= world_size:
        return 0
    return (world_size - 1) * len(counts)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 4), (8, 16), (3, 1), (8, 2)])
def test_mix665k_like_micro_steps_are_homogeneous_and_cover_the_epoch(mode, world_size,
                                                                      batch_size):
    lengths, modality = mix665k_like()
    for epoch in (0, 1):
        per_rank = rank_plans(lengths, modality, world_size=world_size, batch_size=batch_size,
                              mode=mode, seed=7, epoch=epoch)
        assert_micro_steps_homogeneous(per_rank, modality)
        seen = Counter(s for batches in per_rank for batch in batches for s in batch)
        assert set(seen) == set(range(len(lengths))), "a sample is missing"
        extra = sum(seen.values()) - len(lengths)
        if mode == "packed":  # repeats are whole bins; each bin holds >= 1 sample
            assert extra >= 0
        else:
            assert 0 <= extra <= repeats_allowed(modality, batch_size, world_size)
            assert all(len(batch) <= batch_size for b in per_rank for batch in b)
        if mode == "packed":
            assert all(int(lengths[batch].sum()) <= batch_size * MAX_LEN
                       for b in per_rank for batch in b)


@pytest.mark.parametrize(("n_image", "n_text", "batch_size", "world_size"), [
    (7, 5, 2, 2),     # image tail spread over both ranks; text tail merged with its last unit
    (9, 9, 4, 2),     # both tails >= ranks: spread
    (1, 6, 4, 2),     # fewer image samples than ranks: one is repeated
    (13, 200, 1, 8),  # batch 1: tails shorter than the ranks get repeats
    (100, 3, 16, 8),  # a 3-sample modality on 8 ranks
    (2, 2, 3, 2),     # everything is a tail
])
@pytest.mark.parametrize("drop_last", [False, True])
def test_odd_counts_and_tails(n_image, n_text, batch_size, world_size, drop_last):
    modality = np.array([IMAGE] * n_image + [TEXT] * n_text, dtype=np.int8)
    lengths = np.arange(1, len(modality) + 1) % 50 + 10
    per_rank = rank_plans(lengths, modality, world_size=world_size, batch_size=batch_size,
                          mode="random", seed=3, drop_last=drop_last)
    assert_micro_steps_homogeneous(per_rank, modality)
    seen = Counter(s for batches in per_rank for batch in batches for s in batch)
    if drop_last:  # whole batches only, nobody twice
        assert all(len(batch) == batch_size for b in per_rank for batch in b)
        assert max(seen.values(), default=1) == 1
        for label, count in Counter(modality.tolist()).items():
            kept = sum(1 for s in seen if modality[s] == label)
            assert kept == count - count % (batch_size * world_size)
    else:
        assert set(seen) == set(range(len(modality)))
        extra = sum(seen.values()) - len(modality)
        assert extra <= repeats_allowed(modality, batch_size, world_size)
        if repeats_allowed(modality, batch_size, world_size) == 0:
            assert extra == 0


def test_a_short_tail_is_merged_with_the_unit_before_it():
    items = list(range(5))  # batch 2 x 2 ranks: one full unit and 1 left over
    units = micro_step_units(items, batch_size=2, world_size=2)
    assert units == [[[0, 1], [2]], [[3], [4]]]
    assert micro_step_units(items, batch_size=2, world_size=2, drop_last=True) == [
        [[0, 1], [2, 3]]]
    # Batch 1: nothing to merge; the first item is repeated for the second rank.
    assert micro_step_units(items, batch_size=1, world_size=2) == [
        [[0], [1]], [[2], [3]], [[4], [0]]]


def test_length_grouped_puts_the_longest_unit_first_and_pads_less_than_random():
    lengths, modality = mix665k_like()

    def padding(mode: str) -> float:
        batches = ResumableBatchSampler(lengths, batch_size=8, mode=mode, seed=1, world_size=4,
                                        modality=modality).global_batches(0)
        real = sum(int(lengths[b].sum()) for b in batches)
        return 1 - real / sum(len(b) * int(lengths[b].max()) for b in batches)

    grouped = ResumableBatchSampler(lengths, batch_size=8, mode="length_grouped", seed=1,
                                    world_size=4, modality=modality).global_batches(0)
    assert max(int(lengths[s]) for batch in grouped[:4] for s in batch) == lengths.max()
    assert padding("length_grouped") < padding("random") / 3


# --------------------------------------------------------------------------- order and resume


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_per_seed_and_epoch(mode):
    lengths, modality = mix665k_like(n=501, text_only=37)
    kw = {"batch_size": 4, "mode": mode, "max_length": MAX_LEN, "world_size": 2,
          "modality": modality}
    a = ResumableBatchSampler(lengths, seed=5, **kw)
    b = ResumableBatchSampler(lengths, seed=5, **kw)
    assert a.global_batches(0) == b.global_batches(0)
    assert a.global_batches(1) == b.global_batches(1)
    assert a.global_batches(0) != a.global_batches(1)
    assert ResumableBatchSampler(lengths, seed=6, **kw).global_batches(0) != a.global_batches(0)


def test_one_modality_keeps_the_ungrouped_order():
    lengths, _ = mix665k_like(n=300)
    text = np.zeros(300, dtype=np.int8)
    for mode in MODES:
        kw = {"batch_size": 4, "mode": mode, "max_length": MAX_LEN, "world_size": 2, "seed": 2}
        assert ResumableBatchSampler(lengths, modality=text, **kw).global_batches(0) == \
            ResumableBatchSampler(lengths, **kw).global_batches(0)


@pytest.mark.parametrize("mode", MODES)
def test_resume_mid_epoch_equals_the_uninterrupted_order(mode):
    lengths, modality = mix665k_like(n=401, text_only=41)
    kw = {"batch_size": 3, "mode": mode, "max_length": MAX_LEN, "world_size": 2, "rank": 1,
          "modality": modality}
    straight = ResumableBatchSampler(lengths, seed=9, **kw)
    reference = [list(straight) for _ in range(2)]  # epochs 0 and 1
    first = ResumableBatchSampler(lengths, seed=9, **kw)
    list(first)  # epoch 0
    k = len(reference[1]) // 2
    head = []
    for batch in first:  # epoch 1, stopped half way
        head.append(batch)
        if len(head) == k:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "batch_index": k, "seed": 9}
    resumed = ResumableBatchSampler(lengths, seed=0, **kw)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert head + list(resumed) == reference[1]


# --------------------------------------------------------------------------- through the loader


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    rows = make_rows(61, seed=4)  # 0-2 images per row: about a third are text-only
    return write_shards(tmp_path_factory.mktemp("mixed") / "pretok", rows), rows


def grouped_loader(root, rank: int, seed: int = 0, **kw):
    return build_dataloader(root, batch_size=3, mode="length_grouped", max_length=256,
                            seed=seed, num_workers=0, image_processor=ColourProcessor(),
                            rank=rank, world_size=2, group_by_modality=True, **kw)


def test_the_loader_groups_shards_by_their_image_column(mixed_shards):
    root, rows = mixed_shards
    has_image = {r["id"]: bool(r["images"]) for r in rows}
    assert 0 < sum(has_image.values()) < len(rows)
    per_rank = [[batch for batch in grouped_loader(root, r)] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1])
    for b0, b1 in zip(*per_rank, strict=True):
        kinds = {has_image[i] for i in b0["ids"] + b1["ids"]}
        assert len(kinds) == 1
        assert ("pixel_values" in b0) == ("pixel_values" in b1) == kinds.pop()
    ids = Counter(i for batches in per_rank for b in batches for i in b["ids"])
    assert sorted(ids) == sorted(has_image) and set(ids.values()) == {1}


def test_the_loader_resumes_a_grouped_epoch_exactly(mixed_shards):
    root, _ = mixed_shards
    reference = [b["ids"] for b in grouped_loader(root, 1)]
    first = grouped_loader(root, 1)
    head = []
    for batch in first:
        head.append(batch["ids"])
        if len(head) == 4:
            break
    resumed = grouped_loader(root, 1, seed=77)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["ids"] for b in resumed] == reference


def test_ungrouped_mixed_data_warns_where_the_ranks_need_grouping(mixed_shards, caplog):
    root, rows = mixed_shards
    with caplog.at_level(logging.WARNING, logger="mmjobs.data.modality"):
        build_dataloader(root, batch_size=3, mode="random", max_length=256, seed=0,
                         num_workers=0, image_processor=ColourProcessor(), rank=0,
                         world_size=2, group_by_modality=False, modality_must_match=True)
    text_only = sum(1 for r in rows if not r["images"])
    assert f"{len(rows) - text_only} image and {text_only} text-only rows" in caplog.text
    assert "group_by_modality" in caplog.text


# --------------------------------------------------------------------------- the decision


def test_which_setups_need_the_ranks_to_agree_on_modality():
    assert ranks_need_same_modality("zero3", vision_side_trains=False, world_size=2)
    assert ranks_need_same_modality("zero3_offload", vision_side_trains=False, world_size=8)
    assert ranks_need_same_modality("zero2", vision_side_trains=True, world_size=2)
    assert not ranks_need_same_modality("zero2", vision_side_trains=False, world_size=2)
    assert not ranks_need_same_modality("none", vision_side_trains=True, world_size=8)
    assert not ranks_need_same_modality("zero3", vision_side_trains=True, world_size=1)


def test_modality_plan_groups_only_mixed_data():
    mixed, text = [0, 2, 1, 0], [0, 0, 0]
    assert modality_plan(mixed, group=True, must_match=True).tolist() == [TEXT, IMAGE, IMAGE,
                                                                          TEXT]
    assert modality_plan(mixed, group=False, must_match=False) is None
    assert modality_plan(text, group=True, must_match=True) is None
    assert sample_modalities(mixed).dtype == np.int8


def test_modality_labels_must_match_the_samples():
    with pytest.raises(ValueError, match="modality: 2 labels for 3 samples"):
        ResumableBatchSampler([5, 6, 7], batch_size=1, modality=[0, 1])
