"""Reward model on the tiny LLaVA: learns a preference that carries to held-out pairs, exports
to final/reward_model/, loads with load_reward_model and scores raw (prompt, response, images)
exactly as it scored during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmjobs.config import ModelConfig, load_config
from mmjobs.models.builder import load_model
from mmjobs.train.methods import TrainConfig
from mmjobs.train.reward_model import (
    CONFIG_FILE,
    RM_STATS,
    VALUE_HEAD_FILE,
    RewardModel,
    load_reward_model,
)
from mmjobs.train.trainer import TrainRecipe
from tests.chart_dataset import bar_chart_png, preference_pairs
from tests.shards import read_shards
from tests.train_fixtures import RecordingRun, read_tensors, train_settings

RM_LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
           "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def test_reward_model_learns_a_preference_that_holds_on_held_out_pairs(
        tmp_path, tiny_llava_dir, rm_shards, one_thread):
    train, held_out = rm_shards
    run = RecordingRun()
    recipe = TrainRecipe(model=ModelConfig(name_or_path=str(tiny_llava_dir)), data=train,
                         eval_data=held_out, train=load_config(TrainConfig, train_settings(
                             mode="rm", max_steps=20, lr=5e-3, lr_schedule="constant",
                             per_device_batch_size=8, checkpoint_every_steps=0, lora=RM_LORA,
                             preference={"rm_center_rewards_coef": 0.01})),
                         output=str(tmp_path / "out"), fingerprint="test", resume=False, run=run)
    try:
        recipe.setup()
        wrapper = recipe.accelerator.unwrap_model(recipe.model)
        trainable = [n for n, p in wrapper.named_parameters() if p.requires_grad]
        assert "value_head.weight" in trainable and any("lora_A" in n for n in trainable)
        assert not any("lm_head" in n for n in trainable)  # unused by a reward model
        recipe.evaluate()
        before = dict(recipe.eval_metrics)
        summary = recipe.train()
        outputs = recipe.save_final()
        # Rewards of held-out pairs as the trainer computes them, for the reload check.
        batch = next(iter(recipe.eval_loader))
        recipe.model.eval()
        with torch.no_grad():
            trained_rewards = recipe.model(**recipe._inputs(batch))
    finally:
        recipe.cleanup()
    after = summary.eval_metrics
    # The untrained head orders the held-out pairs no better than chance (0.31 with this seed).
    assert before["eval_accuracy"] <= 0.5, before
    assert after["eval_accuracy"] >= 0.9, (before, after)
    assert after["eval_reward_margin"] > before["eval_reward_margin"] + 1.0
    assert summary.eval_loss < 0.3
    for key in (*RM_STATS, "loss"):
        assert len(run.series(key)) == 20, key

    export = Path(outputs["reward_model"])
    assert export == tmp_path / "out" / "final" / "reward_model"
    info = json.loads((export / CONFIG_FILE).read_text())
    assert (info["weights"], info["finetune"], info["score_token"]) == (
        "adapter", "lora", "last_non_pad")
    assert info["eval_accuracy"] == after["eval_accuracy"]
    head = read_tensors(export)
    assert head[f"{VALUE_HEAD_FILE}:weight"].shape == (1, 128)
    assert any(k.startswith("adapter/") and "lora_A" in k for k in head)

    # The loaded model scores raw prompts/responses/images like the trainer scored the shards.
    rm = load_reward_model(str(tmp_path / "out" / "final"))
    pairs = {p["id"]: p for p in preference_pairs(16, style="keyword", start=32)}
    images = _held_out_images(held_out)
    ids = batch["ids"]
    scored = []
    for side in ("chosen", "rejected"):
        scored += rm.score_batch([(pairs[i]["prompt"], pairs[i][side], [images[i]]) for i in ids])
    torch.testing.assert_close(torch.tensor(scored), trained_rewards, atol=1e-4, rtol=1e-4)
    one = pairs[ids[0]]
    assert rm.score(one["prompt"], one["chosen"], [images[ids[0]]]) > rm.score(
        one["prompt"], one["rejected"], [images[ids[0]]])


def _held_out_images(shards: str) -> dict[str, bytes]:
    """The image bytes stored with each held-out pair (what the dataset's images were)."""
    return {row.id: row.images[0] for row in read_shards(shards).itertuples()}


def test_the_reward_is_read_at_the_last_real_token_whatever_the_padding(tiny_llava_dir):
    loaded = load_model(ModelConfig(name_or_path=str(tiny_llava_dir)), for_training=False)
    torch.manual_seed(0)
    rm = RewardModel(loaded.model).eval()
    processor = loaded.processor
    pixels = processor.image_processor([_image()], return_tensors="pt")["pixel_values"]
    ids = [int(t) for t in processor(text="USER: <image> hi ASSISTANT: yes</s>",
                                     images=[_image()], add_special_tokens=False)["input_ids"][0]]
    n, pad = len(ids), 5
    right = torch.tensor([ids + [0] * pad])
    left = torch.tensor([[0] * pad + ids])
    mask_r = torch.tensor([[1] * n + [0] * pad])
    mask_l = torch.tensor([[0] * pad + [1] * n])
    with torch.no_grad():
        alone = rm(torch.tensor([ids]), torch.ones(1, n, dtype=torch.int64), pixel_values=pixels)
        r = rm(right, mask_r, pixel_values=pixels)
        left_padded = rm(left, mask_l, pixel_values=pixels,
                         position_ids=(mask_l.cumsum(1) - 1).clamp(min=0))
    assert alone.shape == (1,)
    torch.testing.assert_close(r, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left_padded, alone, atol=1e-5, rtol=1e-5)


def _image():
    import io

    from PIL import Image

    return Image.open(io.BytesIO(bar_chart_png([3, 1, 4, 1]))).convert("RGB")


def test_load_reward_model_refuses_other_directories(tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ValueError, match=r"no reward_model\.json"):
        load_reward_model(str(tmp_path))
