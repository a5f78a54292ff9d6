"""Pipeline `lavin-sweep`: LaVIN's schedule study on ScienceQA, one fine-tune per setting.

convert-lavin (the recipe's `conversions.lavin`, stage convert, kind lavin: Meta's LLaMA +
CLIP ViT-L/14 → the LaVIN directory model.name_or_path names, MMA adapters initialised) ·
prepare (ScienceQA train split, QCM-ALE prompts) and prepare-test (test split) → pretokenize →
for each setting of the recipe's `sweep` (cosine baseline, cyclical, step and exponential LR
decay, increasing / decreasing adapter dropout and their V2), in a `dsl.ParallelFor`: sft (the
recipe's train.finetune: mma, LaVIN's adapters) → merge (the standalone LaVIN: base + that
setting's adapters) → infer → evaluate (ScienceQA accuracy per category) → [deploy: with
`stages.deploy.enabled: true`, on a cluster, each setting's LaVIN behind its own `mmjobs
serve`] · report (the NAT…Average comparison table and graphs).
"""

from __future__ import annotations

import json

from kfp import dsl

from mmjobs.logs import get_logger
from pipelines.builder import Build
from pipelines.chart_demo import deploy_defaults

NAME = "lavin-sweep"
STEPS = ("sft", "merge", "infer", "evaluate")
log = get_logger(__name__)


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()  # one LaVIN for every setting (the recipe's conversions.lavin)
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
    steps = list(STEPS)
    deploys = _deploy_configs(b, names)
    if deploys:
        configs["deploy"] = deploys
        steps.append("deploy")
    items = [{step: json.dumps(configs[step][name]) for step in steps} for name in names]
    each = {step: [configs[step][name] for name in names] for step in steps}

    with dsl.ParallelFor(items) as item:
        sft = b.step("sft", "train", config=item.sft, each=each["sft"], data=shards.output,
                     model=base)
        merged = b.step("merge", "merge", config=item.merge, each=each["merge"], base=base,
                        adapter=sft.output)
        predictions = b.step("infer", "infer", config=item.infer, each=each["infer"],
                             model=merged.output, dataset=test_set.output)
        evaluation = b.step("evaluate", "evaluate", config=item.evaluate,
                            each=each["evaluate"], predictions=predictions.output)
        if deploys:  # each setting's LaVIN behind its own `mmjobs serve` (cluster runs only)
            server = b.step("deploy", "deploy", config=item.deploy, each=each["deploy"],
                            model=merged.output)
            server.after(evaluation)
            server.set_caching_options(False)
    b.report([evaluation], title="LaVIN on ScienceQA: schedule sweep")


def _deploy_configs(b: Build, names: list[str]) -> dict[str, dict] | None:
    """With `stages.deploy.enabled: true`, on a cluster: per setting, a deploy step serving
    that setting's merged LaVIN as `<name>-<setting>` (name: stages.deploy.name, default
    mmjobs-serve-<experiment>), its served model named after the setting. Local runs skip it
    (chart_demo.deploy says how to serve a model locally instead)."""
    if "deploy" not in b.recipe.stages:
        return None
    section = b.recipe.stages["deploy"]
    prefix = section.get("name") or f"mmjobs-serve-{b.recipe.experiment}"
    defaults = deploy_defaults(b.recipe)
    configs = {name: b.config(f"deploy-{name}", "deploy", key="deploy", defaults=defaults,
                              section={**section, "name": f"{prefix}-{name}"},
                              fixed={"serve": {"served_model_name": name}},
                              wired=("model",))
               for name in names}
    if not section.get("enabled"):
        return None
    if not b.for_cluster:
        if b.parent_run_id is not None:
            log.warning("deploy steps skipped: they start servers on a cluster (mmjobs "
                        "compile / submit); here, serve a setting with `mmjobs serve "
                        "<run>/merge-<setting>`")
        return None
    return configs


def _per_setting(b: Build, key: str, stage: str, wired: tuple[str, ...], *,
                 label: bool = False) -> dict[str, dict]:
    """The step's config for every sweep setting (own output folder, label = setting)."""
    names = list(b.recipe.sweep) or [""]
    return {name: b.config(f"{key}-{name}" if name else key, stage, key=key, wired=wired,
                           fixed={"label": name or "baseline"} if label else None)
            for name in names}
