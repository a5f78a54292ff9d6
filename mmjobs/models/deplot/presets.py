"""ChartWiz's real-size composition, for `mmjobs plan` (`plan.config_from: allright2024/ChartWiz`).

Synatra-7B-v0.3-dpo's config.json (the values `mmjobs.models.replicas.chartwiz` keeps) and the
pix2struct-base encoder (transformers' `Pix2StructVisionConfig` defaults are pix2struct-base's:
hidden 768, 12 layers, 12 heads of 64, MLP 2048, 16x16 patches), 512 patches per image
(ChartWiz's train.py), `<image>` added after the 32,002 tokens.
"""

from __future__ import annotations

from typing import Any

from mmjobs.models.deplot.modeling import CHARTWIZ_MAX_PATCHES


def chartwiz_config() -> Any:
    """The `DeplotLlavaConfig` of ChartWiz's 7B model (see the module docstring)."""
    from transformers import MistralConfig, Pix2StructVisionConfig

    from mmjobs.models.deplot import register
    from mmjobs.models.deplot.modeling import DeplotLlavaConfig
    from mmjobs.models.replicas.chartwiz import PIX2STRUCT_CONFIG, SYNATRA_CONFIG

    register()
    text = {k: v for k, v in SYNATRA_CONFIG.items()
            if k not in ("_name_or_path", "architectures", "model_type", "torch_dtype",
                         "transformers_version")}
    vision = {k: v for k, v in PIX2STRUCT_CONFIG["vision_config"].items() if k != "model_type"}
    image_token_id = SYNATRA_CONFIG["vocab_size"]  # appended by the composition
    return DeplotLlavaConfig(
        vision_config=Pix2StructVisionConfig(**vision),
        text_config=MistralConfig(**{**text, "vocab_size": image_token_id + 1}),
        image_token_id=image_token_id, image_seq_length=CHARTWIZ_MAX_PATCHES)
