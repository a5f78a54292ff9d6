"""Trainer parts without training: config checks, FLOPs, DeepSpeed configs, LoRA targets."""

from __future__ import annotations

import pytest
import torch

from mmjobs.config import ConfigError, ModelConfig, load_config
from mmjobs.train.distributed import (
    DIST_TIMEOUT_ENV,
    collective_timeout,
    deepspeed_config,
    resolve_mixed_precision,
)
from mmjobs.train.methods import SftConfig, TrainConfig, train_config
from mmjobs.train.metrics import (
    FlopsModel,
    LogWindow,
    device_peak_flops,
    flops_model,
    log_step,
    step_metrics,
)


@pytest.mark.parametrize(("settings", "message"), [
    # align trains the connector alone: it has no freeze (or adapter) settings.
    ({"mode": "align", "freeze_connector": True},
     r"freeze_connector: not a setting of mode align \(it is for sft, dpo, rm, ppo, grpo\)"),
    ({"mode": "align", "freeze_language_model": False},
     "freeze_language_model: not a setting of mode align"),
    ({"finetune": "full", "layer_dropout": {"preset": "inc"}}, "needs finetune: lora"),
    ({"freeze_connector": True, "freeze_language_model": True}, "every component is frozen"),
    ({"layer_dropout": {"preset": "inc", "kind": "constant"}}, "exactly one of `preset`"),
])
def test_bad_combinations_are_rejected_at_load(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, settings)


def test_train_stage_runs_every_mode_and_lists_all_errors():
    from mmjobs.stages.train import TrainStageConfig

    base = {"model": {"name_or_path": "m"}, "data": "d"}
    for mode in ("ppo", "grpo"):  # rollouts need a reward: a model export, or a programmatic one
        with pytest.raises(ConfigError, match=r"rl\.reward\.model: kind model needs the URI"):
            load_config(TrainStageConfig, {**base, "train": {"mode": mode}})
        keyword = {"mode": mode, "rl": {"reward": {"kind": "keyword", "keywords": ["e"]}}}
        assert load_config(TrainStageConfig, {**base, "train": keyword}).train.mode == mode
    for mode in ("dpo", "rm"):  # preference pairs train in this stage
        assert load_config(TrainStageConfig, {**base, "train": {"mode": mode}}).train.mode == mode
    with pytest.raises(ConfigError) as info:
        load_config(TrainStageConfig, {**base, "train": {"deepspeed": "zero4",
                                                         "batching": "bucketed"}})
    assert [e.split(":")[0] for e in info.value.errors] == ["train.batching", "train.deepspeed"]


def test_default_config_trains_lora_with_checkpoints():
    cfg = train_config()
    assert isinstance(cfg, SftConfig)
    assert (cfg.mode, cfg.finetune, cfg.deepspeed, cfg.mixed_precision) == (
        "sft", "lora", "none", "auto")
    assert cfg.checkpoint_every_steps > 0 and cfg.keep_last_checkpoints >= 1


def test_flops_formula_is_6n_plus_attention_when_everything_trains():
    fm = FlopsModel(lm_params=1000, lm_trainable=1000, num_layers=2, hidden_size=8)
    assert fm.per_token(10) == 6 * 1000 + 12 * 2 * 8 * 10
    # A frozen LM still pays forward + activation gradients (4N), not weight gradients.
    frozen = FlopsModel(lm_params=1000, lm_trainable=0, num_layers=2, hidden_size=8)
    assert frozen.per_token(10) == 4 * 1000 + 12 * 2 * 8 * 10
    assert fm.step_flops([10, 20], 0) == 6000 * 30 + 12 * 2 * 8 * (100 + 400)
    vis = FlopsModel(lm_params=0, lm_trainable=0, num_layers=0, hidden_size=0,
                     vision_params=50, connector_params=5, connector_trains=True,
                     patches_per_image=4)
    assert vis.per_image() == 2 * 50 * 4 + 2 * 5 * 4 * 3


def test_flops_model_counts_the_tiny_llava(tiny_llava_dir):
    from mmjobs.models.builder import freeze, load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_llava_dir))).model
    summary = freeze(model, vision_tower=True, connector=False, language_model=True)
    fm = flops_model(model, summary, patches_per_image=16)
    embed = model.get_input_embeddings().weight.numel()
    assert fm.lm_params == summary["language_model"]["total"] - embed
    assert (fm.lm_trainable, fm.connector_trains, fm.vision_trains) == (0, True, False)
    assert (fm.num_layers, fm.hidden_size, fm.patches_per_image) == (2, 128, 16)


