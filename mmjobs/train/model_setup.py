"""What trains: freezing per mode, LoRA wrapping, gradient checkpointing; and the final export.

| mode          | vision tower             | connector                  | language model           |
|---------------|--------------------------|----------------------------|--------------------------|
| align         | frozen                   | trains (full)              | frozen                   |
| sft, full     | freeze_vision_tower      | trains unless frozen       | trains unless frozen     |
| sft, lora     | adapters if not frozen   | full (modules_to_save)     | adapters unless frozen   |
|               |                          | unless frozen              |                          |

dpo, rm, ppo and grpo freeze and wrap like sft (full or LoRA); rm adds a value head around the
result (`mmjobs.train.reward_model.RewardModel`), ppo a per-token value head, the critic
(`mmjobs.train.rl_objective.PolicyWithValueHead`).

Components are told apart by parameter names (`mmjobs.models.compose.component_of`). LoRA
targets are resolved here to full module names inside the unfrozen components, so a
`q_proj` target does not also put adapters on the CLIP tower's `q_proj`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmjobs.logs import get_logger
from mmjobs.models.builder import (
    connector_module,
    export_model_dir,
    freeze,
    trainable_parameter_summary,
)
from mmjobs.models.compose import (
    COMPONENTS,
    component_of,
    connector_from_spec,
    connector_spec,
)
from mmjobs.train.dropout_schedules import (
    LAVIN_DROPOUT_PRESETS,
    apply_layer_dropout,
    layer_dropout_values,
)
from mmjobs.train.methods import TrainConfig
from mmjobs.train.moe import CONNECTOR_DIR, mlp2x_layers, save_connector

log = get_logger(__name__)

_LORA_LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)


def frozen_components(cfg: TrainConfig) -> dict[str, bool]:
    """`{vision_tower, connector, language_model}` → frozen? for this config."""
    if cfg.mode == "align":  # align has no freeze settings: the connector trains alone
        return {"vision_tower": True, "connector": False, "language_model": True}
    return {"vision_tower": cfg.freeze_vision_tower, "connector": bool(cfg.freeze_connector),
            "language_model": bool(cfg.freeze_language_model)}


def prepare_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freeze, wrap with LoRA when asked, enable gradient checkpointing.

    Returns the model to train (a `peft.PeftModel` for LoRA).

    Raises:
        ValueError: no LoRA target matched, or nothing is left to train.
    """
    frozen = frozen_components(cfg)
    if cfg.mode != "align" and cfg.finetune == "mma":
        _set_up_mma(model, cfg)
    elif cfg.mode != "align" and cfg.finetune == "lora":
        model = _wrap_lora(model, cfg, frozen)
    else:
        freeze(model, **frozen)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs (no enable_input_require_grads
        # hack) and with DeepSpeed ZeRO-3.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters after freezing; check train.freeze_* and "
                         "train.lora.target_modules")
    log.info("trainable parameters: %s", ", ".join(
        f"{k} {v['trainable']:,}/{v['total']:,}" for k, v in parameter_counts(model).items()))
    return model


def upcast_trainable(model: nn.Module) -> int:
    """Keep trainable parameters in float32 (returns how many were cast).

    `dtype: auto` loads bf16 weights on GPUs. AdamW updating bf16 weights in place rounds small
    updates away (8 mantissa bits), so trainable weights become float32 master weights and
    bf16 autocast does the compute. Not for DeepSpeed, which keeps its own fp32 master copy.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            cast += 1
    return cast


def trained_part(cfg: TrainConfig) -> str:
    """What the trained weights are: `connector` (align), else `lora`, `mma` or `full`."""
    return "connector" if cfg.mode == "align" else cfg.finetune


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """`builder.trainable_parameter_summary`, but with ZeRO-3's real sizes: partitioned
    parameters are empty placeholders whose size is kept in `ds_numel`."""
    if not any(hasattr(p, "ds_numel") for p in model.parameters()):
        return trainable_parameter_summary(model)
    summary = {name: {"trainable": 0, "total": 0} for name in (*COMPONENTS, "all")}
    for name, param in model.named_parameters():
        # Parameters made after loading (LoRA adapters, value heads) are not partitioned yet.
        n = int(getattr(param, "ds_numel", param.numel()))
        for key in (component_of(name), "all"):
            summary[key]["total"] += n
            summary[key]["trainable"] += n if param.requires_grad else 0
    return summary


def _wrap_lora(model: nn.Module, cfg: TrainConfig, frozen: dict[str, bool]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    freeze(model, vision_tower=True, connector=True, language_model=True)
    targets = lora_targets(model, cfg.lora.target_modules, frozen)
    if not targets:
        raise ValueError(f"train.lora.target_modules {cfg.lora.target_modules} match no layer "
                         "in the unfrozen components; use names like q_proj, v_proj")
    to_save = list(cfg.lora.modules_to_save)
    if not frozen["connector"]:
        conn = connector_module(model)
        name = next(n for n, m in model.named_modules() if m is conn)
        if not any(name == s or name.endswith("." + s) for s in to_save):
            to_save.append(name)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, modules_to_save=to_save or None)
    model = get_peft_model(model, lora)
    log.info("LoRA r=%d alpha=%d on %d modules; trained in full: %s", cfg.lora.r,
             cfg.lora.alpha, len(targets), to_save or "none")
    if cfg.layer_dropout is not None:
        values = _dropout_values(model, cfg)
        applied = apply_layer_dropout(model, values)
        log.info("per-layer adapter dropout: %s",
                 ", ".join(f"{k}:{v:.3f}" for k, v in applied.items()))
    return model


def _set_up_mma(model: nn.Module, cfg: TrainConfig) -> None:
    """LaVIN: only its adapters train; the dropout preset sets the depth-wise walk."""
    if not hasattr(model, "train_adapters_only"):
        raise ValueError(f"train.finetune: mma trains LaVIN's mixture-of-modality adapters, "
                         f"but the model is a {type(model).__name__}; use a LaVIN model "
                         "(mmjobs.models.lavin.compose.build_lavin) or finetune: lora")
    trainable = model.train_adapters_only()
    preset = cfg.layer_dropout.preset if cfg.layer_dropout is not None else None
    dropouts = model.apply_dropout_preset(preset)
    log.info("LaVIN adapters: %d trainable parameters; dropout per LLaMA block %s",
             trainable, ", ".join(f"{p:.4f}" for p in dropouts["text"]))


def lora_targets(model: nn.Module, suffixes: list[str], frozen: dict[str, bool]) -> list[str]:
    """Full names of the modules matching `suffixes` (peft's rule: the name equals the suffix
    or ends with `.suffix`) inside components that are not frozen."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, _LORA_LAYER_TYPES) or frozen[component_of(name)]:
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            out.append(name)
    return out


