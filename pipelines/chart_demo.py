"""Pipeline `chart-demo`: the embedded default, a real (tiny) recipe end to end on CPU.

make-model (a tiny LLaVA from configs) → prepare (synthetic charts, train) and prepare-test
(held-out charts, another seed) → pretokenize → align (connector only) → apply-connector →
sft (LoRA) → merge → infer + evaluate (ChartQA relaxed accuracy) for the untrained base and
the trained model (with `eval.engine`: through a serving engine per model, started before
and removed after its infer step; see pipelines/engines.py) → report → [deploy: the merged
model as a review server, when the recipe sets `stages.deploy.enabled: true`; cluster runs
only].
"""

from __future__ import annotations

from typing import Any

from kfp import dsl

from mmjobs.logs import get_logger
from mmjobs.recipe import RecipeConfig
from pipelines.builder import Build
from pipelines.cluster import resources_for
from pipelines.engines import engines

NAME = "chart-demo"
log = get_logger(__name__)
_SKIP_TOLD: set[tuple[str, str]] = set()  # local runs told that their deploy step is skipped


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    train_set = b.step("prepare", "prepare")
    held_out = b.step("prepare-test", "prepare")
    shards = b.step("pretokenize", "pretokenize", dataset=train_set.output, model=base)
    align = b.step("align", "train", fixed={"train": {"mode": "align"}},
                   data=shards.output, model=base)
    aligned = b.step("apply-connector", "apply-connector", base=base, connector=align.output)
    sft = b.step("sft", "train", fixed={"train": {"mode": "sft", "finetune": "lora"}},
                 data=shards.output, model=aligned.output)
    merged = b.step("merge", "merge", base=aligned.output, adapter=sft.output)
    evaluations = []
    with engines(b) as eng:  # eval.engine: infer through a serving engine per model
        for label, model in (("untrained", base), ("trained", merged.output)):
            predictions = eng.infer(f"infer-{label}", label=label, model=model,
                                    dataset=held_out.output)
            eng.down(label)
            evaluations.append(b.step(f"evaluate-{label}", "evaluate", key="evaluate",
                                      fixed={"label": label}, label=label,
                                      predictions=predictions.output))
        report = b.report(evaluations, title="chart-demo: untrained vs trained tiny LLaVA")
        deploy(b, merged.output, after=[*evaluations, *([report] if report else [])])


def deploy(b: Build, model: Any, *, after: list[dsl.PipelineTask]) -> dsl.PipelineTask | None:
    """The optional `deploy` step: `model` as a review server (Deployment + Service running
    `mmjobs serve`, see mmjobs.stages.deploy) once `after` are done.

    Only when the recipe sets `stages.deploy.enabled: true` (the section is validated either
    way), and only on a cluster: the local runner skips it with a message saying how to serve
    the model locally. Never cached: a re-submitted run deploys again (and finds its server).
    """
    if "deploy" not in b.recipe.stages:
        return None
    config = b.config("deploy", "deploy", defaults=deploy_defaults(b.recipe))
    if not config.get("enabled"):
        return None
    if not b.for_cluster:
        # Said once per local run (the pipeline is wired several times: checks, compile, run);
        # a local run is the build with an MLflow parent run, checks have none.
        run = (b.recipe.recipe, b.run_id)
        if b.parent_run_id is not None and run not in _SKIP_TOLD:
            _SKIP_TOLD.add(run)
            merged = next((s.output for s in b.steps if s.name == "merge"), "<merge output>")
            log.warning("deploy step skipped: it starts a server on a cluster (mmjobs compile / "
                        "submit); here, serve the trained model with `mmjobs serve %s`", merged)
        return None
    task = b.step("deploy", "deploy", config=config, model=model)
    task.after(*after)
    task.set_caching_options(False)
    return task


def deploy_defaults(recipe: RecipeConfig) -> dict[str, Any]:
    """The deploy step's defaults from the recipe: the eval image, what an infer step gets
    (GPUs, CPU, memory; `cluster.stages.infer` over `cluster`), the pods' placement, Secret
    names and plain env, and the model's dtype; `stages.deploy` wins over all of them."""
    cluster = recipe.cluster
    res = resources_for(cluster, "infer", "infer")
    defaults: dict[str, Any] = {
        "image": recipe.images.image("eval"), "gpus": res.gpus,
        "secrets": cluster.secrets.model_dump(), "env": dict(cluster.env),
        "node_selector": dict(cluster.node_selector),
        "tolerations": [dict(t) for t in cluster.tolerations],
        "image_pull_secrets": list(cluster.image_pull_secrets)}
    defaults.update({k: v for k, v in (("cpu", res.cpu), ("memory", res.memory)) if v})
    serve = {"dtype": recipe.model.dtype} if recipe.model.dtype != "auto" else {}
    if recipe.model.trust_remote_code:
        serve["trust_remote_code"] = True
    if recipe.model.conversation_format != "auto":  # chats rendered as the model was trained
        serve["conversation_format"] = recipe.model.conversation_format
    if serve:
        defaults["serve"] = serve
    return defaults
