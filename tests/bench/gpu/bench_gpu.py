"""LLaVA-1.5-7B on one CUDA GPU: training steps and generation at the recipe's shape.

Run: `.venv/bin/python -m tests.bench.gpu.bench_gpu [--batch 16] [--seq-len 2048] [--steps 5]
[--full-layers 8] [--only lora,full,generate] [--smoke]`. Without a CUDA GPU it prints one
"skipped" line and exits 0; `--smoke` runs every case on the CPU on a shrunken config instead
(to check the script, not to time anything).

No downloads: the model is the real `llava-hf/llava-1.5-7b-hf` config (the published file in
`mmjobs/models/replicas/published/`) with random bf16 weights. Each training case is one
mmjobs training step, the trainer's own parts: `prepare_for_training` (LoRA r128/alpha 256 on
every LM linear layer and the projector in full, as `llava-dataengine`; or full fine-tuning of
the LM and projector), gradient checkpointing, `PaddedCollator` / `PackedCollator`,
`model_inputs`, `loss_sum`, fp32 master weights for what trains, bf16 autocast, fused AdamW,
clipping. Samples are LLaVA-665k-like (576 image tokens + text, `bench_packing`'s mix), cut to
`--seq-len`:

- padded: `--batch` samples, right-padded to the longest (length-grouping would pad less);
- packed: the same samples flattened into one padding-free row (position ids restart per
  sample; flash-attention runs varlen kernels, SDPA a block-diagonal mask).

Full fine-tuning of all 32 layers needs ~16 bytes per parameter (bf16 weights, fp32 master and
gradients, Adam moments): 112 GB for 7B, more than one GPU holds without ZeRO; the full case
keeps `--full-layers` layers and says so (its step time scales about linearly with depth).

Printed per case: step time (median of `--steps` after 2 warm-up steps), real tokens/s, peak
memory, and MFU = the trainer's model FLOPs (`mmjobs.train.metrics.FlopsModel`) / step time /
the GPU's dense bf16 peak. Generation: greedy, `--gen-batch` prompts of one image + 40 text
tokens, `--new-tokens` new tokens each, new tokens/s. Attention: SDPA always, flash-attention-2
where `flash_attn` imports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PUBLISHED = (Path(__file__).resolve().parents[3] / "mmjobs" / "models" / "replicas"
             / "published" / "llava-hf--llava-1.5-7b-hf")
LORA = {"r": 128, "alpha": 256, "dropout": 0.05,  # llava-dataengine / LLaVA-1.5 finetune_lora
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}


@dataclass(frozen=True)
class Case:
    """One timed configuration."""

    finetune: str  # lora | full
    attn: str  # sdpa | flash_attention_2
    packed: bool

    @property
    def name(self) -> str:
        return f"{self.finetune:<4} {self.attn:<17} {'packed' if self.packed else 'padded'}"


def attention_backends(device: torch.device) -> list[str]:
    """SDPA, plus flash-attention-2 where it can run (a CUDA device and `flash_attn`)."""
    backends = ["sdpa"]
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            print("  flash_attn not importable: flash-attention-2 cases left out")
        else:
            backends.append("flash_attention_2")
    return backends


def llava_config(*, smoke: bool, text_layers: int | None = None) -> Any:
    """The published LLaVA-1.5-7B config (shrunk for --smoke; text depth cut if asked)."""
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(PUBLISHED)
    if smoke:  # widths only; image size, patch size, 576 image tokens and vocab stay real
        config.text_config.update({"hidden_size": 64, "intermediate_size": 128,
                                   "num_attention_heads": 4, "num_key_value_heads": 4,
                                   "num_hidden_layers": 2})
        config.vision_config.update({"hidden_size": 32, "intermediate_size": 64,
                                     "num_attention_heads": 2, "num_hidden_layers": 2,
                                     "projection_dim": 32})
    if text_layers is not None:
        config.text_config.num_hidden_layers = min(text_layers,
                                                   config.text_config.num_hidden_layers)
    return config


def build_model(config: Any, attn: str, device: torch.device) -> Any:
    """Random bf16 weights, made on the device (no CPU copy of 14 GB)."""
    from transformers import LlavaForConditionalGeneration

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        return LlavaForConditionalGeneration._from_config(config, torch_dtype=dtype,
                                                          attn_implementation=attn)


def samples(config: Any, batch: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    """`batch` pretokenized LLaVA-665k-like samples in the shard-row layout the collators read."""
    from tests.bench.bench_packing import llava665k_like_lengths

    rng = np.random.default_rng(seed)
    lengths, _ = llava665k_like_lengths(batch, seed=seed)
    size = config.vision_config.image_size
    image_tokens = (size // config.vision_config.patch_size) ** 2
    rows = []
    for k, length in enumerate(np.minimum(lengths, seq_len).tolist()):
        ids = rng.integers(3, 32000, length)
        ids[0], ids[1:1 + image_tokens] = 1, config.image_token_index
        labels = ids.copy()
        labels[:1 + image_tokens + 40] = -100  # image and prompt: no loss
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "num_images": 1,
                     "id": f"s{k}", "image_features": {
                         "pixel_values": torch.randn(1, 3, size, size)}})
    return rows


def time_steps(step: Callable[[], None], device: torch.device, steps: int) -> tuple[float, int]:
    """(median seconds per step after 2 warm-up steps, peak bytes allocated)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for k in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak


