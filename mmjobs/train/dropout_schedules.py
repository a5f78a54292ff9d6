"""Per-layer adapter dropout schedules (the LaVIN study's "Inc./Dec. Drop. Prob").

LaVIN's study (HyejunShin/LaVIN `lavin/mm_adapter.py`) gives decoder layer i the adapter
dropout `p_i = p * factor**i`, held at `limit` once it would pass it (a ceiling when
factor > 1, a floor when factor < 1). Its runs:

| row                | kind                  | p   | factor | limit |
|--------------------|-----------------------|-----|--------|-------|
| Inc. Drop. Prob    | increasing_geometric  | 0.1 | 1.01   | 0.2   |
| Inc. Drop. Prob V2 | increasing_geometric  | 0.1 | 1.03   | 0.2   |
| Dec. Drop. Prob    | decreasing_geometric  | 0.2 | 0.99   | 0.1   |
| Dec. Drop. Prob V2 | decreasing_geometric  | 0.2 | 0.97   | 0.1   |

The linear kinds (`increasing`, `decreasing`) span the same range evenly over the depth.
Here the adapters are peft LoRA modules, whose input dropout plays the MMA adapter's role.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from mmjobs.logs import get_logger
from mmjobs.models.lavin.presets import LAVIN_DROPOUT_PRESETS

log = get_logger(__name__)

__all__ = ["LAVIN_DROPOUT_PRESETS", "apply_layer_dropout", "layer_dropout_values"]

DROPOUT_SCHEDULES = (
    "constant", "increasing", "decreasing", "increasing_geometric", "decreasing_geometric",
)  # fmt: skip


# `...layers.<i>.` in module names: `base_model.model.model.layers.3.self_attn.q_proj...`
# (Llama) or `...model.language_model.layers.3...` (Llava).
DEFAULT_LAYER_PATTERN = r"(?:^|\.)layers\.(\d+)\."
# Vision encoders also have `layers.<i>`; their adapters are not the decoder's depth schedule.
DEFAULT_EXCLUDE = ("vision_tower", "vision_model", "visual")


def _check_p(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name}: got {value}; a dropout probability must be in [0, 1)")


def layer_dropout_values(
    kind: str,
    num_layers: int,
    *,
    p: float | None = None,
    p_min: float | None = None,
    p_max: float | None = None,
    factor: float | None = None,
    limit: float | None = None,
) -> list[float]:
    """Dropout probability for each of `num_layers` decoder layers (index 0 = nearest the input).

    Args:
        kind: `constant` (p), `increasing` (linear p_min at layer 0 → p_max at the last),
            `decreasing` (linear p_max → p_min), `increasing_geometric` /
            `decreasing_geometric` (LaVIN: p * factor**i, capped / floored at limit).
        num_layers: number of decoder layers.

    Raises:
        ValueError: unknown kind, missing or out-of-range arguments (naming the fix).
    """
    if num_layers <= 0:
        raise ValueError(f"num_layers: got {num_layers}; must be > 0")
    if kind == "constant":
        if p is None:
            raise ValueError("dropout schedule 'constant' needs p")
        _check_p("p", p)
        return [float(p)] * num_layers
    if kind in ("increasing", "decreasing"):
        if p_min is None or p_max is None:
            raise ValueError(f"dropout schedule {kind!r} needs p_min and p_max")
        _check_p("p_min", p_min)
        _check_p("p_max", p_max)
        if p_min > p_max:
            raise ValueError(f"p_min ({p_min}) must be <= p_max ({p_max})")
        span = max(1, num_layers - 1)  # one layer: just p_min (inc) or p_max (dec)
        values = [p_min + (p_max - p_min) * i / span for i in range(num_layers)]
        return values if kind == "increasing" else values[::-1]
    if kind in ("increasing_geometric", "decreasing_geometric"):
        if p is None or factor is None or limit is None:
            raise ValueError(f"dropout schedule {kind!r} needs p, factor and limit")
        _check_p("p", p)
        _check_p("limit", limit)
        increasing = kind == "increasing_geometric"
        if increasing and not (factor >= 1 and limit >= p):
            raise ValueError(f"{kind}: needs factor >= 1 and limit >= p (a ceiling); "
                             f"got factor={factor}, p={p}, limit={limit}")
        if not increasing and not (0 < factor <= 1 and limit <= p):
            raise ValueError(f"{kind}: needs 0 < factor <= 1 and limit <= p (a floor); "
                             f"got factor={factor}, p={p}, limit={limit}")
        clamp = min if increasing else max
        return [clamp(p * factor**i, limit) for i in range(num_layers)]
    raise ValueError(f"dropout schedule: got {kind!r}; use one of {', '.join(DROPOUT_SCHEDULES)}")


def _num_decoder_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n, int):
            return n
    return None


def apply_layer_dropout(
    model: nn.Module,
    values: Sequence[float],
    *,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[int, float]:
    """Set the LoRA input dropout of every decoder layer i to `values[i]`.

    Finds peft's `lora_dropout` ModuleDict entries (e.g.
    `base_model.model.model.layers.3.self_attn.q_proj.lora_dropout.default`) and takes the
    layer index from the name. peft stores `nn.Identity` when an adapter was created with
    lora_dropout=0; such entries are replaced by `nn.Dropout(p)` (the forward calls whatever
    module is there), so the schedule works whatever dropout the adapter started with.

    Args:
        model: a peft model (or any module containing peft LoRA layers).
        values: one probability per decoder layer, e.g. from `layer_dropout_values`.
        layer_pattern: regex whose group 1 is the layer index in a module name.
        exclude: substrings of module names to skip (vision encoder layers by default).

    Returns:
        {layer index: p set} for each layer that has adapter dropout modules.

    Raises:
        ValueError: no adapter dropout modules, or `values` does not have one entry per layer.
    """
    for i, value in enumerate(values):
        _check_p(f"values[{i}]", value)
    pattern = re.compile(layer_pattern)
    # (layer index, owning ModuleDict, adapter name): collected first so errors leave the
    # model untouched.
    targets: list[tuple[int, nn.ModuleDict, str]] = []
    for name, module in model.named_modules():
        if not name.endswith("lora_dropout") or not isinstance(module, nn.ModuleDict):
            continue
        match = pattern.search(name)
        if match is None or any(word in name for word in exclude):
            log.debug("adapter dropout %s is outside the decoder layers; left as is", name)
            continue
        targets.extend((int(match.group(1)), module, key) for key in module)
    if not targets:
        raise ValueError(
            "model has no LoRA dropout modules in decoder layers (no '...layers.<i>...."
            "lora_dropout'); wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    found = sorted({layer for layer, _, _ in targets})
    num_layers = _num_decoder_layers(model) or found[-1] + 1
    if len(values) != num_layers or found[-1] >= len(values):
        raise ValueError(
            f"got {len(values)} dropout values but the model has {num_layers} decoder layers "
            f"(adapters on layers {found[0]}..{found[-1]}); pass one value per layer"
        )
    applied: dict[int, float] = {}
    for layer, holder, key in targets:
        p = float(values[layer])
        if isinstance(holder[key], nn.Dropout):
            holder[key].p = p
        else:
            replacement = nn.Dropout(p)
            replacement.train(holder.training)  # a new module would default to train mode
            holder[key] = replacement
        applied[layer] = p
    return dict(sorted(applied.items()))
