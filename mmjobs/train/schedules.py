"""Learning-rate schedules by name, including the LaVIN study's (cyclical, step, exponential).

Every schedule is an ordinary `torch.optim.lr_scheduler.LRScheduler` stepped once per optimizer
step, so it checkpoints with `state_dict()` / `load_state_dict()` like any torch scheduler.
"The LR at step t" below means the LR the optimizer uses for its (0-based) step t, i.e. after
t calls to `scheduler.step()`.

Defaults follow the LaVIN schedule study (HyejunShin/LaVIN `util/lr_sched.py`, 20 epochs with
2 warmup epochs), translated from epochs to fractions of the run:
- cosine: linear warmup from 0, then half-cosine to `min_lr_ratio * lr` (LaVIN: min_lr 0).
- cyclic_triangular2: no warmup, 5 half-cycles over the run (`step_size_up = steps // 5`),
  between `base_lr` (LaVIN: min_lr 0) and the optimizer's lr; the amplitude halves each cycle.
- step: warmup, then `lr * 0.65 ** ((t - warmup) // step_size)`, step_size = 10% of the steps
  (LaVIN: 2 of 20 epochs).
- exponential: warmup, then `lr * gamma ** (t - warmup)` with gamma chosen so the LR reaches
  `min_lr` (LaVIN: 1e-5) at the end of the run, unless `gamma` is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, LRScheduler

from mmjobs.logs import get_logger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = get_logger(__name__)

# Same names as `TrainConfig.lr_schedule`.
LR_SCHEDULES = (
    "cosine", "linear", "constant", "cyclic_triangular", "cyclic_triangular2",
    "step", "exponential",
)  # fmt: skip

# Schedule-specific keyword arguments each name accepts (anything else is a config error).
_SCHEDULE_KWARGS: dict[str, frozenset[str]] = {
    "cosine": frozenset({"min_lr_ratio"}),
    "linear": frozenset(),
    "constant": frozenset(),
    "cyclic_triangular": frozenset({"base_lr", "max_lr", "step_size_up", "step_size_down",
                                    "cycle_momentum"}),
    "cyclic_triangular2": frozenset({"base_lr", "max_lr", "step_size_up", "step_size_down",
                                     "cycle_momentum"}),
    "step": frozenset({"gamma", "step_size"}),
    "exponential": frozenset({"gamma", "min_lr"}),
}

LAVIN_STEP_GAMMA = 0.65
LAVIN_STEP_FRACTION = 0.1  # 2 of 20 epochs
LAVIN_EXP_MIN_LR = 1e-5
LAVIN_CYCLIC_HALF_CYCLES = 5


def resolve_warmup_steps(
    num_training_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None
) -> int:
    """Warmup length in steps from either an absolute count or a fraction of the run.

    The ratio is rounded up, as transformers' `TrainingArguments.get_warmup_steps` does, so a
    recipe gives the same warmup here and under the HF Trainer.

    Raises:
        ValueError: both or an out-of-range value are given.
    """
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError(
            f"got warmup_steps={warmup_steps} and warmup_ratio={warmup_ratio}; give only one"
        )
    if warmup_ratio is not None:
        if not 0 <= warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio: got {warmup_ratio}; use a fraction in [0, 1]")
        warmup_steps = math.ceil(num_training_steps * warmup_ratio)
    warmup_steps = warmup_steps or 0
    if not 0 <= warmup_steps <= num_training_steps:
        raise ValueError(
            f"warmup_steps: got {warmup_steps}; use 0..num_training_steps ({num_training_steps})"
        )
    return warmup_steps


def build_lr_scheduler(
    optimizer: Optimizer,
    name: str,
    *,
    num_training_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    **kwargs: Any,
) -> LRScheduler:
    """Build the LR schedule `name` on `optimizer`, peaking at each param group's current lr.

    Args:
        optimizer: optimizer whose param-group lrs are the peak LRs. Build the scheduler before
            loading an optimizer checkpoint (the usual order) so the peak is the configured lr.
        name: one of `LR_SCHEDULES`.
        num_training_steps: total optimizer steps in the run.
        warmup_steps / warmup_ratio: linear warmup from 0 (at most one of them; default none).
            Ignored, with a warning, by the cyclic schedules, whose first ramp is the warmup.
        **kwargs: schedule-specific options (see the module docstring):
            cosine: min_lr_ratio=0.0.
            cyclic_*: base_lr=0.0, max_lr=<optimizer lr>, step_size_up=steps // 5,
                step_size_down=step_size_up, cycle_momentum=False.
            step: gamma=0.65, step_size=steps // 10.
            exponential: gamma=None (derived from min_lr), min_lr=1e-5.

    Returns:
        a torch LR scheduler; call `.step()` after every `optimizer.step()`.

    Raises:
        ValueError: unknown name, unknown option for this name, or out-of-range values.
    """
    if name not in _SCHEDULE_KWARGS:
        raise ValueError(f"lr_schedule: got {name!r}; use one of {', '.join(LR_SCHEDULES)}")
    unknown = sorted(set(kwargs) - _SCHEDULE_KWARGS[name])
    if unknown:
        allowed = ", ".join(sorted(_SCHEDULE_KWARGS[name])) or "none"
        raise ValueError(f"lr_schedule {name!r} does not take {unknown}; its options: {allowed}")
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps: got {num_training_steps}; must be > 0")
    warmup = resolve_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)

    # Library schedules where one exists: identical to what the HF Trainer would use.
    if name == "cosine":
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, num_training_steps, min_lr_rate=kwargs.get("min_lr_ratio", 0.0)
        )
    if name == "linear":
        from transformers.optimization import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps)
    if name == "constant":
        from transformers.optimization import get_constant_schedule_with_warmup

        return get_constant_schedule_with_warmup(optimizer, warmup)
    if name.startswith("cyclic_"):
        mode = name.removeprefix("cyclic_")
        return _cyclic(optimizer, mode, num_training_steps, warmup, **kwargs)

    # step / exponential: torch's StepLR / ExponentialLR decay from step 0, and chaining them
    # after a warmup with SequentialLR needs LinearLR, which cannot start at 0
    # (start_factor > 0) as LaVIN's warmup does. One closed-form LambdaLR is exact, resumes
    # from `last_epoch` alone, and reads like LaVIN's lr_sched formulas.
    if name == "step":
        gamma = kwargs.get("gamma", LAVIN_STEP_GAMMA)
        step_size = kwargs.get("step_size") or max(1, int(num_training_steps * LAVIN_STEP_FRACTION))
        if step_size <= 0 or gamma <= 0:
            raise ValueError(f"step: got step_size={step_size}, gamma={gamma}; both must be > 0")
        fn = partial(_step_factor, warmup=warmup, step_size=step_size, gamma=gamma)
        return LambdaLR(optimizer, fn)
    fns = _exponential_factors(optimizer, num_training_steps, warmup, **kwargs)
    return LambdaLR(optimizer, fns)


def schedule_factor(name: str, *, num_training_steps: int,
                    warmup_ratio: float | None = None) -> Callable[[int], float]:
    """The lr factor per step (0-based) of a schedule that scales every param group alike
    (constant, cosine, linear): e.g. a second group's own schedule in a `LambdaLR` with one
    factor function per group (PPO's critic next to its actor).

    Raises:
        ValueError: `name` is a schedule whose factor depends on the group (cyclic_*,
            exponential with a derived gamma) or has options; or a bad warmup.
    """
    if name not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr schedule {name!r} cannot be a param group's own schedule; use "
                         "constant, cosine or linear")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_lr_scheduler(probe, name, num_training_steps=num_training_steps,
                                   warmup_ratio=warmup_ratio)
    assert isinstance(scheduler, LambdaLR)  # transformers' schedules are LambdaLRs
    return scheduler.lr_lambdas[0]


def _warmup_factor(step: int, warmup: int) -> float:
    return step / warmup  # LaVIN/MAE: starts at 0, reaches the peak at step == warmup


def _step_factor(step: int, *, warmup: int, step_size: int, gamma: float) -> float:
    if step < warmup:
        return _warmup_factor(step, warmup)
    return gamma ** ((step - warmup) // step_size)


def _exp_factor(step: int, *, warmup: int, gamma: float) -> float:
    if step < warmup:
        return _warmup_factor(step, warmup)
    return gamma ** (step - warmup)


def _exponential_factors(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup: int,
    gamma: float | None = None,
    min_lr: float = LAVIN_EXP_MIN_LR,
) -> list[Callable[[int], float]]:
    """One factor function per param group (a derived gamma depends on the group's peak lr)."""
    if gamma is not None:
        if not 0 < gamma <= 1:
            raise ValueError(f"exponential: got gamma={gamma}; use 0 < gamma <= 1")
        return [partial(_exp_factor, warmup=warmup, gamma=gamma) for _ in optimizer.param_groups]
    decay_steps = max(1, num_training_steps - warmup)
    fns: list[Callable[[int], float]] = []
    for i, group in enumerate(optimizer.param_groups):
        peak = float(group["lr"])
        if not 0 < min_lr < peak:
            raise ValueError(
                f"exponential: min_lr={min_lr} must be below param group {i}'s lr ({peak}); "
                "lower min_lr or pass gamma"
            )
        derived = (min_lr / peak) ** (1.0 / decay_steps)  # reaches min_lr at the last step
        fns.append(partial(_exp_factor, warmup=warmup, gamma=derived))
    return fns


def _cyclic(
    optimizer: Optimizer,
    mode: str,
    num_training_steps: int,
    warmup: int,
    base_lr: float = 0.0,
    max_lr: float | list[float] | None = None,
    step_size_up: int | None = None,
    step_size_down: int | None = None,
    cycle_momentum: bool = False,
) -> CyclicLR:
    if warmup:
        log.warning("cyclic_%s starts at base_lr and ramps up by itself (as in LaVIN); "
                    "ignoring warmup of %d steps", mode, warmup)
    # CyclicLR defaults to cycling momentum, which on AdamW would silently cycle beta1 too;
    # LaVIN cycles only the LR, so momentum cycling is opt-in and checked here.
    if cycle_momentum and not {"momentum", "betas"} & set(optimizer.defaults):
        raise ValueError(
            f"cycle_momentum=True needs an optimizer with momentum or betas; "
            f"{type(optimizer).__name__} has neither. Set cycle_momentum: false"
        )
    if max_lr is None:
        max_lr = [float(g["lr"]) for g in optimizer.param_groups]
    step_size_up = step_size_up or max(1, num_training_steps // LAVIN_CYCLIC_HALF_CYCLES)
    return CyclicLR(
        optimizer,
        base_lr=base_lr,
        max_lr=max_lr,
        step_size_up=step_size_up,
        step_size_down=step_size_down,
        mode=mode,
        cycle_momentum=cycle_momentum,
    )


def lr_at_steps(
    name: str, steps: Iterable[int], *, lr: float = 1.0, num_training_steps: int, **kwargs: Any
) -> list[float]:
    """The LR schedule `name` would use at each of `steps` (0-based), for a peak of `lr`.

    Runs the real scheduler on a one-parameter optimizer, so it shows exactly what training
    gets. `kwargs` are passed to `build_lr_scheduler` (warmup_steps, warmup_ratio, options).
    """
    steps = list(steps)
    if any(s < 0 for s in steps):
        raise ValueError(f"steps must be >= 0, got {steps}")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_lr_scheduler(
        optimizer, name, num_training_steps=num_training_steps, **kwargs
    )
    lrs: list[float] = []
    for _ in range(max(steps, default=-1) + 1):
        lrs.append(float(scheduler.get_last_lr()[0]))
        optimizer.step()  # no grads: a no-op that keeps torch's step-order check quiet
        scheduler.step()
    return [lrs[s] for s in steps]


def plot_lr_curve(
    name: str, num_steps: int, *, lr: float = 1.0, title: str | None = None, **kwargs: Any
) -> Figure:
    """A figure of the LR over a run of `num_steps` steps (for `mlflow.log_figure`).

    Uses `matplotlib.figure.Figure` directly (no pyplot) so it needs no display and leaves no
    global figure state behind in a long-running stage.
    """
    from matplotlib.figure import Figure

    values = lr_at_steps(name, range(num_steps), lr=lr, num_training_steps=num_steps, **kwargs)
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(num_steps), values)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title or f"lr schedule: {name}")
    ax.grid(alpha=0.3)
    return fig
