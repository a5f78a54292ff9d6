"""Throughput, model FLOPs and MFU for training steps.

**Model FLOPs** (what the step must compute, not what the kernels happen to do; recomputation
under gradient checkpointing is not counted, as in the PaLM MFU definition). A matmul with a
weight of N parameters costs 2·N FLOPs per token forward; the backward pass costs 2·N for the
activation gradients plus 2·N for the weight gradients, the latter only if the weight trains.
So per text token:

    lm      = 2·N_lm                         forward
            + 2·N_lm                         backward to the activations (always: the connector
                                             sits below the LM, and LoRA adapters sit inside it)
            + 2·N_lm_trainable               weight gradients (LoRA: the adapters only)
    attn    = 12·L·d·S                       QKᵀ and AV, forward 4·L·d·S, backward twice that,
                                             for a token in a sample of S tokens (no causal
                                             discount, as PaLM counts it)

and per image (P patches through the vision tower, P tokens through the connector):

    vision  = 2·N_vision·P · (3 if the vision tower trains else 1)
    conn    = 2·N_conn·P · (3 if the connector trains else 2)

N_lm excludes the input embedding table (a lookup, not a matmul). Full fine-tuning of
everything gives the familiar 6·N + attention. MFU = achieved model FLOP/s per device ÷ the
device's dense bf16 peak (`GPU_PEAK_BF16_FLOPS`); there is no peak for CPUs, so no MFU there.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

from mmjobs.logs import get_logger

log = get_logger(__name__)

# Dense (non-sparse) bf16 tensor-core peaks in FLOP/s from the vendors' data sheets, matched
# as substrings of `torch.cuda.get_device_name()` (first match wins, so order matters).
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / NVL
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("V100", 125e12),  # fp16 (no bf16 on Volta)
    ("T4", 65e12),  # fp16
)


def device_peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, or None (CPU, unknown GPU)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


@dataclass(frozen=True)
class FlopsModel:
    """Parameter counts that decide a step's model FLOPs (see the module docstring)."""

    lm_params: int
    lm_trainable: int
    num_layers: int
    hidden_size: int
    vision_params: int = 0
    vision_trains: bool = False
    connector_params: int = 0
    connector_trains: bool = False
    patches_per_image: int = 0

    def per_token(self, sample_length: float) -> float:
        """Training FLOPs of one text token in a sample of `sample_length` tokens."""
        dense = 4 * self.lm_params + 2 * self.lm_trainable
        return dense + 12 * self.num_layers * self.hidden_size * sample_length

    def per_image(self) -> float:
        """Training FLOPs of one image through the vision tower and the connector."""
        p = self.patches_per_image
        vision = 2 * self.vision_params * p * (3 if self.vision_trains else 1)
        conn = 2 * self.connector_params * p * (3 if self.connector_trains else 2)
        return vision + conn

    def step_flops(self, sample_lengths: list[int] | torch.Tensor, num_images: int) -> float:
        """Model FLOPs of one micro-batch on one rank.

        Args:
            sample_lengths: real (unpadded) token count of each sample, shape [N].
            num_images: images in the micro-batch.
        """
        lengths = [int(s) for s in (sample_lengths.tolist() if torch.is_tensor(sample_lengths)
                                    else sample_lengths)]
        dense = (4 * self.lm_params + 2 * self.lm_trainable) * sum(lengths)
        attn = 12 * self.num_layers * self.hidden_size * sum(s * s for s in lengths)
        return float(dense + attn + self.per_image() * num_images)


def flops_model(model: torch.nn.Module, summary: dict[str, dict[str, int]],
                patches_per_image: int) -> FlopsModel:
    """A `FlopsModel` from per-component parameter counts.

    Args:
        model: the (possibly peft-wrapped) model; its config gives layers and hidden size.
        summary: `mmjobs.models.builder.trainable_parameter_summary(model)`:
            `{vision_tower|connector|language_model: {trainable, total}}`.
        patches_per_image: image tokens per image (e.g. 576 for LLaVA-1.5 at 336 px).
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    lm, vision, conn = (summary.get(k, {"trainable": 0, "total": 0})
                        for k in ("language_model", "vision_tower", "connector"))
    return FlopsModel(
        lm_params=max(lm["total"] - _input_embedding_params(model), 0),
        lm_trainable=lm["trainable"],
        num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        vision_params=vision["total"], vision_trains=vision["trainable"] > 0,
        connector_params=conn["total"], connector_trains=conn["trainable"] > 0,
        patches_per_image=patches_per_image)


def _input_embedding_params(model: torch.nn.Module) -> int:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return 0
    # ZeRO-3 replaces parameters with empty placeholders and keeps the real size in ds_numel.
    return sum(int(getattr(p, "ds_numel", 0) or p.numel())
               for p in emb.parameters()) if emb is not None else 0


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory so far: CUDA `max_memory_allocated`, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def step_metrics(*, seconds: float, tokens: int, samples: int, flops: float,
                 peak_flops: float | None, device: Any) -> dict[str, float]:
    """Per-rank throughput metrics of one optimizer step.

    Args:
        seconds: wall time of the step (all micro-batches, optimizer included).
        tokens, samples: real tokens and samples this rank processed in the step.
        flops: model FLOPs this rank computed in the step (`FlopsModel.step_flops` summed).
        peak_flops: the device's peak FLOP/s, or None.
    """
    seconds = max(seconds, 1e-9)
    out = {
        "step_time_s": seconds,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
    }
    if peak_flops:
        out["mfu"] = flops / seconds / peak_flops
    return out


def patches_per_image(card: dict[str, Any]) -> int:
    """Image tokens per image, from a pretokenized card (`tokens.image / images`)."""
    images = int(card.get("images") or 0)
    return int(card.get("tokens", {}).get("image", 0)) // images if images else 0


def log_step(run: Any, step: int, total: int, *, loss: float | None, lr: float,
             grad_norm: Any, seconds: float, tokens: float, samples: float, flops: float,
             peak_flops: float | None, device: Any,
             extra: dict[str, float] | None = None) -> dict[str, float]:
    """Log one optimizer step's metrics to the tracking run and as one log line.

    `tokens`/`samples` are totals over all ranks; `flops` is this rank's model FLOPs;
    `extra` are the objective's own step metrics (DPO rewards, margins, ...).
    """
    metrics = {"loss": float("nan") if loss is None else loss, "lr": lr,
               **step_metrics(seconds=seconds, tokens=int(tokens), samples=int(samples),
                              flops=flops, peak_flops=peak_flops, device=device)}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics.update(extra or {})
    run.log_metrics(metrics, step=step)
    log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g %.0f tok/s %.0f ms%s%s", step, total,
             metrics["loss"], lr, metrics.get("grad_norm", math.nan), metrics["tokens_per_s"],
             seconds * 1000, f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "",
             "".join(f" {k} {v:.4g}" for k, v in (extra or {}).items()))
    return metrics
