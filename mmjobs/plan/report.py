"""`mmjobs plan RECIPE... [--set k=v]`: the real-size dry run, as a table per recipe.

    mmjobs plan pipelines/recipes/llava-dataengine.yaml
    mmjobs plan pipelines/recipes/*.yaml --set cluster.gpu_memory_gib=24

For every train step (align, sft, dpo, rm, ppo, grpo) of the recipe's pipeline: the model's
total and trainable parameters, the memory per GPU (model states + activations) for the step's
ZeRO stage, micro-batch and sequence length, whether that fits the recipe's GPUs, and the
training FLOPs. Nothing runs and nothing is downloaded: models are built on the meta device
from their published configs (see `mmjobs.plan.models`).

Exit status: 0 every step was planned and fits (or is an architecture still to be
implemented), 1 a step does not fit its GPUs, 2 a recipe cannot be planned (invalid recipe, no
config for its model, a LoRA target the model does not have).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmjobs.plan.estimate import StepPlan, plan_step
from mmjobs.plan.hardware import HEADROOM, PLANNING_MFU, GpuMemory, gpu_memory
from mmjobs.plan.memory import GIB
from mmjobs.plan.models import PlanError, ResolveContext, ResolvedModel, resolve_model
from mmjobs.plan.steps import training_steps


@dataclass(frozen=True)
class UnplannedStep:
    """A train step whose model mmjobs cannot build yet."""

    step: str
    mode: str
    reason: str


@dataclass
class RecipePlan:
    """Every train step of one recipe, planned."""

    recipe: str
    source: str
    model: str
    origin: str
    gpu: GpuMemory
    rows: list[StepPlan | UnplannedStep] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """No planned step is over its GPUs' memory."""
        return all(r.fits != "no" for r in self.rows if isinstance(r, StepPlan))


def plan_recipe(path: str, overrides: Sequence[str] = ()) -> RecipePlan:
    """Plan every train step of the recipe at `path`.

    Raises:
        ConfigError: the recipe is invalid.
        PlanError: its model has no config here, or a step cannot be set up (named).
    """
    from mmjobs.config import load_recipe
    from mmjobs.plan.settings import train_settings

    recipe = load_recipe(path, overrides)
    steps = training_steps(recipe, str(path))
    context = ResolveContext(
        imports={str(s.get("to", "")).rstrip("/"): str(s["source"])
                 for s in recipe.imports.values() if s.get("source") and s.get("to")},
        make_model=steps.make_model, trust_remote_code=recipe.model.trust_remote_code)
    name = recipe.model.name_or_path
    hint = recipe.plan.config_from
    resolved = resolve_model(hint or name, context)
    origin = (f"plan.config_from = {hint}: " if hint else "") + (
        resolved.origin if isinstance(resolved, ResolvedModel) else resolved.message())
    gpu = gpu_memory(recipe.cluster)
    plan = RecipePlan(recipe.recipe, str(path), name, origin, gpu)
    for step in steps.train:
        if not isinstance(resolved, ResolvedModel):
            mode = train_settings(step.config["train"]).mode
            plan.rows.append(UnplannedStep(step.name, mode, resolved.message()))
            continue
        plan.rows.append(plan_step(step, resolved, gpu, dtype=recipe.model.dtype,
                                   attn_implementation=recipe.model.attn_implementation))
    return plan


# --------------------------------------------------------------------------- formatting

_COLUMNS = ("step", "mode", "trains", "params", "trainable", "ZeRO", "GPUs", "batch x seq",
            "states", "activations", "total/GPU", "fits", "FLOP/step/GPU")


