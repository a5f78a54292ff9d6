"""What `TrainRecipe` minimises, per train.mode.

An objective turns one loader batch into `(summed loss, summed stats)`; the trainer divides by
the step's total `count` over micro-batches and ranks, so every unit weighs the same however
the data falls into micro-batches and ranks:

| mode       | objective                    | count            | batches              |
|------------|------------------------------|------------------|----------------------|
| align, sft | `LanguageModelingObjective`  | labelled tokens  | padded or packed     |
| dpo        | `preference.DPOObjective`    | pairs            | `PreferenceCollator` |
| rm         | `reward_model.RewardObjective` | pairs          | `PreferenceCollator` |

Stats (`stat_names`, e.g. DPO's rewards and margins) are sums over the count's units; the
trainer logs their means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from mmjobs.train.batches import label_tokens, loss_sum

InputsFn = Callable[[Mapping[str, Any]], dict[str, Any]]


class Objective(Protocol):
    """The interface `TrainRecipe` trains against."""

    name: str
    stat_names: tuple[str, ...]

    def count(self, batch: Mapping[str, Any]) -> int:
        """Units of `batch` the loss is averaged over (known before the forward pass)."""

    def loss(self, model: nn.Module, batch: Mapping[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss as a scalar tensor with grad, `{stat: summed value}`)."""


class LanguageModelingObjective:
    """Next-token cross-entropy on the labelled (assistant) tokens: align and sft."""

    name = "lm"
    stat_names: tuple[str, ...] = ()

    def __init__(self, inputs: InputsFn) -> None:
        self.inputs = inputs

    def count(self, batch: Mapping[str, Any]) -> int:
        return label_tokens(batch)

    def loss(self, model: nn.Module, batch: Mapping[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        summed, _ = loss_sum(model(**self.inputs(batch)).logits, batch["labels"])
        return summed, {}


def evaluate_objective(objective: Objective, model: nn.Module, loader: Any, accelerator: Any
                       ) -> tuple[float, float, dict[str, float]]:
    """The objective over a whole eval loader, summed over all ranks, without gradients and
    without drawing from the training RNG streams; `model` is back in train mode after.

    Returns:
        (mean loss per unit, units counted, mean of each of the objective's stats).
    """
    from mmjobs.train.distributed import all_reduce_sum

    names = objective.stat_names
    model.eval()
    total, count, stats = 0.0, 0, dict.fromkeys(names, 0.0)
    loader.set_epoch(0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for batch in loader:
            summed, batch_stats = objective.loss(model, batch)
            total, count = total + float(summed), count + objective.count(batch)
            for key, value in batch_stats.items():
                stats[key] += float(value)
    model.train()
    total, count, *sums = all_reduce_sum(accelerator, [total, count, *(stats[k] for k in names)])
    return (total / max(count, 1.0), count,
            {k: v / max(count, 1.0) for k, v in zip(names, sums, strict=True)})
