"""Vision→text connectors: linear, LLaVA-1.5's mlp2x_gelu, and ChartMoE's MoE-MLP.

Every connector maps vision features `[..., Dv]` (usually `[B, N, Dv]`) to `[..., Dt]` and has
the `forward(image_features)` signature of transformers' `LlavaMultiModalProjector`, so it can
replace `model.model.multi_modal_projector` of a Llava model.

ChartMoE (IDEA-FinAI/ChartMoE `train/moe_construction.py`) aligns three copies of the connector
on chart→table, chart→JSON and chart→code data, then builds an MoE whose experts start from
those connectors (plus, optionally, the original one) and whose router is trained in SFT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONNECTOR_KINDS = ("linear", "mlp2x_gelu")
CONFIG_NAME = "connector_config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT_VERSION = 1


class LinearConnector(nn.Module):
    """One linear projection `[..., Dv] -> [..., Dt]` (LLaVA-1.0's connector)."""

    def __init__(self, vision_dim: int, text_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


class MLP2xGeluConnector(nn.Module):
    """Linear-GELU-Linear `[..., Dv] -> [..., Dt]` (LLaVA-1.5's `mlp2x_gelu`).

    Submodule names match `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`), so state
    dicts move between the two unchanged.
    """

    def __init__(self, vision_dim: int, text_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = nn.GELU()  # exact GELU, as transformers' ACT2FN["gelu"]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def build_connector(kind: str, vision_dim: int, text_dim: int, *, bias: bool = True) -> nn.Module:
    """A fresh `linear` or `mlp2x_gelu` connector."""
    if kind == "linear":
        return LinearConnector(vision_dim, text_dim, bias=bias)
    if kind == "mlp2x_gelu":
        return MLP2xGeluConnector(vision_dim, text_dim, bias=bias)
    raise ValueError(f"connector kind: got {kind!r}; use one of {', '.join(CONNECTOR_KINDS)}")


class MoEConnector(nn.Module):
    """Token-level top-k mixture of connector experts (ChartMoE's MoE-MLP).

    For each token x (a row of `[..., Dv]`): logits = router(x) `[E]`; the top-k logits are
    softmaxed (= softmax over all experts renormalised over the top k), and the output is
    Σ_k w_k · expert_k(x) `[Dt]`.

    Attributes:
        aux_loss: after each forward, `aux_loss_coef · E · Σ_e f_e · P_e` (Switch/Mixtral load
            balancing: f_e = share of routing slots sent to e, P_e = mean router probability
            of e), a differentiable scalar to add to the LM loss; None when aux_loss_coef is
            0 or the routing was overridden.
        router_override: optional routing probabilities `[E]` or `[..., E]` used instead of
            softmax(router(x)) (ablations); top-k still applies.
        forced_expert: set by `force_expert(i)`: the output is exactly expert i's.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_experts: int,
        *,
        top_k: int = 2,
        expert_type: str = "mlp2x_gelu",
        bias: bool = True,
        aux_loss_coef: float = 0.0,
        router_init: str = "normal",
        expert_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"need 1 <= top_k <= num_experts; got top_k={top_k}, num_experts={num_experts}"
            )
        if aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef: got {aux_loss_coef}; must be >= 0")
        names = list(expert_names) if expert_names is not None else [
            f"expert_{i}" for i in range(num_experts)
        ]
        if len(names) != num_experts:
            raise ValueError(f"got {len(names)} expert_names for {num_experts} experts")
        self.vision_dim, self.text_dim = vision_dim, text_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.expert_type, self.bias = expert_type, bias
        self.aux_loss_coef, self.router_init = aux_loss_coef, router_init
        self.expert_names = names
        self.experts = nn.ModuleList(
            build_connector(expert_type, vision_dim, text_dim, bias=bias)
            for _ in range(num_experts)
        )
        # Bias-free like ChartMoE's gate: routing depends on the token only.
        self.router = nn.Linear(vision_dim, num_experts, bias=False)
        self.reset_router(router_init)
        self.aux_loss: torch.Tensor | None = None
        self.router_override: torch.Tensor | None = None
        self.forced_expert: int | None = None

    def reset_router(self, init: str = "normal") -> None:
        """`zeros`: all experts equally likely at first (top-k ties go to the lowest indices);
        `normal`: N(0, 0.02²), small random logits that break ties per token; `linear`:
        `nn.Linear`'s own initialisation (Kaiming-uniform, bound 1/sqrt(vision_dim)), what
        ChartMoE's gate gets (`nn.Linear(..., bias=False)`, never re-initialised)."""
        if init == "zeros":
            nn.init.zeros_(self.router.weight)
        elif init == "normal":
            nn.init.normal_(self.router.weight, std=0.02)
        elif init == "linear":
            self.router.reset_parameters()
        else:
            raise ValueError(f"router_init: got {init!r}; use 'zeros', 'normal' or 'linear'")
        self.router_init = init

    def force_expert(self, index: int | None) -> None:
        """Route every token to expert `index` only (None restores the router)."""
        if index is not None and not 0 <= index < self.num_experts:
            raise ValueError(f"expert index {index} out of range 0..{self.num_experts - 1}")
        self.forced_expert = index

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments, as saved next to the weights."""
        return {
            "vision_dim": self.vision_dim, "text_dim": self.text_dim,
            "num_experts": self.num_experts, "top_k": self.top_k,
            "expert_type": self.expert_type, "bias": self.bias,
            "aux_loss_coef": self.aux_loss_coef, "router_init": self.router_init,
            "expert_names": self.expert_names,
        }  # fmt: skip

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """`image_features` `[..., Dv]` → `[..., Dt]`; sets `self.aux_loss`."""
        self.aux_loss = None
        if self.forced_expert is not None:
            # The expert itself on the original tensor: bit-identical to calling it directly.
            return self.experts[self.forced_expert](image_features)
        lead_shape = image_features.shape[:-1]
        x = image_features.reshape(-1, self.vision_dim)  # [T, Dv]
        if self.router_override is not None:
            override = self.router_override.to(device=x.device, dtype=torch.float32)
            probs = override.expand(*lead_shape, self.num_experts).reshape(-1, self.num_experts)
        else:
            # Softmax in float32 (as ChartMoE and Mixtral do): in bf16 the top-k weights of
            # close logits would be rounded to a few significant bits.
            probs = F.softmax(self.router(x).float(), dim=-1)  # [T, E]
        top_p, top_idx = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = x.new_zeros(x.shape[0], self.text_dim)  # [T, Dt]
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(top_idx == e)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx])  # [n, Dt]
            out.index_add_(0, token_idx, (weights[token_idx, slot, None] * y).to(out.dtype))
        if self.aux_loss_coef > 0 and self.router_override is None:
            self.aux_loss = self.aux_loss_coef * load_balancing_loss(probs, top_idx)
        return out.reshape(*lead_shape, self.text_dim)

    @classmethod
    def from_experts(
        cls,
        experts: Sequence[nn.Module | Mapping[str, torch.Tensor]]
        | Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
        *,
        top_k: int = 2,
        router_init: str = "normal",
        add_original: nn.Module | Mapping[str, torch.Tensor] | None = None,
        aux_loss_coef: float = 0.0,
    ) -> MoEConnector:
        """Build an MoE whose experts are copies of aligned connectors (ChartMoE construction).

        Args:
            experts: connector modules or state dicts, in expert order, or a mapping
                name → connector (e.g. {"table": ..., "json": ..., "code": ...}). Accepted keys:
                ours or `LlavaMultiModalProjector`'s (`linear_1.*`, `linear_2.*`), LLaVA
                `nn.Sequential` ones (`0.*`, `2.*`), or a single linear (`weight`, `bias`),
                under any common prefix (`vision_proj.`, `model.mm_projector.`).
            top_k: experts per token (ChartMoE: 2 of 4).
            router_init: `zeros` or `normal` (see `reset_router`).
            add_original: the pre-alignment connector, added as expert 0 named "original"
                (ChartMoE's order: original, table, JSON, code).
            aux_loss_coef: load-balancing loss weight (ChartMoE's balance-loss variant: 0.1).

        Raises:
            ValueError: no experts, unrecognised keys, or experts of different type/shape.
        """
        named = list(experts.items()) if isinstance(experts, Mapping) else [
            (f"expert_{i}", e) for i, e in enumerate(experts)
        ]
        if add_original is not None:
            named.insert(0, ("original", add_original))
        if not named:
            raise ValueError("from_experts needs at least one connector")
        parsed = [(name, *_canonical_state_dict(name, src)) for name, src in named]
        _, kind, first = parsed[0]
        for name, other_kind, sd in parsed[1:]:
            mismatch = other_kind != kind or {k: v.shape for k, v in sd.items()} != {
                k: v.shape for k, v in first.items()
            }
            if mismatch:
                raise ValueError(
                    f"expert {name!r} is {other_kind} {_shapes(sd)} but expert {parsed[0][0]!r} "
                    f"is {kind} {_shapes(first)}; all experts must be the same connector type "
                    "with the same vision/text dims"
                )
        first_weight = first["linear.weight" if kind == "linear" else "linear_1.weight"]
        last_weight = first["linear.weight" if kind == "linear" else "linear_2.weight"]
        moe = cls(
            int(first_weight.shape[1]), int(last_weight.shape[0]), len(parsed), top_k=top_k,
            expert_type=kind, bias=any(k.endswith("bias") for k in first),
            aux_loss_coef=aux_loss_coef, router_init=router_init,
            expert_names=[name for name, _, _ in parsed],
        )  # fmt: skip
        with torch.no_grad():
            for expert, (name, _, sd) in zip(moe.experts, parsed, strict=True):
                try:  # load_state_dict copies, so the source connectors stay independent
                    expert.load_state_dict(sd, strict=True)
                except RuntimeError as e:
                    raise ValueError(f"expert {name!r} {_shapes(sd)} is not a {kind} "
                                     f"connector: {e}") from e
        return moe


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss `E · Σ_e f_e · P_e` (1.0 when perfectly balanced).

    Args:
        probs: router probabilities `[T, E]` (differentiable).
        top_idx: selected experts `[T, k]`.
    """
    num_experts = probs.shape[-1]
    # f_e: share of all T·k routing slots given to e (not differentiable, like Switch's).
    counts = F.one_hot(top_idx, num_experts).sum(dim=(0, 1)).to(probs.dtype)  # [E]
    f = counts / top_idx.numel()
    p = probs.mean(dim=0)  # [E]
    return num_experts * torch.sum(f * p)


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of `aux_loss` over every MoEConnector in `model` (found even inside peft wrappers)."""
    losses = [m.aux_loss for m in model.modules()
              if isinstance(m, MoEConnector) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def _shapes(sd: Mapping[str, torch.Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {list(v.shape)}" for k, v in sorted(sd.items())) + "}"


def _canonical_state_dict(
    name: str, source: nn.Module | Mapping[str, torch.Tensor]
) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, state dict under our key names) for a connector module or state dict."""
    sd = dict(source.state_dict() if isinstance(source, nn.Module) else source)
    # Group parameters by the layer that owns them: `vision_proj.0.weight` -> `vision_proj.0`.
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        layer, _, param = key.rpartition(".")
        layers.setdefault(layer, {})[param] = value
    if len(layers) == 1:  # a bare nn.Linear (`weight`) or our LinearConnector (`linear.weight`)
        (params,) = layers.values()
        return "linear", {f"linear.{param}": value for param, value in params.items()}
    # LLaVA's nn.Sequential numbers the Linears 0 and 2 (1 is the GELU, without weights).
    aliases = {"0": "linear_1", "2": "linear_2", "linear_1": "linear_1", "linear_2": "linear_2"}
    mapped = {aliases.get(layer.rpartition(".")[2]): params for layer, params in layers.items()}
    if len(layers) == 2 and set(mapped) == {"linear_1", "linear_2"}:
        return "mlp2x_gelu", {
            f"{layer}.{param}": value for layer, params in mapped.items()
            for param, value in params.items()
        }  # fmt: skip
    raise ValueError(
        f"expert {name!r}: cannot tell the connector type from keys {sorted(sd)}; expected "
        "linear_1.*/linear_2.* (mlp2x_gelu), 0.*/2.* (nn.Sequential) or weight/bias (linear)"
    )


def save_moe_connector(module: MoEConnector, directory: str | Path) -> Path:
    """Write `model.safetensors` + `connector_config.json` into `directory` (never pickle).

    Returns the directory.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"kind": "moe", "format_version": _FORMAT_VERSION, **module.config_dict()}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_moe_connector(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> MoEConnector:
    """Rebuild a connector written by `save_moe_connector` (strict: every weight must match).

    Raises:
        FileNotFoundError: the directory lacks the config or weights file.
        ValueError: the config is not an MoE connector config this version understands.
    """
    from safetensors.torch import load_file

    src = Path(directory)
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not (src / required).is_file():
            raise FileNotFoundError(f"{src / required} not found; is {src} a saved MoE connector?")
    config = json.loads((src / CONFIG_NAME).read_text())
    kind, version = config.pop("kind", None), config.pop("format_version", None)
    if kind != "moe" or version != _FORMAT_VERSION:
        raise ValueError(f"{src / CONFIG_NAME}: kind={kind!r}, format_version={version!r}; "
                         f"expected kind='moe', format_version={_FORMAT_VERSION}")
    module = MoEConnector(**config)
    module.load_state_dict(load_file(str(src / WEIGHTS_NAME)), strict=True)
    return module.to(device)
