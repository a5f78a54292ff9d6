"""The model and the loss of ppo and grpo updates: a policy with a value head, and the
objective that samples rollouts and turns them into clipped policy (and value) losses.

`PolicyWithValueHead` is the trained VLM with ppo's critic: a value head (`Linear(hidden, 1)`,
zero-initialised) on its final hidden states (one backbone, one forward pass for log-probs and
values), or a separate critic model initialised from the reward model. `RolloutObjective`
samples responses (`mmjobs.train.rollouts`), scores them with the reward, computes the rollout
and reference log-probs, and gives each optimizer update's loss (`mmjobs.train.ppo`,
`mmjobs.train.grpo`). The recipe around them is `mmjobs.train.rl`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmjobs.logs import get_logger
from mmjobs.train.grpo import group_advantages, grpo_token_losses
from mmjobs.train.methods import GrpoConfig, PpoConfig
from mmjobs.train.ppo import gae, kl_penalized_rewards, ppo_losses, whiten
from mmjobs.train.rollouts import (
    ResponseSampler,
    Rollout,
    final_scores,
    response_logps,
)

log = get_logger(__name__)


def _base_model(vlm: nn.Module) -> nn.Module:
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


class PolicyWithValueHead(nn.Module):
    """The actor (a VLM, plain or peft-wrapped) and, for ppo, its critic.

    `forward(positions=P, **inputs)` computes logits only at the positions `P` [n, R]
    (`logits_to_keep`) and, with a critic, the values there. The critic is either a value
    head on the actor's final hidden states (captured by a hook on the LM head, so it costs
    no second pass), or a separate model (`critic`: a `RewardModel` initialised from the
    reward model, Align-Anything's layout) that runs its own pass over the same inputs. The
    critic's parameters are named `critic.*`: the recipe gives them their own optimizer group.

    Args:
        vlm: e.g. `LlavaForConditionalGeneration`, or the `PeftModel` around it.
        value_head: add the critic's `Linear(hidden, 1)` (zero-initialised: values start at 0).
        critic: a separate critic model with `token_values(positions, **inputs)`; excludes
            `value_head`.
    """

    def __init__(self, vlm: nn.Module, *, value_head: bool,
                 critic: nn.Module | None = None) -> None:
        super().__init__()
        if value_head and critic is not None:
            raise ValueError("a policy has a value head or a separate critic, not both")
        self.vlm = vlm
        base = _base_model(vlm)
        self.hidden_size = int(base.config.get_text_config().hidden_size)
        self.value_head: nn.Linear | None = None
        self.critic = critic
        self._hidden: torch.Tensor | None = None
        if value_head:
            self.value_head = nn.Linear(self.hidden_size, 1)  # float32: values are small numbers
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            base.get_output_embeddings().register_forward_pre_hook(self._keep_hidden)

    def _keep_hidden(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._hidden = args[0]

    def forward(self, positions: torch.Tensor | None = None, with_values: bool = True,
                **inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [n, R, V] at `positions` (all positions if None), values [n, R] or None)."""
        out = self.vlm(**inputs, logits_to_keep=positions if positions is not None else 0)
        hidden, self._hidden = self._hidden, None
        values = None
        if with_values and self.critic is not None:
            if positions is None:  # every position of every row
                n, t = inputs["input_ids"].shape
                positions = torch.arange(t, device=inputs["input_ids"].device).expand(n, t)
            values = self.critic.token_values(positions, **inputs)
        elif with_values and self.value_head is not None:
            assert hidden is not None, "the LM head hook did not run"
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values


class RolloutObjective:
    """Rollouts and update losses of one ppo/grpo run (built by `RLRecipe`)."""

    name = "rl"
    stat_names: tuple[str, ...] = ()

    def __init__(self, *, cfg: PpoConfig | GrpoConfig, sampler: ResponseSampler, reward: Any,
                 inputs: Any, accelerator: Any, generations: int, float_dtype: torch.dtype,
                 reference_model: nn.Module | None, peft_model: Any) -> None:
        self.cfg, self.rl, self.mode = cfg, cfg.rl, cfg.mode
        self.sampler, self.reward, self.inputs = sampler, reward, inputs
        self.accelerator, self.generations, self.float_dtype = accelerator, generations, float_dtype
        self.reference_model, self.peft_model = reference_model, peft_model
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _forward(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor, *,
                 with_values: bool = True) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        piece = rollout.rows(rows)
        inputs = self.inputs(piece.batch)
        logits, values = model(positions=piece.positions.to(self.device),
                               with_values=with_values, **inputs)
        return piece, logits, values

    def _logps(self, logits: torch.Tensor, response_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return response_logps(logits, response_ids, temperature=self.rl.temperature,
                              suppress_token_ids=self.sampler.suppress_token_ids)

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor
                        ) -> torch.Tensor:
        """[n, R] reference log-probs of the responses in `rows`."""
        if self.reference_model is not None:
            piece = rollout.rows(rows)
            logits = self.reference_model(
                **self.inputs(piece.batch),
                logits_to_keep=piece.positions.to(self.device)).logits
        else:  # the same network, adapters (and peft's modules_to_save copies) off
            with self.peft_model.disable_adapter():
                piece, logits, _ = self._forward(model, rollout, rows, with_values=False)
        return self._logps(logits, piece.response_ids)[0].cpu()

    @torch.no_grad()
    def rollout(self, model: nn.Module, prompts: Mapping[str, Any], kl_coef: float
                ) -> tuple[Rollout, dict[str, float]]:
        """Sample, score and evaluate one step's responses (the model in eval mode).

        Returns:
            (the rollout with `scores`, `old_logps`, `ref_logps`, `advantages` (+ ppo's
            `values`, `returns`) in `tensors`; this rank's sums of the rollout statistics).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        ro = self.sampler.sample(unwrapped.vlm, prompts, self.generations, device=self.device,
                                 float_dtype=self.float_dtype)
        unwrapped._hidden = None  # the hook's last capture during generation
        scores = final_scores(self.reward(ro), ro.finished, self.rl.reward)
        n, width = ro.mask.shape
        old, ref = torch.zeros(n, width), torch.zeros(n, width)
        values = torch.zeros(n, width) if self.mode == "ppo" else None
        for start in range(0, n, self.cfg.per_device_batch_size):
            rows = torch.arange(start, min(start + self.cfg.per_device_batch_size, n))
            piece, logits, v = self._forward(model, ro, rows)
            old[rows] = self._logps(logits, piece.response_ids)[0].cpu()
            if values is not None and v is not None:
                values[rows] = v.float().cpu()
            ref[rows] = self.reference_logps(model, ro, rows)
        mask = ro.mask
        old, ref = old * mask, ref * mask
        if self.mode == "ppo":
            assert values is not None
            rewards = kl_penalized_rewards(scores, old, ref, mask, kl_coef)
            advantages, returns = gae(rewards, values, mask, gamma=self.rl.gamma, lam=self.rl.lam)
            if self.rl.whiten_advantages:
                advantages = whiten(advantages, mask)
            ro.tensors.update(values=values * mask, returns=returns)
        else:
            advantages = group_advantages(scores, self.generations, scale=self.rl.scale_rewards)
        ro.tensors.update(scores=scores, old_logps=old, ref_logps=ref, advantages=advantages)
        stats = {"responses": float(n), "reward_sum": float(scores.sum()),
                 "reward_sq_sum": float((scores.double() ** 2).sum()),
                 "kl_sum": float(((old - ref) * mask).sum()),
                 "response_tokens": float(mask.sum()),
                 "finished": float(ro.finished.sum()),
                 "tokens": float(ro.attention_mask.sum())}
        return ro, stats

    def loss(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor, kl_coef: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """(summed token loss with grad, summed `UPDATE_STATS`, the micro-batch's model batch)."""
        piece, logits, values = self._forward(model, rollout, rows)
        logps, entropy = self._logps(logits, piece.response_ids)
        mask = piece.mask.to(self.device)
        t = {k: v.to(self.device) for k, v in piece.tensors.items()}
        if self.mode == "ppo":
            assert values is not None
            out = ppo_losses(logps, t["old_logps"], t["advantages"], clip_range=self.rl.clip_range,
                             values=values.float(), old_values=t["values"], returns=t["returns"],
                             value_clip_range=self.rl.value_clip_range)
            assert out.value is not None
            policy, value = (out.policy * mask).sum(), (out.value * mask).sum()
            # A separate critic's parameters get gradient from the value loss alone: weight 1
            # is its own loss, as Align-Anything's separate critic backward.
            vf_coef = 1.0 if self.rl.critic == "reward_model" else self.rl.vf_coef
            summed = policy + vf_coef * value
            stats = {"policy_loss": policy.detach(), "value_loss": value.detach(),
                     "clip_fraction": (out.clipped * mask).sum(),
                     "approx_kl": (out.approx_kl * mask).sum(),
                     "entropy": (entropy * mask).sum()}
        else:
            out = grpo_token_losses(logps, t["old_logps"], t["ref_logps"], t["advantages"],
                                    beta=kl_coef, clip_range=self.rl.clip_range)
            summed = (out.loss * mask).sum()
            stats = {"policy_loss": (out.policy * mask).sum(), "kl_k3": (out.kl * mask).sum(),
                     "clip_fraction": (out.clipped * mask).sum(),
                     "entropy": (entropy * mask).sum()}
        return summed, stats, piece.batch
