"""The stage contract: what every stage has, and the skeleton every stage runs.

A stage is a module `mmjobs/stages/<name>.py` (kebab-case stage names, snake_case modules; a
Python keyword gets a trailing underscore: `import` is `import_.py`). It declares itself once,
at its end, as `STAGE = Stage(...)`: its name, config and result models, `main`, the image
that runs it, whether it wants a GPU and is resumable, and the inputs its pipeline component
takes (`mmjobs.stages.registry` finds it there; the CLI, the KFP components, the pipeline
builder, the cluster settings and the images' import checks all read that declaration).

`main(cfg) -> Result` runs the stage. Outputs go to `{store_root}/{experiment}/
{pipeline_run_id}/{step}/`, are staged locally and committed with a manifest last; the
manifest's `meta.fingerprint` records the inputs, so a re-run whose committed output has the
same fingerprint is a no-op. `run_stage` is that skeleton (resolve the output, open the MLflow
child run, reuse a matching committed output, run the body, return the result); `stage_cli`
is the `python -m mmjobs.stages.<module>` / `mmjobs stage NAME` entrypoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from mmjobs import settings, storage
from mmjobs.config import ConfigError, StrictModel, load_config
from mmjobs.image_backend import image_backend
from mmjobs.logs import get_logger

log = get_logger(__name__)
C = TypeVar("C", bound="StageConfig")
R = TypeVar("R", bound="StageResult")
REQUIRED: Any = ...  # an `Input` without a default: the pipeline must wire it


class StageConfig(StrictModel):
    """Fields every stage config has (each stage's config subclasses this)."""

    experiment: str = Field("default", description="MLflow experiment and store folder.")
    pipeline_run_id: str = Field(
        "local", description="Pipeline run this stage belongs to; a folder in the output path."
    )
    output: str | None = Field(
        None, description="Output URI; default {store}/{experiment}/{pipeline_run_id}/{stage}."
    )
    recipe: str | None = Field(None, description="Recipe name, for tags.")
    parent_run_id: str | None = Field(
        None, description="MLflow parent (pipeline) run id; default $MMJOBS_PARENT_RUN_ID."
    )
    step: str | None = Field(
        None, description="Pipeline step this stage runs as (align, sft, infer-trained, ...): "
        "the name of its MLflow run. Default: the stage name."
    )
    force: bool = Field(False, description="Run even if a committed output matches the inputs.")


class StageResult(BaseModel):
    """Base of every stage result: where the output is and whether this run was a no-op."""

    output: str
    cached: bool = False
    mlflow_run_id: str | None = None


# Fields of StageConfig that say where the output goes and how it is tracked: never part of
# a stage's fingerprint.
RUN_FIELDS = frozenset(StageConfig.model_fields)


# --------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Input:
    """A parameter of the stage's pipeline component.

    Attributes:
        name: the parameter name (what pipeline files pass to `Build.step`).
        path: the config field it fills, dotted for nested fields ("" = same as `name`;
            None = not a config field: `Stage.component` gets it).
        type: the KFP parameter type (str, int or list).
        default: `REQUIRED`, or the value meaning "not wired" (then the config decides).
        placeholder: what stands in for the wired value while the pipeline validates the
            step's config before the run (None: a string saying it is wired), for fields
            whose validation a plain string fails (e.g. a URL).
    """

    name: str
    path: str | None = ""
    type: type = str
    default: Any = REQUIRED
    placeholder: Any = None

    @property
    def field(self) -> str | None:
        """The config field this input fills (dotted), or None."""
        return self.name if self.path == "" else self.path


@dataclass(frozen=True)
class Knob:
    """A config field users change from run to run: a KFP pipeline parameter (with the
    recipe's value as its default) that the pipeline hands to every step it configures.

    Attributes:
        path: the config field, dotted for nested fields (`train.lr`).
        type: the parameter type (float, int or str).
        unset: the parameter value meaning "no value" (None in the config, e.g. no row limit);
            None: the field always has a value, and a step whose config has none gets no
            parameter for it.
        description: what the run form shows beside the parameter.
    """

    path: str
    type: type
    unset: Any = None
    description: str = ""

    @property
    def input_name(self) -> str:
        """The component parameter carrying the knob's value (`set__train__lr`)."""
        return knob_input(self.path)


def knob_input(path: str) -> str:
    """The component parameter name of the knob at config field `path`."""
    return "set__" + path.replace(".", "__")


# The pipeline run id, when a cluster run makes its own: compiled into every step's config
# (output paths, tags) and replaced by KFP's job id at run time (`registry.run_component`).
KFP_RUN_ID_TOKEN = "{{mmjobs.kfp_run_id}}"


@dataclass(frozen=True)
class Stage(Generic[C, R]):
    """One stage, declared once in its module (see the module docstring).

    Attributes:
        name: kebab-case stage name (`mmjobs stage NAME`, the recipe's step kinds).
        config, result: the stage's config and result models.
        main: runs the stage.
        image: which of the recipe's images runs it.
        gpu: gets `cluster.gpus` on a cluster (unless `cluster.stages` says otherwise).
        resumable: picks up where a killed pod left off, so the cluster retries it.
        inputs: the component's parameters besides `config_json` (wired URIs, launch knobs).
        outputs: KFP UI artifacts of the component, name -> `dsl` type name: those the
            component body writes (Metrics, Markdown, HTML), and `Model` / `Dataset`, which
            `run_component` points at the committed output (typed lineage, nothing copied).
        own_output: the step writes to `{store}/{experiment}/{run}/{step}`.
        multinode: `cluster.nodes > 1` turns the step into a launcher of a multi-node job.
        pod_env: environment variables of the step's pod set to one of the recipe's images
            (variable -> image kind), e.g. evaluate's PoT pod image.
        recipe_defaults: the stage's defaults from the recipe-level sections (model, data,
            train, eval), given the recipe (`mmjobs.recipe.RecipeConfig`: it sits above the
            core, so it is typed `Any` here) and the step name.
        step_defaults: adjusts those defaults to the step's own section (section and what
            the pipeline fixes), e.g. train keeps the recipe-level settings the step's mode has.
        recipe_check: problems with the recipe-level sections given this stage's steps in the
            pipeline (step -> its own section), one message each, e.g. train settings that no
            train step takes.
        component: the component body when `main(cfg).output` is not all it does; gets the
            config and the non-config inputs and outputs, returns the component's string.
        wire: assembles wired inputs whose shape differs from their config field (default:
            each input's value at its `field`).
        errors: exceptions the CLI prints as one line (`mmjobs NAME: message`, exit 1).
        usage_errors: exceptions that mean a setting must be chosen, not a crash: printed as
            `mmjobs stage NAME: message`, exit 2 (like a config error).
        exit_codes: exceptions that end the CLI with their own exit code (logged as a
            warning), e.g. a preempted training run's 143.
        knobs: config fields a user changes per run (learning rate, steps, data URIs, row
            limits): pipeline parameters in the KFP UI's run form (`pipelines/builder.py`).
    """

    name: str
    config: type[C]
    result: type[R]
    main: Callable[[C], R]
    image: Literal["data", "train", "eval"]
    gpu: bool = False
    resumable: bool = False
    inputs: tuple[Input, ...] = ()
    outputs: Mapping[str, str] = field(default_factory=dict)
    own_output: bool = True
    multinode: bool = False
    pod_env: Mapping[str, str] = field(default_factory=dict)
    recipe_defaults: Callable[[Any, str], dict[str, Any]] | None = None
    step_defaults: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    recipe_check: Callable[[Any, dict[str, dict[str, Any]]], list[str]] | None = None
    component: Callable[..., str] | None = None
    wire: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    errors: tuple[type[BaseException], ...] = ()
    usage_errors: tuple[type[BaseException], ...] = ()
    exit_codes: Mapping[type[BaseException], int] = field(default_factory=dict)
    knobs: tuple[Knob, ...] = ()

    @property
    def summary(self) -> str:
        """One line saying what the stage does (its config's docstring)."""
        return " ".join((self.config.__doc__ or self.name).split())

    @property
    def wired(self) -> tuple[str, ...]:
        """Config fields the pipeline fills from upstream steps (dotted for nested)."""
        return tuple(dict.fromkeys(i.field for i in self.inputs if i.field))

    def cli(self, argv: Sequence[str] | None = None) -> int:
        """The stage's command line (`mmjobs stage NAME ...`, the image entrypoint)."""
        return stage_cli(self, argv)


# --------------------------------------------------------------------------- outputs


def output_uri(cfg: StageConfig, stage: str) -> str:
    """The stage's output location (explicit `output`, else the standard layout)."""
    if cfg.output:
        return cfg.output
    return storage.join(settings.store_root(), cfg.experiment, cfg.pipeline_run_id, stage)


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-able parts (configs, manifests, versions)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def input_fingerprint(uri: str) -> str:
    """Fingerprint of an input: its manifest's file list when committed, else size + bytes hash.

    Raises `IncompleteDirectoryError` for a directory without a manifest: it is never an input.
    """
    if storage.is_committed(uri):
        manifest = storage.read_manifest(uri)
        return fingerprint([(f.path, f.sha256) for f in manifest.files])
    loc = storage.parse(uri)
    if loc.scheme == "file" and Path(loc.key).is_file():
        return fingerprint(storage.sha256_file(loc.key))
    if loc.scheme == "file" and Path(loc.key).is_dir():
        # Raw source folders (annotation dumps) are fingerprinted by names and sizes.
        return fingerprint([(o.relpath, o.size) for o in storage.list_objects(uri)])
    if loc.scheme == "s3":
        # A single object: its size and ETag (a prefix lists as `uri/`, so it would never
        # change the fingerprint and a changed input file would silently reuse old outputs).
        head = storage.stat_object(uri)
        if head is not None:
            return fingerprint(head)
    if storage.exists(uri):
        objs = list(storage.list_objects(uri))
        return fingerprint([(o.relpath, o.size) for o in objs])
    raise storage.StoreNotFoundError(f"{uri}: input not found")


def reusable_output(uri: str, fp: str, force: bool = False) -> storage.Manifest | None:
    """The committed output at `uri` if it was made from the same inputs (`fp`), else None."""
    if force or not storage.is_committed(uri):
        return None
    manifest = storage.read_manifest(uri)
    if manifest.meta.get("fingerprint") == fp:
        log.info("%s: output already committed for these inputs (fingerprint %s); reusing it",
                 uri, fp)
        return manifest
    return None


def uncommit(uri: str) -> None:
    """Remove the manifest of an older output at `uri`, so a failure before the new commit
    never leaves one that looks current."""
    storage.delete(storage.join(uri, storage.MANIFEST_NAME))


@contextlib.contextmanager
def staged_output(uri: str, fp: str, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """A local scratch directory that is committed to `uri` when the block exits cleanly.

    `meta` is read when the block exits (a body may still add to it). On an exception nothing
    is committed, so a failed stage never looks complete.
    """
    scratch = Path(tempfile.mkdtemp(prefix="mmjobs-stage-", dir=os.environ.get("MMJOBS_TMP")))
    try:
        yield scratch
        storage.put_dir(scratch, uri, meta={**(meta or {}), "fingerprint": fp})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# Config fields that name datasets a stage reads, and the `mlflow.data.context` each is logged
# with as a dataset input of the stage's run (infer reads its `dataset` to answer it).
DATASET_FIELDS = {"data": "training", "ptx_data": "training", "eval_data": "evaluation",
                  "dataset": "training", "datasets": "training"}
_DATASET_CONTEXT = {("infer", "dataset"): "evaluation"}


@contextlib.contextmanager
def stage_tracking(cfg: StageConfig, stage: str, *, tags: dict[str, str] | None = None):
    """An MLflow child run for this stage under the pipeline's parent run (on a cluster,
    the parent the run's steps share: `mmjobs.pipeline_parent`).

    The run is named by the pipeline step (`cfg.step`: align, sft, infer-trained, ...; the
    stage name when run on its own) and tagged `mmjobs.stage` / `mmjobs.step`. Logs the
    resolved config as params (flattened) and as `config.yaml`, and the datasets it reads
    (`DATASET_FIELDS`) as dataset inputs with their fingerprints. Yields the run handle
    (`log_metrics`, `log_figure`, `log_table`, `log_artifact`, ...); the run ends FINISHED, or
    FAILED if the block raises. Tracking never fails the stage (see `mmjobs.tracking`).
    """
    from mmjobs.config import dump_recipe, flatten
    from mmjobs.pipeline_parent import shared_parent
    from mmjobs.tracking import Tracker, default_tags

    tracker = Tracker(cfg.experiment)
    parent = cfg.parent_run_id or os.environ.get("MMJOBS_PARENT_RUN_ID") or None
    shared = shared_parent(parent, cfg.recipe)  # a cluster run's steps share one parent
    step = cfg.step or stage
    all_tags = {**default_tags(recipe=cfg.recipe, stage=stage, step=step,
                               image=os.environ.get("MMJOBS_IMAGE")), **(tags or {})}
    with tracker.start_run(step, parent=None if shared else parent, tags=all_tags,
                           shared_parent=shared) as run:
        run.log_params(flatten(cfg))
        run.log_text(dump_recipe(cfg), "config.yaml")
        for uri, context in dataset_inputs(cfg, stage):
            log_dataset(run, uri, context)
        yield run


def dataset_inputs(cfg: StageConfig, stage: str) -> list[tuple[str, str]]:
    """(URI, context) of each dataset the stage's config names (`DATASET_FIELDS`)."""
    found = []
    for name, context in DATASET_FIELDS.items():
        value = getattr(cfg, name, None)
        for uri in value if isinstance(value, list) else [value]:
            if isinstance(uri, str) and uri:
                found.append((uri, _DATASET_CONTEXT.get((stage, name), context)))
    return found


def log_dataset(run: Any, uri: str, context: str) -> None:
    """Log the dataset at `uri` as an input of `run`: named by the step that made it (the
    folder name; a cache folder by its kind, e.g. `pretokenized`), its fingerprint as the
    digest, its manifest's numbers (row counts) as the profile.
    A dataset that cannot be read is left out with a warning (the stage reports it itself)."""
    try:
        digest = input_fingerprint(uri)
        meta = storage.read_manifest(uri).meta if storage.is_committed(uri) else {}
    except (storage.StoreError, OSError, ValueError) as e:
        log.warning("tracking: dataset input %s not logged: %s", uri, e)
        return
    profile = {k: v for k, v in meta.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    parts = storage.parse(uri).key.rstrip("/").split("/")
    # A content-addressed cache folder (cache/pretokenized/<fingerprint>) is named by its kind.
    name = parts[-2] if len(parts) > 1 and parts[-1] == meta.get("fingerprint") else parts[-1]
    run.log_dataset(name=name, uri=uri, digest=digest, context=context, profile=profile)


# --------------------------------------------------------------------------- the skeleton


@dataclass
class StageRun:
    """What a stage body works with: where its output goes and its MLflow run."""

    stage: str
    out: str
    fingerprint: str
    run: Any

    def commit(self, meta: dict[str, Any] | None = None) -> contextlib.AbstractContextManager:
        """A scratch directory committed to `out` (with `meta` + the stage name) on a clean
        exit; `meta` is read at that moment, so the body may fill it in the block."""
        meta = {} if meta is None else meta
        meta.setdefault("stage", self.stage)
        return staged_output(self.out, self.fingerprint, meta=meta)


def run_stage(cfg: StageConfig, stage: str, fp: str, body: Callable[[StageRun], dict[str, Any]],
              *, result: Callable[[str, dict[str, Any], bool, str | None], R],
              reused: Callable[[str, storage.Manifest, Any], dict[str, Any]] | None = None,
              tags: dict[str, str] | None = None, out: str | None = None,
              uncommit_first: bool = False, model_type: str | None = None) -> R:
    """What every stage with a committed output does around its own work.

    Resolve the output (`out`, else `output_uri`), open the stage's MLflow run, and reuse a
    committed output made from the same inputs (`fp`): `reused(out, manifest, run)` returns
    its facts (default: the manifest's meta; it may log them too). Otherwise (after removing
    an older output's manifest when `uncommit_first`) `body` runs, commits (`StageRun.commit`)
    and logs, and returns the facts. `result(out, facts, cached, mlflow_run_id)` makes the
    stage's result either way. With `model_type` the output is a model (merged, a base with
    a trained connector, ...): it is logged as an MLflow logged model pointing at `out`.
    """
    out = out or output_uri(cfg, stage)
    with stage_tracking(cfg, stage, tags=tags) as run:
        manifest = reusable_output(out, fp, cfg.force)
        cached = manifest is not None
        if manifest is not None:
            run.set_tags({"cached": "true"})
            facts = reused(out, manifest, run) if reused else manifest.meta
        else:
            if uncommit_first:
                uncommit(out)
            facts = body(StageRun(stage, out, fp, run))
        if model_type:
            run.log_model(name=cfg.step or stage, uri=out, fingerprint=fp, model_type=model_type,
                          params={k: v for k, v in facts.items()
                                  if isinstance(v, str | int | float) and k != "stage"})
        return result(out, facts, cached, run.run_id)


# --------------------------------------------------------------------------- command line


def stage_cli(stage: Stage, argv: Sequence[str] | None = None) -> int:
    """The `python -m mmjobs.stages.<module>` entrypoint: load config, run, print the result.

    The result is printed as one JSON line on stdout (the pipeline component reads it); under
    torchrun only rank 0 prints. Config errors exit 2 (also those found once the inputs are
    known); the stage's own `errors` print as one line and exit 1; `exit_codes` end with theirs.
    """
    parser = argparse.ArgumentParser(prog=f"mmjobs stage {stage.name}",
                                     description=(stage.config.__doc__ or "").strip())
    parser.add_argument("--config", help="stage config YAML (optional; fields can all be --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    args = parser.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"
    quiet = contextlib.nullcontext() if main_rank else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            cfg = load_config(stage.config, args.config or {}, args.overrides,
                              source=args.config or f"{stage.name} config")
            image_backend()  # a broken torchvision: one line now, not a traceback mid-stage
            result = stage.main(cfg)
            print(result.model_dump_json())
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except stage.usage_errors as e:
        print(f"mmjobs stage {stage.name}: {e}", file=sys.stderr)
        return 2
    except stage.errors as e:
        log.debug("%s failed", stage.name, exc_info=True)
        message = str(e).removeprefix(f"{stage.name}: ")  # errors that name their stage
        print(f"mmjobs {stage.name}: {message}", file=sys.stderr)
        return 1
    except tuple(stage.exit_codes) as e:
        log.warning("%s: %s", stage.name, e)
        return next(code for kind, code in stage.exit_codes.items() if isinstance(e, kind))
    return 0