def format_plan(plan: RecipePlan) -> str:
    """The recipe's table and, per step, the memory split and FLOPs."""
    lines = [f"{plan.recipe} ({plan.source})",
             f"  model: {plan.model} -- {plan.origin}",
             f"  GPU memory: {plan.gpu.gib:g} GiB ({plan.gpu.source}); fits = within "
             f"{HEADROOM:.0%} of it, tight = within 100%"]
    if not plan.rows:
        lines.append("  no train step in this pipeline")
        return "\n".join(lines)
    rows = [_row(r) for r in plan.rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    table = [_COLUMNS, *rows]
    for n, row in enumerate(table):
        cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        lines.append(("  " + "  ".join(cells)).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    for r in plan.rows:
        lines.extend(_details(r))
    return "\n".join(lines)


def _row(r: StepPlan | UnplannedStep) -> tuple[str, ...]:
    if isinstance(r, UnplannedStep):
        return (r.step, r.mode, "not planned (see the model line)",
                *([""] * (len(_COLUMNS) - 3)))
    s = r.settings
    images = f" ({r.image_tokens} img)" if r.image_tokens else ""
    batch = f"{s.sequences_per_micro_batch} x {r.seq_len}{images}"
    if s.grad_accum > 1:
        batch += f", accum {s.grad_accum}"
    gib = r.total_bytes / GIB
    return (r.step, r.mode, r.trains, _count(r.model_params), _count(r.trainable_params),
            s.deepspeed, f"{r.gpus} x {r.gpu.gib:g}G", batch, f"{r.states.total / GIB:.1f}G",
            f"{r.activations.total / GIB:.1f}G" + (" gc" if s.gradient_checkpointing else ""),
            f"{gib:.1f}G ({gib / r.gpu.gib:.0%})", r.fits.upper() if r.fits == "no" else r.fits,
            _flops(r.flops_per_step))


def _details(r: StepPlan | UnplannedStep) -> list[str]:
    if isinstance(r, UnplannedStep):
        return []  # the reason is on the model line
    st, act, g = r.states, r.activations, GIB
    states = (f"weights {st.weights / g:.2f}, gradients {st.gradients / g:.2f}, optimizer "
              f"{st.optimizer / g:.2f}")
    if st.gathered:
        states += f", gathered layer {st.gathered / g:.2f}"
    if st.frozen_copies:
        states += f", frozen copies {st.frozen_copies / g:.2f}"
    checkpointing = "with" if r.settings.gradient_checkpointing else "without"
    acts = (f"layers {act.layers / g:.2f} ({checkpointing} gradient checkpointing), logits "
            f"{act.logits / g:.2f}")
    if act.vision:
        acts += f", vision/connector {act.vision / g:.2f}"
    if act.rollout_cache:
        acts += f"; rollout KV cache {act.rollout_cache / g:.2f} (the larger counts)"
    parts = ", ".join(f"{k.replace('_', ' ')} {v['trainable']:,}/{v['total']:,}"
                      for k, v in r.components.items() if k != "all" and v["total"])
    out = [f"  {r.step}: {r.model_params:,} parameters ({r.total_params:,} with what training "
           f"adds), {r.trainable_params:,} trainable; by part (trainable/total): {parts}",
           f"    model states {st.total / g:.2f} GiB ({states}) + activations "
           f"{act.total / g:.2f} GiB ({acts})",
           f"    FLOPs: {_flops(r.flops_per_token)} per trained token at {r.seq_len} "
           f"tokens; {_flops(r.flops_per_step)} per step and GPU "
           f"({r.samples_per_step} samples); one H100 at {PLANNING_MFU:.0%} MFU takes "
           f"{r.h100_samples_per_s():.2f} samples/s"]
    out.extend(f"    {note}" for note in r.notes)
    return out


def _flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} FLOP"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`mmjobs plan`; see the module docstring for the exit status."""
    from mmjobs.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="mmjobs plan", description="Real-size dry run of a recipe's training steps on the "
        "meta device: parameters, memory per GPU for the recipe's ZeRO stage, batch and "
        "sequence length, whether it fits the recipe's GPUs, FLOPs. Runs nothing, downloads "
        "nothing.")
    parser.add_argument("recipes", nargs="+", metavar="RECIPE")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe field, e.g. "
                        "cluster.gpu_memory_gib=24 or train.per_device_batch_size=4")
    args = parser.parse_args(argv)
    status = 0
    for n, path in enumerate(args.recipes):
        if n:
            print()
        try:
            plan = plan_recipe(path, args.overrides)
        except ConfigError as e:
            print(e, file=sys.stderr)
            status = 2
            continue
        except PlanError as e:
            print(f"{path}: {e}", file=sys.stderr)
            status = 2
            continue
        print(format_plan(plan), flush=True)
        if not plan.fits:
            status = max(status, 1)
    return status
