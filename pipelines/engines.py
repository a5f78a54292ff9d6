"""Evaluating through a serving engine (`eval.engine`): the engine steps around infer steps.

A pipeline file wraps its evaluation in `engines(b)` and creates its infer steps through it::

    with engines(b) as eng:
        for label, model in (("untrained", base), ("trained", merged.output)):
            predictions = eng.infer(f"infer-{label}", label=label, model=model,
                                    dataset=held_out.output)
            eng.down(label)
            ...  # evaluate, report, deploy: everything that reads the predictions

Without `eval.engine` this is `b.step(step, "infer", key="infer", ...)` and nothing else.
With it, each evaluated model gets:

- `engine-up-<label>` (stage `engine`, a CPU launcher): the engine's Deployment + Service,
  waiting until it is ready; its output, the engine's /v1 URL, is the `endpoint.url` of the
  model's infer steps (`endpoint.model` is `eval.engine.served_model_name`, the client
  settings `eval.engine.endpoint`);
- `engine-down-<label>` after the model's infer steps, with `ignore_upstream_failure()`: it
  also runs when an infer step (or engine-up) fails, so the GPUs are freed as soon as the
  model's answers are in, or are not coming;
- once per run, `engine-cleanup` as the `dsl.ExitHandler` of the block: KFP runs it when the
  block ends however it ends, and it deletes every engine of the run still there.

Why both: KFP v2's exit handler is the one mechanism that runs after failures anywhere in its
block, but its exit task may not depend on any task (so it cannot wait for one model's infer
steps) and nothing outside the block may read a task inside it (hence the block holds every
step after the infer steps). `ignore_upstream_failure` frees each engine early; the exit
handler is the guarantee. Both run under `mmjobs run` too (KFP's local runner supports them),
where `mmjobs serve` on 127.0.0.1 is the engine and the runner stops any left running.

With `eval.engine.secrets.api_key` (cluster runs) the engine and its infer steps read the
bearer key from that Secret; the infer steps send it (`endpoint.api_key_env`).

Infer steps answering through an engine are CPU steps (`cluster.cpu_steps`) unless
`eval.engine.endpoint.agreement_sample` asks them to also answer in-process (then they keep
the infer step's GPUs).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from kfp import dsl, kubernetes

from mmjobs.recipe import EngineSpec
from pipelines.builder import Build
from pipelines.cluster import resources_for


class Engines:
    """The engine steps of one pipeline build (see the module docstring)."""

    def __init__(self, b: Build, spec: EngineSpec | None) -> None:
        self.b, self.spec = b, spec
        self.up_tasks: dict[str, dsl.PipelineTask] = {}
        self.infers: dict[str, list[dsl.PipelineTask]] = {}

    def infer(self, step: str, *, label: str, model: Any, key: str | tuple[str, ...] = "infer",
              fixed: dict[str, Any] | None = None, **inputs: Any) -> dsl.PipelineTask:
        """Infer step `step` (sections `key`, as `Build.step`) of model `label`: through its
        engine when the recipe has one (started here on first use), else in-process."""
        if self.spec is None:
            return self.b.step(step, "infer", key=key, fixed=fixed, model=model, **inputs)
        up = self.up_tasks.get(label)
        if up is None:
            up = self.up_tasks[label] = self._engine(f"engine-up-{label}", "up", label,
                                                     model=model)
        # What the engine is keys the infer output (its URL is new each run): see infer.
        identity = self.spec.model_dump(include={"image", "command", "args", "port",
                                                 "served_model_name", "env", "local_serve"})
        endpoint = {"model": self.spec.served_model_name,
                    "engine": json.dumps(identity, sort_keys=True),
                    **self.spec.endpoint.model_dump(exclude_none=True)}
        key_secret = self.spec.secrets.api_key if self.b.for_cluster else None
        if key_secret:  # the engine's bearer key, from its Secret (local engines have none)
            endpoint["api_key_env"] = EngineSpec.KEY_ENV
        if not self.spec.endpoint.agreement_sample:
            self.b.cpu_only.add(step)  # a client of the engine: no GPU of its own
        task = self.b.step(step, "infer", key=key, fixed={**(fixed or {}), "endpoint": endpoint},
                           model=model, endpoint_url=up.output, **inputs)
        if key_secret:
            kubernetes.use_secret_as_env(
                task, secret_name=key_secret,
                secret_key_to_env={EngineSpec.KEY_IN_SECRET: EngineSpec.KEY_ENV})
        self.infers.setdefault(label, []).append(task)
        return task

    def down(self, label: str) -> dsl.PipelineTask | None:
        """`engine-down-<label>` after model `label`'s infer steps, also when they fail."""
        if self.spec is None or label not in self.up_tasks:
            return None
        # Every input given (even at its default): KFP's ignore_upstream_failure reads them all.
        task = self._engine(f"engine-down-{label}", "down", label, model="", kfp_run_id="")
        return task.after(self.up_tasks[label], *self.infers.get(label, [])) \
            .ignore_upstream_failure()

    def _engine(self, step: str, action: str, label: str, **inputs: Any) -> dsl.PipelineTask:
        b = self.b
        config = b.config(step, "engine", defaults=engine_defaults(b, self.spec),
                          fixed={"action": action, "label": label,
                                 "local": not b.for_cluster},
                          wired=("model",) if inputs.get("model") else ())
        task = b.step(step, "engine", config=config, **inputs)
        task.set_caching_options(False)  # an engine must really start (and stop) each run
        return task


@contextlib.contextmanager
def engines(b: Build) -> Iterator[Engines]:
    """The block of a pipeline's eval steps; with `eval.engine`, inside the exit handler
    whose `engine-cleanup` step deletes every engine of the run (see the module docstring).
    """
    spec = b.recipe.eval.engine
    if spec is None:
        yield Engines(b, None)
        return
    if "endpoint" in b.recipe.stages.get("infer", {}):
        b.errors.append("stages.infer.endpoint: eval.engine sets the infer steps' endpoint "
                        "(its client settings: eval.engine.endpoint); remove one of them")
    cleanup = Engines(b, spec)._engine("engine-cleanup", "cleanup", "*")
    with dsl.ExitHandler(cleanup, name="eval-engines"):
        yield Engines(b, spec)


def engine_defaults(b: Build, spec: EngineSpec | None) -> dict[str, Any]:
    """An engine step's config before its own section: `eval.engine`, with the resources an
    infer step would get where it leaves them open, the eval image to copy the model, and
    the cluster's Secret names, store env and (GPU) placement."""
    assert spec is not None
    cluster = b.recipe.cluster
    res = resources_for(cluster, "infer", "infer")
    defaults = spec.model_dump(exclude={"endpoint"}, exclude_none=True)  # (infer's settings)
    defaults.update({"gpus": res.gpus if spec.gpus is None else spec.gpus,
                     "cpu": spec.cpu or res.cpu, "memory": spec.memory or res.memory,
                     "fetch_image": b.recipe.images.image("eval"),
                     "secrets": {**cluster.secrets.model_dump(),
                                 **spec.secrets.model_dump(exclude_none=True)},
                     "store_env": dict(cluster.env),
                     "node_selector": dict(cluster.node_selector),
                     "tolerations": [dict(t) for t in cluster.tolerations],
                     "image_pull_secrets": list(cluster.image_pull_secrets)})
    return defaults
