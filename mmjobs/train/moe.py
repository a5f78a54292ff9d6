"""ChartMoE's MoE-MLP connector construction, and the connector checkpoint format.

ChartMoE aligns three copies of a model's connector on chart→table, chart→JSON and chart→code
data, then builds a mixture-of-experts connector whose experts start from those connectors —
with the original (pre-alignment) connector as expert 0 — and whose router is trained in SFT.

**Connector checkpoint** (what `train` in align mode exports, and `build-moe-connector` reads):
a directory `connector/` holding
- `connector.safetensors`: the connector's state dict under mmjobs' key names
  (`linear.*` for linear; `linear_1.*`, `linear_2.*` for mlp2x_gelu — the same names as
  transformers' `LlavaMultiModalProjector`; `experts.<i>.*`, `router.weight` for moe);
- `connector_config.json`: `{"format": "mmjobs-connector", "format_version": 1, "kind":
  "linear"|"mlp2x_gelu"|"moe", "version": 1, "vision_dim": Dv, "text_dim": Dt, "bias": ...,
  (moe: num_experts, top_k, expert_type, aux_loss_coef, router_init, expert_names),
  "meta": {...}}`.
Write it with `save_connector(module, dir)`, read it with `load_connector(dir)`.

An expert source may also be a training output holding `connector/` or `final/connector/`, or a
full model directory (its projector is read straight from the safetensors).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmjobs import storage
from mmjobs.layout import CONNECTOR_DIR
from mmjobs.logs import get_logger
from mmjobs.models import connectors
from mmjobs.models.builder import fetch_dir
from mmjobs.models.compose import connector_from_spec, connector_spec
from mmjobs.models.connectors import MLP2xGeluConnector, MoEConnector

log = get_logger(__name__)

CONNECTOR_WEIGHTS = "connector.safetensors"
CONNECTOR_CONFIG = connectors.CONFIG_NAME  # "connector_config.json"
FORMAT = "mmjobs-connector"
FORMAT_VERSION = 1
# Where an expert URI may keep its connector, relative to the URI, in the order tried.
EXPERT_LAYOUTS = ("", CONNECTOR_DIR, f"final/{CONNECTOR_DIR}")


# --------------------------------------------------------------------------- checkpoint format


def as_mmjobs_connector(module: nn.Module) -> nn.Module:
    """`module` as one of mmjobs' connector classes (unwrapping peft, converting transformers'
    `LlavaMultiModalProjector` and XComposer2's `vision_proj` (`nn.Sequential` of Linear, GELU,
    Linear), with exact GELU, into an equivalent `MLP2xGeluConnector`).

    Raises:
        ValueError: a module that is not a linear / mlp2x_gelu / moe connector.
    """
    wrapped = getattr(module, "modules_to_save", None)  # peft's ModulesToSaveWrapper
    if isinstance(wrapped, nn.ModuleDict) and hasattr(module, "active_adapters"):
        module = wrapped[module.active_adapters[0]]
    if connector_spec(module) is not None:
        return module
    layers = mlp2x_layers(module)
    if layers is not None:
        first, last = layers
        plain = MLP2xGeluConnector(first.in_features, last.out_features,
                                   bias=first.bias is not None).to(first.weight.dtype)
        plain.load_state_dict({f"linear_1.{k}": v for k, v in first.state_dict().items()}
                              | {f"linear_2.{k}": v for k, v in last.state_dict().items()},
                              strict=True)
        return plain
    raise ValueError(f"{type(module).__name__} is not a connector mmjobs can save (linear, "
                     "mlp2x_gelu with exact GELU, or moe)")


def mlp2x_layers(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(first, last) Linear of a Linear-exact GELU-Linear connector in transformers' LLaVA
    layout (`linear_1`, `act`, `linear_2`) or as an `nn.Sequential` (XComposer2's
    `vision_proj`, LLaVA's original `mm_projector`); None for anything else."""
    if isinstance(module, nn.Sequential) and len(module) == 3:
        first, act, last = module
    else:
        first, act, last = (getattr(module, n, None) for n in ("linear_1", "act", "linear_2"))
    exact_gelu = (type(act).__name__ == "GELUActivation" and not getattr(act, "use_gelu_python",
                                                                          False)) or (
        isinstance(act, nn.GELU) and act.approximate == "none")
    if isinstance(first, nn.Linear) and isinstance(last, nn.Linear) and exact_gelu:
        return first, last
    return None


