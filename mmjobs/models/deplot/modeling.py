"""`DeplotLlavaForConditionalGeneration`: LLaVA with a Pix2Struct/DePlot encoder (ChartWiz).

ChartWiz (allright2024/ChartWiz, `llava/model/multimodal_encoder/deplot_encoder.py`) replaces
LLaVA's CLIP with the encoder of a Pix2Struct model (`ybelkada/pix2struct-base` with DePlot
weights): `Pix2StructForConditionalGeneration(...).encoder`, frozen, its `last_hidden_state`
(after the encoder's final layer norm) fed to LLaVA's `mlp2x_gelu` projector. Every one of the
processor's `max_patches` positions becomes one image token, padding patches included
(ChartWiz passes the whole `last_hidden_state`): 512 tokens per image in its training script.

Here that is transformers' `LlavaForConditionalGeneration` with two changes:
- the vision tower is a `Pix2StructVisionModel` (the same module as Pix2Struct's `.encoder`,
  so weights load unchanged) built from `config.vision_config`;
- `get_image_features` takes the flattened patches `[n, max_patches, 2 + 3·p·p]` (the
  processor writes them as `pixel_values`) and uses `last_hidden_state`; the patch mask is
  the one Pix2Struct derives itself (all-zero rows are padding), so no second mask travels
  next to the text's `attention_mask`.
Component names (`vision_tower`, `multi_modal_projector`, `language_model`) are LLaVA's, so
freezing, LoRA targets and connector bookkeeping (`mmjobs.models.compose`) work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    Pix2StructVisionModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.models.llava.modeling_llava import (
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

MODEL_TYPE = "deplot_llava"
# ChartWiz's train.py: `processor(images=image, max_patches=512)` for ybelkada/pix2struct-base.
CHARTWIZ_MAX_PATCHES = 512


@strict
class DeplotLlavaConfig(LlavaConfig):
    """LlavaConfig whose vision config is a `pix2struct_vision_model` (see the module docstring).

    `image_seq_length` is the processor's `max_patches` (one token per patch position);
    `vision_feature_layer` / `vision_feature_select_strategy` are fixed (-1 after the final
    norm, all positions) since ChartWiz reads `last_hidden_state`.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "vision_config": SubConfigSpec(config_class=AutoConfig,
                                       model_type="pix2struct_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mistral"),
    }
    image_seq_length: int = CHARTWIZ_MAX_PATCHES
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.vision_feature_layer != -1 or self.vision_feature_select_strategy != "full":
            raise ValueError("deplot_llava reads the Pix2Struct encoder's last_hidden_state at "
                             "every patch position: vision_feature_layer must be -1 and "
                             "vision_feature_select_strategy 'full' (ChartWiz's encoder)")


class DeplotLlavaModel(LlavaModel):
    """`LlavaModel` with a `Pix2StructVisionModel` tower (see the module docstring)."""

    config_class = DeplotLlavaConfig

    def __init__(self, config: DeplotLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)  # LlavaModel's would ask AutoModel
        self.vision_tower = Pix2StructVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, *args: Any,
                           **kwargs: Any) -> Any:
        """Flattened patches `[n, P, 2 + 3·p·p]` → `pooler_output`: n tensors `[P, Dt]`."""
        if pixel_values.dim() != 3:
            raise ValueError(f"deplot_llava takes Pix2Struct flattened patches [images, "
                             f"max_patches, 2 + 3*patch*patch] as pixel_values; got shape "
                             f"{list(pixel_values.shape)} (use the model's own processor)")
        tower = self.vision_tower
        outputs = tower(flattened_patches=pixel_values.to(tower.dtype), return_dict=True)
        features = self.multi_modal_projector(outputs.last_hidden_state)
        outputs.pooler_output = list(features)
        return outputs


class DeplotLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` around `DeplotLlavaModel`."""

    config_class = DeplotLlavaConfig

    def __init__(self, config: DeplotLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DeplotLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size,
                                       config.text_config.vocab_size, bias=False)
        self.post_init()
