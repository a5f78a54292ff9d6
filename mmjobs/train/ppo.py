"""PPO for language-model policies: KL-penalised token rewards, GAE, clipped losses, KL control.

The formulation of Ziegler et al. (2019) / InstructGPT, as in Align-Anything's and TRL's
(pre-1.0) PPO trainers. For a response y_1..y_T sampled from the policy for prompt x:

    r_t   = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t))        (+ score(x, y) at t = T)
    delta = r_t + gamma * V(t + 1) - V(t)                          (V(T + 1) = 0)
    A_t   = delta_t + gamma * lambda * A_{t + 1}                   (GAE; returns = A + V)

and per response token, with ratio = pi / pi_old and advantages whitened over the rollout:

    policy loss  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    value loss   0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)

Losses are summed over tokens here; the recipe divides by the response tokens of the whole
optimizer update (all micro-batches and ranks). KL control is fixed or adaptive
(`AdaptiveKLController`, Ziegler et al.'s proportional controller towards `target_kl`).

Why our own: TRL 1.16 no longer ships a PPO trainer (its GRPOTrainer is critic-free), and the
math is a few lines; the tests check GAE against a direct evaluation of its definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every response token, the score on the last.

    Args:
        scores: [N] sequence scores.
        logps, ref_logps: [N, R] token log-probs under the rollout policy and the reference.
        mask: [N, R] 1 on response tokens (a prefix of each row).
        kl_coef: the penalty weight.

    Returns:
        [N, R] float32 rewards, 0 after each response's end.
    """
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns.

    Args:
        rewards, values: [N, R] per-token rewards and value estimates.
        mask: [N, R] 1 on response tokens (a prefix of each row); the value after the last
            token is 0 (the episode ends there).

    Returns:
        (advantages [N, R], returns [N, R] = advantages + values), 0 after the end.
    """
    values = values * mask
    rewards = rewards * mask
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`values` shifted and scaled to mean 0, (unbiased) std 1 over the masked entries."""
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    var = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


@dataclass(frozen=True)
class PPOTokenLosses:
    """Per-token results of `ppo_losses`, each [n, R] (masked positions included; mask them)."""

    policy: torch.Tensor
    value: torch.Tensor | None
    clipped: torch.Tensor
    approx_kl: torch.Tensor


def ppo_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
               clip_range: float, values: torch.Tensor | None = None,
               old_values: torch.Tensor | None = None, returns: torch.Tensor | None = None,
               value_clip_range: float = 0.2) -> PPOTokenLosses:
    """The clipped PPO policy loss (and the clipped value loss when `values` are given).

    Args:
        logps: [n, R] log-probs under the policy being trained (with grad).
        old_logps: [n, R] the same under the rollout policy.
        advantages: [n, R].
        clip_range: eps of the ratio clip.
        values, old_values, returns: [n, R] current and rollout values, GAE returns.
        value_clip_range: eps_v of the value clip.

    Returns:
        `PPOTokenLosses`: policy and value losses, whether the ratio clip was active, and the
        estimate 0.5 * (log ratio)^2 of KL(pi_old || pi).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped)
    value = None
    if values is not None:
        assert old_values is not None and returns is not None
        moved = old_values + (values - old_values).clamp(-value_clip_range, value_clip_range)
        value = 0.5 * torch.maximum((values - returns) ** 2, (moved - returns) ** 2)
    return PPOTokenLosses(policy=policy, value=value,
                          clipped=(clipped > unclipped).float().detach(),
                          approx_kl=(0.5 * log_ratio.detach() ** 2))


class AdaptiveKLController:
    """Ziegler et al.'s KL controller: after each step,
    `coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * responses / horizon`; fixed without a target.

    Args:
        coef: the starting coefficient.
        target: KL per response to aim for (nats), or None for a fixed coefficient.
        horizon: responses over which the coefficient may change by up to 20%.
    """

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, responses: int) -> float:
        """Adjust after a step whose responses had mean KL `kl`; returns the new value."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * responses / self.horizon
        return self.value