def save_connector(module: nn.Module, directory: str | os.PathLike,
                   meta: Mapping[str, Any] | None = None) -> Path:
    """Write `connector.safetensors` + `connector_config.json` into `directory`; returns it.

    `meta` (JSON-able: training data, step, ...) is stored in the config for provenance.
    """
    from safetensors.torch import save_file

    module = as_mmjobs_connector(module)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(out / CONNECTOR_WEIGHTS), metadata={"format": "pt"})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **connector_spec(module),
              "meta": dict(meta or {})}
    (out / CONNECTOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_connector(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a connector saved by `save_connector` (or `connectors.save_moe_connector`).

    Raises:
        FileNotFoundError: no `connector_config.json` / weights in `directory`.
        ValueError: an unknown format, or weights that do not fit the config.
    """
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / CONNECTOR_CONFIG).is_file():
        raise FileNotFoundError(f"{src / CONNECTOR_CONFIG} not found; is {src} a connector "
                                "directory (written by save_connector)?")
    config = json.loads((src / CONNECTOR_CONFIG).read_text())
    if config.get("format") != FORMAT:
        return connectors.load_moe_connector(src)  # the older MoE-only layout
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{src / CONNECTOR_CONFIG}: format_version "
                         f"{config.get('format_version')!r}; this mmjobs reads {FORMAT_VERSION}")
    spec = {k: v for k, v in config.items() if k not in {"format", "format_version", "meta"}}
    module = connector_from_spec(spec)
    try:
        module.load_state_dict(load_file(str(src / CONNECTOR_WEIGHTS)), strict=True)
    except (RuntimeError, FileNotFoundError) as e:
        raise ValueError(f"{src}: weights do not match {spec['kind']} connector config: {e}") from e
    return module


# --------------------------------------------------------------------------- expert sources


def locate_expert(uri: str) -> str:
    """The URI of the connector (or full model) directory an expert source points at.

    Tries `uri`, `uri/connector`, `uri/final/connector` for a connector checkpoint, then `uri`
    as a full model directory (config.json).

    Raises:
        storage.StoreNotFoundError: none of these exist.
    """
    for rel in EXPERT_LAYOUTS:
        candidate = storage.join(uri, rel) if rel else uri
        if storage.exists(storage.join(candidate, CONNECTOR_CONFIG)):
            return candidate
    if storage.exists(storage.join(uri, "config.json")):
        return uri
    raise storage.StoreNotFoundError(
        f"{uri}: no connector checkpoint ({CONNECTOR_CONFIG} in it, in {CONNECTOR_DIR}/ or in "
        f"final/{CONNECTOR_DIR}/) and no model (config.json); expected the output of an align "
        "run or a model directory")


def load_expert(uri: str) -> nn.Module:
    """The connector at `uri` (see `locate_expert`), as an mmjobs connector module."""
    located = locate_expert(uri)
    local = fetch_dir(located, kind="connectors")
    if (local / CONNECTOR_CONFIG).is_file():
        return load_connector(local)
    return projector_from_model_dir(local)


def projector_from_model_dir(model_dir: str | os.PathLike) -> nn.Module:
    """A LLaVA-style model's connector, read from its safetensors without loading the model.

    Raises:
        ValueError: no `multi_modal_projector.*` weights, or a native projector whose
            activation is not exact GELU.
    """
    from safetensors import safe_open

    from mmjobs.models.builder import check_weights_are_safetensors

    src = Path(model_dir)
    check_weights_are_safetensors(src)
    config = json.loads((src / "config.json").read_text())
    marker = "multi_modal_projector."
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if marker in key:
                    tensors[key.split(marker, 1)[1]] = f.get_tensor(key)
    if not tensors:
        raise ValueError(f"{src}: no {marker}* weights; is it a LLaVA-style model?")
    spec = config.get("mmjobs_connector")
    if spec:
        module = connector_from_spec(spec)
    elif config.get("projector_hidden_act", "gelu") == "gelu" and "linear_1.weight" in tensors:
        weight = tensors["linear_1.weight"]
        module = MLP2xGeluConnector(weight.shape[1], tensors["linear_2.weight"].shape[0],
                                    bias="linear_1.bias" in tensors)
    else:
        raise ValueError(f"{src}: projector with activation "
                         f"{config.get('projector_hidden_act')!r} is not an mlp2x_gelu connector")
    module.load_state_dict(tensors, strict=True)
    return module.to(next(iter(tensors.values())).dtype)


# --------------------------------------------------------------------------- construction


def moe_connector_from(experts: Mapping[str, nn.Module], *, original: nn.Module | None = None,
                        top_k: int = 2, router_init: str = "normal",
                        aux_loss_coef: float = 0.0) -> MoEConnector:
    """An MoE connector whose experts are copies of `experts` (and `original` as expert 0).

    Args:
        experts: name → aligned connector, in expert order (ChartMoE: table, json, code).
        original: the base model's connector, added first as "original" (ChartMoE's order).
        top_k, router_init, aux_loss_coef: see `MoEConnector`.

    Returns:
        `MoEConnector` mapping `[..., Dv]` → `[..., Dt]`, in float32.

    Raises:
        ValueError: experts of different kinds or shapes (the message names both), or bad
            top_k.
    """
    # No .float() here: it would convert the caller's modules in place. from_experts copies
    # the weights into a fresh float32 MoE.
    plain = {name: as_mmjobs_connector(m) for name, m in experts.items()}
    base = as_mmjobs_connector(original) if original is not None else None
    for name, module in {**plain, **({"original": base} if base is not None else {})}.items():
        if isinstance(module, MoEConnector):
            raise ValueError(f"expert {name!r} is already an MoE connector; experts must be "
                             "linear or mlp2x_gelu connectors (for a base that has an MoE "
                             "connector, leave out the original: include_original=false)")
    return MoEConnector.from_experts(plain, add_original=base, top_k=top_k,
                                     router_init=router_init, aux_loss_coef=aux_loss_coef)


@torch.no_grad()
def expert_reproduction_error(moe: MoEConnector, sources: list[nn.Module],
                              features: torch.Tensor) -> float:
    """Max |forced expert i(x) − sources[i](x)| over all experts, for features `[B, N, Dv]`.

    Both sides run in float32 (sources saved in bf16 are compared through a float32 copy, as
    the MoE holds them), so 0.0 means each expert is an exact copy of its source connector.
    """
    worst = 0.0
    previous = moe.forced_expert
    x = features.float()
    try:
        for index, source in enumerate(sources):
            moe.force_expert(index)
            ours = moe.float()(x)
            theirs = copy.deepcopy(as_mmjobs_connector(source)).float()(x)
            worst = max(worst, (ours - theirs).abs().max().item())
    finally:
        moe.force_expert(previous)
    return worst
