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
from dataclasses import dataclass, field
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
                 peak_flops: float | None, device: Any, steps: int = 1) -> dict[str, float]:
    """Per-rank throughput metrics of `steps` optimizer steps (a logging window).

    Args:
        seconds: wall time of the steps (all micro-batches, optimizer included).
        tokens, samples: real tokens and samples this rank processed in them.
        flops: model FLOPs this rank computed in them (`FlopsModel.step_flops` summed).
        peak_flops: the device's peak FLOP/s, or None.
        steps: how many optimizer steps the totals cover (`step_time_s` is per step).
    """
    seconds = max(seconds, 1e-9)
    out = {
        "step_time_s": seconds / max(steps, 1),
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
    }
    if peak_flops:
        out["mfu"] = flops / seconds / peak_flops
    return out


@dataclass
class LogWindow:
    """The optimizer steps since the last logged one (`train.log_every_steps` of them).

    Logging every Nth step's own loss would show one noisy sample out of N; like
    transformers' Trainer, a log line reports the window: the mean of its steps' losses and
    objective stats, and its throughput (totals over its wall time). `take()` returns the
    `log_step` arguments and starts the next window.
    """

    steps: int = 0
    loss: float = 0.0
    seconds: float = 0.0
    tokens: float = 0.0
    samples: float = 0.0
    flops: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, *, loss: float, seconds: float, tokens: float, samples: float, flops: float,
            extra: dict[str, float] | None = None) -> None:
        """Add one optimizer step (`tokens`/`samples` over all ranks, `flops` this rank's)."""
        self.steps += 1
        self.loss += loss
        self.seconds, self.tokens = self.seconds + seconds, self.tokens + tokens
        self.samples, self.flops = self.samples + samples, self.flops + flops
        for key, value in (extra or {}).items():
            self.extra[key] = self.extra.get(key, 0.0) + value

    def take(self) -> dict[str, Any]:
        """The window as `log_step` keyword arguments (means and totals); then reset."""
        n = max(self.steps, 1)
        out = {"loss": self.loss / n, "seconds": self.seconds, "tokens": self.tokens,
               "samples": self.samples, "flops": self.flops, "steps": n,
               "extra": {k: v / n for k, v in self.extra.items()}}
        self.__init__()  # type: ignore[misc]
        return out


def patches_per_image(card: dict[str, Any]) -> int:
    """Image tokens per image, from a pretokenized card (`tokens.image / images`)."""
    images = int(card.get("images") or 0)
    return int(card.get("tokens", {}).get("image", 0)) // images if images else 0


def log_step(run: Any, step: int, total: int, *, loss: float | None, lr: float,
             grad_norm: Any, seconds: float, tokens: float, samples: float, flops: float,
             peak_flops: float | None, device: Any, extra: dict[str, float] | None = None,
             steps: int = 1) -> dict[str, float]:
    """Log the metrics of the `steps` optimizer steps ending at `step` (a `LogWindow`) to the
    tracking run and as one log line, at `step`.

    `loss` and `extra` (the objective's own metrics: DPO rewards, margins, ...) are means over
    the steps; `seconds`, `tokens`/`samples` (over all ranks) and `flops` (this rank's model
    FLOPs) are their totals; `lr` and `grad_norm` are those of `step`.
    """
    metrics = {"loss": float("nan") if loss is None else loss, "lr": lr,
               **step_metrics(seconds=seconds, tokens=int(tokens), samples=int(samples),
                              flops=flops, peak_flops=peak_flops, device=device, steps=steps)}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics.update(extra or {})
    run.log_metrics(metrics, step=step)
    log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g %.0f tok/s %.0f ms%s%s", step, total,
             metrics["loss"], lr, metrics.get("grad_norm", math.nan), metrics["tokens_per_s"],
             metrics["step_time_s"] * 1000,
             f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "",
             "".join(f" {k} {v:.4g}" for k, v in (extra or {}).items()))
    return metrics
