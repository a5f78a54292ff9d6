"""Training step time: our train recipe vs transformers' `Trainer` ("no framework tax").

Run: `.venv/bin/python -m tests.bench.bench_train [--samples N] [--batch-size B] [--steps N]
[--warmup W] [--runs R]`.

Both sides train the same model on the same batches in one process, one thread each:
- the tiny LLaVA (built here from configs) wrapped by `mmjobs.train.model_setup.
  prepare_for_training` with the same LoRA config (adapters on the LM, connector in full);
- the same pretokenized chart shards, the same batch size, the same batch sequence: ours
  reads them with `ShardDataLoader` (random order, seed 0); the `Trainer` gets a dataset
  whose item i is ours' batch i (its sample indices, from the same `ResumableBatchSampler`),
  read in order (`train_sampling_strategy="sequential"`) and turned into a batch by a
  collator that does ours' work: read the rows, decode and process the images, pad
  (`PaddedCollator`). Images are decoded in the training process on both sides
  (`dataloader_workers=0`);
- torch AdamW (`optim="adamw_torch"`, not the fused variant `Trainer` picks by default on
  torch >= 2.8; ours uses `torch.optim.AdamW`), cosine schedule, clipping at 1.0, no
  checkpoints, logging only at the end.

A step is measured from one optimizer step's end to the next (data loading, forward,
backward, clipping, optimizer and scheduler step, bookkeeping): for ours at
`scheduler.step()`, for the `Trainer` at `TrainerCallback.on_step_end`. `Trainer`'s
`on_step_begin` → `on_step_end` (which leaves out its batch prefetch) is shown too. The
first `--warmup` steps of every run are dropped; each run's median is taken, and the table
shows the median over `--runs` runs, the two sides alternating (and swapping who goes first)
so that load from other processes hits both alike. On shared cores wall times swing by 2x
from run to run; the CPU-time column and the best run's median (least disturbed) are the
steadier figures then.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LR = 1e-3


def train_config(batch_size: int, steps: int) -> Any:
    from mmjobs.config import load_config
    from mmjobs.train.methods import TrainConfig

    return load_config(TrainConfig, {
        "mode": "sft", "finetune": "lora", "lr": LR, "max_steps": steps,
        "per_device_batch_size": batch_size, "grad_accum": 1, "batching": "random",
        "lr_schedule": "cosine", "warmup_ratio": 0.0, "max_grad_norm": 1.0, "seed": 0,
        "checkpoint_every_steps": 0, "log_every_steps": steps + 1, "dataloader_workers": 0,
        "lora": LORA})


def build_inputs(root: Path, samples: int) -> tuple[Path, str]:
    """The tiny LLaVA and `samples` pretokenized chart samples (max length 256)."""
    from mmjobs.models.tiny import build_tiny_llava
    from tests.train_fixtures import build_shards

    model_dir = build_tiny_llava(root / "llava")
    return model_dir, build_shards(root, model_dir, samples, f"charts{samples}")


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): CPU time per step barely moves when other
    processes share the cores, wall time does (one torch thread, so CPU <= wall)."""
    return time.perf_counter(), time.process_time()


def _intervals(marks: list[tuple[float, float]]) -> dict[str, list[float]]:
    pairs = list(itertools.pairwise(marks))
    return {"wall": [b[0] - a[0] for a, b in pairs], "cpu": [b[1] - a[1] for a, b in pairs]}


def run_ours(model_dir: Path, shards: str, batch_size: int, steps: int, out: Path
             ) -> dict[str, list[float]]:
    """Train `steps` steps with `TrainRecipe`; return each step's wall and CPU seconds."""
    from mmjobs.config import ModelConfig
    from mmjobs.train.trainer import TrainRecipe

    recipe = TrainRecipe(model=ModelConfig(name_or_path=str(model_dir)), data=shards,
                         train=train_config(batch_size, steps), output=str(out),
                         fingerprint="bench", resume=False)
    marks: list[tuple[float, float]] = []
    try:
        recipe.setup()
        scheduler_step = recipe.scheduler.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            result = scheduler_step(*args, **kwargs)
            marks.append(_now())
            return result

        recipe.scheduler.step = timed_step
        marks.append(_now())
        recipe.train()
    finally:
        recipe.cleanup()
    return _intervals(marks)


