"""Process-group plumbing for training: the Accelerator, DeepSpeed configs, small collectives.

`accelerate.Accelerator` covers the launch modes we need with one code path: a single process
(CPU or one GPU), DDP under `torchrun --nproc_per_node N` (NCCL on GPUs, gloo on CPU), and
DeepSpeed ZeRO-2/3 (`TrainConfig.deepspeed`, configs in `deepspeed_configs/*.json`, whose
`"auto"` values are filled here from the train config). Multi-node jobs are torchrun inside a
Kubeflow TrainJob; nothing here depends on how the processes were started.

Mixed precision `auto` means bf16 autocast on a GPU that supports bf16 and fp32 elsewhere
(CPU training in bf16 is slow and not what the tests compare).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from mmjobs.logs import get_logger

log = get_logger(__name__)

DEEPSPEED_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json",
                     "zero3_offload": "zero3_offload.json"}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank and world size from the torchrun environment (before any process group exists)."""
    return DistInfo(rank=int(os.environ.get("RANK", "0")),
                    world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_mixed_precision(setting: str) -> str:
    """`auto` → `bf16` on a bf16-capable GPU, else `no`; `bf16` without such a GPU is an error.

    Returns:
        an `accelerate` mixed_precision value: `no` or `bf16`.
    """
    has_bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "auto":
        return "bf16" if has_bf16_gpu else "no"
    if setting == "bf16" and not has_bf16_gpu:
        raise ValueError("train.mixed_precision=bf16 needs a GPU with bf16 support (Ampere or "
                         "newer); use mixed_precision: auto or no")
    return setting


def deepspeed_config(kind: str, *, micro_batch_size: int, grad_accum: int, world_size: int,
                     max_grad_norm: float, bf16: bool, hidden_size: int | None) -> dict[str, Any]:
    """The packaged DeepSpeed config `kind` with every `"auto"` filled from the train config.

    We fill the values ourselves instead of leaving them to accelerate: accelerate derives the
    batch size from a prepared DataLoader, and our loader is deliberately not prepared (see
    `mmjobs.train.trainer`). The bucket sizes follow the usual hidden_size rules
    (reduce: h², prefetch: 0.9·h², persistence threshold: 10·h).

    Raises:
        ValueError: unknown `kind`, or an `"auto"` left that we do not know how to fill.
    """
    if kind not in DEEPSPEED_CONFIGS:
        raise ValueError(f"train.deepspeed: got {kind!r}; use none or one of "
                         f"{', '.join(DEEPSPEED_CONFIGS)}")
    text = resources.files("mmjobs.train").joinpath(
        "deepspeed_configs", DEEPSPEED_CONFIGS[kind]).read_text()
    config = json.loads(text)
    h = hidden_size or 4096
    fills: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
        "bf16.enabled": bf16,
        "zero_optimization.reduce_bucket_size": h * h,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h),
        "zero_optimization.stage3_param_persistence_threshold": 10 * h,
    }
    for dotted, value in fills.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part, {})
        if node.get(leaf) == "auto":
            node[leaf] = value
    left = [k for k, v in _walk(config) if v == "auto"]
    if left:
        raise ValueError(f"deepspeed config {kind}: cannot fill 'auto' for {left}")
    return config