def train_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time one training step configuration."""
    from mmjobs.config import load_config
    from mmjobs.data.loader import PaddedCollator
    from mmjobs.data.packing import PackedCollator
    from mmjobs.models.builder import trainable_parameter_summary
    from mmjobs.train.batches import loss_sum, model_inputs
    from mmjobs.train.methods import TrainConfig
    from mmjobs.train.metrics import device_peak_flops, flops_model
    from mmjobs.train.model_setup import prepare_for_training, upcast_trainable

    layers = args.full_layers if case.finetune == "full" else None
    config = llava_config(smoke=args.smoke, text_layers=layers)
    model = build_model(config, case.attn, device)
    cfg = load_config(TrainConfig, {
        "mode": "sft", "finetune": case.finetune, "lr": 2e-4, "gradient_checkpointing": True,
        "per_device_batch_size": args.batch, "batching": "packed" if case.packed else "random",
        **({"lora": LORA} if case.finetune == "lora" else {})})
    model = prepare_for_training(model, cfg)
    upcast_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=device.type == "cuda")
    rows = samples(config, args.batch, args.seq_len, seed=0)
    batch = (PackedCollator() if case.packed else PaddedCollator(config.pad_token_id))(rows)
    inputs = model_inputs(batch, device=device, float_dtype=torch.bfloat16
                          if device.type == "cuda" else torch.float32,
                          flash_attention=case.attn == "flash_attention_2")
    labels = batch["labels"].to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**inputs).logits
        total, count = loss_sum(logits, labels)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = time_steps(step, device, args.steps)
    lengths = [len(r["input_ids"]) for r in rows]
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    flops = flops_model(model, trainable_parameter_summary(model), image_tokens)
    peak_flops = device_peak_flops(device)
    result = {"case": case.name, "step_s": seconds, "tokens_per_s": sum(lengths) / seconds,
              "peak_gib": peak / 2**30, "layers": config.text_config.num_hidden_layers,
              "mfu": (flops.step_flops(lengths, len(rows)) / seconds / peak_flops
                      if peak_flops else None)}
    return result


def generate_case(attn: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Greedy generation throughput: new tokens per second over a batch of image prompts."""
    config = llava_config(smoke=args.smoke)
    model = build_model(config, attn, device).eval()
    rows = samples(config, args.gen_batch, 576 + 41, seed=1)
    prompts = [r["input_ids"][:1 + 576 + 40] for r in rows]  # same length: no padding
    input_ids = torch.tensor(prompts, device=device)
    pixels = torch.cat([r["image_features"]["pixel_values"] for r in rows]).to(
        device, model.dtype)

    def step() -> None:
        with torch.no_grad():
            model.generate(input_ids=input_ids, pixel_values=pixels, do_sample=False,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    seconds, peak = time_steps(step, device, max(1, args.steps // 2))
    result = {"case": f"generate {attn:<17} batch {args.gen_batch}", "step_s": seconds,
              "tokens_per_s": args.gen_batch * args.new_tokens / seconds,
              "peak_gib": peak / 2**30, "layers": config.text_config.num_hidden_layers,
              "mfu": None}
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="samples per step (recipe: 16)")
    parser.add_argument("--seq-len", type=int, default=2048, help="max_length (recipe: 2048)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--full-layers", type=int, default=8,
                        help="LM layers kept for full fine-tuning (one GPU holds ~16 B/param)")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--only", default="lora,full,generate",
                        help="comma list of lora, full, generate")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, shrunken widths, 1 step: checks the script runs")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA GPU here (run it on a GPU node; --smoke checks the "
              "script on the CPU)")
        return []
    if args.smoke:
        args.batch, args.steps, args.gen_batch, args.new_tokens = 2, 1, 2, 4
    device = torch.device("cuda" if not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"bench_gpu: {name}, LLaVA-1.5-7B config{' (shrunk)' if args.smoke else ''}, "
          f"batch {args.batch}, seq_len {args.seq_len}, torch {torch.__version__}")
    wanted = set(args.only.split(","))
    runs: list[Callable[[], dict[str, Any]]] = []
    for attn in attention_backends(device):
        runs += [lambda c=Case(finetune, attn, packed): train_case(c, args, device)
                 for finetune in ("lora", "full") if finetune in wanted
                 for packed in (False, True)]
        if "generate" in wanted:
            runs.append(lambda a=attn: generate_case(a, args, device))
    results = []
    for run in runs:
        results.append(run())  # the case's model is garbage once it returns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"  {'case':<40} {'layers':>6} {'step s':>8} {'tokens/s':>10} {'peak GiB':>9} "
          f"{'MFU':>6}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"  {r['case']:<40} {r['layers']:>6} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>10,.0f} {r['peak_gib']:>9.1f} {mfu:>6}")
    return results


if __name__ == "__main__":
    main()
