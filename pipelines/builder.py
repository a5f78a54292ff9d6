"""What every pipeline file uses to wire its steps: `Build.step(...)`.

A pipeline file only says which steps exist and what feeds what::

    shards = b.step("pretokenize", "pretokenize", dataset=prepared.output, model=base)

`Build.step` assembles the step's stage config — the stage's defaults from the recipe
(`model`, `data`, `eval`, and of `train` the settings the step's train.mode has), then the
recipe's `stages.<step>` section, then values the pipeline fixes — adds the wiring fields
(experiment, run id, parent MLflow run, output `{store}/{experiment}/{run_id}/{step}`),
validates it against the stage's config model (all problems collected, named
`stages.<step>.<key>`), creates the task with the stage's component and image and, when
compiling for a cluster, applies the cluster settings.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl
from pydantic import BaseModel

from mmjobs import storage
from mmjobs.config import RecipeConfig
from mmjobs.config_errors import validation_errors
from mmjobs.logs import get_logger
from mmjobs.train.methods import DEFAULT_MODE, defaults_for, unused_defaults
from pipelines.cluster import apply_cluster_settings, resources_for
from pipelines.components import component

log = get_logger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """How the pipeline layer sees a stage.

    Attributes:
        config: `module:Class` of the stage config.
        image: which of the recipe's images runs it (data, train, eval).
        wired: config fields the pipeline fills from upstream steps (dotted for nested).
        own_output: whether the step gets `{store}/{experiment}/{run}/{step}` as its output
            (pretokenize writes to its content-addressed cache instead).
    """

    config: str
    image: str
    wired: tuple[str, ...] = ()
    own_output: bool = True

    def config_class(self) -> type[BaseModel]:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, StageSpec] = {
    "make-tiny-model": StageSpec("mmjobs.stages.make_tiny_model:MakeTinyModelConfig", "data"),
    "prepare": StageSpec("mmjobs.stages.prepare:PrepareConfig", "data"),
    "mix": StageSpec("mmjobs.stages.mix:MixConfig", "data", ("datasets",)),
    "pretokenize": StageSpec("mmjobs.stages.pretokenize:PretokenizeConfig", "data",
                             ("dataset", "model"), own_output=False),
    "train": StageSpec("mmjobs.stages.train:TrainStageConfig", "train",
                       ("data", "model.name_or_path")),
    "apply-connector": StageSpec("mmjobs.stages.apply_connector:ApplyConnectorConfig", "train",
                                 ("base", "connector")),
    "build-moe-connector": StageSpec("mmjobs.stages.build_moe_connector:BuildMoeConfig",
                                     "train", ("base", "experts")),
    "merge": StageSpec("mmjobs.stages.merge:MergeConfig", "train", ("base", "adapter")),
    "infer": StageSpec("mmjobs.stages.infer:InferConfig", "eval", ("model", "dataset",
                                                                    "adapter")),
    "evaluate": StageSpec("mmjobs.stages.evaluate:EvaluateConfig", "eval", ("predictions",)),
    "report": StageSpec("mmjobs.stages.report:ReportConfig", "eval"),
    # Writes to its `to` (default {store}/{experiment}/{run}/import): recipes name the place.
    "import": StageSpec("mmjobs.stages.import_:ImportConfig", "data", own_output=False),
    # A server: no output; `serve` blocks in the step's pod, `deploy` (a light launcher, the
    # server itself runs the eval image) creates a Deployment + Service and waits for it.
    "serve": StageSpec("mmjobs.stages.serve:ServeConfig", "eval", ("model", "adapter"),
                       own_output=False),
    "deploy": StageSpec("mmjobs.stages.deploy:DeployConfig", "data", ("model", "adapter"),
                        own_output=False),
}
# StageConfig fields every step gets from the pipeline run, never from the recipe.
RUN_FIELDS = ("experiment", "pipeline_run_id", "output", "recipe", "parent_run_id")
# Component parameters that fill a config field of another name.
_PARAM_PATHS = {("train", "model"): "model.name_or_path",
                ("build-moe-connector", "expert_names"): "experts"}
_PLACEHOLDER = "<wired by the pipeline>"


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


@dataclass
class Build:
    """Wiring state of one pipeline build (one compile, or one local run).

    Attributes:
        recipe: the validated recipe.
        run_id: the pipeline run id (a folder in every output path).
        store_root: where outputs go (the cluster's `MMJOBS_STORE` when compiling).
        parent_run_id: the MLflow parent run every stage nests under (local runs).
        for_cluster: apply Kubernetes settings (compile/submit) or not (local runs).
    """

    recipe: RecipeConfig
    run_id: str
    store_root: str
    parent_run_id: str | None = None
    for_cluster: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    allowed_steps: set[str] = field(default_factory=set)
    imports: list[dsl.PipelineTask] = field(default_factory=list)
    train_modes: dict[str, str] = field(default_factory=dict)  # train step -> its mode
    _tiny: Any = None

    # ---------------------------------------------------------------- step configs

    def config(self, step: str, stage: str, *, key: str | tuple[str, ...] | None = None,
               defaults: Mapping[str, Any] | None = None, fixed: Mapping[str, Any] | None = None,
               section: Mapping[str, Any] | None = None, where: str | None = None,
               wired: tuple[str, ...] = ()) -> dict[str, Any]:
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
            wired: the config fields filled from upstream steps (default: the stage's).
        """
        spec = STAGES[stage]
        keys = (key,) if isinstance(key, str) else tuple(key or (step,))
        self.allowed_steps.update(keys)
        where = where or f"stages.{keys[-1]}"
        defaults = self.defaults(stage, step) if defaults is None else defaults
        if section is None:  # later sections refine earlier ones (infer, then infer-pot)
            section = {}
            for name in keys:
                section = _deep_merge(section, self.recipe.stages.get(name, {}))
        given = dict(section)
        problems = [f"{where}.{key}: set by the pipeline ({_why(key)}); remove it"
                    for key in given if key in RUN_FIELDS or key in _top(wired or spec.wired)]
        problems += [f"{where}.{path}: the {step} step needs {value!r} here; remove it"
                     for path, value in _flat(fixed or {}).items()
                     if _get(given, path, value) != value]
        if stage == "train":  # the recipe's train defaults serve steps of several modes
            defaults = self._train_defaults(step, defaults or {}, given, fixed or {})
        cfg = _deep_merge(_deep_merge(copy.deepcopy(dict(defaults or {})), given), fixed or {})
        cfg.update({"experiment": self.recipe.experiment, "pipeline_run_id": self.run_id,
                    "recipe": self.recipe.recipe, "parent_run_id": self.parent_run_id})
        if spec.own_output:
            cfg["output"] = storage.join(self.store_root, self.recipe.experiment or "default",
                                         self.run_id, step)
        problems += self._validate(spec, cfg, wired or spec.wired, where)
        self.errors.extend(problems)
        return cfg

    def _train_defaults(self, step: str, defaults: Mapping[str, Any],
                        given: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
        """`defaults` with only the recipe-level train settings the step's mode has."""
        mode = _get(fixed, "train.mode", None) or _get(given, "train.mode", None) or DEFAULT_MODE
        self.train_modes[step] = mode
        return {**defaults, "train": defaults_for(mode, defaults.get("train") or {})}

    def _validate(self, spec: StageSpec, cfg: dict[str, Any], wired: tuple[str, ...],
                  where: str) -> list[str]:
        trial = copy.deepcopy(cfg)
        for path in wired:
            _set(trial, path, _placeholder_for(spec, path))
        model_cls = spec.config_class()
        return [f"{where}.{message}" for _, message in validation_errors(model_cls, trial, [])]

    # ---------------------------------------------------------------- tasks

    def step(self, step: str, stage: str, *, key: str | tuple[str, ...] | None = None,
             fixed: Mapping[str, Any] | None = None, config: dict[str, Any] | Any | None = None,
             label: str | None = None, row: str | None = None,
             each: list[dict[str, Any]] | None = None, **inputs: Any) -> dsl.PipelineTask:
        """Create the task of `step`, running `stage` with `inputs` wired in.

        Args:
            key, fixed: see `config()`.
            config: a config from `config()` (or a loop item's JSON); default: built here.
            label: for evaluate steps, the label of the row in the run's results table.
            row: for evaluate steps, the model the row belongs to (multi-benchmark tables).
            each: inside a `dsl.ParallelFor`, the configs the loop runs (with `config` the
                loop item's field): recorded one by one, labelled by their `_label` key.
            inputs: the component's wired parameters (upstream outputs or static URIs).
        """
        if config is None:
            config = self.config(step, stage, key=key, fixed=fixed,
                                 wired=wired_paths(stage, inputs))
        config_json = json.dumps(config) if isinstance(config, dict) else config
        spec = STAGES[stage]
        image = self.recipe.images.image(spec.image)  # type: ignore[arg-type]
        extra = self._multinode(stage, step, image) if stage == "train" else {}
        task = component(stage, image)(config_json=config_json, **inputs, **extra)
        task.set_display_name(step)
        if stage != "import" and self.imports:
            task.after(*self.imports)  # steps read what the recipe's imports put in the store
        if self.for_cluster:
            apply_cluster_settings(task, stage, self.recipe, step)
        else:
            task.set_caching_options(False)  # stages reuse committed outputs themselves
        for cfg in each or [config]:
            if isinstance(cfg, dict):
                self.steps.append(StepRecord(step, stage, task.name, cfg.get("output"),
                                             cfg.get("label", label), cfg.get("metric"), row))
        return task

    def _multinode(self, stage: str, step: str, image: str) -> dict[str, Any]:
        """Arguments of the train component that launch a TrainJob (or PyTorchJob) when
        nodes > 1: node and GPU counts, the image, and `launch_json`, the job's cluster
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
        warning) while `mmjobs.stages.report` does not exist yet."""
        if importlib.util.find_spec("mmjobs.stages.report") is None:
            log.warning("report step skipped: mmjobs.stages.report is not available in this "
                        "version (the run's results table is still written by the runner)")
            return None
        model_cls = STAGES["report"].config_class()
        offered = {"title": title}
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
                                  section=_deep_merge(copy.deepcopy(dict(base)), overrides),
                                  where=f"sweep.{name}" if name else None)
                for name, overrides in settings.items()}

    # ---------------------------------------------------------------- recipe defaults

    def add_imports(self) -> None:
        """One `import-<name>` step per entry of the recipe's `imports`, before every other
        step. Each must say where its copy goes (`to`): the recipe names that URI where the
        input is used, so no step needs the import's output channel."""
        for name, section in self.recipe.imports.items():
            where = f"imports.{name}"
            if not section.get("to"):
                self.errors.append(f"{where}.to: required (the store URI the recipe's model, "
                                   "data or stages sections then name)")
            config = self.config(f"import-{name}", "import", section=section, where=where)
            self.imports.append(self.step(f"import-{name}", "import", config=config))

    def base_model(self) -> str | dsl.PipelineChannel:
        """The recipe's base model: its URI, or the output of a make-model step building a
        tiny model when `model.name_or_path` is `tiny:llava` / `tiny:chameleon`."""
        name = self.recipe.model.name_or_path
        if not name.startswith("tiny:"):
            return name
        kind = name.removeprefix("tiny:")
        if self._tiny is None:
            config = self.config("make-model", "make-tiny-model", defaults={"kind": kind})
            self._tiny = self.step("make-model", "make-tiny-model", config=config).output
        return self._tiny

    def defaults(self, stage: str, step: str = "") -> dict[str, Any]:
        """A stage's defaults from the recipe-level sections (model, data, train, eval).

        `data` (source_format, input) describes the step named `prepare` only: recipes with
        several prepare steps give each its own section.
        """
        r = self.recipe
        trust = {"trust_remote_code": True} if r.model.trust_remote_code else {}
        # Training data and prompts must be rendered alike: both steps get the recipe's format.
        fmt = ({"conversation_format": r.model.conversation_format}
               if r.model.conversation_format != "auto" else {})
        if stage == "train":
            model = r.model.model_dump(exclude={"name_or_path"}, exclude_defaults=True)
            return {"model": model, "train": r.train.model_dump(mode="json",
                                                                  exclude_defaults=True)}
        if stage == "pretokenize":
            return {**({"max_length": r.data.max_length} if r.data else {}), **trust, **fmt}
        if stage == "prepare" and step == "prepare" and r.data is not None:
            data = {"source_format": r.data.source_format, "input": r.data.input,
                    "max_reject_fraction": r.data.max_reject_fraction}
            return {k: v for k, v in data.items() if v is not None}
        if stage == "infer":
            return {"batch_size": r.eval.batch_size, "max_new_tokens": r.eval.max_new_tokens,
                    **({"dtype": r.model.dtype} if r.model.dtype != "auto" else {}), **trust,
                    **fmt}
        if stage in ("merge", "apply-connector", "build-moe-connector"):
            return dict(trust)
        return {}

    # ---------------------------------------------------------------- checks

    def check_sections(self) -> None:
        """Errors for `stages.<name>` / `cluster.stages.<name>` naming no step of this
        pipeline (typos), and for recipe-level train settings no train step has, added to
        `errors`."""
        steps = sorted(self.allowed_steps)
        pipeline = self.recipe.pipeline
        for name in self.recipe.stages:
            if name not in self.allowed_steps:
                hint = _did_you_mean(name, steps)
                self.errors.append(f"stages.{name}: not a step of pipeline {pipeline}; "
                                   f"{hint}")
        given = self.recipe.train.model_dump(mode="json", exclude_defaults=True)
        for path, message in unused_defaults(given, self.train_modes):
            self.errors.append(f"train.{path}: {message}")
        kinds = sorted(STAGES)
        for name in self.recipe.cluster.stages:
            if name not in self.allowed_steps and name not in STAGES:
                hint = _did_you_mean(name, steps + kinds)
                self.errors.append(f"cluster.stages.{name}: neither a step of pipeline "
                                   f"{pipeline} nor a stage kind; {hint}")


def wired_paths(stage: str, inputs: Mapping[str, Any]) -> tuple[str, ...]:
    """The config fields that the component parameters `inputs` fill."""
    return tuple(dict.fromkeys(_PARAM_PATHS.get((stage, name), name) for name in inputs))


def _did_you_mean(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"known: {', '.join(allowed)}"


def _why(key: str) -> str:
    if key in ("output", "pipeline_run_id", "experiment"):
        return "outputs go to {store}/{experiment}/{run_id}/{step}"
    if key in ("recipe", "parent_run_id"):
        return "every stage joins this pipeline run"
    return "wired from an upstream step"


def _top(paths: tuple[str, ...]) -> set[str]:
    """Top-level keys fully set by the pipeline (`model.name_or_path` leaves `model` open)."""
    return {p for p in paths if "." not in p}


def _placeholder_for(spec: StageSpec, path: str) -> Any:
    if path == "datasets":
        return [_PLACEHOLDER]
    if path == "experts":
        return {"expert": _PLACEHOLDER}
    return _PLACEHOLDER


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` (nested mappings merged, everything else replaced)."""
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def _get(data: Mapping[str, Any], path: str, default: Any) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
