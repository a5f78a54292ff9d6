"""`LavinForConditionalGeneration`: LaVIN on transformers' `LlamaModel` and `CLIPVisionModel`.

What LaVIN (luogen1996/LaVIN `lavin/model.py`, `lavin/mm_adapter.py`) computes, and how it
maps here:

- **Visual tokens.** CLIP ViT-L/14 runs on a 224 px image; the CLS token after every 4th block
  (blocks 4, 8, ..., 24; no `ln_post`, no projection) gives 6 features of width 1024, which
  `adapter_proj` (Linear 1024 -> 128, SiLU, Linear 128 -> 4096) maps into the LLM. The
  tokenizer's `<image>` id marks their 6 positions in `input_ids` (the processor expands one
  `<image>` to 6); those ids are never embedded (the id is past the LLaMA vocabulary).
- **The modality token.** `adapter_modality_embedding` (2 rows: 1 = the sequence has an image,
  0 = text only) is put in front of every sequence by this model, so `input_ids`, labels and
  logits never contain it: logits come back for the given positions only, aligned with the
  labels. The modality token takes RoPE position 0 (BOS is at 1, as in LaVIN); no later
  position may attend to it (LaVIN masks column 0 for rows >= 1); it attends to itself and
  drives the routers. LaVIN's `--max_seq_len 512` counts it: tokenized samples are at most
  511 ids (`lavin_sequence_budget`).
- **Adapters.** A `RepAdapterRouter` before self-attention in every LLaMA and CLIP layer
  (`mmjobs.models.lavin.adapters`); they start as the identity.
- **Masking and padding.** Positions come from the attention mask (left padding in batched
  generation, right padding in training), never from `position_ids` arguments; every row can
  attend to itself, so padded rows stay finite.
- **Decoding.** The KV cache holds the modality token too; decode steps reuse the routers'
  prompt weights. Beam search is not supported (the cached routing is per row).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, LlamaModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmjobs.models.lavin.adapters import RepAdapterRouter, attach_adapters
from mmjobs.models.lavin.config import LavinConfig

IGNORE_INDEX = -100


def lavin_sequence_budget(config: LavinConfig) -> int:
    """Token ids a sample may have so that, with the modality token, it fits `max_seq_len`."""
    return config.max_seq_len - 1


class LavinProjector(nn.Module):
    """LaVIN's `AdapterMLP` (`adapter_proj`): Linear -> SiLU -> Linear, xavier, zero bias."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.conv_A = nn.Linear(in_features, hidden)  # LaVIN's names, though they are linears
        self.conv_B = nn.Linear(hidden, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LaVIN's initialisation (skips parameters already loaded from a checkpoint)."""
        for linear in (self.conv_A, self.conv_B):
            init.xavier_uniform_(linear.weight)
            init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.conv_A.weight.dtype
        return self.conv_B(nn.functional.silu(self.conv_A(x.to(dtype))))


def _reset_adapter(adapter: RepAdapterRouter) -> None:
    """`RepAdapterRouter.reset_parameters` through transformers' guarded init functions, so
    parameters loaded from a checkpoint are left alone; the router gets `nn.Linear`'s
    default initialisation, as in LaVIN."""
    init.xavier_uniform_(adapter.conv_A.weight)
    init.zeros_(adapter.conv_A.bias)
    for conv in (adapter.conv_B, adapter.conv_D):
        init.zeros_(conv.weight)
        init.zeros_(conv.bias)
    router = adapter.expert_weights
    init.kaiming_uniform_(router.weight, a=5 ** 0.5)
    bound = 1 / router.in_features ** 0.5
    init.uniform_(router.bias, -bound, bound)


class LavinPreTrainedModel(PreTrainedModel):
    """Weights, initialisation and capabilities shared by LaVIN classes."""

    config_class = LavinConfig
    config: LavinConfig
    base_model_prefix = "lavin"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]  # noqa: RUF012 (transformers' name)
    _supports_sdpa = True
    # The modality token needs a custom 4D mask, which flash / flex kernels do not take.
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LavinProjector):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):  # the modality embedding: nn.Embedding's N(0, 1)
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):  # lm_head
            init.normal_(module.weight, std=self.config.text_config.initializer_range)


