"""ChartWiz's "LLaVA with DePlot": a Pix2Struct/DePlot encoder joined to a causal LM.

- `modeling`: `DeplotLlavaConfig` / `DeplotLlavaForConditionalGeneration` (model_type
  `deplot_llava`), transformers' LLaVA with a `Pix2StructVisionModel` tower;
- `processing`: `DeplotLlavaProcessor` (Pix2Struct's flattened patches as `pixel_values`,
  `max_patches` image tokens per `<image>`);
- `compose`: build one from a Pix2Struct checkpoint and an LLM (`mmjobs stage convert
  --set kind=deplot_llava`).

`register()` teaches transformers' Auto classes the model type, so `load_model` and
`AutoProcessor` read a composed directory with `trust_remote_code` off.
"""

from __future__ import annotations

MODEL_TYPE = "deplot_llava"
_registered = False


def register() -> None:
    """Register `deplot_llava` with `AutoConfig`, `AutoModelForImageTextToText`,
    `AutoProcessor` and `AutoImageProcessor` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from mmjobs.models.deplot.modeling import (
        DeplotLlavaConfig,
        DeplotLlavaForConditionalGeneration,
    )
    from mmjobs.models.deplot.processing import DeplotImageProcessor, DeplotLlavaProcessor

    AutoConfig.register(MODEL_TYPE, DeplotLlavaConfig, exist_ok=True)
    AutoModelForImageTextToText.register(DeplotLlavaConfig, DeplotLlavaForConditionalGeneration,
                                         exist_ok=True)
    AutoImageProcessor.register(DeplotLlavaConfig,
                                image_processor_classes={"pil": DeplotImageProcessor},
                                exist_ok=True)
    AutoProcessor.register(DeplotLlavaConfig, DeplotLlavaProcessor, exist_ok=True)
    _registered = True
