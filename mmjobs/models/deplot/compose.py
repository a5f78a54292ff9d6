"""Compose ChartWiz's model: a Pix2Struct/DePlot encoder + a causal LM + `mlp2x_gelu`.

    model = compose_deplot_llava("hub/pix2struct-base", "hub/Synatra-7B-v0.3-dpo")
    save_composed_deplot_llava("out/chartwiz-base", "hub/pix2struct-base", "hub/Synatra-...")

What ChartWiz's `LlavaMistralForCausalLM` + `DeplotVisionTower` do, as one transformers-style
checkpoint (safetensors, `model_type: deplot_llava`):
- vision: a full `Pix2StructForConditionalGeneration` directory (its `encoder.*` weights are
  kept, the text decoder dropped, as ChartWiz's `self.vision_tower.encoder`), or a bare
  `Pix2StructVisionModel` directory, or a `Pix2StructVisionConfig` (random weights);
- language: a causal LM directory (its tokenizer gets `<image>`; its pad token becomes `<unk>`
  as ChartWiz's train.py sets it), or a text config (random weights, `image_token_id` needed);
- the projector: LLaVA-1.5's `mlp2x_gelu` (ChartWiz's `--mm_projector_type mlp2x_gelu`),
  randomly initialised; the align (pretraining) step trains it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmjobs.models.deplot.modeling import (
    CHARTWIZ_MAX_PATCHES,
    DeplotLlavaConfig,
    DeplotLlavaForConditionalGeneration,
)
from mmjobs.models.deplot.processing import (
    IMAGE_TOKEN,
    DeplotLlavaProcessor,
    deplot_image_processor,
)


def compose_deplot_llava(vision: Any, language: Any, *, max_patches: int = CHARTWIZ_MAX_PATCHES,
                         image_token_id: int | None = None,
                         seed: int | None = None) -> DeplotLlavaForConditionalGeneration:
    """Build ChartWiz's model (see the module docstring); weights copied from both parts.

    Raises:
        ValueError: a vision source that is no Pix2Struct model, or a text config without
            `image_token_id`.
    """
    from transformers import AutoConfig, PretrainedConfig

    from mmjobs.models.compose import _checked_dir, _tokenizer_with_image_token

    vision_dir = None if isinstance(vision, PretrainedConfig) else _checked_dir(vision)
    vision_cfg = _pix2struct_vision_config(vision if vision_dir is None else
                                           AutoConfig.from_pretrained(vision_dir), vision)
    language_dir = None if isinstance(language, PretrainedConfig) else _checked_dir(language)
    text_cfg = language if language_dir is None else AutoConfig.from_pretrained(language_dir)
    if language_dir is not None:
        tokenizer = _tokenizer_with_image_token(language_dir, IMAGE_TOKEN)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    elif image_token_id is None:
        raise ValueError("image_token_id is required when `language` is a config (no tokenizer)")
    config = DeplotLlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_token_id,
        image_seq_length=max_patches, projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)))
    if seed is not None:
        torch.manual_seed(seed)
    model = DeplotLlavaForConditionalGeneration(config)
    if vision_dir is not None:
        _copy_encoder_weights(model, vision_dir)
    if language_dir is not None:
        from mmjobs.models.compose import _copy_language_weights

        _copy_language_weights(model, language_dir)
        if len(tokenizer) > text_cfg.vocab_size:
            model.resize_token_embeddings(len(tokenizer))  # the image token was added
    return model


def deplot_llava_processor(vision: str | os.PathLike, language: str | os.PathLike, *,
                           max_patches: int = CHARTWIZ_MAX_PATCHES,
                           chat_template: str | None = None) -> DeplotLlavaProcessor:
    """The processor for a composed model: the vision directory's Pix2Struct image settings
    (if it has a preprocessor config) at `max_patches`, the LLM's tokenizer with `<image>` and
    `<unk>` as padding (ChartWiz: `tokenizer.pad_token = tokenizer.unk_token`)."""
    from mmjobs.models.compose import _resolve, _tokenizer_with_image_token

    vision_dir = _resolve(vision)
    source = None
    if (vision_dir / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        source = AutoImageProcessor.from_pretrained(vision_dir)
    tokenizer = _tokenizer_with_image_token(_resolve(language), IMAGE_TOKEN)
    if tokenizer.unk_token:
        tokenizer.pad_token = tokenizer.unk_token
    return DeplotLlavaProcessor(deplot_image_processor(source, max_patches=max_patches),
                                tokenizer, chat_template=chat_template or tokenizer.chat_template)


def save_composed_deplot_llava(out_dir: str | os.PathLike, vision: str | os.PathLike,
                               language: str | os.PathLike, *,
                               max_patches: int = CHARTWIZ_MAX_PATCHES,
                               seed: int | None = None) -> dict[str, Any]:
    """`compose_deplot_llava` + `deplot_llava_processor`, saved to `out_dir` (safetensors).

    Returns a summary for the convert stage's manifest (kind, tensors, image tokens).
    """
    from mmjobs.models.deplot import register

    register()
    model = compose_deplot_llava(vision, language, max_patches=max_patches, seed=seed)
    processor = deplot_llava_processor(vision, language, max_patches=max_patches)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"kind": "deplot_llava", "tensors": len(model.state_dict()),
            "image_tokens": max_patches,
            "vision_hidden_size": model.config.vision_config.hidden_size,
            "text_model_type": model.config.text_config.model_type}


def _pix2struct_vision_config(cfg: Any, source: Any) -> Any:
    """The Pix2Struct vision config of a full Pix2Struct config or a vision config."""
    cfg = getattr(cfg, "vision_config", None) if cfg.model_type == "pix2struct" else cfg
    if cfg is None or cfg.model_type != "pix2struct_vision_model":
        raise ValueError(f"vision model {source}: not a Pix2Struct model (model_type "
                         f"{getattr(cfg, 'model_type', None)!r}); ChartWiz's vision tower is a "
                         "Pix2Struct/DePlot checkpoint such as ybelkada/pix2struct-base")
    return cfg


def _copy_encoder_weights(model: DeplotLlavaForConditionalGeneration, vision_dir: Path) -> None:
    """Load the Pix2Struct encoder's weights into the vision tower (strict)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(vision_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    # A full Pix2Struct model keeps the encoder under `encoder.`; a bare vision model has none.
    prefixed = {k.removeprefix("encoder."): v for k, v in state.items()
                if k.startswith("encoder.")}
    model.model.vision_tower.load_state_dict(prefixed or state, strict=True)
