"""What every pipeline file uses to wire its steps: `Build.step(...)`.

A pipeline file only says which steps exist and what feeds what::

    sft = b.step("sft", "train", data=shards.output, model=base, key="sft")

`Build.step` assembles the step's stage config — the stage's defaults from the recipe
(`model`, `data`, `eval`, and of `train` the settings the step's train.mode has), then the
recipe's `stages.<step>` section, then values the pipeline fixes — adds the wiring fields
(experiment, run id, parent MLflow run, output `{store}/{experiment}/{run_id}/{step}`),
validates it against the stage's config model (all problems collected, named
`stages.<step>.<key>`), creates the task with the stage's component and image and, when
compiling for a cluster, applies the cluster settings.

The stages' knobs (`Stage.knobs`: learning rate, epochs, max steps, data URIs, row limits)
become pipeline parameters, named `<section>_<field>` (`sft_lr`, `infer_limit`,
`prepare_test_input`; steps one section configures share one) with the step's resolved value
as the default, and the base model (unless a make-model step builds it) becomes
`base_model`: the KFP UI's run form shows them, and a value given there reaches the steps'
configs at run time (`registry.run_component`). A build records them in `parameters`; the
pipeline function declares them and hands their channels in as `params`.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl
from pydantic import ValidationError

from mmjobs import storage
from mmjobs.config import dump_recipe
from mmjobs.config_errors import validation_errors
from mmjobs.logs import get_logger
from mmjobs.pipeline_parent import CLUSTER_PREFIX
from mmjobs.recipe import RecipeConfig
from mmjobs.stage_contract import KFP_RUN_ID_TOKEN
from mmjobs.stages import registry
from pipelines.cluster import apply_cluster_settings, resources_for
from pipelines.components import component
from pipelines.config_paths import attr, deep_merge, flat, get_path, set_path, stand_in

log = get_logger(__name__)

# StageConfig fields every step gets from the pipeline run, never from the recipe.
RUN_FIELDS = ("experiment", "pipeline_run_id", "output", "recipe", "parent_run_id", "step")


@dataclass
class StepRecord:
    """One step the pipeline created (for the runner's summary and error messages)."""

    name: str
    stage: str
    task: str  # KFP's task name (the component name, deduplicated: train, train-2, ...)
    output: str | None
    label: str | None = None
    metric: str | None = None
    row: str | None = None


class StepTask(dsl.PipelineTask):
    """A step's task whose `.output` is the stage's returned URI also when its component
    writes KFP UI artifacts besides (train's Metrics, report's Markdown and HTML), where
    KFP's own `.output` refuses a task with several outputs."""

    @property
    def output(self) -> dsl.PipelineChannel:
        return self.outputs["Output"]


@dataclass
class Param:
    """A pipeline parameter: a field of the KFP UI's run form, the recipe's value its default."""

    name: str
    type: type
    default: Any
    description: str
    steps: list[str] = field(default_factory=list)


@dataclass
class Build:
    """Wiring state of one pipeline build (one compile, or one local run).

    Attributes:
        recipe: the validated recipe.
        run_id: the pipeline run id (a folder in every output path).
        store_root: where outputs go (the cluster's `MMJOBS_STORE` when compiling).
        parent_run_id: the MLflow parent run every stage nests under: its id (local runs)
            or, compiled for a cluster, the reference by which the steps of each KFP run
            find or create the one they share (`mmjobs.pipeline_parent.cluster_ref`).
        for_cluster: apply Kubernetes settings (compile/submit) or not (local runs).
        params: the pipeline parameters' channels, by name (empty while the parameters are
            being found: the steps then keep their compiled values).
        parameters: the pipeline parameters this build found (name -> `Param`).
    """

    recipe: RecipeConfig
    run_id: str
    store_root: str
    parent_run_id: str | None = None
    for_cluster: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    parameters: dict[str, Param] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    allowed_steps: set[str] = field(default_factory=set)
    imports: list[dsl.PipelineTask] = field(default_factory=list)
    # stage -> step -> the step's own section (with what the pipeline fixes), for the stages'
    # checks of the recipe-level sections (`Stage.recipe_check`)
    sections: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # results-table row -> the committed dataset whose accepted samples are the row's "Data
    # Amount" (None: "-"), for tables in the seed's layout (llava-dataengine's Main Results)
    row_data: dict[str, str | None] = field(default_factory=dict)
    # steps that run as CPU steps although their stage declares a GPU (infer steps answering
    # through a serving engine: pipelines/engines.py)
    cpu_only: set[str] = field(default_factory=set)
    _tiny: Any = None
    _section_of: dict[str, str] = field(default_factory=dict)  # step -> its (last) section

    # ---------------------------------------------------------------- step configs

    def config(self, step: str, stage: str, *, key: str | tuple[str, ...] | None = None,
               defaults: Mapping[str, Any] | None = None, fixed: Mapping[str, Any] | None = None,
               section: Mapping[str, Any] | None = None, where: str | None = None,
               wired: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The validated config of `step` without its wired inputs (the component adds them).

        Args:
            key: the recipe section(s) configuring this step, merged in order (default: the
                step name); e.g. `infer` configures both infer-untrained and infer-trained,
                and ("infer", "infer-pot") adds the PoT step's own section.
            defaults: the stage's defaults (default: `defaults(stage)`, from the recipe-level
                sections); the section wins over them.
            fixed: values the pipeline needs (e.g. train.mode=align for an align step); a
                recipe section setting them differently is an error.
            section: use this instead of `recipe.stages[key]` (sweeps merge their own).
            where: how errors name the section (default `stages.<key>`).
            wired: the config fields filled from upstream steps (default: the stage's; `()`
                for a step wired to nothing, e.g. one deploy step serving a sweep's models).
        """
        spec = registry.get(stage)
        keys = (key,) if isinstance(key, str) else tuple(key or (step,))
        self.allowed_steps.update(keys)
        self._section_of[step] = keys[-1]
        where = where or f"stages.{keys[-1]}"
        defaults = self.defaults(stage, step) if defaults is None else defaults
        wired = spec.wired if wired is None else wired
        if section is None:  # later sections refine earlier ones (infer, then infer-pot)
            section = {}
            for name in keys:
                section = deep_merge(section, self.recipe.stages.get(name, {}))
        given = dict(section)
        problems = [f"{where}.{key}: set by the pipeline ({_why(key)}); remove it"
                    for key in given if key in RUN_FIELDS or key in _top(wired)]
        problems += [f"{where}.{path}: the {step} step needs {value!r} here; remove it"
                     for path, value in flat(fixed or {}).items()
                     if get_path(given, path, value) != value]
        own = deep_merge(copy.deepcopy(given), fixed or {})
        self.sections.setdefault(stage, {})[step] = own
        if spec.step_defaults:  # e.g. the recipe's train defaults serve steps of several modes
            defaults = spec.step_defaults(dict(defaults or {}), own)
        cfg = deep_merge(deep_merge(copy.deepcopy(dict(defaults or {})), given), fixed or {})
        cfg.update({"experiment": self.recipe.experiment, "pipeline_run_id": self.run_id,
                    "recipe": self.recipe.recipe, "parent_run_id": self.parent_run_id,
                    "step": step})
        if spec.own_output:
            cfg["output"] = storage.join(self.store_root, self.recipe.experiment or "default",
                                         self.run_id, step)
        problems += self._validate(spec, cfg, wired, where)
        self.errors.extend(problems)
        return cfg

    def _validate(self, spec: Any, cfg: dict[str, Any], wired: tuple[str, ...],
                  where: str) -> list[str]:
        trial = copy.deepcopy(cfg)
        for path in wired:
            set_path(trial, path, stand_in(spec, path))
        return [f"{where}.{message}" for _, message in validation_errors(spec.config, trial, [])]

    # ---------------------------------------------------------------- tasks

    def step(self, step: str, stage: str, *, key: str | tuple[str, ...] | None = None,
             fixed: Mapping[str, Any] | None = None, config: dict[str, Any] | Any | None = None,
             label: str | None = None, row: str | None = None,
             each: list[dict[str, Any]] | None = None, **inputs: Any) -> dsl.PipelineTask:
        """Create the task of `step`, running `stage` with `inputs` wired in.

        Args:
            key, fixed: see `config()`.
            config: a config from `config()` (or a loop item's JSON); default: built here.
            label: for evaluate steps, the name of its entry in the run's results (default the
                config's `label`).
            row: for evaluate steps, the model the row belongs to (multi-benchmark tables).
            each: inside a `dsl.ParallelFor`, the configs the loop runs (with `config` the
                loop item's field): recorded one by one, labelled by their `_label` key.
            inputs: the component's wired parameters (upstream outputs or static URIs).
        """
        if config is None:
            config = self.config(step, stage, key=key, fixed=fixed,
                                 wired=wired_paths(stage, inputs) or None)
        config_json = json.dumps(config) if isinstance(config, dict) else config
        spec = registry.get(stage)
        image = self.recipe.images.image(spec.image)
        extra = self._multinode(stage, step, image) if spec.multinode else {}
        configs = each or ([config] if isinstance(config, dict) else [])
        extra.update(self._knobs(step, stage, configs, wired_paths(stage, inputs)))
        if self.for_cluster and KFP_RUN_ID_TOKEN in f"{self.run_id} {self.parent_run_id}":
            # the job id fills the run's folder and names the parent run the steps share
            extra["kfp_run_id"] = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        parts = self._fan_out(step, stage, config, image, inputs, extra)
        if parts is not None:  # the step's own task only commits what the parts wrote
            config_json = json.dumps({**config, "force": False})
        task = self._task(step, stage, image, config_json, {**inputs, **extra})
        task.__class__ = StepTask
        if parts is not None:
            task.after(parts)  # KFP waits for every iteration of the loop
        for cfg in each or [config]:
            if isinstance(cfg, dict):
                # An explicit `label` names the step's results entry even where the config's
                # label (MLflow tag) names its table row instead (llava-dataengine).
                self.steps.append(StepRecord(step, stage, task.name, cfg.get("output"),
                                             label if label is not None else cfg.get("label"),
                                             cfg.get("metric"), row))
        return task

    def _task(self, step: str, stage: str, image: str, config_json: Any,
              args: dict[str, Any], *, part: bool = False) -> dsl.PipelineTask:
        """One task of `step`: the stage's component (a fan-out part's, without output
        artifacts, with `part`), after the imports, with the cluster settings."""
        task = component(stage, image, part=part)(config_json=config_json, **args)
        task.set_display_name(step)
        if stage not in ("import", "engine") and self.imports:
            # Steps read what the recipe's imports (and conversions) put in the store. Engine
            # steps read only their model input (made after the imports), and engine-cleanup,
            # an exit handler's task, may depend on nothing.
            task.after(*self.imports)
        if self.for_cluster:
            apply_cluster_settings(task, stage, self.recipe, step,
                                   gpu=False if step in self.cpu_only else None)
        else:
            task.set_caching_options(False)  # stages reuse committed outputs themselves
        return task

    def _fan_out(self, step: str, stage: str, config: Any, image: str,
                 inputs: Mapping[str, Any], extra: dict[str, Any]) -> dsl.PipelineTask | None:
        """With `fan_out: N` (pretokenize), a `dsl.ParallelFor` of N part tasks (`part`
        0..N-1, each its own CPU pod with the step's resources) writing disjoint shards into
        the step's cache entry; the task of the last iteration, or None without a fan-out.
        The parts expose no `Dataset` artifact: the entry is complete only once the step's
        own task has committed it, and that task's artifact points at it."""
        if stage != "pretokenize" or not isinstance(config, dict) or config.get("fan_out",
                                                                                 1) <= 1:
            return None
        if config.get("part") is not None:
            self.errors.append(f"stages.{self._section_of.get(step, step)}.part: set by the "
                               "pipeline for each fan-out task; remove it")
        items = [json.dumps({**config, "part": k}) for k in range(config["fan_out"])]
        with dsl.ParallelFor(items) as item:
            part = self._task(step, stage, image, item, {**inputs, **extra}, part=True)
            part.set_display_name(f"{step}-part")  # the step's cluster settings, own name
        return part

    def _knobs(self, step: str, stage: str, configs: list[dict[str, Any]],
               wired: tuple[str, ...]) -> dict[str, Any]:
        """The component arguments of `stage`'s knobs for this step: a pipeline parameter
        each (found here, the step's resolved value its default; see the module docstring).
        A knob whose value differs between the configs of a loop's iterations (a sweep
        setting changes it) gets none: each iteration keeps its own."""
        spec = registry.get(stage)
        models = [self._resolved(spec, cfg, wired) for cfg in configs] if spec.knobs else []
        if not models or any(m is None for m in models):
            return {}
        args: dict[str, Any] = {}
        section = self._section_of.get(step, step)
        for knob in spec.knobs:
            values = {json.dumps(attr(m, knob.path)) for m in models}
            if len(values) != 1:
                continue
            value = attr(models[0], knob.path)
            if value is None and knob.unset is None:
                continue
            default = knob.unset if value is None else knob.type(value)
            leaf = knob.path.rsplit(".", 1)[-1]
            param = self._param(f"{section}_{leaf}", f"{step}_{leaf}", knob.type, default,
                                f"{knob.description} Recipe: stages.{section}."
                                f"{knob.path}.", step)
            if param is not None and param in self.params:
                args[knob.input_name] = self.params[param]
        return args

    def _param(self, name: str, fallback: str, kind: type, default: Any, description: str,
               step: str) -> str | None:
        """Register pipeline parameter `name` (or `fallback` when `name` is taken with
        another default) for `step`; its name, or None when both are taken."""
        for candidate in (name, fallback):
            candidate = candidate.replace("-", "_")
            known = self.parameters.get(candidate)
            if known is None:
                self.parameters[candidate] = Param(candidate, kind, default, description, [step])
                return candidate
            if known.type is kind and known.default == default:
                if step not in known.steps:
                    known.steps.append(step)
                return candidate
        return None

    @staticmethod
    def _resolved(spec: Any, cfg: dict[str, Any], wired: tuple[str, ...]) -> Any:
        """The step's validated config (wired inputs stand-ins), or None if it is invalid
        (the error is already recorded)."""
        trial = copy.deepcopy(cfg)
        for path in wired or spec.wired:
            set_path(trial, path, stand_in(spec, path))
        try:
            return spec.config.model_validate(trial)
        except ValidationError:
            return None

    def _multinode(self, stage: str, step: str, image: str) -> dict[str, Any]:
        """Arguments of a multi-node stage's component that launch a TrainJob (or PyTorchJob)
        when nodes > 1: node and GPU counts, the image, and `launch_json`, the job's cluster
        settings (`mmjobs.train.k8s_jobs.JobSettings`; Secret names, never credentials)."""
        cluster = self.recipe.cluster
        nodes = cluster.nodes if self.for_cluster else 1
        if nodes <= 1:
            return {}
        res = resources_for(cluster, stage, step)
        settings = {"kind": cluster.trainer, "runtime": cluster.training_runtime,
                    "cpu": res.cpu, "memory": res.memory, "shm_size": res.shm_size,
                    "node_selector": cluster.node_selector, "tolerations": cluster.tolerations,
                    "image_pull_secrets": cluster.image_pull_secrets,
                    "secrets": cluster.secrets.model_dump(), "env": cluster.env}
        return {"nodes": nodes, "gpus_per_node": res.gpus, "image": image,
                "launch_json": json.dumps(settings, sort_keys=True)}

    def report(self, after: list[dsl.PipelineTask], *, title: str) -> dsl.PipelineTask | None:
        """The report step over this run's MLflow runs, after `after`; skipped (with a
        warning) when this version has no report stage."""
        if "report" not in registry.names():
            log.warning("report step skipped: no report stage in this version (the run's "
                        "results table is still written by the runner)")
            return None
        model_cls = registry.get("report").config
        offered: dict[str, Any] = {"title": title}
        if str(self.parent_run_id or "").startswith(CLUSTER_PREFIX):
            # A cluster run's parent gets the recipe from the report step (`mmjobs run` logs
            # it locally): compiled in, as the steps themselves do not carry it.
            offered["recipe_yaml"] = dump_recipe(self.recipe)
        defaults = {k: v for k, v in offered.items() if k in model_cls.model_fields}
        config = self.config("report", "report", defaults=defaults)
        task = self.step("report", "report", config=config)
        task.after(*after)
        return task

    def allow(self, *keys: str) -> None:
        """Accept recipe sections for steps this build does not create (e.g. benchmarks left
        out of eval.benchmarks), so trimming a list does not turn its sections into errors."""
        self.allowed_steps.update(keys)

    def sweep(self, key: str, stage: str, *, fixed: Mapping[str, Any] | None = None,
              wired: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
        """Per setting of `recipe.sweep`: the config of step `<key>-<setting>`, its section
        being `stages.<key>` with the setting's overrides merged in (errors name
        `sweep.<setting>`). No settings: just `<key>` itself, as the only setting."""
        settings = self.recipe.sweep or {"": {}}
        base = self.recipe.stages.get(key, {})
        self.allowed_steps.add(key)
        return {name: self.config(f"{key}-{name}" if name else key, stage, key=key,
                                  fixed=fixed, wired=wired,
                                  section=deep_merge(copy.deepcopy(dict(base)), overrides),
                                  where=f"sweep.{name}" if name else None)
                for name, overrides in settings.items()}

    # ---------------------------------------------------------------- recipe defaults

    def add_imports(self) -> None:
        """One `import-<name>` step per entry of the recipe's `imports`, then one
        `convert-<name>` step per entry of its `conversions` (after the imports: they read what
        those put in the store), all before every other step. Each must say where its output
        goes (`to`): the recipe names that URI where it is used, so no step needs the output
        channel."""
        self.imports.extend(self._store_fillers(
            "imports", "import", "the store URI the recipe's model, data or stages sections "
            "then name"))
        self.imports.extend(self._store_fillers(
            "conversions", "convert", "the store URI the recipe's model.name_or_path then names"))

    def _store_fillers(self, key: str, stage: str, to_hint: str) -> list[dsl.PipelineTask]:
        """The steps of the recipe's `key` section (imports or conversions), run by `stage`."""
        tasks = []
        for name, section in getattr(self.recipe, key).items():
            where = f"{key}.{name}"
            if not section.get("to"):
                self.errors.append(f"{where}.to: required ({to_hint})")
            config = self.config(f"{stage}-{name}", stage, section=section, where=where)
            tasks.append(self.step(f"{stage}-{name}", stage, config=config))
        return tasks

    def base_model(self) -> str | dsl.PipelineChannel:
        """The recipe's base model: the pipeline parameter `base_model` (its default the
        recipe's URI), or the output of a make-model step building a tiny model when
        `model.name_or_path` is `tiny:llava` / `tiny:chameleon`."""
        name = self.recipe.model.name_or_path
        if not name.startswith("tiny:"):
            self._param("base_model", "base_model", str, name, "Base model: a Hugging Face "
                        "hub id or a store URI (s3://...). Recipe: model.name_or_path.",
                        "base")
            return self.params.get("base_model", name)
        kind = name.removeprefix("tiny:")
        if self._tiny is None:
            # `stages.make-model.replica` builds a replica of a real model instead (its sizes
            # are the real model's: a kind would contradict it).
            replica = self.recipe.stages.get("make-model", {}).get("replica")
            config = self.config("make-model", "make-tiny-model",
                                 defaults={} if replica else {"kind": kind})
            self._tiny = self.step("make-model", "make-tiny-model", config=config).output
        return self._tiny

    def defaults(self, stage: str, step: str = "") -> dict[str, Any]:
        """A stage's defaults from the recipe-level sections (model, data, train, eval), as
        the stage declares them (`recipe_defaults`); `step` names the step they are for."""
        spec = registry.get(stage)
        return spec.recipe_defaults(self.recipe, step) if spec.recipe_defaults else {}

    # ---------------------------------------------------------------- checks

    def check_sections(self) -> None:
        """Errors for `stages.<name>` / `cluster.stages.<name>` naming no step of this
        pipeline (typos), and the stages' own checks of the recipe-level sections (e.g. train
        settings no train step has), added to `errors`."""
        steps = sorted(self.allowed_steps)
        pipeline = self.recipe.pipeline
        for name in self.recipe.stages:
            if name == "make-model" and name not in self.allowed_steps:
                self.errors.append(
                    "stages.make-model: the step that builds a tiny:<kind> base model, but "
                    f"model.name_or_path is {self.recipe.model.name_or_path!r}; drop the "
                    "section (in a copy of the recipe) for a real base model")
            elif name not in self.allowed_steps:
                hint = _did_you_mean(name, steps)
                self.errors.append(f"stages.{name}: not a step of pipeline {pipeline}; "
                                   f"{hint}")
        for spec in registry.stages():  # recipe-level settings no step takes, ...
            if spec.recipe_check:
                self.errors += spec.recipe_check(self.recipe, self.sections.get(spec.name, {}))
        if self.recipe.eval.engine is not None and not any(s.stage == "engine"
                                                           for s in self.steps):
            self.errors.append(f"eval.engine: pipeline {pipeline} does not evaluate through "
                               "an engine yet (chart-demo and llava-dataengine do: "
                               "pipelines/engines.py); remove eval.engine, or point "
                               "stages.<infer step>.endpoint at a server you run")
        if self.recipe.eval.baseline and len(self.row_data) < 2:
            self.errors.append(f"eval.baseline: pipeline {pipeline} has no baseline row "
                               "(llava-dataengine has); remove it")
        kinds = registry.names()
        for name in self.recipe.cluster.stages:
            if name not in self.allowed_steps and name not in kinds:
                hint = _did_you_mean(name, steps + kinds)
                self.errors.append(f"cluster.stages.{name}: neither a step of pipeline "
                                   f"{pipeline} nor a stage kind; {hint}")


def wired_paths(stage: str, inputs: Mapping[str, Any]) -> tuple[str, ...]:
    """The config fields that the component parameters `inputs` fill."""
    fields = {i.name: i.field for i in registry.get(stage).inputs}
    return tuple(dict.fromkeys(fields.get(name, name) for name in inputs if fields.get(name, name)))


def _did_you_mean(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"known: {', '.join(allowed)}"


def _why(key: str) -> str:
    if key in ("output", "pipeline_run_id", "experiment"):
        return "outputs go to {store}/{experiment}/{run_id}/{step}"
    if key in ("recipe", "parent_run_id", "step"):
        return "every stage joins this pipeline run, its MLflow run named by the step"
    return "wired from an upstream step"


def _top(paths: tuple[str, ...]) -> set[str]:
    """Top-level keys fully set by the pipeline (`model.name_or_path` leaves `model` open)."""
    return {p for p in paths if "." not in p}
