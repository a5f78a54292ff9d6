"""Pipeline `lavin-sweep`: LaVIN's schedule study on ScienceQA, one fine-tune per setting.

prepare (ScienceQA train split, QCM-ALE prompts) and prepare-test (test split) → pretokenize
→ for each setting of the recipe's `sweep` (cosine baseline, cyclical, step and exponential
LR decay, increasing / decreasing adapter dropout and their V2), in a `dsl.ParallelFor`: sft
(the recipe's train.finetune: mma, LaVIN's adapters) →
merge → infer → evaluate (ScienceQA accuracy per category) → report (the NAT…Average
comparison table and graphs).
"""

from __future__ import annotations

import json

from kfp import dsl

from pipelines.builder import Build

NAME = "lavin-sweep"
STEPS = ("sft", "merge", "infer", "evaluate")


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    train_set = b.step("prepare", "prepare")
    test_set = b.step("prepare-test", "prepare")
    shards = b.step("pretokenize", "pretokenize", dataset=train_set.output, model=base)
    # One config per step and setting, validated here; the loop hands each iteration its own.
    configs = {
        "sft": b.sweep("sft", "train", fixed={"train": {"mode": "sft"}},  # finetune: recipe
                       wired=("data", "model.name_or_path")),
        "merge": _per_setting(b, "merge", "merge", ("base", "adapter")),
        "infer": _per_setting(b, "infer", "infer", ("model", "dataset")),
        "evaluate": _per_setting(b, "evaluate", "evaluate", ("predictions",), label=True),
    }
    names = list(configs["sft"])
    items = [{step: json.dumps(configs[step][name]) for step in STEPS} for name in names]
    each = {step: [configs[step][name] for name in names] for step in STEPS}

    with dsl.ParallelFor(items) as item:
        sft = b.step("sft", "train", config=item.sft, each=each["sft"], data=shards.output,
                     model=base)
        merged = b.step("merge", "merge", config=item.merge, each=each["merge"], base=base,
                        adapter=sft.output)
        predictions = b.step("infer", "infer", config=item.infer, each=each["infer"],
                             model=merged.output, dataset=test_set.output)
        evaluation = b.step("evaluate", "evaluate", config=item.evaluate,
                            each=each["evaluate"], predictions=predictions.output)
    b.report([evaluation], title="LaVIN on ScienceQA: schedule sweep")


def _per_setting(b: Build, key: str, stage: str, wired: tuple[str, ...], *,
                 label: bool = False) -> dict[str, dict]:
    """The step's config for every sweep setting (own output folder, label = setting)."""
    names = list(b.recipe.sweep) or [""]
    return {name: b.config(f"{key}-{name}" if name else key, stage, key=key, wired=wired,
                           fixed={"label": name or "baseline"} if label else None)
            for name in names}
