"""InternLM2's decoder as InternLM-XComposer2 uses it: fused `wqkv` with grouped-query heads,
dynamic-NTK RoPE, and Partial-LoRA (`Plora_A` / `Plora_B`) on image positions.

Written from the published architecture (the hub's `modeling_internlm2.py` / `build_mlp.py`,
read for facts; see the package docstring), module and parameter names as in the official
state dict: `model.tok_embeddings`, `model.layers.{i}.attention.wqkv` / `.wo`,
`.feed_forward.w1` / `w2` / `w3` (each with `.Plora_A`, `.Plora_B`), `.attention_norm`,
`.ffn_norm`, `model.norm`.

- **wqkv layout.** The fused projection's output `[(H + 2*K) * D]` is K groups, one per
  key/value head, each `[H/K query heads, 1 key head, 1 value head] x D` (the remote code's
  `'b q (h gs d) -> b q h gs d', gs = 2 + H/K`): query head `h*(H/K) + g` is slot `g` of group
  `h`. InternLM2-7B: H 32, K 8, D 128 -> 8 groups of 6 x 128 = 6144.
- **Partial-LoRA.** Every decoder linear is `W x (+ b)`, plus `alpha/r * B(A(dropout(x)))` at
  the positions where `im_mask` is True (image tokens) and nothing elsewhere; r 256, alpha 256.
- **RoPE.** theta 1e6, `rope_type: dynamic` with factor 1.0: the base is rescaled only past
  `max_position_embeddings` (32,768), as the remote code's `DynamicNTKScalingRotaryEmbedding`
  (which keeps the enlarged base once it grew; here it is recomputed per call).
- **Positions.** From `position_ids`, or from the attention mask (left padding starts each row
  at 0). The remote code ignores `position_ids` and numbers every position, pads included;
  that is the same thing for unpadded and right-padded rows (training, ChartMoE's batch-1
  eval), and it is what makes left-padded batched generation equal one-at-a-time generation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from mmjobs.models.xcomposer2.configuration import XComposer2Config


class InternLM2RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as InternLM2/Llama)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class PLoRALinear(nn.Linear):
    """`nn.Linear` with a low-rank branch applied only at image positions (Partial-LoRA).

    `forward(x [B, L, in], im_mask [B, L] bool | None) -> [B, L, out]`. A subclass of
    `nn.Linear`, so peft puts its LoRA adapters around it (the extra `im_mask` argument is
    passed through to this forward) and merges them into `weight`.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, r: int, alpha: float,
                 dropout: float) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.Plora_A = nn.Linear(in_features, r, bias=False)
        self.Plora_B = nn.Linear(r, out_features, bias=False)
        self.plora_scaling = alpha / r
        self.plora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if im_mask is None:
            return out
        if im_mask.any():
            part = self.plora_dropout(x[im_mask])  # [N image positions, in]
            delta = self.Plora_B(self.Plora_A(part)) * self.plora_scaling
            return out.index_put((im_mask,), delta.to(out.dtype), accumulate=True)
        if self.training and torch.is_grad_enabled() and self.Plora_A.weight.requires_grad:
            # No image in the batch: the branch still joins the graph with a zero (the remote
            # code does the same), so DDP sees gradients for every trainable parameter.
            return out + self.Plora_B(self.Plora_A(x[:, :1])).sum() * 0
        return out


