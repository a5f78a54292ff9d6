"""The PPO and GRPO recipe (train.mode ppo / grpo): rollouts, rewards, KL to a reference, updates.

    recipe = RLRecipe(model=ModelConfig(name_or_path=...), data="s3://.../prompt-shards",
                      train=PpoConfig(rl={"reward": {"model": RM_URI}}),
                      output=OUT, fingerprint=FP, ptx_data=None, run=mlflow_run)
    recipe.setup(); summary = recipe.train(); outputs = recipe.save_final(); recipe.cleanup()

One step (`RLRecipe.train`):

1. **Rollout** (no gradients, `mmjobs.train.rollouts`): `rl.rollout_batch_size` prompts from
   the prompt shards, `num_generations` responses each, sampled by the policy; scored by the
   reward (a reward model from the rm mode, or a programmatic one); one forward pass over the
   responses for the rollout policy's log-probs (and values), one for the reference policy's.
2. **Advantages**: ppo — KL-penalised token rewards, GAE over the critic's values, whitened
   (`mmjobs.train.ppo`); grpo — each response's score relative to the other responses to the
   same prompt (`mmjobs.train.grpo`).
3. **Updates**: `rl.ppo_epochs` passes over the responses in shuffled optimizer updates of
   `per_device_batch_size` x `grad_accum` responses per process, with the clipped losses,
   normalised by the response tokens of the whole update over all micro-batches and ranks.
   With `rl.ptx_coef` > 0 every micro-batch is preceded by one of SFT data (`ptx_data`) whose
   next-token loss is added with that weight. The learning-rate schedule counts optimizer
   updates (steps x `ppo_epochs` x updates per pass).
4. **KL control**: the coefficient stays fixed or follows `rl.target_kl`.

Models. The **actor** is the trained VLM (LoRA or full, frozen parts as in sft). The ppo
**critic** (`rl.critic`) is a value head (`Linear(hidden, 1)`, zero-initialised) on the actor's
final hidden states — one backbone, one forward pass for log-probs and values
(`PolicyWithValueHead` in `mmjobs.train.rl_objective`), the value loss weighted by
`rl.vf_coef` — or (`reward_model`, Align-Anything's layout) a separate model initialised from
the reward model and trained in full: its parameters sit in their own optimizer groups at
`rl.critic_lr` / `rl.critic_weight_decay` with their own schedule (`rl.critic_lr_schedule`,
one `LambdaLR` factor per group), its gradients are clipped on their own, it is checkpointed
with the actor (one module) and exported to `final/critic/reward_model/`. The **reference** is
the base weights with the LoRA adapters switched off (no second copy) or a frozen copy of the
base model. The **reward model** is loaded frozen with `load_reward_model`. Dropout is
switched off in the policy: ratios and KL compare the policy with itself, which dropout noise
would blur (TRL's `disable_dropout`).

Resume. A step is the unit of checkpointing: a checkpoint holds the weights, optimizer and
schedule (as for sft), each rank's RNG state — from which the next rollout's sampling and the
update shuffles are drawn — and data position (prompts, and ptx data), and the KL coefficient.
A run killed at any point and resumed finishes with the same weights as one never killed.

Why not TRL: TRL 1.16 has no PPO trainer any more, and its GRPOTrainer runs the HF Trainer
loop on `datasets` rows of text and PIL images — it cannot restore the data position and RNG
streams exactly from store-backed checkpoints, nor take pretokenized shards with Chameleon's
image tokens. This recipe reuses mmjobs' own loop parts (`TrainRecipe`: accelerate/DeepSpeed
setup, checkpoints, export) and TRL's numerics where they fit (`selective_log_softmax`,
`nanstd`, `disable_dropout_in_model`; the GRPO loss is tested against TRL's).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mmjobs import storage
from mmjobs.config import ConfigError
from mmjobs.layout import SHARDS_CARD, VALUE_HEAD_FILE
from mmjobs.logs import get_logger
from mmjobs.train import checkpoint as ckpt
from mmjobs.train import trainer as base_trainer
from mmjobs.train.batches import loss_sum, num_images, sample_lengths
from mmjobs.train.distributed import all_reduce_sum, whole_model_loading
from mmjobs.train.methods import RL_MODES
from mmjobs.train.metrics import LogWindow
from mmjobs.train.outputs import TrainingPreempted
from mmjobs.train.ppo import AdaptiveKLController
from mmjobs.train.rl_objective import PolicyWithValueHead, RolloutObjective
from mmjobs.train.rollouts import (
    ResponseSampler,
    Rollout,
    build_reward,
    generation_token_ids,
)
from mmjobs.train.trainer import TrainRecipe, TrainSummary

log = get_logger(__name__)

STATE_FILE = "rl_state.json"
CRITIC_PREFIX = "critic."  # the separate critic's parameter names in PolicyWithValueHead
CRITIC_DIR = "critic"  # final/critic/reward_model/: the trained separate critic
PTX_LOADER_FILE = "ptx_loader.json"
# Per-step metrics (means), logged next to loss, lr and grad_norm.
ROLLOUT_STATS = ("reward_mean", "reward_std", "kl", "kl_coef", "response_length",
                 "finished_fraction")
UPDATE_STATS = {"ppo": ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy"),
                "grpo": ("policy_loss", "kl_k3", "clip_fraction", "entropy")}


class RLRecipe(TrainRecipe):
    """One ppo/grpo run; see the module docstring. Methods in call order: `setup`, `train`,
    `save_final`, `cleanup`.

    Args:
        ptx_data: pretokenized SFT shards for the ptx loss (needs `train.rl.ptx_coef` > 0).
        **kwargs: as for `TrainRecipe` (`eval_data` is not used by these modes).

    Raises:
        ConfigError: every bad combination, together.
    """

    def __init__(self, *, ptx_data: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg, rl = self.cfg, self.cfg.rl
        errors = []
        if cfg.mode not in RL_MODES:
            errors.append(f"train.mode: RLRecipe runs ppo and grpo, not {cfg.mode}")
        if self.eval_data is not None:
            errors.append("eval_data: ppo and grpo have no held-out loss (each step logs its "
                          "responses' reward and KL); remove eval_data")
        if rl.ptx_coef > 0 and not ptx_data:
            errors.append("train.rl.ptx_coef > 0 needs ptx_data: pretokenized SFT shards")
        if ptx_data and rl.ptx_coef == 0:
            errors.append("ptx_data is set but train.rl.ptx_coef is 0; set ptx_coef "
                          "(Align-Anything uses 16.0) or remove ptx_data")
        if errors:
            raise ConfigError("train stage config", errors)
        self.ptx_data = ptx_data
        self.ptx_loader: Any = None
        self._ptx_iter: Any = None
        self.generations = rl.num_generations
        self.per_update = cfg.per_device_batch_size * cfg.grad_accum
        self.updates_per_step = rl.ppo_epochs * rl.rollout_batch_size * self.generations \
            // self.per_update
        self.kl = AdaptiveKLController(rl.kl_coef, rl.target_kl,
                                       rl.kl_horizon)
        self.step_stats: dict[str, float] = {}

    # --------------------------------------------------------------- TrainRecipe hooks
    def _backward_passes_per_step(self) -> int:
        # A ptx micro-batch is its own forward/backward pass next to each rollout one.
        return self.cfg.grad_accum * (2 if self.ptx_data else 1)

    def _wrap_model(self, model: Any) -> Any:
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(model)
        if self._separate_critic:
            from mmjobs.train.model_setup import frozen_components
            from mmjobs.train.reward_model import load_critic

            # Whole (a LoRA reward model is merged first); under ZeRO-3 the engine
            # partitions it with the actor when the recipe prepares the model.
            with whole_model_loading(self.accelerator):
                critic = load_critic(self.cfg.rl.reward.model,
                                     freeze_parts=frozen_components(self.cfg),
                                     gradient_checkpointing=self.cfg.gradient_checkpointing)
            disable_dropout_in_model(critic)
            log.info("critic: a separate model initialised from the reward model %s",
                     self.cfg.rl.reward.model)
            return PolicyWithValueHead(model, value_head=False, critic=critic)
        return PolicyWithValueHead(model, value_head=self.cfg.mode == "ppo")

    @property
    def _separate_critic(self) -> bool:
        return self.cfg.mode == "ppo" and self.cfg.rl.critic == "reward_model"

    def _build_optimizer(self, model: Any) -> torch.optim.Optimizer:
        """As every mode's, plus (separate critic) the critic's parameters in their own
        groups at rl.critic_lr and rl.critic_weight_decay, whatever train.param_groups say."""
        from mmjobs.train.methods.common import ParamGroup
        from mmjobs.train.optim import build_optimizer

        cfg = self.cfg
        if not self._separate_critic:
            return super()._build_optimizer(model)
        rl = cfg.rl
        critic = ParamGroup(match=CRITIC_PREFIX, lr=rl.critic_lr or cfg.lr,
                            weight_decay=rl.critic_weight_decay)
        # First: a parameter joins the first group that matches, so the critic's own wins.
        return build_optimizer(model, cfg.model_copy(
            update={"param_groups": [critic, *cfg.param_groups]}))

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """As every mode's; with a separate critic its groups follow rl.critic_lr_schedule
        (one LambdaLR, one factor function per group), the actor's train.lr_schedule."""
        from torch.optim.lr_scheduler import LambdaLR

        from mmjobs.train.schedules import schedule_factor

        actor = super()._build_scheduler(optimizer)
        if not self._separate_critic:
            return actor
        cfg = self.cfg
        if not isinstance(actor, LambdaLR):
            raise ConfigError("train stage config", [
                f"train.lr_schedule: {cfg.lr_schedule} cannot run next to the critic's own "
                "schedule (rl.critic: reward_model); use cosine, linear, constant, step or "
                "exponential"])
        critic = schedule_factor(cfg.rl.critic_lr_schedule,
                                 num_training_steps=self._scheduler_steps(),
                                 warmup_ratio=cfg.warmup_ratio)
        factors = [critic if str(g.get("name", "")).startswith(CRITIC_PREFIX)
                   else actor.lr_lambdas[i] for i, g in enumerate(optimizer.param_groups)]
        return LambdaLR(optimizer, factors)

    def _loader_options(self) -> dict[str, Any]:
        # Whole prompt batches only: every rank then runs the same number of updates (their
        # collectives must pair up) and every step the same number of responses.
        return {"batch_size": self.cfg.rl.rollout_batch_size, "drop_last": True}

    def _count_total_steps(self) -> int:
        cfg = self.cfg
        return cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.epochs * len(self.loader)))

    def _scheduler_steps(self) -> int:
        return self.total_steps * self.updates_per_step

    def _build_objective(self) -> RolloutObjective:  # type: ignore[override]
        from mmjobs.models.builder import load_model

        cfg, acc = self.cfg, self.accelerator
        if self.dist.rank:
            # Every rank was seeded alike (identical initialisation); their rollouts must not
            # share sampling noise. (A resume restores each rank's own stream from then on.)
            torch.manual_seed(cfg.seed + self.dist.rank)
        tokenizer = getattr(self.loaded.processor, "tokenizer", self.loaded.processor)
        eos, suppress = generation_token_ids(self.loaded.model, tokenizer)
        sampler = ResponseSampler(
            tokenizer, max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
            eos_token_ids=eos, suppress_token_ids=suppress,
            synced_gpus=cfg.deepspeed.startswith("zero3") and self.dist.world_size > 1)
        # Frozen models run outside the DeepSpeed engine: whole on every rank, even under
        # ZeRO-3 (as Align-Anything keeps its reference and reward model next to the actor).
        with whole_model_loading(acc):
            reward = build_reward(cfg.rl.reward, tokenizer=tokenizer, device=acc.device,
                                  batch_size=cfg.per_device_batch_size)
        reference = None
        unwrapped = acc.unwrap_model(self.model)
        if cfg.rl.reference_kind(cfg.finetune) == "frozen_copy":
            # Loaded the way the policy was (for_training: e.g. Chameleon's image tokens
            # unmasked), so both score the same vocabulary; frozen and in eval mode below.
            with whole_model_loading(acc):
                reference = load_model(self.spec, for_training=True, device=acc.device).model
        elif not hasattr(unwrapped.vlm, "disable_adapter"):
            raise ConfigError("train stage config", [
                "train.rl.reference: implicit_lora needs a LoRA model; use frozen_copy"])
        if self.ptx_data is not None:
            self._build_ptx_loader()
        return RolloutObjective(cfg=cfg, sampler=sampler, reward=reward, inputs=self._inputs,
                                accelerator=acc, generations=self.generations,
                                float_dtype=self.input_dtype, reference_model=reference,
                                peft_model=unwrapped.vlm)

    def _build_ptx_loader(self) -> None:
        from mmjobs.data.loader import build_dataloader

        assert self.ptx_data is not None
        card = json.loads(storage.read_text(storage.join(self.ptx_data, SHARDS_CARD)))
        if card.get("kind", "sample") != "sample":
            raise ConfigError("train stage data", [
                f"ptx_data {self.ptx_data} holds {card.get('kind')} shards; ptx needs SFT "
                "conversation shards (pretokenize a sample dataset)"])
        cfg = self.cfg
        self.ptx_loader = build_dataloader(
            self.ptx_data, batch_size=cfg.per_device_batch_size, mode=cfg.batching,
            max_length=card.get("max_length"), seed=cfg.seed,
            num_workers=cfg.dataloader_workers,
            image_processor=getattr(self.loaded.processor, "image_processor", None),
            rank=self.dist.rank, world_size=self.dist.world_size, **self._modality_options())

    def _save_extra_state(self, local: Path) -> None:
        if self.dist.is_main:
            (local / STATE_FILE).write_text(json.dumps({"kl_coef": self.kl.value}))
        if self.ptx_loader is not None:
            path = local / ckpt.rank_dir(self.dist.rank) / PTX_LOADER_FILE
            path.write_text(json.dumps(self.ptx_loader.state_dict()))

    def _load_extra_state(self, local: Path) -> None:
        self.kl.value = float(json.loads((local / STATE_FILE).read_text())["kl_coef"])
        if self.ptx_loader is not None:
            path = local / ckpt.rank_dir(self.dist.rank) / PTX_LOADER_FILE
            self.ptx_loader.load_state_dict(json.loads(path.read_text()))

    def _export(self, model: Any, full_state: dict[str, torch.Tensor] | None,
                scratch: Path) -> dict[str, str]:
        """The policy like sft exports it (adapter/ or model/), plus ppo's value head."""
        from safetensors.torch import save_file

        from mmjobs.train.model_setup import export_final

        vlm_state, head_state = None, None
        if full_state is not None:  # ZeRO-3: the gathered state of the wrapper
            vlm_state = {k.removeprefix("vlm."): v for k, v in full_state.items()
                         if k.startswith("vlm.")}
            head_state = {k.removeprefix("value_head."): v for k, v in full_state.items()
                          if k.startswith("value_head.")}
        parts = export_final(model.vlm, vlm_state, self.cfg, scratch,
                             processor=self.loaded.processor, source_dir=self.loaded.model_dir,
                             meta={"data": self.data, "step": self.step})
        if model.critic is not None:
            from mmjobs.train.methods import RmConfig
            from mmjobs.train.reward_model import export_reward_model

            critic_state = None if full_state is None else {
                k.removeprefix(CRITIC_PREFIX): v for k, v in full_state.items()
                if k.startswith(CRITIC_PREFIX)}
            written = export_reward_model(
                model.critic, critic_state, RmConfig(finetune="full"), scratch / CRITIC_DIR,
                base_model=self.spec, processor=self.loaded.processor,
                source_dir=self.loaded.model_dir,
                meta={"initialised_from": self.cfg.rl.reward.model, "step": self.step,
                      "max_length": self.card.get("max_length")})
            parts["critic"] = f"{CRITIC_DIR}/{written['reward_model']}"
        if model.value_head is not None:
            head_state = head_state or model.value_head.state_dict()
            save_file({k: v.detach().to("cpu", torch.float32).contiguous()
                       for k, v in head_state.items()}, str(scratch / VALUE_HEAD_FILE))
            parts["value_head"] = VALUE_HEAD_FILE
        return parts

    # --------------------------------------------------------------------------- train
    def _next_ptx(self) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):  # as `_next_batch`: keep the RNG stream
            for _ in range(2):
                if self._ptx_iter is None:
                    self._ptx_iter = iter(self.ptx_loader)
                try:
                    return next(self._ptx_iter)
                except StopIteration:
                    self._ptx_iter = None
        raise RuntimeError(f"{self.ptx_data}: the loader yields no batches on rank "
                           f"{self.dist.rank}")

    def train(self) -> TrainSummary:
        """Run rollout + update steps until `total_steps`; log, checkpoint on the way.

        Raises:
            TrainingPreempted: SIGTERM arrived; a checkpoint of the step reached is committed.
        """
        cfg, acc, objective = self.cfg, self.accelerator, self.objective
        assert isinstance(objective, RolloutObjective), "call setup() first"
        names = UPDATE_STATS[cfg.mode]
        start, tokens_seen = time.monotonic(), 0
        log_window = LogWindow()  # the steps since the last logged one
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.model.eval()
            rollout, rollout_sums = objective.rollout(self.model, self._next_batch(),
                                                      self.kl.value)
            self.model.train()
            update = self._update(objective, rollout)
            self.step += 1
            keys = sorted(rollout_sums)
            reduced = all_reduce_sum(acc, [*(rollout_sums[k] for k in keys),
                                           *(update[k] for k in ("loss", "tokens", "ptx_loss",
                                                                 "ptx_tokens", *names)),
                                           float(self.preemption.requested)])
            ro = dict(zip(keys, reduced[:len(keys)], strict=True))
            loss_all, tokens_all, ptx_all, ptx_tokens_all, *rest = reduced[len(keys):]
            stats_all, stop = rest[:-1], rest[-1]
            self.last_loss = loss_all / max(tokens_all, 1.0)
            tokens_seen += int(ro["tokens"])
            kl_used = self.kl.value
            stats = self._step_stats(ro, kl_used)
            stats.update({k: v / max(tokens_all, 1.0)
                          for k, v in zip(names, stats_all, strict=True)})
            if self.ptx_data is not None:
                stats["ptx_loss"] = ptx_all / max(ptx_tokens_all, 1.0)
            self.kl.update(stats["kl"], int(ro["responses"]))
            self.step_stats = stats
            log_window.add(loss=self.last_loss, seconds=time.perf_counter() - t0,
                       tokens=ro["tokens"], samples=ro["responses"], flops=update["flops"],
                       extra=stats)
            if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                base_trainer.log_step(
                    self.run, self.step, self.total_steps, lr=update["lr"],
                    grad_norm=update["grad_norm"], peak_flops=self.peak_flops,
                    device=acc.device, **log_window.take())
            if stop:
                uri = self.save_checkpoint(background=False)
                log.warning("SIGTERM received: stopped at step %d/%d; checkpoint committed at "
                            "%s; exiting (re-run the same command to resume)", self.step,
                            self.total_steps, uri)
                raise TrainingPreempted(self.step, uri)
            every = cfg.checkpoint_every_steps
            if every and self.step % every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        self.uploader.wait()
        return TrainSummary(steps=self.step, total_steps=self.total_steps,
                            final_loss=self.last_loss, resumed_from_step=self.resumed_from,
                            tokens=tokens_seen, seconds=time.monotonic() - start)

    @staticmethod
    def _step_stats(ro: dict[str, float], kl_coef: float) -> dict[str, float]:
        n = max(ro["responses"], 1.0)
        mean = ro["reward_sum"] / n
        var = max(ro["reward_sq_sum"] / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
        return {"reward_mean": mean, "reward_std": math.sqrt(var), "kl": ro["kl_sum"] / n,
                "kl_coef": kl_coef, "response_length": ro["response_tokens"] / n,
                "finished_fraction": ro["finished"] / n}

    def _update(self, objective: RolloutObjective, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of optimizer updates over the rollout; this rank's loss and
        stat sums, the last update's lr and gradient norm, and the model FLOPs."""
        cfg, acc = self.cfg, self.accelerator
        gas = self._backward_passes_per_step()
        names = UPDATE_STATS[cfg.mode]
        sums: dict[str, Any] = dict.fromkeys(("loss", "ptx_loss", *names), 0.0)
        tokens = ptx_tokens = 0
        flops, lr, grad_norm = 0.0, 0.0, None
        for _ in range(cfg.rl.ppo_epochs):
            order = torch.randperm(rollout.size)  # the global RNG: restored on resume
            for first in range(0, rollout.size, self.per_update):
                micro = order[first:first + self.per_update].split(cfg.per_device_batch_size)
                ptx = [self._next_ptx() for _ in micro] if self.ptx_data else []
                counts = [float(sum(rollout.mask[m].sum() for m in micro)),
                          float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in ptx))]
                update_tokens, update_ptx = all_reduce_sum(acc, counts)
                # Each backward's sum x (ranks · passes / the update's tokens over all ranks):
                # after accelerate's ÷ passes and DDP's mean over ranks, the gradient is that
                # of the mean token loss of the whole update.
                scale = acc.num_processes * gas / max(update_tokens, 1.0)
                ptx_scale = cfg.rl.ptx_coef * acc.num_processes * gas / max(update_ptx, 1.0)
                acc.step = 0
                for k, rows in enumerate(micro):
                    if ptx:  # first, so the window's last (synchronising) pass uses every part
                        with acc.accumulate(self.model):
                            logits, _ = self.model(with_values=False,
                                                   **self._inputs(ptx[k]))
                            ptx_sum, n_ptx = loss_sum(logits, ptx[k]["labels"])
                            acc.backward(ptx_sum * ptx_scale)
                        sums["ptx_loss"] += ptx_sum.detach()
                        ptx_tokens += n_ptx
                    with acc.accumulate(self.model):
                        summed, stats, batch = objective.loss(self.model, rollout, rows,
                                                              self.kl.value)
                        acc.backward(summed * scale)
                    sums["loss"] = sums["loss"] + summed.detach()
                    for key, value in stats.items():
                        sums[key] = sums[key] + value
                    tokens += int(rollout.mask[rows].sum())
                    flops += self.flops.step_flops(sample_lengths(batch), num_images(batch))
                grad_norm = self._clip_gradients()
                lr = float(self.scheduler.get_last_lr()[0])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(v) for k, v in sums.items()}
        out.update(tokens=float(tokens), ptx_tokens=float(ptx_tokens), lr=lr, flops=flops,
                   grad_norm=None if grad_norm is None else float(grad_norm))
        return out

    def _clip_gradients(self) -> Any:
        """Clip to train.max_grad_norm; the actor's gradient norm. A separate critic is
        clipped on its own, as its own DeepSpeed engine is in Align-Anything (under DeepSpeed
        here, actor and critic are one engine, clipped together by its gradient_clipping)."""
        acc, limit = self.accelerator, self.cfg.max_grad_norm or math.inf
        if not self._separate_critic:
            return acc.clip_grad_norm_(self.params, limit)
        critic = {id(p) for p in acc.unwrap_model(self.model).critic.parameters()}
        acc.clip_grad_norm_([p for p in self.params if id(p) in critic], limit)
        return acc.clip_grad_norm_([p for p in self.params if id(p) not in critic], limit)

    def evaluate(self) -> float:
        raise NotImplementedError("ppo/grpo have no eval loss; see the step metrics")

    def cleanup(self) -> None:
        """As `TrainRecipe.cleanup`, and the ptx loader's workers too."""
        self._ptx_iter = self.ptx_loader = None
        super().cleanup()
