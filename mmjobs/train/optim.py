"""The AdamW optimizer a train config asks for: betas, epsilon, weight-decay exemptions and
per-group learning rates (`train.adam_betas`, `adam_eps`, `no_decay`, `param_groups`).

Groups: each trainable parameter goes to the first `param_groups` entry whose `match` is a
substring of its name (its own lr / weight decay), else to the default group (`train.lr`,
`train.weight_decay`); with `no_decay: bias_and_norm` every group splits again into a decayed
part and a part with weight decay 0 (names containing "bias", and the weights of LayerNorm /
RMSNorm modules), transformers' `Trainer.create_optimizer` rule (its ALL_LAYERNORM_LAYERS plus
any module whose class name ends in "RMSNorm"). Empty groups are left out. A group that
matches no trainable parameter is a config error, so a typo cannot silently train at the
default lr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmjobs.train.methods.common import TrainBase


def _norm_weights(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to normalisation layers."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            names.update(f"{module_name}.{p}" if module_name else p
                         for p, _ in module.named_parameters(recurse=False))
    return names


def param_groups(model: nn.Module, cfg: TrainBase) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for `model`'s trainable parameters (see the module
    docstring); each group also carries a `name` for logs.

    Raises:
        ValueError: a `param_groups` entry matches no trainable parameter (naming it and a few
            trainable names to match instead).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = _norm_weights(model) if cfg.no_decay == "bias_and_norm" else set()
    specs = [(g.match, g.lr or cfg.lr,
              cfg.weight_decay if g.weight_decay is None else g.weight_decay)
             for g in cfg.param_groups]
    buckets: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in named:
        index = next((i for i, (match, _, _) in enumerate(specs) if match in name), -1)
        no_decay = name in exempt or (cfg.no_decay == "bias_and_norm" and "bias" in name)
        buckets.setdefault((index, no_decay), []).append(param)
    unmatched = [match for i, (match, _, _) in enumerate(specs)
                 if not any(key[0] == i for key in buckets)]
    if unmatched:
        sample = ", ".join(n for n, _ in named[:5]) or "none"
        raise ValueError(f"train.param_groups: match {unmatched} names no trainable parameter "
                         f"(trainable: {sample}{', ...' if len(named) > 5 else ''}); fix the "
                         "match or drop the group")
    groups = []
    for (index, no_decay), params in sorted(buckets.items()):
        match, lr, decay = specs[index] if index >= 0 else ("default", cfg.lr, cfg.weight_decay)
        groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else decay,
                       "name": f"{match}{' (no decay)' if no_decay else ''}"})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainBase) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, grouped as `param_groups` says."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr,
                             betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def group_summary(optimizer: torch.optim.Optimizer) -> Sequence[str]:
    """One line per group: name, parameter count, lr and weight decay (for the run log)."""
    return [f"{g.get('name', i)}: {sum(p.numel() for p in g['params']):,} params, lr "
            f"{g['lr']:g}, weight_decay {g['weight_decay']:g}"
            for i, g in enumerate(optimizer.param_groups)]