def plora_linear(config: XComposer2Config, in_features: int, out_features: int, *,
                 bias: bool) -> PLoRALinear:
    """A decoder linear with the config's Partial-LoRA settings."""
    return PLoRALinear(in_features, out_features, bias=bias, r=config.plora_r,
                       alpha=config.plora_alpha, dropout=config.plora_dropout)


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin for RoPE at given positions; dynamic NTK past `max_position_embeddings`."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        params = config.rope_parameters or {}
        self.dim = config.head_dim
        self.base = float(params.get("rope_theta", 1000000.0))
        self.rope_type = params.get("rope_type") or "default"
        if self.rope_type not in ("default", "dynamic"):
            raise ValueError(f"rope_parameters.rope_type {self.rope_type!r}: InternLM2 supports "
                             "dynamic (the published config) or default")
        self.factor = float(params.get("factor", 1.0))
        self.max_position_embeddings = config.max_position_embeddings

    def _inv_freq(self, base: float, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
        return 1.0 / (base ** exponents)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, seq_len: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[B, L, D]` in `x`'s dtype for `position_ids` `[B, L]`; `seq_len` is the
        attended length (cache included), which decides the dynamic base."""
        base = self.base
        if self.rope_type == "dynamic" and seq_len > self.max_position_embeddings:
            base = self.base * ((self.factor * seq_len / self.max_position_embeddings)
                                - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        # Computed per call, not a buffer: nothing to restore after meta-device loading.
        inv_freq = self._inv_freq(base, x.device)
        freqs = position_ids[..., None].float() * inv_freq  # [B, L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on `q` `[B, H, L, D]` and `k` `[B, K, L, D]` with `cos`/`sin` `[B, L, D]`."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def split_wqkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection `[B, L, (H + 2K) * D]` as query `[B, H, L, D]`, key and value
    `[B, K, L, D]` (see the module docstring for the layout)."""
    b, length, _ = qkv.shape
    groups = num_heads // num_kv_heads
    grouped = qkv.view(b, length, num_kv_heads, groups + 2, head_dim)
    query = grouped[..., :groups, :].reshape(b, length, num_heads, head_dim)
    return query.transpose(1, 2), grouped[..., -2, :].transpose(1, 2), \
        grouped[..., -1, :].transpose(1, 2)


class InternLM2Attention(nn.Module):
    """Grouped-query self-attention with the fused, Partial-LoRA `wqkv` and `wo`."""

    def __init__(self, config: XComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = plora_linear(config, config.hidden_size, out, bias=config.bias)
        self.wo = plora_linear(config, self.num_heads * self.head_dim, config.hidden_size,
                               bias=config.bias)

    def forward(self, hidden_states: torch.Tensor, *, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, im_mask: torch.Tensor | None,
                cache: Any = None) -> torch.Tensor:
        b, length, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states, im_mask)
        query, key, value = split_wqkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary(query, key, *cos_sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        key = key.repeat_interleave(groups, dim=1)  # [B, H, T, D]: query head h reads kv h // g
        value = value.repeat_interleave(groups, dim=1)
        if self.config._attn_implementation == "eager":
            out = _eager_attention(query, key, value, attention_mask)
        else:  # sdpa (flash-attention 2 is not wired: mmjobs falls back to sdpa)
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask,
                is_causal=attention_mask is None and length > 1)
        out = out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)
        return self.wo(out, im_mask)


def _eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """The remote code's attention: scores / sqrt(D), masked, softmax in float32."""
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
    if mask is None:  # causal, no cache, no padding
        length = query.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


class InternLM2MLP(nn.Module):
    """SwiGLU feed-forward: `w2(act(w1 x) * w3 x)`, each linear Partial-LoRA."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.w1 = plora_linear(config, config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = plora_linear(config, config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = plora_linear(config, config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + attention(norm(x))`, then `x + feed_forward(norm(x))`."""

    def __init__(self, config: XComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, *, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, im_mask: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool = False) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(
            self.attention_norm(hidden_states), cos_sin=cos_sin, attention_mask=attention_mask,
            im_mask=im_mask, cache=cache)
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states), im_mask)


def attention_mask_4d(attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                      query_length: int, past_length: int) -> torch.Tensor | None:
    """Boolean `[B, 1, Lq, Lk]` (True = attend): causal, padding, and packed rows.

    Packed rows (no attention mask, `position_ids` restarting at 0 inside a row) get a
    block-diagonal mask, so packed samples never see each other. Every query may attend to
    itself, so a padded position never has an empty row (its NaN would leak through 0 * NaN).
    None when plain causal attention is enough (no padding, no cache, no packing).
    """
    batch = position_ids.shape[0]
    device = position_ids.device
    key_length = past_length + query_length
    packed = attention_mask is None and past_length == 0 and query_length > 1 and bool(
        (position_ids[:, 1:] == 0).any())
    if attention_mask is None and past_length == 0 and not packed:
        return None
    q_pos = torch.arange(past_length, key_length, device=device)
    k_pos = torch.arange(key_length, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None].expand(batch, -1, -1)  # [B, Lq, Lk]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :key_length].bool()
    if packed:
        sample = (position_ids == 0).cumsum(-1)  # [B, L]
        mask = mask & (sample[:, :, None] == sample[:, None, :])
    diagonal = torch.zeros_like(mask)
    diagonal[:, torch.arange(query_length, device=device),
             torch.arange(past_length, key_length, device=device)] = True
    return (mask | diagonal)[:, None]


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, query_length: int,
                         past_length: int, device: torch.device) -> torch.Tensor:
    """`[B, Lq]` positions: counted over the attention mask (left padding starts at 0), else
    `past_length ..`."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length,
                            device=device)[None].expand(batch, -1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past_length:past_length + query_length]


class InternLM2Model(nn.Module):
    """Embeddings, decoder layers and the final norm (`model.*` in the state dict)."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        self.config = config
        # padding_idx as upstream: the pad (= </s>) row gets no gradient in full fine-tuning.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                           config.pad_token_id)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(config)

    def forward(self, inputs_embeds: torch.Tensor, *, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, im_mask: torch.Tensor | None,
                cache: Any = None, use_cache: bool = False) -> torch.Tensor:
        """Hidden states `[B, L, hidden]` after the final norm."""
        batch, length, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, length, past,
                                                inputs_embeds.device)
        mask = attention_mask_4d(attention_mask, position_ids, length, past)
        cos_sin = self.rotary_emb(inputs_embeds, position_ids, past + length)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos_sin=cos_sin, attention_mask=mask, im_mask=im_mask,
                           cache=cache, use_cache=use_cache)
        return self.norm(hidden)
