"""Trained outputs travel to other tools (issue 18, artifacts): a LoRA adapter trained on a base
model from S3 names that base by its store URI (not the local cache copy it was loaded from),
loads with plain peft after the store folder is moved, carries a filled model card, and every
file the store wrote is readable by others (0644 / 0755). The merged model says how many image
tokens it really uses and carries its own card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmjobs import storage
from mmjobs.config import load_config
from mmjobs.stages import merge, train
from tests.train_fixtures import chart_shards, one_thread, stage_settings  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _modes(root: Path) -> dict[str, set[str]]:
    """Octal modes of the files and folders under `root` (root included)."""
    modes: dict[str, set[str]] = {"files": set(), "dirs": {oct(root.stat().st_mode & 0o777)}}
    for path in root.rglob("*"):
        kind = "dirs" if path.is_dir() else "files"
        modes[kind].add(oct(path.stat().st_mode & 0o777))
    return modes


def test_adapter_from_an_s3_base_loads_with_plain_peft_after_the_store_moves(
        tmp_path, s3_bucket, tiny_llava_dir, chart_shards, one_thread):  # noqa: F811
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base_uri = f"s3://{s3_bucket}/models/tiny-llava"
    storage.copy_uncommitted(tiny_llava_dir, base_uri)
    store = tmp_path / "store"
    settings = stage_settings(tiny_llava_dir, chart_shards, str(store / "exp/run-1/sft"),
                              max_steps=3, checkpoint_every_steps=0)
    settings["model"]["name_or_path"] = base_uri
    settings.update(recipe="chart-demo", experiment="exp", pipeline_run_id="run-1")
    sft = train.main(load_config(train.TrainStageConfig, settings))
    assert sft.adapter == str(store / "exp/run-1/sft/final/adapter")

    config = json.loads((Path(sft.adapter) / "adapter_config.json").read_text())
    # What the recipe named; peft alone writes the cache folder the base was loaded from.
    assert config["base_model_name_or_path"] == base_uri
    storage.verify_dir(sft.final)  # rewritten before the commit: the manifest vouches for it

    card = (Path(sft.adapter) / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not peft's template
    shard_card = json.loads((Path(chart_shards) / "card.json").read_text())
    for expected in (f'base_model: "{base_uri}"', "library_name: peft", "chart-demo",
                     f"`{chart_shards}`", f"`{shard_card['fingerprint']}`",
                     f"`{shard_card['dataset']}`", "| `lr` | `0.01` |", "| `max_steps` | `3` |",
                     "| steps | 3 |", "| final_loss |", f"`{sft.adapter}`",
                     "PeftModel.from_pretrained(base,", "`run-1`"):
        assert expected in card, expected

    # Every file the store wrote is readable by other users, every folder listable.
    assert _modes(store) == {"files": {"0o644"}, "dirs": {"0o755"}}

    # Move the whole store; load the adapter from its new place onto a base passed in.
    moved = tmp_path / "elsewhere"
    shutil.move(store, moved)
    adapter_dir = moved / "exp/run-1/sft/final/adapter"
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b and any(saved[k].abs().sum() > 0 for k in lora_b)  # training moved them
    for key in lora_b:  # peft names them with the adapter name inserted
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name], saved[key]), key


def test_merged_model_states_its_image_tokens_and_carries_a_card(
        tmp_path, tiny_llava_dir, chart_shards, one_thread):  # noqa: F811
    sft = train.main(load_config(train.TrainStageConfig, stage_settings(
        tiny_llava_dir, chart_shards, str(tmp_path / "store/sft"), max_steps=2,
        checkpoint_every_steps=0)))
    merged = merge.main(merge.MergeConfig(base=str(tiny_llava_dir), adapter=sft.output,
                                          output=str(tmp_path / "store/merged"),
                                          recipe="chart-demo"))
    out = Path(merged.model)
    config = json.loads((out / "config.json").read_text())
    # 56 px charts in 14 px patches, CLS dropped: 16 image tokens (LlavaConfig's default: 576).
    assert config["image_seq_length"] == 16
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    ids = processor(text=["<image>"], images=[torch.zeros(3, 56, 56)], return_tensors="pt")
    assert int((ids["input_ids"] == processor.image_token_id).sum()) == 16

    card = (out / "README.md").read_text()
    for expected in ("library_name: transformers", "# Merged model from recipe `chart-demo`",
                     f"`{sft.adapter}`", f"`{chart_shards}`", "| max_logit_diff |",
                     "| final_loss |", "AutoModelForImageTextToText.from_pretrained"):
        assert expected in card, expected
    modes = _modes(out)
    assert modes == {"files": {"0o644"}, "dirs": {"0o755"}}, modes
