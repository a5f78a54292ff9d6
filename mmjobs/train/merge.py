"""Merge a LoRA adapter into its base model, with a logits self-check.

The trainer saves adapters with peft's `save_pretrained` (`adapter_config.json` +
`adapter_model.safetensors`, including `modules_to_save` such as a fully trained connector)
under its output, e.g. `{train_output}/final/adapter`. `merge_lora` loads the base with
`load_model` (so mmjobs connectors are rebuilt before the adapter attaches), applies the adapter,
runs a probe batch, merges (`merge_and_unload`: W ← W + B·A·alpha/r; the modules_to_save copies
replace the originals) and runs the probe again: the largest logit difference is the self-check.

LaVIN's MMA adapters (`train.finetune: mma`) cannot be folded into the weights (their routers
depend on the input; see `mmjobs.models.lavin.compose`): `merge_mma` loads the base with the
trained adapters in place of the initial ones, the stage writes that standalone model, and
`standalone_diff` reloads what was written and compares its logits with the model in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmjobs.config import ModelConfig
from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel, load_model
from mmjobs.models.model_dirs import locate_adapter

log = get_logger(__name__)
__all__ = ["MergeError", "MergeOutcome", "locate_adapter", "merge_lora", "merge_mma",
           "standalone_diff"]


class MergeError(ValueError):
    """The adapter cannot be merged into this base; the message says why."""


@dataclass
class MergeOutcome:
    """The merged model and what the self-check saw.

    Attributes:
        loaded: the base as loaded, with `loaded.model` replaced by the merged model.
        max_logit_diff: max |logits(merged) − logits(base + adapter)| on the probe batch
            (`[B, L, V]`); None if no probe batch could be built.
        probe: "image+text", "text" or "none".
    """

    loaded: LoadedModel
    max_logit_diff: float | None
    probe: str


def merge_lora(base: ModelConfig, adapter_dir: str | os.PathLike) -> MergeOutcome:
    """Load `base`, apply the LoRA adapter in `adapter_dir`, merge it into the weights.

    The base is loaded in float32 whatever `base.dtype` says: merging adds a low-rank update to
    every target weight, and doing that in bf16 would round it away.

    Raises:
        MergeError: the adapter is not LoRA, or does not fit the base.
    """
    from peft import PeftConfig, PeftModel, PeftType

    adapter_dir = Path(adapter_dir)
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    if peft_config.peft_type != PeftType.LORA:
        raise MergeError(f"{adapter_dir}: a {peft_config.peft_type} adapter; only LoRA adapters "
                         "can be merged into the weights")
    loaded = load_model(base.model_copy(update={"dtype": "float32"}), for_training=False)
    try:
        peft_model = PeftModel.from_pretrained(loaded.model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MergeError(f"{adapter_dir}: adapter does not fit base {base.name_or_path}: "
                         f"{e}") from e
    peft_model.eval()
    batch, probe = probe_batch(loaded)
    before = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    after = _logits(merged, batch)
    diff = None if before is None else (before - after).abs().max().item()
    loaded.model = merged
    return MergeOutcome(loaded=loaded, max_logit_diff=diff, probe=probe)


def merge_mma(base: ModelConfig, adapter_dir: str | os.PathLike) -> MergeOutcome:
    """Load the LaVIN `base` (float32) with the trained MMA adapters of `adapter_dir`.

    Returns an outcome whose `max_logit_diff` is None until `standalone_diff` has checked the
    written directory.

    Raises:
        MergeError: `base` is not a LaVIN, or the adapters do not fit it.
    """
    from mmjobs.models.convert.checkpoints import ConversionError
    from mmjobs.models.lavin.compose import load_adapters

    loaded = load_model(base.model_copy(update={"dtype": "float32"}), for_training=False)
    if loaded.info.get("model_type") != "lavin":
        raise MergeError(f"{adapter_dir}: LaVIN MMA adapters, but base {base.name_or_path} is a "
                         f"{loaded.info.get('model_type')}; give the LaVIN directory they were "
                         "trained on")
    try:
        tensors = load_adapters(loaded.model, adapter_dir)
    except ConversionError as e:
        raise MergeError(str(e)) from e
    loaded.info.update(adapter=str(adapter_dir), adapter_tensors=tensors)
    _, probe = probe_batch(loaded)
    return MergeOutcome(loaded=loaded, max_logit_diff=None, probe=probe)


def standalone_diff(outcome: MergeOutcome, model_dir: str | os.PathLike) -> float | None:
    """max |logits| difference on the probe batch between the model in `outcome` and the
    directory written from it (reloaded as `load_model` reads it, in float32)."""
    batch, _ = probe_batch(outcome.loaded)
    if batch is None:
        return None
    reloaded = load_model(ModelConfig(name_or_path=str(model_dir), dtype="float32"),
                          for_training=False)
    before = _logits(outcome.loaded.model.float(), batch)
    after = _logits(reloaded.model, batch)
    assert before is not None and after is not None
    return (before - after).abs().max().item()


def probe_batch(loaded: LoadedModel) -> tuple[dict[str, torch.Tensor] | None, str]:
    """A tiny deterministic batch for the self-check: one grey image + text when the processor
    takes images, else text only; (None, "none") when there is no tokenizer."""
    processor = loaded.processor
    image_token = getattr(processor, "image_token", None)
    if processor is not None and image_token and hasattr(processor, "image_processor"):
        from PIL import Image

        try:
            image = Image.new("RGB", (64, 48), (128, 128, 128))
            batch = processor(text=[f"{image_token}\nWhat does the chart show?"],
                              images=[image], return_tensors="pt")
            return dict(batch), "image+text"
        except (ValueError, TypeError, KeyError) as e:  # processors differ; text still checks
            log.warning("self-check: could not build an image batch (%s); using text only", e)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is None or not callable(tokenizer):
        return None, "none"
    return dict(tokenizer(["What does the chart show?"], return_tensors="pt")), "text"


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, Any] | None) -> torch.Tensor | None:
    if batch is None:
        return None
    return model(**batch).logits.float()