def test_no_mfu_without_a_known_peak():
    assert device_peak_flops("cpu") is None
    metrics = step_metrics(seconds=0.5, tokens=100, samples=4, flops=1e9, peak_flops=None,
                           device="cpu")
    assert metrics["tokens_per_s"] == 200 and "mfu" not in metrics
    assert metrics["peak_memory_mb"] > 0
    assert step_metrics(seconds=1, tokens=1, samples=1, flops=1e12, peak_flops=4e12,
                        device="cpu")["mfu"] == 0.25


class _Run:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def test_logged_loss_is_the_mean_over_the_logging_window():
    # log_every_steps=4: one line at step 4 saying what the 4 steps did, not step 4 alone.
    window, run = LogWindow(), _Run()
    for loss in (4.0, 3.0, 2.0, 1.0):
        window.add(loss=loss, seconds=0.5, tokens=100, samples=4, flops=1e9,
                   extra={"rewards_margin": loss / 2})
    log_step(run, 4, 8, lr=1e-3, grad_norm=None, peak_flops=None, device="cpu",
             **window.take())
    ((step, metrics),) = run.logged
    assert step == 4 and metrics["loss"] == 2.5 and metrics["rewards_margin"] == 1.25
    assert metrics["step_time_s"] == 0.5 and metrics["tokens_per_s"] == 200
    assert window.take()["steps"] == 1 and window.steps == 0  # taken: the next window is empty


@pytest.mark.parametrize("kind", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_are_packaged_and_filled(kind):
    config = deepspeed_config(kind, micro_batch_size=4, grad_accum=8, world_size=2,
                              max_grad_norm=1.0, bf16=True, hidden_size=64)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8
    assert config["train_batch_size"] == 64
    assert config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage"] == (2 if kind == "zero2" else 3)
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert "auto" not in str(config)


def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    import datetime

    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert collective_timeout() is None  # torch's default
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "90")
    assert collective_timeout() == datetime.timedelta(seconds=90)
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"MMJOBS_DIST_TIMEOUT_S={bad!r}: expected"):
            collective_timeout()


def test_mixed_precision_auto_is_fp32_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert resolve_mixed_precision("auto") == "no"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_mixed_precision("bf16")


def test_lora_targets_stay_out_of_frozen_components(tiny_llava_dir):
    from mmjobs.models.builder import load_model
    from mmjobs.train.model_setup import frozen_components, lora_targets

    model = load_model(ModelConfig(name_or_path=str(tiny_llava_dir))).model
    frozen = frozen_components(SftConfig())
    targets = lora_targets(model, ["q_proj", "v_proj"], frozen)
    assert len(targets) == 4 and all(t.startswith("model.language_model.") for t in targets)
    with_vision = lora_targets(model, ["q_proj"], {**frozen, "vision_tower": False})
    assert any("vision_tower" in t for t in with_vision)


def test_trainable_bf16_weights_become_float32_master_weights():
    from mmjobs.train.model_setup import upcast_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert upcast_trainable(model) == 2
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32


def test_layer_dropout_schedule_sets_each_decoder_layers_adapter_dropout(tiny_llava_dir):
    from mmjobs.models.builder import load_model
    from mmjobs.train.model_setup import prepare_for_training

    model = load_model(ModelConfig(name_or_path=str(tiny_llava_dir))).model
    cfg = load_config(TrainConfig, {"layer_dropout": {"kind": "decreasing", "p_min": 0.1,
                                                      "p_max": 0.3}})
    model = prepare_for_training(model, cfg)
    found = {(name.split("layers.")[1].split(".")[0], round(module.p, 6))
             for name, module in model.named_modules()
             if name.endswith("lora_dropout.default")}
    assert found == {("0", 0.3), ("1", 0.1)}


def test_an_explicit_group_by_modality_changes_the_fingerprint(tmp_path, tiny_llava_dir,
                                                               fixed_batch_shards):
    from mmjobs.stages.train import TrainStageConfig, train_fingerprint
    from tests.train_fixtures import train_settings

    def fp(**train) -> str:
        return train_fingerprint(load_config(TrainStageConfig, {
            "model": {"name_or_path": str(tiny_llava_dir)}, "data": fixed_batch_shards,
            "output": str(tmp_path), "train": train_settings(**train)}))

    # Set, it decides the batch order on mixed data, so a resume must not switch it.
    assert len({fp(), fp(group_by_modality=True), fp(group_by_modality=False)}) == 3
