"""LR schedules: hand-computed values at chosen steps, and resume from a checkpoint."""

from __future__ import annotations

import io

import pytest
import torch
from matplotlib.figure import Figure
from torch.optim.lr_scheduler import LRScheduler

from mmjobs.train.schedules import (
    LR_SCHEDULES,
    build_lr_scheduler,
    lr_at_steps,
    plot_lr_curve,
    resolve_warmup_steps,
)

# Peak lr 1.0, so every expected value is the schedule's factor.
T = 100


def lrs(name: str, steps: list[int], **kwargs) -> list[float]:
    return lr_at_steps(name, steps, num_training_steps=kwargs.pop("num_training_steps", T),
                       **kwargs)


def test_cosine_warmup_midpoint_peak_and_half() -> None:
    # warmup 10: midpoint 5 → 0.5; step 10 → peak; cosine midpoint 10 + 90/2 = 55 → 0.5.
    got = lrs("cosine", [0, 5, 10, 55, 100], warmup_steps=10)
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)


def test_cosine_min_lr_ratio_and_warmup_ratio() -> None:
    got = lrs("cosine", [10, 55, 100], warmup_ratio=0.1, min_lr_ratio=0.1)
    assert got == pytest.approx([1.0, 0.55, 0.1], abs=1e-12)


def test_linear_and_constant() -> None:
    assert lrs("linear", [5, 10, 55, 100], warmup_steps=10) == pytest.approx(
        [0.5, 1.0, 0.5, 0.0], abs=1e-12
    )
    assert lrs("constant", [0, 5, 10, 99], warmup_steps=10) == pytest.approx(
        [0.0, 0.5, 1.0, 1.0], abs=1e-12
    )
    assert lrs("constant", [0, 99]) == [1.0, 1.0]


def test_cyclic_triangular_peaks_every_cycle() -> None:
    got = lrs("cyclic_triangular", [0, 5, 10, 15, 20, 30], step_size_up=10)
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 1.0], abs=1e-12)


def test_cyclic_triangular2_halves_each_cycle() -> None:
    got = lrs("cyclic_triangular2", [10, 20, 30, 50], step_size_up=10)
    assert got == pytest.approx([1.0, 0.0, 0.5, 0.25], abs=1e-12)
    # base_lr is the floor; the amplitude above it halves.
    got = lrs("cyclic_triangular2", [0, 10, 30], step_size_up=10, base_lr=0.1)
    assert got == pytest.approx([0.1, 1.0, 0.55], abs=1e-12)


def test_cyclic_default_is_lavin_five_half_cycles_and_ignores_warmup() -> None:
    got = lrs("cyclic_triangular2", [0, 20, 40, 60], warmup_steps=10)
    assert got == pytest.approx([0.0, 1.0, 0.0, 0.5], abs=1e-12)


def test_cyclic_keeps_adamw_betas_and_rejects_momentum_cycling_without_momentum() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    adamw = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.95))
    sched = build_lr_scheduler(adamw, "cyclic_triangular", num_training_steps=T)
    for _ in range(7):
        adamw.step()
        sched.step()
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    adagrad = torch.optim.Adagrad([param], lr=1e-3)
    with pytest.raises(ValueError, match="cycle_momentum"):
        build_lr_scheduler(adagrad, "cyclic_triangular", num_training_steps=T,
                           cycle_momentum=True)


def test_step_decay_boundaries() -> None:
    got = lrs("step", [5, 10, 29, 30, 49, 50], warmup_steps=10, gamma=0.5, step_size=20)
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, 0.25], abs=1e-12)
    # LaVIN defaults: gamma 0.65 every 10% of the run.
    assert lrs("step", [19, 20], warmup_steps=10) == pytest.approx([1.0, 0.65], abs=1e-12)


def test_exponential_after_k_steps() -> None:
    got = lrs("exponential", [5, 10, 13], warmup_steps=10, gamma=0.9)
    assert got == pytest.approx([0.5, 1.0, 0.9**3], abs=1e-12)


def test_exponential_default_reaches_lavin_min_lr_at_end() -> None:
    # lr 1e-3 → 1e-5 over 100 decay steps: halfway (in log space) is 1e-4.
    got = lr_at_steps("exponential", [10, 60, 110], lr=1e-3, num_training_steps=110,
                      warmup_steps=10)
    assert got == pytest.approx([1e-3, 1e-4, 1e-5], rel=1e-9)


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_resume_gives_identical_lrs(name: str) -> None:
    def setup() -> tuple[torch.nn.Linear, torch.optim.Optimizer, LRScheduler]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        # Two groups with different peaks: per-group state must survive too.
        opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1e-3},
                                 {"params": [model.bias], "lr": 5e-4}])
        kwargs = {"step_size_up": 4} if name.startswith("cyclic") else {"warmup_steps": 3}
        return model, opt, build_lr_scheduler(opt, name, num_training_steps=20, **kwargs)

    def train_step(model, opt, sched) -> list[float]:
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        return sched.get_last_lr()

    model, opt, sched = setup()
    for _ in range(7):
        train_step(model, opt, sched)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buffer)
    expected = [train_step(model, opt, sched) for _ in range(10)]

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # checkpoints must not need pickle
    model2, opt2, sched2 = setup()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert [train_step(model2, opt2, sched2) for _ in range(10)] == expected


def test_bad_arguments_are_rejected_with_the_fix() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="use one of"):
        build_lr_scheduler(opt, "warp", num_training_steps=T)
    with pytest.raises(ValueError, match="does not take"):
        build_lr_scheduler(opt, "cosine", num_training_steps=T, gamma=0.5)
    with pytest.raises(ValueError, match="give only one"):
        resolve_warmup_steps(T, warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="min_lr"):
        build_lr_scheduler(opt, "exponential", num_training_steps=T, min_lr=1.0)


def test_warmup_ratio_rounds_up_like_hf_trainer() -> None:
    assert resolve_warmup_steps(50, warmup_ratio=0.03) == 2
    assert resolve_warmup_steps(T) == 0


def test_plot_lr_curve_has_one_point_per_step() -> None:
    fig = plot_lr_curve("cosine", 40, lr=2e-4, warmup_ratio=0.1)
    assert isinstance(fig, Figure)
    (line,) = fig.axes[0].get_lines()
    assert len(line.get_xdata()) == 40
    assert max(line.get_ydata()) == pytest.approx(2e-4)


def test_a_group_schedule_factor_is_the_schedules_own() -> None:
    from mmjobs.train.schedules import schedule_factor

    for name in ("constant", "cosine", "linear"):
        factor = schedule_factor(name, num_training_steps=T, warmup_ratio=0.03)
        assert [factor(s) for s in (0, 2, 3, 50, 99)] == pytest.approx(
            lrs(name, [0, 2, 3, 50, 99], warmup_ratio=0.03))
    with pytest.raises(ValueError, match="cannot be a param group's own schedule"):
        schedule_factor("cyclic_triangular", num_training_steps=T)