class LavinForConditionalGeneration(LavinPreTrainedModel, GenerationMixin):
    """LaVIN (see the module docstring). Parameters whose names contain `adapter` are LaVIN's
    trainable ones (`adapter_attn.*` in every layer, `adapter_proj.*`,
    `adapter_modality_embedding.*`)."""

    _tied_weights_keys: dict[str, str] = {}  # noqa: RUF012 (transformers' name)

    def __init__(self, config: LavinConfig) -> None:
        super().__init__(config)
        text, vision = config.text_config, config.vision_config
        self.language_model = LlamaModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.vision_tower = CLIPVisionModel(vision)
        settings = {"hidden_dim": config.adapter_dim, "groups": config.adapter_groups,
                    "scale": config.adapter_scale, "temperature": config.router_temperature}
        self.text_adapters = attach_adapters(
            self.language_model.layers, "input_layernorm", text.hidden_size,
            dropouts=[config.adapter_dropout] * text.num_hidden_layers, **settings)
        self.vision_adapters = attach_adapters(
            self.vision_tower.encoder.layers, "layer_norm1", vision.hidden_size,
            dropouts=[config.adapter_dropout] * vision.num_hidden_layers, **settings)
        self.adapter_proj = LavinProjector(vision.hidden_size, config.projector_hidden,
                                           text.hidden_size)
        self.adapter_modality_embedding = nn.Embedding(2, text.hidden_size)
        self.post_init()

    # Plain lists would be registered twice as modules; keep them out of nn.Module's registry.
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("text_adapters", "vision_adapters"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation, then LaVIN's for the adapters inside the LLaMA and
        CLIP layers (their sub-models' own init would draw them as ordinary linears)."""
        super().initialize_weights()
        for adapter in (*self.text_adapters, *self.vision_adapters):
            _reset_adapter(adapter)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def adapter_dropouts(self) -> dict[str, list[float]]:
        """The adapters' dropout probabilities per layer: `{"text": [...], "vision": [...]}`."""
        return {"text": [a.dropout.p for a in self.text_adapters],
                "vision": [a.dropout.p for a in self.vision_adapters]}

    def set_adapter_dropouts(self, text: list[float], vision: list[float]) -> None:
        """Set each layer's adapter dropout (the seed fork's depth schedules)."""
        for adapters, values, what in ((self.text_adapters, text, "text"),
                                       (self.vision_adapters, vision, "vision")):
            if len(values) != len(adapters):
                raise ValueError(f"{len(values)} {what} dropout values for {len(adapters)} "
                                 f"{what} layers")
            for adapter, p in zip(adapters, values, strict=True):
                adapter.dropout.p = float(p)

    def apply_dropout_preset(self, preset: str | None) -> dict[str, list[float]]:
        """Set the study row's depth-wise adapter dropout (`adapters.preset_dropouts`): the
        fork walks the LLaMA blocks and the CLIP blocks separately, each from the start."""
        from mmjobs.models.lavin.adapters import preset_dropouts

        self.set_adapter_dropouts(preset_dropouts(preset, len(self.text_adapters)),
                                  preset_dropouts(preset, len(self.vision_adapters)))
        return self.adapter_dropouts()

    def train_adapters_only(self) -> int:
        """LaVIN's rule: parameters whose names contain "adapter" train, all others are
        frozen. Returns the number of trainable parameters (LaVIN-7B: about 3.8M)."""
        total = 0
        for name, param in self.named_parameters():
            param.requires_grad_("adapter" in name)
            total += param.numel() if param.requires_grad else 0
        return total

    # ------------------------------------------------------------------ inputs

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` images -> `[N, num_visual_tokens, text hidden]` visual tokens."""
        tower = self.vision_tower
        every = self.config.vision_tap_every
        hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
        hidden = tower.pre_layrnorm(hidden)
        taps = []
        for index, layer in enumerate(tower.encoder.layers):
            hidden = layer(hidden, None)
            if (index + 1) % every == 0:
                taps.append(hidden[:, 0])  # the CLS token
        return self.adapter_proj(torch.stack(taps, dim=1))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the visual tokens written over the `<image>` positions.

        Raises:
            ValueError: `<image>` positions and images do not match (6 per image).
        """
        is_image = input_ids == self.config.image_token_id
        embed_tokens = self.language_model.embed_tokens
        embeds = embed_tokens(input_ids.masked_fill(is_image, 0))
        count = int(is_image.sum())
        if not count:
            return embeds
        per_image = self.config.num_visual_tokens
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if count != images * per_image:
            raise ValueError(f"{count} <image> positions but {images} images ({per_image} "
                             "positions each); prompts must come from the LaVIN processor")
        features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    @staticmethod
    def attention_mask_4d(mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive `[B, 1, Q, K]` mask for the last `queries` of `mask`'s K positions
        (position 0 = the modality token): causal, no padding, nobody but itself attends to
        position 0, and every position attends to itself."""
        keys = mask.shape[1]
        q_pos = torch.arange(keys - queries, keys, device=mask.device)[:, None]  # [Q, 1]
        k_pos = torch.arange(keys, device=mask.device)[None, :]  # [1, K]
        allowed = (k_pos <= q_pos) & mask[:, None, :].bool()  # [B, Q, K]
        allowed &= ~((k_pos == 0) & (q_pos > 0))
        allowed |= k_pos == q_pos
        out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.LongTensor | None = None,
                pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits for `input_ids` `[B, T]` (the modality token is added here, not returned).

        Args:
            input_ids: token ids, `<image>` x 6 per image (see the module docstring).
            pixel_values: `[N, 3, 224, 224]` images, in the order of their `<image>` runs.
            attention_mask: `[B, T]` (1 = token); for decode steps, past tokens included.
            position_ids: ignored; positions follow the mask, the modality token at 0.
            cache: a transformers `Cache`; empty or None = a prompt pass.
            labels: `[B, T]`, -100 where no loss is taken; gives the mean next-token loss.
            logits_to_keep: as in transformers' causal LMs (0 = all positions).
        """
        if input_ids is None:
            raise ValueError("LaVIN needs input_ids (the <image> positions say where the "
                             "visual tokens go)")
        prompt_pass = cache is None or cache.get_seq_length() == 0
        batch = input_ids.shape[0]
        if attention_mask is None:
            # transformers' generate drops an all-ones mask (a batch of one): every past token
            # counts then, and the cache also holds the modality token (not in the mask).
            past = 0 if prompt_pass else cache.get_seq_length() - 1
            attention_mask = input_ids.new_ones(batch, past + input_ids.shape[1])
        embeds = self.embed(input_ids, pixel_values if prompt_pass else None)
        if prompt_pass:
            has_image = (input_ids == self.config.image_token_id).any(dim=1).long()
            modality = self.adapter_modality_embedding(has_image)[:, None].to(embeds.dtype)
            embeds = torch.cat([modality, embeds], dim=1)
        ones = torch.ones(batch, 1, dtype=attention_mask.dtype, device=attention_mask.device)
        full_mask = torch.cat([ones, attention_mask], dim=1)  # the modality token + tokens
        queries = embeds.shape[1]
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -queries:]
        mask = self.attention_mask_4d(full_mask, queries, embeds.dtype)
        for adapter in self.text_adapters:
            adapter.reuse_routing = not prompt_pass
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=positions, cache=cache, use_cache=use_cache)
        hidden = out.last_hidden_state[:, 1:] if prompt_pass else out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
