"""The train recipe on the tiny LLaVA: overfitting, what trains in each mode, packed batches."""

from __future__ import annotations

import pytest
import torch

from mmjobs.config import ModelConfig, load_config
from mmjobs.models.builder import load_model
from mmjobs.models.compose import component_of
from mmjobs.train.methods import TrainConfig
from mmjobs.train.trainer import TrainRecipe
from tests.train_fixtures import OVERFIT_LORA, RecordingRun, read_tensors, train_settings


def _run(model_dir, data, output, **train) -> tuple[TrainRecipe, RecordingRun]:
    run = RecordingRun()
    recipe = TrainRecipe(model=ModelConfig(name_or_path=str(model_dir)), data=data,
                         train=load_config(TrainConfig, train_settings(**train)),
                         output=str(output), fingerprint="test", resume=False, run=run)
    recipe.setup()
    recipe.train()
    return recipe, run


def test_lora_sft_overfits_a_fixed_batch(tmp_path, tiny_llava_dir, fixed_batch_shards,
                                         one_thread):
    recipe, run = _run(tiny_llava_dir, fixed_batch_shards, tmp_path / "out", max_steps=30,
                       lr=2e-2, lr_schedule="constant", max_grad_norm=0.0,
                       checkpoint_every_steps=0, lora=OVERFIT_LORA)
    try:
        losses = run.series("loss")
        assert len(losses) == 30
        assert losses[-1] < 0.5 * losses[0], losses
        names = [n for n, p in recipe.model.named_parameters() if p.requires_grad]
        # Adapters only in the LM (never on the CLIP tower's q/v/o_proj), connector in full.
        assert any("lora_A" in n for n in names)
        assert all(component_of(n) != "vision_tower" for n in names)
        assert any(component_of(n) == "connector" for n in names)
        for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s",
                    "peak_memory_mb"):
            assert len(run.series(key)) == 30, key
        assert "mfu" not in run.metrics  # no peak FLOPs known for CPUs
        assert run.figures == ["plots/lr_schedule.png"]
        assert float(run.params["run.flops_per_token"]) > 0
        outputs = recipe.save_final()
    finally:
        recipe.cleanup()
    adapter = read_tensors(outputs["adapter"])
    assert any("lora_A" in k for k in adapter)
    assert any("multi_modal_projector" in k for k in adapter)  # modules_to_save


def test_align_trains_only_the_connector(tmp_path, tiny_llava_dir, fixed_batch_shards,
                                         one_thread):
    base = dict(load_model(ModelConfig(name_or_path=str(tiny_llava_dir))).model
                .named_parameters())
    recipe, run = _run(tiny_llava_dir, fixed_batch_shards, tmp_path / "out", mode="align",
                       max_steps=15, lr=1e-2, lr_schedule="constant", checkpoint_every_steps=0)
    try:
        trained = dict(recipe.accelerator.unwrap_model(recipe.model).named_parameters())
        outputs = recipe.save_final()
    finally:
        recipe.cleanup()
    assert sorted(trained) == sorted(base)
    changed = {n for n in base if not torch.equal(base[n], trained[n].detach())}
    connector = {n for n in base if component_of(n) == "connector"}
    assert changed == connector  # every connector tensor moved; nothing else, bit for bit
    losses = run.series("loss")
    # A frozen random LM emits near-uniform logits whatever the connector feeds it, so the
    # connector alone can only move the loss a little; it must still go down.
    assert losses[-1] < 0.98 * losses[0], losses
    from mmjobs.train.moe import load_connector  # the format build-moe-connector reads

    reloaded = load_connector(outputs["connector"]).state_dict()
    prefix = "model.multi_modal_projector."
    assert sorted(reloaded) == sorted(n.removeprefix(prefix) for n in connector)
    for name in connector:
        assert torch.equal(reloaded[name.removeprefix(prefix)], trained[name].detach())


def test_full_sft_and_packed_batches_train(tmp_path, tiny_llava_dir, chart_shards, one_thread):
    recipe, run = _run(tiny_llava_dir, chart_shards, tmp_path / "out", finetune="full",
                       batching="packed", max_steps=6, grad_accum=2, per_device_batch_size=1,
                       checkpoint_every_steps=0, gradient_checkpointing=True)
    try:
        assert recipe.loaded.model.is_activation_checkpointing
        outputs = recipe.save_final()
    finally:
        recipe.cleanup()
    losses = run.series("loss")
    assert losses[-1] < losses[0]
    reloaded = load_model(ModelConfig(name_or_path=outputs["model"]))
    assert reloaded.processor is not None  # the exported model loads on its own


def test_packed_rows_give_each_sample_its_own_logits(tiny_llava_dir, chart_shards):
    """SDPA path: position_ids restarting per sample make a block-diagonal mask, so a packed
    row's logits equal each sample's logits computed alone."""
    from mmjobs.data.loader import PaddedCollator, ShardDataset
    from mmjobs.data.packing import PackedCollator
    from mmjobs.train.batches import model_inputs

    loaded = load_model(ModelConfig(name_or_path=str(tiny_llava_dir)), for_training=True)
    model = loaded.model.eval()
    samples = [ShardDataset(chart_shards, image_processor=loaded.processor.image_processor)[i]
               for i in (0, 1, 2)]

    def logits(batch):
        inputs = model_inputs(batch, device=torch.device("cpu"), float_dtype=torch.float32,
                              flash_attention=False)
        with torch.no_grad():
            return model(**inputs).logits[0]

    packed = logits(PackedCollator()(samples))
    offset = 0
    for sample in samples:
        alone = logits(PaddedCollator()([sample]))
        n = len(sample["input_ids"])
        torch.testing.assert_close(packed[offset:offset + n], alone, atol=1e-5, rtol=1e-5)
        offset += n


def test_stage_evaluates_logs_artifacts_registers_and_then_reuses_its_output(
        tmp_path, tiny_llava_dir, fixed_batch_shards, one_thread):
    from mlflow import MlflowClient

    from mmjobs import settings
    from mmjobs.stages.train import TrainStageConfig, main

    cfg = load_config(TrainStageConfig, {
        "model": {"name_or_path": str(tiny_llava_dir)}, "data": fixed_batch_shards,
        "eval_data": fixed_batch_shards, "output": str(tmp_path / "out"),
        "log_model_artifacts": True, "registered_model_name": "tiny-chart",
        "train": train_settings(mode="align", max_steps=3, eval_every_steps=2)})
    result = main(cfg)
    assert (result.steps, result.cached) == (3, False)
    assert result.connector == str(tmp_path / "out" / "final" / "connector")
    client = MlflowClient(settings.tracking_uri())
    evals = client.get_metric_history(result.mlflow_run_id, "eval_loss")
    assert [m.step for m in evals] == [2, 3]
    assert result.eval_loss == pytest.approx(evals[-1].value)
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "final")}
    assert "final/connector" in artifacts
    (version,) = client.search_model_versions("name='tiny-chart'")
    assert version.source == result.final

    again = main(cfg)
    assert again.cached and again.connector == result.connector and again.steps == 3


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mmjobs.cli", "stage", "train", "--set",
                           "model.name_or_path=m", "--set", "data=d", "--set", "train.mode=dpo",
                           "--set", "train.lr_schedule=warp"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.lr_schedule" in proc.stderr and proc.stdout == ""
