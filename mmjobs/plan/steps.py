"""A recipe's training steps, found the way the pipeline builds them, without running anything.

`training_steps` wires the recipe's pipeline exactly as `mmjobs compile` does
(`mmjobs.pipeline_runner.build_pipeline`, which validates every step's config) with a `Build`
subclass that records the config of each training, pre-tokenization and model-building step
and what feeds it (the stages are named by their modules' `NAME`, not here). A train step's
sequence length is then its `train.max_length`, or the `max_length` of the pre-tokenization
step whose shards it reads (the card's value), and its GPUs are what the cluster section gives
that step (`pipelines.cluster.resources_for`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmjobs.recipe import RecipeConfig


def _recorded_stages() -> dict[str, str]:
    """The stages whose configs the planner reads, by their declared names -> their role."""
    from mmjobs.stages import make_tiny_model, pretokenize, train

    return {train.NAME: "train", pretokenize.NAME: "shards", make_tiny_model.NAME: "model"}

# Keyword arguments of `Build.step` that are not component inputs.
_STEP_OPTIONS = frozenset({"key", "fixed", "config", "label", "row", "each"})


@dataclass(frozen=True)
class TrainStep:
    """One train step of a recipe's pipeline.

    Attributes:
        name: the step's name (`sft`, `align-table`, `sft-cyclical-lr` in a sweep).
        section: the step name its settings and resources are keyed by (`sft` for every
            sweep setting).
        config: the step's validated stage config (as its component receives it).
        model_from: the step whose output it trains (`apply-connector`, `sft`, ...), or None
            when it trains the recipe's base model.
        card_max_length: `max_length` of the pretokenize step feeding it (None: unknown).
        gpus: GPUs per node the step's pod requests; nodes: nodes it trains on.
    """

    name: str
    section: str
    config: dict[str, Any]
    model_from: str | None
    card_max_length: int | None
    gpus: int
    nodes: int


@dataclass
class RecipeSteps:
    """What the planner needs from a recipe's pipeline."""

    train: list[TrainStep] = field(default_factory=list)
    make_model: dict[str, Any] | None = None  # the make-tiny-model step's config, if any


@dataclass(frozen=True)
class _Recorded:
    name: str
    section: str
    role: str  # train | shards | model (`_recorded_stages`)
    config: dict[str, Any]
    task: str
    inputs: dict[str, Any]


def _recording_build_class() -> type:
    """`pipelines.builder.Build` with a `step` that records the configs of the train,
    pretokenize and make-tiny-model steps (`_recorded_stages`)."""
    from mmjobs import pipeline_runner

    pipeline_runner.pipelines_package()
    from pipelines.builder import Build, wired_paths

    recorded_stages = _recorded_stages()

    @dataclass
    class RecordingBuild(Build):
        recorded: list[_Recorded] = field(default_factory=list)

        def step(self, step: str, stage: str, **kwargs: Any) -> Any:
            inputs = {k: v for k, v in kwargs.items() if k not in _STEP_OPTIONS}
            if stage in recorded_stages and kwargs.get("config") is None:
                # What Build.step would build itself, made here so it can be recorded.
                kwargs["config"] = self.config(step, stage, key=kwargs.get("key"),
                                               fixed=kwargs.get("fixed"),
                                               wired=wired_paths(stage, inputs))
            task = super().step(step, stage, **kwargs)
            if stage in recorded_stages:
                for cfg in kwargs.get("each") or [kwargs["config"]]:
                    if isinstance(cfg, dict):  # a sweep's loop item stands for `each`
                        name = str(cfg.get("output") or step).rstrip("/").rsplit("/", 1)[-1]
                        self.recorded.append(_Recorded(name, step, recorded_stages[stage], cfg,
                                                       task.name, inputs))
            return task

    return RecordingBuild


def training_steps(recipe: RecipeConfig, source: str) -> RecipeSteps:
    """The train steps of `recipe`'s pipeline, in wiring order.

    Raises:
        ConfigError: the recipe's step sections are invalid (as `mmjobs validate` reports).
    """
    from mmjobs.pipeline_runner import build_pipeline

    build_cls = _recording_build_class()  # makes the pipelines package importable
    from pipelines.cluster import resources_for

    _, build = build_pipeline(recipe, run_id="plan", store_root="/plan", source=source,
                              build_cls=build_cls)
    by_task = {r.task: r for r in build.recorded}
    names = {s.task: s.name for s in build.steps}  # every step, to name a model's producer
    out = RecipeSteps()
    for rec in build.recorded:
        if rec.role == "model":
            out.make_model = rec.config
        if rec.role != "train":
            continue
        shards = by_task.get(_task_of(rec.inputs.get("data")) or "")
        model_task = _task_of(rec.inputs.get("model"))
        res = resources_for(recipe.cluster, "train", rec.section)
        out.train.append(TrainStep(
            name=rec.name, section=rec.section, config=rec.config,
            model_from=names.get(model_task, model_task) if model_task else None,
            card_max_length=_max_length(shards.config) if shards else None,
            gpus=int(res.gpus or 0), nodes=recipe.cluster.nodes))
    return out


def _task_of(value: Any) -> str | None:
    """The producing task's name of a pipeline channel (None for a plain value)."""
    return getattr(value, "task_name", None) if value is not None else None


def _max_length(pretokenize: Mapping[str, Any]) -> int | None:
    from mmjobs.stages.pretokenize import PretokenizeConfig

    value = pretokenize.get("max_length", PretokenizeConfig.model_fields["max_length"].default)
    return int(value) if value is not None else None
