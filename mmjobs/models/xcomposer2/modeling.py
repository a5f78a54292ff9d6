"""`XComposer2ForCausalLM`: CLIP ViT-L/14 (490 px) -> `vision_proj` -> InternLM2 with Partial-LoRA.

Parameter names are the official checkpoint's (`vit.vision_tower.vision_model.*`,
`vision_proj.{0,2}.*`, `model.*`, `output.weight`), so the converted weights load as they are.

Inputs are mmjobs' usual ones, not the remote code's `samples` dict: `input_ids` in which the
processor wrote `config.image_token_id` once per image position (1225 per 490 px image),
`pixel_values` `[num_images, 3, 490, 490]`, `attention_mask`, optionally `position_ids`. The
forward embeds the text, puts each image's projected patch features over its positions (in
order) and sets `im_mask` there, which switches the decoder's Partial-LoRA branches on. That
is what the remote code's `interleav_wrap` builds from text split at `<ImageHere>`: the same
embeddings, the same `im_mask`. Generation goes through transformers' `GenerationMixin`
(KV cache; the images are encoded once, in the first step; later steps are text tokens, whose
`im_mask` is all False, as in the remote code).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmjobs.models.xcomposer2.configuration import XComposer2Config
from mmjobs.models.xcomposer2.internlm2 import InternLM2Model

# transformers renamed the KV cache field `past_key_values` -> `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


class CLIPVisionHolder(nn.Module):
    """Holds CLIP's vision transformer as `vision_model`, so its parameters are named
    `vision_model.*` as transformers 4.x's `CLIPVisionModel` named them (the official checkpoint:
    `vit.vision_tower.vision_model.*`); transformers 5's `CLIPVisionModel` dropped that level."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.vision_model = CLIPVisionModel(config.vision_config)


class XComposer2VisionTower(nn.Module):
    """CLIP's vision transformer read at `vision_select_layer`, CLS dropped.

    `forward(pixel_values [N, 3, S, S]) -> [N, (S / patch)^2, vision hidden]`.
    """

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionHolder(config)
        self.select_layer = config.vision_select_layer

    @property
    def dtype(self) -> torch.dtype:
        """The vision transformer's parameter dtype (inputs are cast to it)."""
        return self.vision_tower.vision_model.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        clip = self.vision_tower.vision_model
        if self.select_layer == -1:  # the last encoder layer = last_hidden_state (pre post-LN)
            hidden = clip(pixel_values).last_hidden_state
        else:
            hidden = clip(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        return hidden[:, 1:]


def build_vision_proj(vision_dim: int, text_dim: int) -> nn.Sequential:
    """XComposer2's `mlp2x_gelu` connector: Linear, exact GELU, Linear (`vision_proj.{0,2}`)."""
    return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(),
                         nn.Linear(text_dim, text_dim))


class XComposer2PreTrainedModel(PreTrainedModel):
    """Weight init and loading settings shared by the XComposer2 classes."""

    config_class = XComposer2Config
    config: XComposer2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer", "CLIPEncoderLayer"]  # noqa: RUF012
    _supports_sdpa = True
    _supports_flash_attn = False  # sdpa or eager: `select_attn_implementation` falls back


class XComposer2ForCausalLM(XComposer2PreTrainedModel, GenerationMixin):
    """InternLM-XComposer2 (see the module docstring)."""

    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vit = XComposer2VisionTower(config)
        self.vision_proj = build_vision_proj(config.vision_config.hidden_size,
                                             config.hidden_size)
        self.post_init()

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.output = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, 3, S, S]` -> projected patch features `[N, image_tokens, hidden]`."""
        vit_dtype = self.vit.dtype
        return self.vision_proj(self.vit(pixel_values.to(vit_dtype)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(inputs_embeds [B, L, hidden], im_mask [B, L])` for ids with image positions.

        Raises:
            ValueError: the image positions do not match the images given.
        """
        is_image = input_ids == self.config.image_token_id
        embeds = self.model.tok_embeddings(input_ids.masked_fill(is_image, 0))
        positions = int(is_image.sum())
        if pixel_values is None:
            if positions:
                raise ValueError(f"input_ids hold {positions} image positions but no "
                                 "pixel_values were given")
            return embeds, is_image
        features = self.get_image_features(pixel_values)  # [N, T, hidden]
        if features.shape[0] * features.shape[1] != positions:
            raise ValueError(
                f"{features.shape[0]} images make {features.shape[0] * features.shape[1]} "
                f"image positions ({features.shape[1]} each) but input_ids hold {positions}; "
                "tokenize with this model's processor (it expands each image placeholder)")
        embeds = embeds.masked_scatter(is_image[..., None],
                                       features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        return embeds, is_image

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, im_mask: torch.Tensor | None = None,
                past_key_values: Any = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits `[B, L, vocab]` (float32, as the remote code returns them).

        Args:
            input_ids: `[B, L]` with image positions marked by `config.image_token_id`.
            pixel_values: `[N, 3, S, S]`, the images in order of their positions.
            inputs_embeds, im_mask: instead of `input_ids`/`pixel_values`, precomputed
                embeddings and the image-position mask (the remote code's interface).
            labels: `[B, L]`, -100 where no loss is taken; the loss is the mean next-token
                cross-entropy, as the remote code computes it.
            logits_to_keep: compute logits for the last N positions only (0: all).
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds, found = self.embed(input_ids, pixel_values)
            im_mask = found if im_mask is None else im_mask
        elif im_mask is None:
            im_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool,
                                  device=inputs_embeds.device)
        if use_cache and cache is None and not self.training:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        hidden = self.model(inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, im_mask=im_mask.bool(),
                            cache=cache if use_cache else None, use_cache=bool(use_cache))
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: cache if use_cache else None})

