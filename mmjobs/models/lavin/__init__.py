"""LaVIN in mmjobs: LLaMA + CLIP ViT-L/14 joined by mixture-of-modality (MMA) adapters.

    register()                                    # AutoConfig / AutoModel / AutoProcessor
    register_if_lavin(model_dir)                  # the same, for a LaVIN directory only
    compose.build_lavin(llm_dir, clip_dir, out_dir)   # a LaVIN model directory from its parts
    save_adapters(model, dir) / load_adapters(model, dir)   # LaVIN's trainable tensors only
    mmjobs.eval.lavin: load_lavin(model_dir, adapter_dir); lavin_generator(loaded)

Modules:
- `config`: `LavinConfig` (LaVIN-7B's defaults);
- `adapters`: `RepAdapterRouter`, how adapters attach to layers, the seed fork's depth-wise
  dropout schedule;
- `modeling`: `LavinForConditionalGeneration` on transformers' `LlamaModel` and
  `CLIPVisionModel` (visual tokens, modality token and its mask, generation);
- `processing`: `LavinProcessor` (LLaMA tokenizer + `<image>`, ImageNet-normalised 224 px);
- `compose`: a LaVIN directory from a Meta or transformers LLaMA and a CLIP checkpoint;
  adapter files; the standalone ("merged") model;
- `presets`: the study's adapter-dropout rows (shared with LoRA's dropout schedules).
Inference (base + trained adapters, prompted and decoded as LaVIN's eval) is
`mmjobs.eval.lavin`, above the model.

Importing this package is cheap: the submodules import transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPE = "lavin"
_registered = False


def register() -> None:
    """Make transformers' Auto classes know LaVIN (idempotent): `AutoConfig`,
    `AutoModelForImageTextToText` (what `mmjobs.models.builder.load_model` uses) and
    `AutoProcessor`."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mmjobs.models.lavin.config import LavinConfig
    from mmjobs.models.lavin.modeling import LavinForConditionalGeneration
    from mmjobs.models.lavin.processing import LavinProcessor

    AutoConfig.register(MODEL_TYPE, LavinConfig, exist_ok=True)
    AutoModelForImageTextToText.register(LavinConfig, LavinForConditionalGeneration,
                                         exist_ok=True)
    AutoProcessor.register(LavinConfig, LavinProcessor, exist_ok=True)
    _registered = True


def register_if_lavin(path: str | Path) -> bool:
    """`register()` when `path` holds a LaVIN config (before transformers' Auto classes read
    it: LaVIN is mmjobs' own class, not a transformers model type); True if it did."""
    if is_lavin_dir(path):
        register()
        return True
    return False


def is_lavin_dir(path: str | Path) -> bool:
    """True if `path/config.json` is a LaVIN config."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False