def _dropout_values(model: nn.Module, cfg: TrainConfig) -> list[float]:
    spec = cfg.layer_dropout
    assert spec is not None
    text = model.config.get_text_config()
    n = int(text.num_hidden_layers)
    if spec.preset is not None:
        kind, params = LAVIN_DROPOUT_PRESETS[spec.preset]
        return layer_dropout_values(kind, n, **params)
    params = {k: getattr(spec, k) for k in ("p", "p_min", "p_max", "factor", "limit")
              if getattr(spec, k) is not None}
    return layer_dropout_values(spec.kind, n, **params)


# --------------------------------------------------------------------------- export


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, copied to CPU (what a checkpoint must restore)."""
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable parameters into `model` (names must match exactly)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's trainable parameters: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]} (was it written with "
                         "another train.mode / finetune / freeze setting?)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


def _native_projector_spec(module: nn.Module) -> dict[str, Any]:
    """transformers' LLaVA projector and XComposer2's `vision_proj` are mlp2x_gelu connectors
    under other key names: describe them as one."""
    layers = mlp2x_layers(module)
    if layers is None:
        raise ValueError(f"cannot describe connector {type(module).__name__} (expected "
                         "linear_1/linear_2, Linear-GELU-Linear or an mmjobs connector)")
    first, last = layers
    return {"kind": "mlp2x_gelu", "version": 1, "vision_dim": first.in_features,
            "text_dim": last.out_features, "bias": first.bias is not None}


def export_final(model: nn.Module, full_state: dict[str, torch.Tensor] | None, cfg: TrainConfig,
                 out: Path, *, processor: Any, source_dir: Path | None,
                 meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the trained result into `out` (rank 0 only).

    Args:
        model: the unwrapped trained model (peft model for LoRA).
        full_state: the gathered full state dict under ZeRO-3 (parameters are shards there),
            else None to read the model's own tensors.
        processor: saved next to a full model so it loads on its own.
        source_dir: the base model directory (processor and custom code files are copied).
        meta: provenance stored in a connector's config (align mode).

    Returns:
        `{"adapter"|"model"|"connector": relative dir}` of what was written.
    """
    if cfg.mode == "align":
        conn = connector_module(model)
        if full_state is not None:  # ZeRO-3: the module holds shards; rebuild it whole
            prefix = next(n for n, m in model.named_modules() if m is conn) + "."
            whole = connector_from_spec(connector_spec(conn) or _native_projector_spec(conn))
            state = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
            if isinstance(conn, nn.Sequential):  # XComposer2's vision_proj.{0,2}
                names = {"0": "linear_1", "2": "linear_2"}
                state = {f"{names[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v
                         for k, v in state.items()}
            whole.load_state_dict(state)
            conn = whole
        save_connector(conn, out / CONNECTOR_DIR, meta=meta)
        return {"connector": CONNECTOR_DIR}
    if cfg.finetune == "mma":  # LaVIN: only the adapter tensors (~3.8M for 7B)
        from mmjobs.models.lavin.compose import adapter_state, save_adapters

        state = full_state if full_state is not None else adapter_state(model)
        dropouts = model.adapter_dropouts() if hasattr(model, "adapter_dropouts") else None
        save_adapters(model, out / "adapter", state=state, meta={"adapter_dropout": dropouts})
        return {"adapter": "adapter"}
    if cfg.finetune == "lora":
        # peft writes the adapters and the modules_to_save (e.g. the connector).
        model.save_pretrained(out / "adapter", state_dict=full_state)
        return {"adapter": "adapter"}
    if full_state is None:
        export_model_dir(model, out / "model", source_dir)
    else:
        model.save_pretrained(out / "model", state_dict=full_state)
        if processor is not None:
            processor.save_pretrained(out / "model")
    return {"model": "model"}
