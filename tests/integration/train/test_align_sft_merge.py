"""The two-stage LLaVA recipe on the tiny LLaVA, every step a real stage, in-process:

    prepare (synthetic-charts) → pretokenize → train mode=align → apply-connector
    → train mode=sft finetune=lora (on the aligned model) → merge

The SFT stage takes the aligned connector the way the pipelines wire it (`pipelines/
chart_demo.py`): `apply-connector` installs the align output's connector into the base model
and the SFT and merge stages use that model as their base. Four charts with one question each
and a batch of four make every optimizer step see the same batch, so the losses measure
fitting, not sampling noise.
"""

from __future__ import annotations

import os

import pytest
import torch

from mmjobs.config import ModelConfig, load_config
from mmjobs.stages import apply_connector, merge, prepare, pretokenize, train
from tests.train_fixtures import OVERFIT_LORA, read_tensors, stage_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHARTS = 4  # one chart_type question each: 4 rows, one batch
ALIGN_STEPS, SFT_STEPS = 15, 40


def _losses(run_id: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    return [m.value for m in history]


def _fixed_batch(shards: str, model_dir: str) -> dict:
    from transformers import AutoProcessor

    from mmjobs.data.loader import build_dataloader

    processor = AutoProcessor.from_pretrained(model_dir)
    loader = build_dataloader(shards, batch_size=CHARTS, mode="random", max_length=None, seed=0,
                              num_workers=0, image_processor=processor.image_processor)
    return next(iter(loader))


@torch.no_grad()
def _logits_and_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, float]:
    from mmjobs.train.batches import loss_sum, model_inputs

    model.eval()
    logits = model(**model_inputs(batch, device=torch.device("cpu"), float_dtype=torch.float32,
                                  flash_attention=False)).logits.float()
    summed, count = loss_sum(logits, batch["labels"])
    return logits, float(summed) / count


def test_align_then_lora_sft_then_merge_on_synthetic_charts(tmp_path, tiny_llava_dir,
                                                            one_thread):
    store = tmp_path / "store"
    prepared = prepare.main(load_config(prepare.PrepareConfig, {
        "source_format": "synthetic-charts", "num": CHARTS, "seed": 0,
        "output": str(store / "prepare"),
        "options": {"kinds": ["qa"], "question_types": ["chart_type"], "test_fraction": 0.0,
                    "image_size": 112}}))
    shards = pretokenize.main(load_config(pretokenize.PretokenizeConfig, {
        "dataset": prepared.output, "model": str(tiny_llava_dir), "max_length": 256,
        "cache_root": str(store / "cache")}))
    assert shards.rows_written == CHARTS and shards.rows_rejected == 0

    # 1. align: only the connector trains, on a frozen random LM, so the loss moves a little.
    align = train.main(load_config(train.TrainStageConfig, stage_settings(
        tiny_llava_dir, shards.output, str(store / "align"), mode="align",
        max_steps=ALIGN_STEPS, lr=1e-2, lr_schedule="constant", per_device_batch_size=CHARTS,
        checkpoint_every_steps=0)))
    align_losses = _losses(align.mlflow_run_id)
    assert len(align_losses) == ALIGN_STEPS
    assert align_losses[-1] < align_losses[0], align_losses

    # 2. the hand-off: the aligned connector installed into the base model.
    aligned = apply_connector.main(apply_connector.ApplyConnectorConfig(
        base=str(tiny_llava_dir), connector=align.output, output=str(store / "aligned")))
    assert aligned.native and aligned.max_abs_diff == 0.0
    connector = read_tensors(align.connector)
    model_weights = read_tensors(aligned.model)
    prefix = "model.safetensors:multi_modal_projector."
    installed = {k.removeprefix(prefix): v for k, v in model_weights.items()
                 if k.startswith(prefix)}
    assert sorted(installed) == sorted(k.split(":", 1)[1] for k in connector)
    for key, value in connector.items():
        assert torch.equal(installed[key.split(":", 1)[1]], value), key

    # 3. LoRA SFT from the aligned model overfits the fixed batch. lr 3e-3 with clipping: at
    # 1e-2..2e-2 (or without clipping) the loss spikes to 5-15 on the way down on this batch.
    sft = train.main(load_config(train.TrainStageConfig, stage_settings(
        aligned.model, shards.output, str(store / "sft"), max_steps=SFT_STEPS, lr=3e-3,
        lr_schedule="constant", max_grad_norm=1.0, per_device_batch_size=CHARTS,
        checkpoint_every_steps=0, lora=OVERFIT_LORA)))
    sft_losses = _losses(sft.mlflow_run_id)
    assert len(sft_losses) == SFT_STEPS
    # Step 1 of SFT scores the aligned model itself (LoRA B starts at zero, no dropout): its
    # loss is where align ended (its last update came after its last logged loss), far below
    # the base model's (align step 1). Started from the base connector, it would be the latter.
    assert sft_losses[0] < align_losses[-1] + 1e-3, (sft_losses[0], align_losses)
    assert sft_losses[-1] < 0.5 * sft_losses[0], sft_losses

    # 4. merge into the aligned model; the stage's self-check compares logits on a probe.
    merged = merge.main(merge.MergeConfig(base=aligned.model, adapter=sft.output,
                                          output=str(store / "merged")))
    assert merged.probe == "image+text"
    # float32 merge: W + B·A·alpha/r is rounded once per weight, so logits differ by ~1e-6.
    assert merged.max_logit_diff is not None and merged.max_logit_diff < 1e-4

    # The same comparison on the training batch, outside the stage: merged model vs
    # aligned base + adapter loaded with peft.
    from peft import PeftModel

    from mmjobs.models.builder import load_model

    batch = _fixed_batch(shards.output, str(tiny_llava_dir))
    merged_model = load_model(ModelConfig(name_or_path=merged.model), for_training=False).model
    base = load_model(ModelConfig(name_or_path=aligned.model, dtype="float32"),
                      for_training=False).model
    with_adapter = PeftModel.from_pretrained(base, sft.adapter, is_trainable=False)
    merged_logits, merged_loss = _logits_and_loss(merged_model, batch)
    adapter_logits, adapter_loss = _logits_and_loss(with_adapter, batch)
    assert float((merged_logits - adapter_logits).abs().max()) < 1e-4
    # The merged model holds the trained weights: its loss on the batch is the fitted one.
    assert merged_loss == pytest.approx(adapter_loss, rel=1e-5)
    assert merged_loss < 0.5 * sft_losses[0], (merged_loss, sft_losses)
