"""Preference pairs through pretokenize and the loader: shared prompt, response-only labels,
the preference shard schema, rejects, and the padded 2B-row batches."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mmjobs.data import pretokenized as fmt
from mmjobs.data.loader import PreferenceCollator, ShardDataset, build_dataloader
from mmjobs.data.pretokenize import PretokenizeJob, pretokenize
from mmjobs.data.sample_encoder import IGNORE_INDEX
from tests.chart_dataset import commit_dataset, preference_pairs, write_chart_dataset
from tests.shards import read_shards, shard_files

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory, tiny_llava_dir):
    """9 pairs in 2 shards (shard size 5), plus 3 bad rows: one side too long, a missing
    image, and a response with an <image> marker but no image."""
    tmp = tmp_path_factory.mktemp("pairs")
    pairs = preference_pairs(9)
    pairs[3]["rejected"] = " ".join(["The chart shows growth in 2021 and 2022."] * 12)
    pairs[5]["images"] = ["images/missing.png"]
    pairs[5]["prompt"][0]["content"] = "<image>\nWhat is the largest value?"
    pairs[7]["chosen"] = "Here: <image>"
    pairs.append({**preference_pairs(1, start=20)[0], "id": "two-turns", "prompt": [
        {"role": "user", "content": "<image>\nWhat is the largest value?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "user", "content": "Please answer."}]})
    local = write_chart_dataset(tmp / "local", pairs, kind="preference",
                                skip_images={"images/missing.png"})
    dataset = commit_dataset(local, str(tmp / "dataset"))
    out = str(tmp / "shards")
    outcome = pretokenize(PretokenizeJob(dataset=dataset, model_dir=str(tiny_llava_dir), out=out,
                                         fingerprint="pairs", max_length=MAX_LENGTH,
                                         shard_size=5))
    return {"out": Path(out), "card": outcome.card, "pairs": {p["id"]: p for p in pairs},
            "local": local}


def _rows(out: Path) -> pd.DataFrame:
    return read_shards(out)


def test_each_side_is_the_shared_prompt_plus_its_response(pair_shards, tiny_llava_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    rows = _rows(pair_shards["out"])
    assert sorted(rows["id"]) == sorted(["pair-0", "pair-1", "pair-2", "pair-4", "pair-6",
                                         "pair-8", "two-turns"])
    for row in rows.itertuples():
        pair = pair_shards["pairs"][row.id]
        for side in ("chosen", "rejected"):
            ids, labels = list(getattr(row, f"{side}_input_ids")), list(
                getattr(row, f"{side}_labels"))
            assert len(ids) == len(labels) == getattr(row, f"{side}_length")
            learned = [t for t in labels if t != IGNORE_INDEX]
            # Only the final response is learned, never the earlier assistant turn.
            assert tokenizer.decode(learned) == pair[side] + "</s>"
            start = labels.index(learned[0])
            assert all(lab == IGNORE_INDEX for lab in labels[:start])
            assert getattr(row, f"{side}_num_image_tokens") == 16 == ids.count(3)
        # Both sides start with the very same prompt tokens.
        c, r = list(row.chosen_input_ids), list(row.rejected_input_ids)
        prompt = list(row.chosen_labels).index(next(t for t in row.chosen_labels if t != -100))
        assert c[:prompt] == r[:prompt]
        assert row.length == max(len(c), len(r))
        # The prompt's image is stored once, for both sides.
        assert list(row.images) == [(pair_shards["local"] / pair["images"][0]).read_bytes()]
        assert len(row.chosen_images) == len(row.rejected_images) == 0


def test_rejects_schema_and_card(pair_shards):
    card = pair_shards["card"]
    assert card["kind"] == "preference"
    assert card["counts"] == {"input": 10, "written": 7, "rejected": 3}
    assert card["rejected_by_reason"] == {"image_missing": 1, "placeholder_mismatch": 1,
                                          "too_long": 1}
    rejects = [json.loads(line) for line in
               (pair_shards["out"] / fmt.REJECTS_FILE).read_text().splitlines()]
    reasons = {r["row"]: r["reason"] for r in rejects}
    assert reasons["pair-3"].startswith("too_long: rejected: ")
    assert reasons["pair-7"].startswith("placeholder_mismatch: chosen: ")
    assert card["columns"] == fmt.schema_description("preference")
    rows = _rows(pair_shards["out"])
    assert card["tokens"]["total"] == int((rows["chosen_length"] + rows["rejected_length"]).sum())
    for path in shard_files(pair_shards["out"]):
        schema = pq.read_schema(path)
        assert schema.remove_metadata().equals(fmt.PREFERENCE_SHARD_SCHEMA.remove_metadata())
        assert schema.metadata[fmt.HF_METADATA_KEY] == fmt.PREFERENCE_SHARD_SCHEMA.metadata[
            fmt.HF_METADATA_KEY]


def test_collator_stacks_chosen_then_rejected_with_images_for_both(pair_shards, tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir).image_processor
    dataset = ShardDataset(str(pair_shards["out"]), image_processor=processor)
    assert dataset.kind == "preference" and len(dataset) == 7
    pairs = [dataset[i] for i in (0, 1, 2)]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    width = max(max(len(p["chosen"]["input_ids"]), len(p["rejected"]["input_ids"]))
                for p in pairs)
    assert batch["input_ids"].shape == batch["labels"].shape == (6, width)
    assert batch["ids"] == [p["id"] for p in pairs]
    for k, pair in enumerate(pairs):
        for half, side in ((0, "chosen"), (3, "rejected")):
            n = len(pair[side]["input_ids"])
            row = batch["input_ids"][half + k]
            assert row[:n].tolist() == pair[side]["input_ids"].tolist()
            assert (row[n:] == 0).all() and (batch["labels"][half + k, n:] == -100).all()
            assert batch["attention_mask"][half + k].sum() == n
    # One image per row: the prompt image goes to the chosen and to the rejected forward pass.
    assert batch["num_images"].tolist() == [1] * 6
    pixels = batch["pixel_values"]
    assert pixels.shape[0] == 6
    assert torch.equal(pixels[:3], pixels[3:])


def test_loader_builds_pair_batches_and_refuses_packing(pair_shards, tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir).image_processor
    loader = build_dataloader(str(pair_shards["out"]), batch_size=2, mode="length_grouped",
                              max_length=None, seed=0, num_workers=0, image_processor=processor)
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) == 7
    assert all(b["input_ids"].shape[0] == 2 * len(b["ids"]) for b in batches)
    with pytest.raises(ValueError, match="cannot be packed"):
        build_dataloader(str(pair_shards["out"]), batch_size=2, mode="packed", max_length=256,
                         seed=0, num_workers=0, image_processor=processor)


def test_chameleon_pairs_carry_vq_tokens_and_a_generated_image_in_the_labels(
        tmp_path, tiny_chameleon_dir):
    """Align-Anything's preference pre-tokenization: prompt images become VQ tokens in both
    sides (not labelled); an image in a response is labelled with that response."""
    pair = {**preference_pairs(1)[0], "chosen": "Here it is: <image>",
            "chosen_images": ["images/gen-0.png"]}
    local = write_chart_dataset(tmp_path / "local", [pair], kind="preference")
    dataset = commit_dataset(local, str(tmp_path / "ds"))
    out = tmp_path / "shards"
    pretokenize(PretokenizeJob(dataset=dataset, model_dir=str(tiny_chameleon_dir), out=str(out),
                               fingerprint="cham", max_length=256, shard_size=4))
    (row,) = _rows(out).itertuples()
    assert list(row.images) == list(row.chosen_images) == []  # images are tokens now
    assert (row.chosen_num_image_tokens, row.rejected_num_image_tokens) == (32, 16)
    c, r = list(row.chosen_input_ids), list(row.rejected_input_ids)
    prompt = next(i for i, t in enumerate(row.rejected_labels) if t != IGNORE_INDEX)
    assert c[:prompt] == r[:prompt]  # the same prompt image tokens on both sides
    from transformers import AutoProcessor

    boi = AutoProcessor.from_pretrained(tiny_chameleon_dir).image_start_token_id
    first, second = [i + 1 for i, t in enumerate(c) if t == boi]
    labels = list(row.chosen_labels)
    # The generated image's 16 codes are learned; the prompt image's are not.
    assert labels[second:second + 16] == c[second:second + 16]
    assert labels[first:first + 16] == [IGNORE_INDEX] * 16 and first < prompt < second
