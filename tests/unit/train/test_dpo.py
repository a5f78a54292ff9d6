"""DPO on the tiny LLaVA: prepare → pretokenize → train raises the preference margin; the
implicit LoRA reference is the base model; frozen-copy references and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mmjobs.config import ConfigError, ModelConfig, TrainConfig, load_config
from mmjobs.models.builder import load_model
from mmjobs.train.preference import DPO_STATS, sequence_logps
from mmjobs.train.trainer import TrainRecipe
from tests.chart_dataset import preference_pairs, write_chart_dataset
from tests.train_fixtures import OVERFIT_LORA, RecordingRun, train_settings


def _recipe(model_dir, data, output, *, eval_data=None, **train) -> tuple[TrainRecipe,
                                                                          RecordingRun]:
    run = RecordingRun()
    recipe = TrainRecipe(model=ModelConfig(name_or_path=str(model_dir)), data=data,
                         eval_data=eval_data, train=load_config(TrainConfig, train_settings(
                             mode="dpo", **train)),
                         output=str(output), fingerprint="test", resume=False, run=run)
    recipe.setup()
    return recipe, run


def test_prepare_pretokenize_and_dpo_raise_the_margin_on_the_training_pairs(
        tmp_path, tiny_llava_dir, one_thread):
    from mmjobs.stages.prepare import PrepareConfig
    from mmjobs.stages.prepare import main as prepare
    from mmjobs.stages.pretokenize import PretokenizeConfig
    from mmjobs.stages.pretokenize import main as pretokenize

    raw = write_chart_dataset(tmp_path / "raw", preference_pairs(8), kind="preference")
    prepared = prepare(PrepareConfig(source_format="canonical-preference",
                                     input=str(raw / "samples.jsonl"),
                                     output=str(tmp_path / "prepared")))
    assert (prepared.kind, prepared.accepted) == ("preference", 8)
    shards = pretokenize(PretokenizeConfig(dataset=prepared.output, model=str(tiny_llava_dir),
                                           max_length=256, shard_size=4,
                                           output=str(tmp_path / "shards")))
    assert shards.rows_written == 8

    # Evaluating on the training pairs measures how well DPO fits them.
    recipe, run = _recipe(tiny_llava_dir, shards.output, tmp_path / "out",
                          eval_data=shards.output, max_steps=12, lr=1e-2,
                          lr_schedule="constant", checkpoint_every_steps=0, lora=OVERFIT_LORA,
                          preference={"beta": 0.1})
    try:
        recipe.evaluate()
        before = dict(recipe.eval_metrics)
        before_loss = run.series("eval_loss")[-1]
        summary = recipe.train()
        after = summary.eval_metrics
        outputs = recipe.save_final()
    finally:
        recipe.cleanup()
    # Before training the policy is the reference: zero implicit rewards, loss log 2.
    assert before_loss == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval_rewards_margin"] == 0.0 and before["eval_rewards_accuracy"] == 0.0
    margin = lambda m: m["eval_logps_chosen"] - m["eval_logps_rejected"]  # noqa: E731
    assert after["eval_rewards_accuracy"] == 1.0, after
    assert after["eval_rewards_margin"] > 0.3, after
    assert margin(after) > margin(before) + 3.0, (before, after)
    assert summary.eval_loss < 0.6
    for key in (*DPO_STATS, "loss", "lr", "grad_norm"):
        assert len(run.series(key)) == 12, key
    assert outputs["adapter"].endswith("final/adapter")


def test_implicit_reference_is_the_base_model_with_adapters_off(
        tmp_path, tiny_llava_dir, dpo_shards, one_thread):
    """After training, the reference pass (adapters disabled) still equals a fresh copy of the
    base model, while the policy has moved away from it."""
    recipe, _ = _recipe(tiny_llava_dir, dpo_shards, tmp_path / "out", max_steps=3, lr=1e-2,
                        checkpoint_every_steps=0, lora=OVERFIT_LORA)
    try:
        recipe.train()
        batch = next(iter(recipe.loader))
        inputs, objective = recipe._inputs(batch), recipe.objective
        recipe.model.eval()
        with torch.no_grad():
            implicit = objective.reference_logits(recipe.model, inputs)
            policy = recipe.model(**inputs).logits
        base = load_model(ModelConfig(name_or_path=str(tiny_llava_dir)), for_training=False)
        with torch.no_grad():
            fresh = base.model(**inputs).logits
    finally:
        recipe.cleanup()
    torch.testing.assert_close(implicit, fresh, atol=1e-5, rtol=1e-5)
    moved = sequence_logps(policy, batch["labels"])[0] - sequence_logps(fresh, batch["labels"])[0]
    assert moved.abs().max() > 0.1


def test_full_finetune_with_a_frozen_reference_copy(tmp_path, tiny_llava_dir, dpo_shards,
                                                   one_thread):
    recipe, run = _recipe(tiny_llava_dir, dpo_shards, tmp_path / "out", finetune="full",
                          max_steps=4, lr=1e-3, lr_schedule="constant", per_device_batch_size=8,
                          checkpoint_every_steps=0,
                          preference={"reference": "frozen_copy", "loss": "ipo"})
    try:
        reference = recipe.objective.reference_model
        assert reference is not None and not reference.training
        assert not any(p.requires_grad for p in reference.parameters())
        before = {n: p.detach().clone() for n, p in reference.named_parameters()}
        recipe.train()
        assert all(torch.equal(before[n], p) for n, p in reference.named_parameters())
        outputs = recipe.save_final()
    finally:
        recipe.cleanup()
    losses = run.series("loss")  # one batch of all 8 pairs: every step sees the same pairs
    # IPO at the start (policy = reference): (0 - 1/(2 beta))^2 = 25 for beta 0.1.
    assert losses[0] == pytest.approx(25.0, abs=1e-4)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 24.0, losses
    assert run.series("rewards_margin")[-1] > 0.1
    assert outputs["model"].endswith("final/model")


def test_bad_preference_combinations_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, train_settings(
            mode="dpo", finetune="full", batching="packed",
            preference={"loss": "ipo", "label_smoothing": 0.1}))
    text = str(err.value)
    assert "batching: packed" in text and "frozen_copy" in text
    assert "label_smoothing" in text


def test_sample_shards_are_refused_for_dpo(tmp_path, tiny_llava_dir, fixed_batch_shards):
    with pytest.raises(ConfigError, match=r"holds sample shards but train\.mode dpo"):
        _recipe(tiny_llava_dir, fixed_batch_shards, tmp_path / "out", max_steps=1)


def test_preference_settings_only_fingerprint_the_preference_modes(tmp_path, tiny_llava_dir,
                                                                   fixed_batch_shards):
    from mmjobs.stages.train import TrainStageConfig, train_fingerprint

    def fp(**train) -> str:
        return train_fingerprint(load_config(TrainStageConfig, {
            "model": {"name_or_path": str(tiny_llava_dir)}, "data": fixed_batch_shards,
            "output": str(tmp_path), "train": train_settings(**train)}))

    # sft has no preference settings (its results made before they existed stay reusable)...
    with pytest.raises(ConfigError, match=r"preference: not a setting of mode sft \(it is for "
                                          r"dpo, rm\)"):
        fp(preference={"beta": 0.5})
    # ...while they decide what dpo trains.
    assert fp(mode="dpo") != fp(mode="dpo", preference={"beta": 0.5})