def _walk(node: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.extend(_walk(value, f"{name}.") if isinstance(value, dict) else [(name, value)])
    return out


DIST_TIMEOUT_ENV = "MMJOBS_DIST_TIMEOUT_S"


def collective_timeout() -> datetime.timedelta | None:
    """How long a collective waits for the other ranks: `$MMJOBS_DIST_TIMEOUT_S` seconds, or
    None for torch's default (30 min with gloo, 10 with NCCL).

    A rank that never joins (it crashed, or the ranks' collectives desynchronised) then fails
    the job after this long instead of holding every GPU for half an hour.

    Raises:
        ValueError: the variable is set but is not a number of seconds > 0.
    """
    raw = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0 (or "
                         "unset for torch's default)")
    return datetime.timedelta(seconds=seconds)


def build_accelerator(*, mixed_precision: str, grad_accum: int, deepspeed: str,
                      micro_batch_size: int, max_grad_norm: float, hidden_size: int | None,
                      find_unused_parameters: bool = False) -> Any:
    """Create the `Accelerator` for this job (call before loading the model; see below).

    With ZeRO-3 the plugin registers transformers' `HfDeepSpeedConfig`, so `from_pretrained`
    then builds the model already sharded (`deepspeed.zero.Init`) instead of materialising it
    whole on every rank. That only works if the Accelerator exists first.

    `find_unused_parameters` is for DDP when a trainable part can sit idle for a whole batch
    (the connector on a text-only batch): without it DDP waits forever for its gradients.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

    precision = resolve_mixed_precision(mixed_precision)
    cpu = not torch.cuda.is_available()
    plugin = None
    if deepspeed != "none":
        if cpu:
            # DeepSpeed picks its accelerator at import; on CPU nodes it must be told.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        world = env_dist_info().world_size
        config = deepspeed_config(deepspeed, micro_batch_size=micro_batch_size,
                                  grad_accum=grad_accum, world_size=world,
                                  max_grad_norm=max_grad_norm, bf16=precision == "bf16",
                                  hidden_size=hidden_size)
        plugin = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(config),
                                 zero3_init_flag=deepspeed.startswith("zero3"))
    handlers: list[Any] = [DistributedDataParallelKwargs(
        find_unused_parameters=find_unused_parameters)]
    timeout = collective_timeout()
    if (plugin is not None and cpu) or timeout is not None:
        # accelerate finds no backend for DeepSpeed without a GPU and would silently run every
        # rank as a separate single process; name gloo so DeepSpeed joins the ranks.
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl",
                                               timeout=timeout))
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                              deepspeed_plugin=plugin, cpu=cpu and plugin is None,
                              kwargs_handlers=handlers)
    log.info("accelerator: %s, %d process(es), device %s, mixed precision %s%s",
             accelerator.distributed_type, accelerator.num_processes, accelerator.device,
             precision, f", deepspeed {deepspeed}" if plugin else "")
    return accelerator


@contextlib.contextmanager
def whole_model_loading(accelerator: Any) -> Iterator[None]:
    """Load models whole inside this block, even under ZeRO-3: a frozen model used outside the
    DeepSpeed engine (an RL reference or reward model) must hold its own weights, and one the
    engine takes over later (PPO's critic) is partitioned when the engine wraps it. Elsewhere
    (no DeepSpeed, ZeRO-2) loading is whole anyway."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # transformers builds models sharded while its global HfDeepSpeedConfig (a weak reference
    # the accelerate plugin registered) says ZeRO-3; unset it for the block, then restore it.
    # (accelerate's zero3_init_context_manager cannot: other holders keep the object alive.)
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def text_hidden_size(spec: Any) -> int | None:
    """The language model's hidden size from a model's config.json (no weights loaded)."""
    from transformers import AutoConfig

    from mmjobs.models import register_native_models
    from mmjobs.models.builder import resolve_model_dir

    register_native_models()
    config = AutoConfig.from_pretrained(resolve_model_dir(spec.name_or_path),
                                        trust_remote_code=spec.trust_remote_code)
    return getattr(config.get_text_config(), "hidden_size", None)


def dist_info(accelerator: Any) -> DistInfo:
    """Rank/world size as the Accelerator sees them."""
    return DistInfo(rank=accelerator.process_index, world_size=accelerator.num_processes,
                    local_rank=accelerator.local_process_index)


def all_reduce_sum(accelerator: Any, values: list[float]) -> list[float]:
    """Sum floats over all ranks (one collective; identity on a single process)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    # float64: token counts and loss sums must add up exactly enough to compare runs.
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in accelerator.reduce(tensor, reduction="sum").tolist()]


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (used for preemption, so all ranks
    stop at the same step instead of some entering a collective the others never join)."""
    if accelerator.num_processes == 1:
        return flag
    return all_reduce_sum(accelerator, [1.0 if flag else 0.0])[0] > 0


def broadcast_from_main(accelerator: Any, value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable objects)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def release_accelerator(accelerator: Any) -> None:
    """Forget accelerate's process-wide state after a single-process run, so another
    training run in the same process (tests, notebooks) may choose other settings. Under
    torchrun the process group lives until the process exits, as torchrun expects."""
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


class NullRun:
    """Tracking handle for ranks other than 0: every call does nothing."""

    run_id: str | None = None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
