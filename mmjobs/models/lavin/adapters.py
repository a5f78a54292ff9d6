"""LaVIN's mixture-of-modality adapter (`RepAdapter_Router`) and where it goes in a block.

One adapter sits before self-attention in every LLaMA decoder layer and every CLIP encoder
layer, on the normed hidden states: `h = x + attn(adapter(norm(x)))` (the MLP is untouched),
as luogen1996/LaVIN's `--adapter_type attn --visual_adapter_type router` builds it:

    h = dropout(conv_A(x))                       # in -> 8, 1x1 conv = per-token linear
    y = x + scale * (w0 * conv_B(h) + w1 * conv_D(h))     # 8 -> in, groups 2, two "experts"
    (w0, w1) = softmax(expert_weights(x[:, r]) / t)       # the router, t = 10

`conv_B` and `conv_D` start at zero, so a fresh adapter is the identity. The router reads one
position `r` of the sequence: in the language model the modality token (index 0, which only
ever attends to itself, so the weights are one constant pair per modality and layer); in CLIP
the CLS token of each image (LaVIN's CLIP runs sequence-first, `(L, N, D)`, so its `x[:, 0]`
actually takes batch element 0 at every position and routes each image by the first image of
its batch; mmjobs routes each image by its own CLS token, batch-independent, as the paper
describes).

During incremental decoding the new tokens do not include the modality token: LaVIN computes
the router weights once, on the prompt (`start_pos == 0`), and reuses them; `reuse_routing`
does the same here. Only the router weights of the last prompt pass are cached (detached), so
beam search, which reorders rows, is not supported.

The adapters are attached as submodules named `adapter_attn` of each layer (LaVIN's name), and
called by a forward hook on the layer's pre-attention norm, so the transformers layer classes,
their forward code and the base weights' names stay exactly those of transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmjobs.models.lavin.presets import LAVIN_DROPOUT_PRESETS


class RepAdapterRouter(nn.Module):
    """LaVIN's `RepAdapter_Router` (see the module docstring).

    Args:
        in_features: the width of the hidden states (4096 for LLaMA-7B, 1024 for ViT-L/14).
        hidden_dim: the bottleneck (LaVIN `--adapter_dim 8`).
        groups: groups of the up-projections `conv_B` / `conv_D` (2).
        scale: the adapter's output scale (`--adapter_scale 1`).
        temperature: the router's softmax temperature (`--temperature 10`).
        dropout: dropout on `conv_A`'s output (0.1; the seed fork schedules it over depth).
        route_index: the sequence position the router reads (0).
    """

    def __init__(self, in_features: int, *, hidden_dim: int = 8, groups: int = 2,
                 scale: float = 1.0, temperature: float = 10.0, dropout: float = 0.1,
                 route_index: int = 0) -> None:
        super().__init__()
        if in_features % groups or hidden_dim % groups:
            raise ValueError(f"adapter widths {in_features} and {hidden_dim} must both be "
                             f"divisible by groups={groups}")
        self.conv_A = nn.Conv1d(in_features, hidden_dim, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
        self.conv_D = nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
        self.expert_weights = nn.Linear(in_features, 2)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.temperature = temperature
        self.route_index = route_index
        self.reuse_routing = False  # set by the model for decoding steps
        self.cached_routing: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LaVIN's initialisation: xavier `conv_A`, zero up-projections (identity at start).
        The router keeps `nn.Linear`'s default initialisation, as in LaVIN."""
        nn.init.xavier_uniform_(self.conv_A.weight)
        nn.init.zeros_(self.conv_A.bias)
        for conv in (self.conv_B, self.conv_D):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The expert weights `[B, 2]` for hidden states `x` `[B, L, D]` (or the cached ones
        while decoding)."""
        if self.reuse_routing:
            if self.cached_routing is None or self.cached_routing.shape[0] != x.shape[0]:
                raise RuntimeError("adapter routing reused before a prompt pass computed it "
                                   "(decode steps need the prompt's pass first; beam search, "
                                   "which reorders rows, is not supported)")
            return self.cached_routing
        token = x[:, self.route_index].to(self.expert_weights.weight.dtype)
        weights = torch.softmax(self.expert_weights(token) / self.temperature, dim=-1)
        self.cached_routing = weights.detach()
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[B, L, D]` -> the adapted hidden states, same shape and dtype.

        The 1x1 convolutions are per-token linear maps; they run as `F.linear` on `[B, L, D]`
        (the grouped up-projections as one block-diagonal matrix), which is what LaVIN's
        `Conv1d`s compute and much faster on CPUs than oneDNN's tiny convolutions.
        """
        dtype = self.conv_A.weight.dtype
        weights = self.routing(x).to(dtype)
        h = x.to(dtype)
        hidden = self.dropout(F.linear(h, self.conv_A.weight[..., 0], self.conv_A.bias))
        mixed = (F.linear(hidden, _dense(self.conv_B), self.conv_B.bias) * weights[:, None, 0:1]
                 + F.linear(hidden, _dense(self.conv_D), self.conv_D.bias) * weights[:, None, 1:2])
        return (h + self.scale * mixed).to(x.dtype)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook for the norm before attention: its output goes through the adapter."""
        return self(output)


def _dense(conv: nn.Conv1d) -> torch.Tensor:
    """A grouped 1x1 `Conv1d`'s weight `[out, in / groups, 1]` as the dense `[out, in]`
    (block-diagonal) matrix of the same linear map."""
    weight = conv.weight[..., 0]
    if conv.groups == 1:
        return weight
    out_per, in_per = conv.out_channels // conv.groups, weight.shape[1]
    blocks = [weight[g * out_per:(g + 1) * out_per] for g in range(conv.groups)]
    return torch.block_diag(*blocks).reshape(conv.out_channels, in_per * conv.groups)


def attach_adapters(layers: Sequence[nn.Module], norm_name: str, width: int, *,
                    dropouts: Sequence[float], **settings: float | int) -> list[RepAdapterRouter]:
    """Give each layer an `adapter_attn` applied to the output of its `norm_name` submodule.

    Args:
        layers: decoder / encoder layers, input side first.
        norm_name: the pre-attention norm (`input_layernorm` in Llama, `layer_norm1` in CLIP).
        width: the hidden size.
        dropouts: one dropout probability per layer.
        settings: `RepAdapterRouter` arguments (hidden_dim, groups, scale, temperature).

    Returns:
        The adapters, in layer order.
    """
    if len(dropouts) != len(layers):
        raise ValueError(f"{len(dropouts)} dropout values for {len(layers)} layers")
    adapters = []
    for layer, p in zip(layers, dropouts, strict=True):
        adapter = RepAdapterRouter(width, dropout=p, **settings)  # type: ignore[arg-type]
        layer.adapter_attn = adapter
        getattr(layer, norm_name).register_forward_hook(adapter.hook)
        adapters.append(adapter)
    return adapters


def depth_dropout(num_layers: int, prob: float, var: float, lim: float) -> list[float]:
    """The seed fork's per-layer adapter dropout (HyejunShin/LaVIN `set_MMAdapter`).

    The first block gets `prob`; every following block multiplies the previous probability by
    `var` while the product stays within `lim` (a floor when `var < 1`, a ceiling otherwise),
    and is `lim` from the first block where it would not. `var = 1` keeps `prob` (LaVIN's
    upstream 0.1 everywhere). The same walk restarts for the CLIP blocks.
    """
    if num_layers <= 0:
        raise ValueError(f"num_layers: got {num_layers}; must be > 0")
    for name, value in (("prob", prob), ("lim", lim)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}: got {value}; a dropout probability must be in [0, 1)")
    if var <= 0:
        raise ValueError(f"var: got {var}; the per-layer factor must be > 0")
    values, p = [prob], prob
    for _ in range(1, num_layers):
        within = p * var >= lim if var < 1 else p * var <= lim
        p = p * var if within else lim
        values.append(p)
    return values


def preset_dropouts(preset: str | None, num_layers: int) -> list[float]:
    """Per-layer adapter dropout of one of the study's rows, by the fork's walk.

    `None` / "base": LaVIN's 0.1 in every layer. "inc", "dec", "inc_v2", "dec_v2": the seed
    fork's `--dropout_prob/--dropout_var/--dropout_lim` (its scripts and README: inc 0.1 x1.01
    up to 0.2, dec 0.2 x0.99 down to 0.1, V2 with x1.03 / x0.97), the numbers shared with
    LoRA's schedules (`presets.LAVIN_DROPOUT_PRESETS`).

    Raises:
        ValueError: an unknown preset (the message lists the known ones).
    """
    if preset in (None, "base"):
        return depth_dropout(num_layers, 0.1, 1.0, 0.2)
    if preset not in LAVIN_DROPOUT_PRESETS:
        raise ValueError(f"adapter dropout preset {preset!r}: use base, "
                         f"{', '.join(LAVIN_DROPOUT_PRESETS)}")
    params = LAVIN_DROPOUT_PRESETS[preset][1]
    return depth_dropout(num_layers, params["p"], params["factor"], params["limit"])
