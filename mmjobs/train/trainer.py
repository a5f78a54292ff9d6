"""The training recipe: align, SFT, DPO or a reward model (full / LoRA), resumable.

    recipe = TrainRecipe(model=ModelConfig(name_or_path=...), data="s3://.../shards",
                         train=SftConfig(finetune="lora"), output=OUT,
                         fingerprint=FP, run=mlflow_run)
    recipe.setup(); summary = recipe.train(); outputs = recipe.save_final(); recipe.cleanup()

The parts are libraries — accelerate (single process, DDP under torchrun, DeepSpeed ZeRO),
peft, torch's AdamW, `mmjobs.train.schedules` — but the loop is ours, not transformers'
`Trainer` or TRL's `SFTTrainer`, for three reasons: resume must restore the exact data
position (`ShardDataLoader.state_dict()`, which counts consumed batches; the HF Trainer skips
batches by re-reading them) and every RNG stream, so a killed run finishes bit-identical to an
uninterrupted one; checkpoints go to the object store with a manifest, uploaded in the
background while training continues; and the loss is normalised by the assistant tokens of the
whole optimizer step across micro-batches and ranks, which packed rows need.

What is minimised depends on `train.mode` (`mmjobs.train.objectives`): next-token loss for
align/sft, the DPO loss on preference pairs (`mmjobs.train.preference`), or a Bradley-Terry
loss for a reward model (`mmjobs.train.reward_model`); the loop, checkpoints and resume are
the same for all of them. ppo and grpo sample their own training data (rollouts), so their
loop differs: `mmjobs.train.rl.RLRecipe` subclasses this recipe through the small hooks below
(`_wrap_model`, `_build_optimizer` / `_build_scheduler`, `_loader_options`,
`_count_total_steps`, `_scheduler_steps`, `_backward_passes_per_step`, `_save_extra_state` /
`_load_extra_state`) and keeps the rest:
setup order, checkpoints, resume, export.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmjobs import storage
from mmjobs.config import ConfigError, ModelConfig
from mmjobs.data.modality import ranks_need_same_modality
from mmjobs.layout import FINAL_DIR, SHARDS_CARD
from mmjobs.layout import TRAIN_INFO as INFO_FILE
from mmjobs.logs import get_logger
from mmjobs.models.builder import load_model
from mmjobs.models.connectors import MoEConnector, moe_aux_loss
from mmjobs.train import checkpoint as ckpt
from mmjobs.train.batches import model_inputs, num_images, sample_lengths
from mmjobs.train.distributed import (
    NullRun,
    all_reduce_sum,
    broadcast_from_main,
    build_accelerator,
    dist_info,
    release_accelerator,
    text_hidden_size,
)
from mmjobs.train.methods import TrainConfig
from mmjobs.train.metrics import (
    LogWindow,
    device_peak_flops,
    flops_model,
    log_step,
    patches_per_image,
)
from mmjobs.train.model_setup import (
    export_final,
    frozen_components,
    parameter_counts,
    prepare_for_training,
    trained_part,
    upcast_trainable,
)
from mmjobs.train.objectives import LanguageModelingObjective, Objective, evaluate_objective
from mmjobs.train.optim import build_optimizer, group_summary
from mmjobs.train.outputs import TrainingPreempted
from mmjobs.train.run import check_data_kind
from mmjobs.train.schedules import build_lr_scheduler, lr_at_steps, plot_lr_curve

log = get_logger(__name__)


@dataclass
class TrainSummary:
    """What a finished `train()` reports."""

    steps: int
    total_steps: int
    final_loss: float | None
    resumed_from_step: int | None
    tokens: int
    seconds: float
    eval_loss: float | None = None
    eval_metrics: dict[str, float] | None = None  # mean eval stats (e.g. rm accuracy)


class TrainRecipe:
    """One training run; see the module docstring. Methods in call order:
    `setup`, `train`, `save_final`, `cleanup` (`save_checkpoint` runs from `train`).

    Raises:
        ConfigError: from the constructor, for bad `train.lr_schedule_options` (every other
            combination is checked when `train` is validated, by its mode's config class).
    """

    def __init__(self, *, model: ModelConfig, data: str, train: TrainConfig, output: str,
                 fingerprint: str, eval_data: str | None = None, resume: bool = True,
                 run: Any = None, about: dict[str, Any] | None = None) -> None:
        errors = []
        try:  # schedule options are checked on a dummy run, before anything heavy starts
            lr_at_steps(train.lr_schedule, [0], lr=train.lr, num_training_steps=100,
                        warmup_ratio=train.warmup_ratio, **train.lr_schedule_options)
        except ValueError as e:
            errors.append(f"train.lr_schedule_options: {e}")
        if errors:
            raise ConfigError("train stage config", errors)
        self.spec, self.data, self.eval_data, self.cfg = model, data, eval_data, train
        self.output, self.fingerprint, self.resume = output, fingerprint, resume
        self.about = about or {}  # recipe, experiment, pipeline run: for the model card
        self.ckpt_root = storage.join(output, ckpt.CHECKPOINTS_DIR)
        self.run = run if run is not None else NullRun()
        self.step, self.resumed_from, self.last_loss = 0, None, None
        self.preemption = ckpt.PreemptionWatcher()
        self.accelerator: Any = None
        self._iter: Any = None
        self.loader: Any = None
        self.eval_loader: Any = None
        self.objective: Objective | None = None
        self.eval_metrics: dict[str, float] = {}

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build everything, in dependency order:

        1. the Accelerator — it sets up the process group (rank and world size split the
           data) and, for ZeRO-3, must exist before the model loads (sharded loading);
        2. seeds — LoRA and connector initialisation draw random numbers;
        3. the model — freezing and LoRA decide which parameters the optimizer gets (a reward
           model's value head is drawn here too);
        4. the loader — needs the processor's image processor and the rank;
        5. optimizer and LR schedule — need the trainable parameters and steps per epoch;
        6. `accelerator.prepare` — DDP/DeepSpeed wrapping and device placement;
        7. the objective — DPO's implicit reference needs the prepared model (and a frozen
           reference copy goes to the device);
        8. resume, last — it restores into the prepared objects, and the RNG states after
           everything above that draws random numbers.
        """
        from accelerate.utils import set_seed

        from mmjobs.data.loader import build_dataloader

        cfg, frozen = self.cfg, frozen_components(self.cfg)
        # Before anything heavy: shards of the wrong kind for the mode fail here.
        self.card = json.loads(storage.read_text(storage.join(self.data, SHARDS_CARD)))
        check_data_kind(cfg.mode, self.data, self.card, self.eval_data)
        self.accelerator = acc = build_accelerator(
            mixed_precision=cfg.mixed_precision, grad_accum=self._backward_passes_per_step(),
            deepspeed=cfg.deepspeed, micro_batch_size=cfg.per_device_batch_size,
            max_grad_norm=cfg.max_grad_norm,
            # Only DeepSpeed's bucket sizes need it (read from config.json, before the model).
            hidden_size=None if cfg.deepspeed == "none" else text_hidden_size(self.spec),
            find_unused_parameters=not (frozen["connector"] and frozen["vision_tower"]))
        self.dist = dist_info(acc)
        set_seed(cfg.seed)
        self.loaded = load_model(self.spec, for_training=True)
        model = self._wrap_model(prepare_for_training(self.loaded.model, cfg))
        if cfg.deepspeed == "none" and upcast_trainable(model):
            log.info("trainable weights kept in float32 (master weights for %s autocast)",
                     acc.mixed_precision)
        summary = parameter_counts(model)

        image_processor = getattr(self.loaded.processor, "image_processor", None)
        max_length = cfg.max_length or self.card.get("max_length")
        self.loader = build_dataloader(
            self.data, **self._loader_options(), mode=cfg.batching,
            max_length=max_length, seed=cfg.seed, num_workers=cfg.dataloader_workers,
            image_processor=image_processor, rank=self.dist.rank,
            world_size=self.dist.world_size, **self._modality_options())
        self.eval_loader = None if self.eval_data is None else build_dataloader(
            self.eval_data, batch_size=cfg.per_device_batch_size, mode="random",
            max_length=None, seed=0, num_workers=0, image_processor=image_processor,
            rank=self.dist.rank, world_size=self.dist.world_size, **self._modality_options())
        self.total_steps = self._count_total_steps()

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._build_optimizer(model)  # betas, no_decay, param_groups
        log.info("optimizer groups: %s", "; ".join(group_summary(optimizer)))
        self.scheduler = self._build_scheduler(optimizer)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.params = params
        self.deepspeed = cfg.deepspeed != "none"
        self.flash = self.loaded.info.get("attn_implementation") == "flash_attention_2"
        self.input_dtype = self.loaded.model.dtype
        self.has_moe = any(isinstance(m, MoEConnector) for m in self.loaded.model.modules())
        self.objective = self._build_objective()
        self.flops = flops_model(self.loaded.model, summary, patches_per_image(self.card))
        self.peak_flops = device_peak_flops(acc.device)
        nonce = broadcast_from_main(acc, uuid.uuid4().hex[:12])
        self.uploader = ckpt.CheckpointUploader(
            self.ckpt_root, rank=self.dist.rank, world_size=self.dist.world_size,
            nonce=nonce, keep=cfg.keep_last_checkpoints)
        if self.resume:
            self._resume()
        elif self.dist.is_main and ckpt.list_checkpoints(self.ckpt_root):
            log.warning("resume=false: deleting the checkpoints under %s", self.ckpt_root)
            storage.delete(self.ckpt_root)
        acc.wait_for_everyone()
        self.preemption.install()
        self._log_setup(summary)

    # Hooks a subclass (mmjobs.train.rl.RLRecipe) overrides; these are the align/sft/dpo/rm ways.
    def _backward_passes_per_step(self) -> int:
        """Backward passes per optimizer step (accelerate's and DeepSpeed's accumulation)."""
        return self.cfg.grad_accum

    def _wrap_model(self, model: Any) -> Any:
        """The module to train around the prepared VLM (rm: a value head on top)."""
        if self.cfg.mode == "rm":
            from mmjobs.train.reward_model import RewardModel

            return RewardModel(model)
        return model

    def _build_optimizer(self, model: Any) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, grouped as train.param_groups says."""
        return build_optimizer(model, self.cfg)

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The train.lr_schedule over `_scheduler_steps()` optimizer steps."""
        cfg = self.cfg
        return build_lr_scheduler(optimizer, cfg.lr_schedule,
                                  num_training_steps=self._scheduler_steps(),
                                  warmup_ratio=cfg.warmup_ratio, **cfg.lr_schedule_options)

    def _loader_options(self) -> dict[str, Any]:
        """`build_dataloader` options of the training loader that differ between recipes."""
        return {"batch_size": self.cfg.per_device_batch_size}

    def _modality_options(self) -> dict[str, bool]:
        """`build_dataloader`'s modality grouping: on where the ranks' collectives need every
        micro-step all-image or all-text (unless train.group_by_modality says otherwise)."""
        frozen = frozen_components(self.cfg)
        must_match = ranks_need_same_modality(
            self.cfg.deepspeed, world_size=self.dist.world_size,
            vision_side_trains=not (frozen["connector"] and frozen["vision_tower"]))
        group = self.cfg.group_by_modality
        return {"group_by_modality": must_match if group is None else group,
                "modality_must_match": must_match}

    def _count_total_steps(self) -> int:
        """Training steps: max_steps, or the epochs' worth of optimizer steps."""
        cfg = self.cfg
        return cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.epochs * len(self.loader) / cfg.grad_accum))

    def _scheduler_steps(self) -> int:
        """Optimizer steps the LR schedule spans."""
        return self.total_steps

    def _save_extra_state(self, local: Path) -> None:
        """Write more resumable state into the checkpoint staging dir `local` (every rank)."""

    def _load_extra_state(self, local: Path) -> None:
        """Read back what `_save_extra_state` wrote (before the RNG states are restored)."""

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return model_inputs(batch, device=self.accelerator.device, float_dtype=self.input_dtype,
                            flash_attention=self.flash)

    def _build_objective(self) -> Objective:
        cfg = self.cfg
        if cfg.mode == "dpo":
            from mmjobs.train.preference import DPOObjective

            reference = None
            if cfg.preference.reference == "frozen_copy":
                # The base weights as loaded, before any training: a second full copy. Loaded
                # as the policy is (for_training: Chameleon's image tokens unmasked) so both
                # score the same vocabulary; then frozen, in eval mode.
                reference = load_model(self.spec, for_training=True,
                                       device=self.accelerator.device).model
                reference.eval().requires_grad_(False)
            return DPOObjective(cfg.preference, self._inputs,
                                peft_model=self.accelerator.unwrap_model(self.model),
                                reference_model=reference)
        if cfg.mode == "rm":
            from mmjobs.train.reward_model import RewardObjective

            return RewardObjective(cfg.preference, self._inputs)
        return LanguageModelingObjective(self._inputs)

    def _log_setup(self, summary: dict[str, dict[str, int]]) -> None:
        cfg = self.cfg
        mean_len = float(self.card.get("tokens", {}).get("mean_length") or 0)
        self.run.log_params({
            "run.world_size": self.dist.world_size, "run.total_steps": self.total_steps,
            "run.effective_batch": cfg.per_device_batch_size * cfg.grad_accum
            * self.dist.world_size,
            "run.trainable_params": summary["all"]["trainable"],
            "run.total_params": summary["all"]["total"],
            "run.flops_per_token": f"{self.flops.per_token(mean_len):.4g}",
            "run.device": str(self.accelerator.device),
            "run.mixed_precision": self.accelerator.mixed_precision})
        fig = plot_lr_curve(cfg.lr_schedule, self.total_steps, lr=cfg.lr,
                            warmup_ratio=cfg.warmup_ratio, **cfg.lr_schedule_options)
        self.run.log_figure(fig, "plots/lr_schedule.png")
        log.info("training %d steps (%s, %s), %d batches/epoch on each of %d rank(s)%s",
                 self.total_steps, cfg.mode, trained_part(cfg),
                 len(self.loader), self.dist.world_size,
                 f", resumed at step {self.resumed_from}" if self.resumed_from else "")

    # ----------------------------------------------------------------------------- resume
    def _resume(self) -> None:
        info = broadcast_from_main(self.accelerator, ckpt.latest_committed(self.ckpt_root)
                                   if self.dist.is_main else None)
        if info is None:
            return
        meta = storage.read_manifest(info.uri).meta
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{info.uri} was written for other inputs or settings (fingerprint "
                f"{meta.get('fingerprint')}, now {self.fingerprint}); set resume: false to "
                "start over (its checkpoints are deleted) or write to another output")
        local = Path(tempfile.mkdtemp(prefix="mmjobs-resume-"))
        try:
            state = ckpt.fetch_checkpoint(info.uri, local, self.dist.rank)
            if state["world_size"] != self.dist.world_size:
                raise ValueError(f"{info.uri} was written by {state['world_size']} processes, "
                                 f"this run has {self.dist.world_size}; resume with the same "
                                 "number of processes (the data split depends on it)")
            rng, loader_state = ckpt.load_training_state(
                local, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, deepspeed=self.deepspeed, rank=self.dist.rank)
            self.loader.load_state_dict(loader_state)
            self.step = self.resumed_from = int(state["step"])
            self.last_loss = state.get("loss")
            self._load_extra_state(local)
            ckpt.restore_rng(rng)  # last: nothing after this may draw random numbers
        finally:
            shutil.rmtree(local, ignore_errors=True)
        log.info("resumed from %s at step %d", info.uri, self.step)

    # ----------------------------------------------------------------------------- train
    def train(self) -> TrainSummary:
        """Run optimizer steps until `total_steps`; checkpoint, evaluate and log on the way.

        Raises:
            TrainingPreempted: SIGTERM arrived; a checkpoint of the step reached is committed.
        """
        cfg, acc, objective = self.cfg, self.accelerator, self.objective
        assert objective is not None, "call setup() first"
        self.model.train()
        start, tokens_seen, eval_loss = time.monotonic(), 0, None
        log_window = LogWindow()  # the steps since the last logged one
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            window = [self._next_batch() for _ in range(cfg.grad_accum)]
            (step_labels,) = all_reduce_sum(acc, [sum(objective.count(b) for b in window)])
            # Each rank's summed loss × (ranks · micro-batches / all units of the step): after
            # accelerate's ÷ micro-batches and DDP's mean over ranks, the gradient is that of
            # the mean loss over every assistant token (sft) or pair (dpo, rm) of the step.
            scale = acc.num_processes * cfg.grad_accum / max(step_labels, 1.0)
            loss_total: Any = 0.0  # a tensor: one device sync per step, not per micro-batch
            stats_total: dict[str, Any] = dict.fromkeys(objective.stat_names, 0.0)
            tokens, samples, flops = 0, 0, 0.0
            acc.step = 0  # windows are whole: accumulate() syncs on the last micro-batch
            for batch in window:
                with acc.accumulate(self.model):
                    summed, stats = objective.loss(self.model, batch)
                    aux = moe_aux_loss(self.loaded.model) if self.has_moe else None
                    acc.backward(summed * scale + (aux if aux is not None else 0.0))
                loss_total = loss_total + summed.detach()
                for key, value in stats.items():
                    stats_total[key] = stats_total[key] + value
                lengths = sample_lengths(batch)
                tokens, samples = tokens + int(lengths.sum()), samples + len(lengths)
                flops += self.flops.step_flops(lengths, num_images(batch))
            grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
            lr = float(self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            # One collective for the step's loss, stats, throughput and the preemption vote, so
            # all ranks stop at the same step.
            loss_all, tokens_all, samples_all, stop, *stats_all = all_reduce_sum(
                acc, [float(loss_total), tokens, samples, float(self.preemption.requested),
                      *(float(stats_total[k]) for k in objective.stat_names)])
            self.last_loss = loss_all / max(step_labels, 1.0)
            tokens_seen += int(tokens_all)
            log_window.add(loss=self.last_loss, seconds=time.perf_counter() - t0, tokens=tokens_all,
                       samples=samples_all, flops=flops,
                       extra={k: v / max(step_labels, 1.0)
                              for k, v in zip(objective.stat_names, stats_all, strict=True)})
            if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                log_step(self.run, self.step, self.total_steps, lr=lr, grad_norm=grad_norm,
                         peak_flops=self.peak_flops, device=acc.device, **log_window.take())
            if stop:
                uri = self.save_checkpoint(background=False)
                log.warning("SIGTERM received: stopped at step %d/%d; checkpoint committed at "
                            "%s; exiting (re-run the same command to resume)", self.step,
                            self.total_steps, uri)
                raise TrainingPreempted(self.step, uri)
            if self.eval_loader is not None and cfg.eval_every_steps and \
                    self.step % cfg.eval_every_steps == 0:
                eval_loss = self.evaluate()
            every = cfg.checkpoint_every_steps
            if every and self.step % every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        evaluated_last = cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0
        if self.eval_loader is not None and not (evaluated_last and eval_loss is not None):
            eval_loss = self.evaluate()
        self.uploader.wait()
        return TrainSummary(steps=self.step, total_steps=self.total_steps,
                            final_loss=self.last_loss, resumed_from_step=self.resumed_from,
                            tokens=tokens_seen, seconds=time.monotonic() - start,
                            eval_loss=eval_loss, eval_metrics=dict(self.eval_metrics) or None)

    def _next_batch(self) -> dict[str, Any]:
        # The DataLoader draws a worker seed from torch's global RNG whenever an epoch's
        # iterator starts. Doing that under fork_rng keeps the training RNG stream (dropout)
        # independent of where the iterator was (re)started — exact resume depends on it.
        with torch.random.fork_rng(devices=[]):
            for _ in range(2):
                if self._iter is None:
                    self._iter = iter(self.loader)
                try:
                    return next(self._iter)
                except StopIteration:
                    self._iter = None  # the loader moved on to the next epoch
        raise RuntimeError(f"{self.data}: the loader yields no batches on rank "
                           f"{self.dist.rank} (too few samples for the batch size?)")

    def evaluate(self) -> float:
        """Mean loss per assistant token (sft) or pair (dpo, rm) over the whole eval set (all
        ranks); the objective's stats are logged as `eval_<stat>` means (e.g. `eval_accuracy`,
        a reward model's pairwise accuracy) and kept in `eval_metrics`."""
        assert self.eval_loader is not None and self.objective is not None
        loss, count, means = evaluate_objective(self.objective, self.model, self.eval_loader,
                                                self.accelerator)
        self.eval_metrics = {f"eval_{k}": v for k, v in means.items()}
        self.run.log_metrics({"eval_loss": loss, **self.eval_metrics}, step=self.step)
        unit = "tokens" if self.objective.name == "lm" else "pairs"
        log.info("step %d: eval loss %.4f over %d %s%s", self.step, loss, int(count), unit,
                 "".join(f", {k} {v:.4g}" for k, v in self.eval_metrics.items()))
        return loss

    # ----------------------------------------------------------------------------- saving
    def save_checkpoint(self, *, background: bool = True) -> str:
        """Write this step's resumable state locally, then commit it to
        `{output}/checkpoints/step-N` (in the background unless told otherwise)."""
        local = self.uploader.staging_dir()
        state = {"step": self.step, "total_steps": self.total_steps, "loss": self.last_loss,
                 "fingerprint": self.fingerprint, "world_size": self.dist.world_size,
                 "mode": self.cfg.mode, "finetune": trained_part(self.cfg),
                 "deepspeed": self.cfg.deepspeed}
        ckpt.save_training_state(
            local, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, loader_state=self.loader.state_dict(),
            deepspeed=self.deepspeed, rank=self.dist.rank,
            state=state if self.dist.is_main else None)
        self._save_extra_state(local)
        meta = {"fingerprint": self.fingerprint, "kind": "train-checkpoint"}
        return self.uploader.commit(local, self.step, meta, background=background)

    def save_final(self) -> dict[str, str]:
        """Commit the trained result to `{output}/final/` (see `model_setup.export_final`).

        Returns `{"final": uri, "adapter"|"model"|"connector": uri}`.
        """
        acc = self.accelerator
        self.uploader.wait()
        zero3 = self.cfg.deepspeed.startswith("zero3")
        full_state = acc.get_state_dict(self.model) if zero3 else None  # a collective
        final = storage.join(self.output, FINAL_DIR)
        outputs: dict[str, str] = {"final": final}
        if self.dist.is_main:
            from mmjobs.train.model_card import card_final

            scratch = Path(tempfile.mkdtemp(prefix="mmjobs-final-"))
            try:
                parts = self._export(acc.unwrap_model(self.model), full_state, scratch)
                info = {"base_model": self.spec.model_dump(mode="json"), "data": self.data,
                        "mode": self.cfg.mode, "finetune": trained_part(self.cfg),
                        "steps": self.step, "final_loss": self.last_loss, "outputs": parts,
                        "eval_metrics": self.eval_metrics,
                        "fingerprint": self.fingerprint}
                (scratch / INFO_FILE).write_text(json.dumps(info, indent=1))
                card_final(self, scratch, parts, final)  # README.md, portable adapter config
                storage.put_dir(scratch, final, meta={"fingerprint": self.fingerprint,
                                                      "stage": "train", **parts})
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            outputs.update({k: storage.join(final, v) for k, v in parts.items()})
        return broadcast_from_main(acc, outputs)  # also the barrier: rank 0 has committed

    def _export(self, model: Any, full_state: dict[str, torch.Tensor] | None,
                scratch: Path) -> dict[str, str]:
        meta = {"data": self.data, "step": self.step}
        if self.cfg.mode == "rm":
            from mmjobs.train.reward_model import export_reward_model

            return export_reward_model(
                model, full_state, self.cfg, scratch, base_model=self.spec,
                processor=self.loaded.processor, source_dir=self.loaded.model_dir,
                meta={**meta, "max_length": self.card.get("max_length"), **self.eval_metrics})
        return export_final(model, full_state, self.cfg, scratch,
                            processor=self.loaded.processor, source_dir=self.loaded.model_dir,
                            meta=meta)

    def cleanup(self) -> None:
        """Stop handling SIGTERM, finish any upload, stop loader workers, free accelerate."""
        self.preemption.uninstall()
        uploader = getattr(self, "uploader", None)
        if uploader is not None:
            try:
                uploader.wait()
            except RuntimeError as e:
                log.error("%s", e)
        # Dropping the iterator and loaders lets their DataLoader worker processes exit.
        self._iter = self.loader = self.eval_loader = None
        self.objective = None  # a DPO frozen reference copy is a whole model
        if self.accelerator is not None:
            release_accelerator(self.accelerator)
