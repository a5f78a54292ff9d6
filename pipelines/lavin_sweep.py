"""Pipeline `lavin-sweep`: LaVIN's schedule study on ScienceQA, one fine-tune per setting.

convert-lavin (the recipe's `conversions.lavin`, stage convert, kind lavin: Meta's LLaMA +
CLIP ViT-L/14 → the LaVIN directory model.name_or_path names, MMA adapters initialised) ·
prepare (ScienceQA train split, QCM-ALE prompts) and prepare-test (test split) → pretokenize →
for each setting of the recipe's `sweep` (cosine baseline, cyclical, step and exponential LR
decay, increasing / decreasing adapter dropout and their V2), in a `dsl.ParallelFor`: sft (the
recipe's train.finetune: mma, LaVIN's adapters) → merge (the standalone LaVIN: base + that
setting's adapters) → infer → evaluate (ScienceQA accuracy per category) · report (the
NAT…Average comparison table and graphs) · [deploy: with `stages.deploy.enabled: true`, on a
cluster, once every setting is evaluated, every setting's merged LaVIN behind one `mmjobs
serve` (one Deployment, `models`: setting -> merge-<setting>), the chat page selecting the
setting].
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
    deploy = _deploy_config(b, {name: configs["merge"][name]["output"] for name in names})
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
    if deploy:  # every setting behind one `mmjobs serve` (cluster runs only)
        server = b.step("deploy", "deploy", config=deploy)
        server.after(evaluation)  # every iteration's: KFP waits for the whole loop
        server.set_caching_options(False)


def _deploy_config(b: Build, merged: dict[str, str]) -> dict | None:
    """With `stages.deploy.enabled: true`, on a cluster: the one deploy step's config, serving
    each setting's merged LaVIN (`merged`: setting -> the merge step's output URI, known when
    the pipeline is built) under the setting's name, from one Deployment (name:
    stages.deploy.name, default mmjobs-serve-<experiment>). Local runs skip it and say how to
    chat with the settings locally (`mmjobs chat RECIPE`)."""
    if "deploy" not in b.recipe.stages:
        return None
    models = [{"name": name, "model": uri} for name, uri in merged.items()]
    config = b.config("deploy", "deploy", defaults=deploy_defaults(b.recipe),
                      fixed={"models": models}, wired=())
    if not b.recipe.stages["deploy"].get("enabled"):
        return None
    if not b.for_cluster:
        if b.parent_run_id is not None:
            log.warning("deploy step skipped: it starts a server on a cluster (mmjobs compile "
                        "/ submit); here, chat with every setting with `mmjobs chat %s` (the "
                        "same --set overrides as the run)", b.recipe.recipe)
        return None
    return config


def _per_setting(b: Build, key: str, stage: str, wired: tuple[str, ...], *,
                 label: bool = False) -> dict[str, dict]:
    """The step's config for every sweep setting (own output folder, label = setting)."""
    names = list(b.recipe.sweep) or [""]
    return {name: b.config(f"{key}-{name}" if name else key, stage, key=key, wired=wired,
                           fixed={"label": name or "baseline"} if label else None)
            for name in names}
