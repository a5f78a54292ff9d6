"""Direct preference optimisation (DPO): the loss, sequence log-probs, and the train objective.

For a prompt x with a chosen response y_c and a rejected one y_r, DPO (Rafailov et al. 2023)
trains the policy pi against a frozen reference pi_ref on the log-ratio margin

    delta = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]

with log pi(y|x) summed over the response tokens only. Losses (`preference.loss`):

    sigmoid   -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)
              (eps = label_smoothing; eps > 0 is conservative DPO, Mitchell 2023)
    ipo       (delta_per_token - 1 / (2 * beta))^2, where each side's log-ratio is divided by
              its response length first (IPO, Azar et al. 2023, in the length-normalised form
              TRL uses and the IPO authors confirmed)

The implicit rewards beta * (log pi - log pi_ref) of each side give the logged metrics.

Why not TRL's `DPOTrainer`: its loop is the HF Trainer's, which cannot resume bit-exactly from
store-backed checkpoints (see `mmjobs.train.trainer`). The loss is small enough to own; the
tests check it against TRL's `DPOTrainer._compute_loss` (sigmoid, IPO) and the conservative
form against TRL's `CPOTrainer.cpo_loss` on the same log-probs.

The reference model is either implicit — the same network with its LoRA adapters disabled
(`peft`'s `disable_adapter()`), so there is no second copy in memory — or a frozen copy of
the base model (needed for full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmjobs.train.batches import IGNORE_INDEX
from mmjobs.train.methods import DpoPreference

InputsFn = Callable[[Mapping[str, Any]], dict[str, Any]]
DPO_STATS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
             "logps_chosen", "logps_rejected", "logps_delta_chosen", "logps_delta_rejected",
             "response_len_chosen", "response_len_rejected")


@dataclass(frozen=True)
class DPOLossOutput:
    """Per-pair results of `dpo_loss`, each [B]; rewards are detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> DPOLossOutput:
    """The DPO loss of each pair (see the module docstring for the formulas).

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed response log-probs under the
            policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model.
        beta: the DPO beta (IPO: tau).
        loss: "sigmoid" or "ipo".
        label_smoothing: eps of conservative DPO (sigmoid only), in [0, 0.5).
        chosen_tokens, rejected_tokens: [B] response token counts (required for ipo).

    Returns:
        `DPOLossOutput(losses [B], chosen_rewards [B], rejected_rewards [B])`.

    Raises:
        ValueError: unknown loss, or ipo without token counts.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss == "sigmoid":
        delta = chosen_logratios - rejected_logratios
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_loss: loss='ipo' needs chosen_tokens and rejected_tokens")
        # Per-token log-ratios: summed ones grow with the response length, which would make
        # the squared loss (and a good beta) depend on it.
        delta = (chosen_logratios / chosen_tokens.clamp(min=1)
                 - rejected_logratios / rejected_tokens.clamp(min=1))
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: unknown loss {loss!r}; use sigmoid or ipo")
    return DPOLossOutput(losses, beta * chosen_logratios.detach(),
                         beta * rejected_logratios.detach())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row, and how many there are.

    Args:
        logits: [N, T, V] model outputs.
        labels: [N, T] token ids, -100 outside the response (prompt, images, padding).

    Returns:
        (logps [N] float32, tokens [N] int64): position t's logits score token t + 1.

    One row at a time: a float32 log-softmax over [N, T, V] at once would hold N x T x V
    floats (GBs for 65k-token vocabularies); a row's logsumexp holds T x V. That is the peak
    of the no-grad reference pass; with gradients autograd still keeps each row's float32
    copy for the backward pass.
    """
    labels = labels.to(logits.device)
    shift_labels = labels[:, 1:]  # [N, T-1]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~mask, 0).unsqueeze(-1)  # gather needs valid ids
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i, :-1, :].float()  # [T-1, V]
        token = row.gather(-1, safe[i]).squeeze(-1) - torch.logsumexp(row, dim=-1)  # [T-1]
        rows.append((token * mask[i]).sum())
    return torch.stack(rows), mask.sum(dim=1)


class DPOObjective:
    """The DPO objective for `TrainRecipe`: one forward pass over the 2B rows of a
    `PreferenceCollator` batch (chosen rows first), one no-grad reference pass.

    Args:
        cfg: `train.preference`.
        inputs: turns a loader batch into model kwargs on the right device.
        peft_model: the unwrapped peft model, for `reference: implicit_lora`.
        reference_model: the frozen copy, for `reference: frozen_copy`.
    """

    name = "dpo"
    stat_names = DPO_STATS

    def __init__(self, cfg: DpoPreference, inputs: InputsFn, *, peft_model: Any = None,
                 reference_model: nn.Module | None = None) -> None:
        if cfg.reference == "implicit_lora" and not hasattr(peft_model, "disable_adapter"):
            raise ValueError("train.preference.reference: implicit_lora needs a LoRA model "
                             "(finetune: lora); use frozen_copy")
        if cfg.reference == "frozen_copy" and reference_model is None:
            raise ValueError("train.preference.reference: frozen_copy needs the reference model")
        if reference_model is not None:  # frozen and without dropout, whatever the policy does
            reference_model.eval().requires_grad_(False)
        self.cfg, self.inputs = cfg, inputs
        self.peft_model, self.reference_model = peft_model, reference_model

    def count(self, batch: Mapping[str, Any]) -> int:
        """Pairs in `batch`: the loss is a mean over pairs."""
        return len(batch["ids"])

    def reference_logits(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """[2B, T, V] reference logits (call under no_grad)."""
        if self.cfg.reference == "frozen_copy":
            assert self.reference_model is not None
            return self.reference_model(**inputs).logits
        # Through the (possibly DDP-wrapped) training model, with the adapters (and peft's
        # modules_to_save copies) switched off: exactly the base weights.
        with self.peft_model.disable_adapter():
            return model(**inputs).logits

    def loss(self, model: nn.Module, batch: Mapping[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the pairs' DPO losses, sums of `DPO_STATS` over the pairs)."""
        inputs = self.inputs(batch)
        labels = batch["labels"]
        pairs = self.count(batch)
        # The reference pass goes first: MoE connectors keep their aux loss from the last
        # forward, which must be the policy's.
        with torch.no_grad():
            ref_logps, _ = sequence_logps(self.reference_logits(model, inputs), labels)
        logps, tokens = sequence_logps(model(**inputs).logits, labels)
        cfg = self.cfg
        out = dpo_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:],
                       beta=cfg.beta, loss=cfg.loss, label_smoothing=cfg.label_smoothing,
                       chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:])
        policy, ref = logps.detach(), ref_logps
        stats = {
            "rewards_chosen": out.chosen_rewards.sum(),
            "rewards_rejected": out.rejected_rewards.sum(),
            "rewards_margin": (out.chosen_rewards - out.rejected_rewards).sum(),
            "rewards_accuracy": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "logps_chosen": policy[:pairs].sum(), "logps_rejected": policy[pairs:].sum(),
            "logps_delta_chosen": (policy[:pairs] - ref[:pairs]).sum(),
            "logps_delta_rejected": (policy[pairs:] - ref[pairs:]).sum(),
            "response_len_chosen": tokens[:pairs].sum().float(),
            "response_len_rejected": tokens[pairs:].sum().float(),
        }
        return out.losses.sum(), stats