class _BatchIndices(torch.utils.data.Dataset):
    """Item i: the sample indices of batch i."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[int]:
        return self.batches[index]


class _ReadBatch:
    """Collator for a one-item `Trainer` batch: read, process and pad that batch's samples,
    keeping only model inputs, and `use_cache=False` as ours passes (what ours' loader and
    `model_inputs` do), so both sides run the same model computation."""

    def __init__(self, dataset: Any, pad_token_id: int) -> None:
        from mmjobs.data.loader import PaddedCollator

        self.dataset, self.collate = dataset, PaddedCollator(pad_token_id)

    def __call__(self, items: list[list[int]]) -> dict[str, Any]:
        (indices,) = items
        batch = self.collate([self.dataset[i] for i in indices])
        inputs = {k: v for k, v in batch.items() if k not in ("ids", "num_images")}
        return {**inputs, "use_cache": False}


def same_batches(shards: str, batch_size: int, steps: int) -> list[list[int]]:
    """The first `steps` batches ours' loader yields (epoch after epoch)."""
    from mmjobs.data.loader import ShardDataset
    from mmjobs.data.sampler import ResumableBatchSampler

    lengths = ShardDataset(shards).lengths
    sampler = ResumableBatchSampler(lengths, batch_size=batch_size, mode="random", seed=0)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        batches += sampler.rank_batches(epoch)
        epoch += 1
    return batches[:steps]


def run_hf(model_dir: Path, shards: str, batch_size: int, steps: int, out: Path
           ) -> dict[str, list[float]]:
    """Train `steps` steps with transformers' `Trainer`; return each step's wall and CPU
    seconds (step end to step end) and its on_step_begin → on_step_end wall seconds."""
    from transformers import AutoProcessor, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import set_seed

    from mmjobs.config import ModelConfig
    from mmjobs.data.loader import ShardDataset
    from mmjobs.models.builder import load_model
    from mmjobs.train.model_setup import prepare_for_training

    set_seed(0)
    model = load_model(ModelConfig(name_or_path=str(model_dir)), for_training=True).model
    model = prepare_for_training(model, train_config(batch_size, steps))
    processor = AutoProcessor.from_pretrained(model_dir)
    dataset = ShardDataset(shards, image_processor=processor.image_processor)
    pad = dataset.card.get("pad_token_id") or 0

    begins: list[tuple[float, float]] = []
    ends: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(_now())

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            begins.append(_now())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(_now())

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, optim="adamw_torch", logging_steps=steps + 1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False,
        train_sampling_strategy="sequential", use_cpu=True,
        seed=0)
    trainer = Trainer(model=model, args=args,
                      train_dataset=_BatchIndices(same_batches(shards, batch_size, steps)),
                      data_collator=_ReadBatch(dataset, int(pad)), callbacks=[StepTimer()])
    trainer.train()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the next run picks its own
    times = _intervals(ends)
    times["in_step_wall"] = [e[0] - b[0] for b, e in zip(begins, ends[1:], strict=False)]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        os.environ["MMJOBS_HOME"] = str(root / "home")  # loader cache, nothing else
        model_dir, shards = build_inputs(root, args.samples)
        medians: dict[tuple[str, str], list[float]] = {}
        for run in range(args.runs):
            for side in ("ours", "hf") if run % 2 == 0 else ("hf", "ours"):
                out = root / f"{side}-{run}"
                times = (run_ours if side == "ours" else run_hf)(
                    model_dir, shards, args.batch_size, total, out)
                for kind, series in times.items():
                    assert len(series) == total, (side, kind, len(series))
                    medians.setdefault((side, kind), []).append(
                        statistics.median(series[args.warmup:]))
            print(f"run {run + 1}/{args.runs}: ours {medians['ours', 'wall'][-1] * 1e3:.1f} ms,"
                  f" Trainer {medians['hf', 'wall'][-1] * 1e3:.1f} ms (wall)", flush=True)

    def ms(side: str, kind: str) -> float:
        return statistics.median(medians[side, kind]) * 1e3

    print(f"\ntiny LLaVA, LoRA r={LORA['r']}, batch {args.batch_size}, 1 thread; median of "
          f"{args.runs} runs x {args.steps} steps ({args.warmup} warm-up steps dropped)")
    print(f"{'per optimizer step':30} {'wall ms':>8} {'CPU ms':>8} {'best':>8}   "
          "per-run wall medians")
    for name, side in (("ours (TrainRecipe)", "ours"), ("transformers Trainer", "hf")):
        best = min(medians[side, "wall"]) * 1e3
        runs = " ".join(f"{t * 1e3:.1f}" for t in medians[side, "wall"])
        print(f"{name:30} {ms(side, 'wall'):8.1f} {ms(side, 'cpu'):8.1f} {best:8.1f}   {runs}")
    print(f"{'  Trainer on_step_begin->end':30} {ms('hf', 'in_step_wall'):8.1f}")
    best_ratio = min(medians["ours", "wall"]) / min(medians["hf", "wall"])
    print(f"ratio ours/Trainer: wall {ms('ours', 'wall') / ms('hf', 'wall'):.3f}, "
          f"CPU {ms('ours', 'cpu') / ms('hf', 'cpu'):.3f}, best run {best_ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
