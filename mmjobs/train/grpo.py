"""GRPO (Shao et al. 2024, DeepSeekMath): critic-free PPO with group-relative advantages.

For G responses sampled for one prompt with scores s_1..s_G, every token of response i gets the
advantage

    A_i = (s_i - mean(s)) / (std(s) + 1e-4)          (scale_rewards; else s_i - mean(s))

and the per-token loss, with ratio = pi / pi_old and the k3 estimator of KL(pi || pi_ref),

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * (exp(d) - d - 1),
    d = log pi_ref - log pi

summed over response tokens; the recipe divides by the response tokens of the whole optimizer
update over all micro-batches and ranks (TRL's default `loss_type="dapo"`, free of the length
bias of per-sequence means).

Why not TRL's GRPOTrainer: it runs the HF Trainer loop (no bit-exact resume from store-backed
checkpoints, see `mmjobs.train.trainer`), reads `datasets` rows of text and PIL images rather
than pretokenized shards (Chameleon's image tokens), and generates for text reward functions.
The formulas are TRL's (advantages as in `_generate_and_score_completions`, the loss as in
`_compute_loss`); the tests check `grpo_token_losses` against TRL's `_compute_loss` on the
same batch, and reuse TRL's `nanstd`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(scores: torch.Tensor, generations: int, *, scale: bool = True
                     ) -> torch.Tensor:
    """Advantages of `scores` [N] (N = prompts x generations, a prompt's responses adjacent)
    relative to their group: [N] float32."""
    from trl.trainer.utils import nanstd

    grouped = scores.float().view(-1, generations)
    mean = grouped.mean(dim=1).repeat_interleave(generations)
    advantages = scores.float() - mean
    if scale:
        std = nanstd(grouped, dim=1).repeat_interleave(generations)
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@dataclass(frozen=True)
class GRPOTokenLosses:
    """Per-token results of `grpo_token_losses`, each [n, R] (mask them)."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
                      advantages: torch.Tensor, *, beta: float, clip_range: float
                      ) -> GRPOTokenLosses:
    """The GRPO loss of each token (see the module docstring).

    Args:
        logps: [n, R] log-probs under the policy being trained (with grad).
        old_logps, ref_logps: [n, R] under the rollout policy and the reference.
        advantages: [n] per response (broadcast over its tokens).
        beta: KL weight; clip_range: eps.

    Returns:
        `GRPOTokenLosses`: the loss, its policy part, the k3 KL estimate (detached) and
        whether the clip was active (TRL's region clip ratio).
    """
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy = -torch.min(ratio * advantages, clipped_ratio * advantages)
    d = ref_logps - logps
    kl = torch.exp(d) - d - 1.0
    loss = policy + beta * kl if beta else policy
    region = ((ratio < 1 - clip_range) & (advantages < 0)) | \
        ((ratio > 1 + clip_range) & (advantages > 0))
    return GRPOTokenLosses(loss=loss, policy=policy.detach(), kl=kl.detach(),
                           clipped=region.float())
