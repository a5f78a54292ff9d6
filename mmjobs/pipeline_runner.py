"""Back end of `mmjobs run`, `compile`, `submit` and `validate`: recipe -> KFP pipeline.

    mmjobs run pipelines/recipes/chart-demo.yaml --set stages.sft.train.max_steps=50
    mmjobs compile pipelines/recipes/chartmoe.yaml -o chartmoe.yaml
    mmjobs submit pipelines/recipes/chartmoe.yaml --host https://kfp.example.com

`run` executes the pipeline with KFP's local runner (`SubprocessRunner(use_venv=False)`: each
step is a subprocess of this Python) on the embedded defaults, or on real S3/MLflow when the
environment says so (`MMJOBS_STORE`, `MLFLOW_TRACKING_URI`). It opens the MLflow parent run
that every stage nests under and ends by printing where the results are. The default run id
is a fingerprint of the resolved recipe, so running the same recipe again (after a failure,
say) lands in the same folders: every step whose committed output matches its inputs is
reused, and training resumes from its last checkpoint.

`compile` and `submit` build the same pipeline for a cluster, with the Kubernetes settings of
`pipelines.cluster`; outputs go under the recipe's `cluster.env.MMJOBS_STORE`, in a folder
named by each run's KFP job id (a `--run-id` bakes a folder in instead: runs naming it reuse
each other's committed outputs, as `mmjobs run` does locally). The stages' knobs and the base
model are pipeline parameters (see `pipelines.builder`), set in the KFP UI's run form.

The pipeline definitions live in the repository's `pipelines/` package (next to this package
in a source checkout), which is imported on demand.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from mmjobs import settings, storage
from mmjobs.config import ConfigError, dump_recipe, load_config
from mmjobs.logs import get_logger
from mmjobs.pipeline_logs import PipelineError, step_error, step_logs
from mmjobs.recipe import RecipeConfig, load_recipe
from mmjobs.run_results import (
    RunOutcome,
    cached_stages,
    collect_results,
    print_outcome,
    results_markdown,
    roll_up_parent_run,
)
from mmjobs.serve import engine_local

log = get_logger(__name__)
__all__ = ["PipelineError", "RunOutcome", "SubmitError", "compile_recipe", "load",
           "print_outcome", "results_markdown", "run_local", "submit", "validate"]
# Fields that do not change what a local run computes: left out of the default run id.
_NOT_IN_RUN_ID = {"description", "cluster", "images", "plan"}


# --------------------------------------------------------------------------- loading


def pipelines_package() -> ModuleType:
    """The `pipelines` package (the pipeline definitions, installed beside mmjobs).

    Raises:
        ConfigError: it is not installed (an install without the repository's pipelines/).
    """
    try:
        return importlib.import_module("pipelines")
    except ModuleNotFoundError as e:
        if e.name != "pipelines":
            raise
        raise ConfigError("pipelines", [
            "the pipeline definitions (the repository's pipelines/ package) are not installed; "
            "install mmjobs from a source checkout (pip install -e .)"]) from None


def load(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load a recipe and check its per-step sections against the stage configs.

    Raises:
        ConfigError: every problem in the file, the overrides and the step sections, in one
            pass: when recipe-level fields are invalid, the step sections are still checked
            with those fields at their defaults.
    """
    try:
        recipe = load_recipe(path, overrides)
    except ConfigError as e:
        more = [m for m in _step_errors_despite(path, overrides, e) if m not in e.errors]
        if more:
            raise ConfigError(e.source, [*e.errors, *more]) from None
        raise
    build_pipeline(recipe, run_id="check", store_root="/check", source=str(path))
    return recipe


def _step_errors_despite(path: str | Path, overrides: Sequence[str],
                         error: ConfigError) -> list[str]:
    """The step-section errors of a recipe whose recipe-level fields are invalid: the fields
    `error` names are left at their defaults, and the pipeline is built from the rest."""
    import yaml

    from mmjobs.recipe import resolve_recipe

    broken = {m.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0] for m in error.errors}
    broken.discard("stages")  # the step sections are what this checks
    try:
        data = yaml.safe_load(resolve_recipe(path).read_text())
    except (ConfigError, OSError, yaml.YAMLError):
        return []
    if not isinstance(data, dict) or "recipe" in broken or "pipeline" in broken:
        return []
    kept = {k: v for k, v in data.items() if k not in broken}
    usable = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in broken]
    try:
        recipe = load_config(RecipeConfig, kept, usable, source=str(path))
        build_pipeline(recipe, run_id="check", store_root="/check", source=str(path))
    except ConfigError as e:
        return e.errors
    return []


def default_run_id(recipe: RecipeConfig) -> str:
    """A fingerprint of the resolved recipe (minus cluster-only settings): identical re-runs
    share their output folders, so finished steps are reused."""
    from mmjobs.stage_contract import fingerprint

    data = recipe.model_dump(mode="json", exclude=_NOT_IN_RUN_ID)
    # Deploying the result for review changes no output: it must not move the run's folders.
    data.get("stages", {}).pop("deploy", None)
    if not data.get("conversions"):  # recipes without conversions keep their earlier run ids
        data.pop("conversions", None)
    return f"run-{fingerprint(data)[:12]}"


def build_pipeline(recipe: RecipeConfig, *, run_id: str, store_root: str,
                   parent_run_id: str | None = None, for_cluster: bool = False,
                   source: str | None = None,
                   build_cls: type | None = None) -> tuple[Callable[..., Any], Any]:
    """The KFP pipeline function for `recipe` and its `Build` (steps, outputs).

    The steps are wired (and every step config validated) once here, so configuration errors
    surface before anything runs, and the pipeline parameters (`Build.parameters`: the
    stages' knobs, the base model) are found; the function returned declares them, with the
    recipe's values as defaults, and wires the steps again (KFP calls it to compile or run)
    with their channels. `build_cls` replaces `pipelines.builder.Build` with a subclass
    (`mmjobs plan` records the steps' configs with one).

    Raises:
        ConfigError: unknown pipeline, or invalid step sections (all listed).
    """
    from kfp import compiler, dsl

    package = pipelines_package()
    from pipelines.builder import Build

    source = source or recipe.recipe
    module = package.PIPELINES.get(recipe.pipeline)
    if module is None:
        raise ConfigError(source, [f"pipeline: got {recipe.pipeline!r} — not a pipeline; "
                                   f"choose one of {', '.join(sorted(package.PIPELINES))}"])
    state: dict[str, Build] = {}

    def wire(params: Mapping[str, Any]) -> None:
        build = (build_cls or Build)(recipe, run_id=run_id, store_root=store_root,
                                     parent_run_id=parent_run_id, for_cluster=for_cluster,
                                     params=params)
        state["build"] = build
        build.add_imports()
        module.wire(build)
        build.check_sections()
        if build.errors:
            raise ConfigError(source, list(dict.fromkeys(build.errors)))

    def unparametrized():  # no return annotation: KFP would read it as an output
        wire({})

    description = recipe.description or recipe.recipe
    with tempfile.TemporaryDirectory(prefix="mmjobs-compile-") as tmp:
        _quietly(compiler.Compiler().compile, dsl.pipeline(name=recipe.recipe,
                 description=description)(unparametrized), str(Path(tmp) / "pipeline.yaml"))
    parameters = state["build"].parameters
    if not parameters:
        return dsl.pipeline(name=recipe.recipe, description=description)(unparametrized), \
            state["build"]
    pipeline = _quietly(dsl.pipeline(name=recipe.recipe, description=description),
                        _with_parameters(wire, parameters.values()))
    return pipeline, state["build"]


def _with_parameters(wire: Callable[[Mapping[str, Any]], None],
                     parameters: Any) -> Callable[..., None]:
    """`wire` as a pipeline function declaring `parameters` (`pipelines.builder.Param`):
    KFP reads a pipeline's parameters, defaults and descriptions from its signature and
    docstring."""
    import inspect

    signature = inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default,
                          annotation=p.type) for p in parameters])

    def pipeline(*args: Any, **kwargs: Any) -> None:  # KFP passes the channels by position
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        wire(bound.arguments)

    pipeline.__signature__ = signature  # type: ignore[attr-defined]
    pipeline.__doc__ = "Pipeline parameters (defaults: the recipe's).\n\nArgs:\n" + "".join(
        f"    {p.name}: {p.description} Steps: {', '.join(p.steps)}.\n" for p in parameters)
    return pipeline


def _quietly(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn`, unwrapping the ConfigError KFP's compiler may wrap."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


# --------------------------------------------------------------------------- run


def _keep_log(log_file: Any, uri: str) -> None:
    """Copy the run's full log into the store beside its outputs (a warning if it cannot)."""
    try:
        log_file.seek(0)
        storage.write_text(uri, log_file.read())
    except (OSError, storage.StoreError) as e:
        log.warning("could not keep the run's full log at %s: %s", uri, e)


def run_dir(path: str | Path, overrides: Sequence[str] = (), run_id: str | None = None) -> str:
    """The folder `run_local(path, overrides, run_id=...)` writes its outputs to (`mmjobs chat`
    serves the settings found there).

    Raises:
        ConfigError: the recipe is invalid.
    """
    recipe = load_recipe(path, overrides)
    return _run_folder(settings.store_root(), recipe, run_id or default_run_id(recipe))


def _run_folder(store: str, recipe: RecipeConfig, run_id: str) -> str:
    return storage.join(store, recipe.experiment or "default", run_id)


def run_local(path: str | Path, overrides: Sequence[str] = (), *, run_id: str | None = None,
              verbose: bool = False, arguments: Mapping[str, Any] | None = None) -> RunOutcome:
    """Run a recipe's pipeline locally; see the module docstring.

    `arguments` sets pipeline parameters (`Build.parameters`, what the KFP UI's run form
    shows) for this run; recipe overrides are the usual way to change a local run.

    Raises:
        ConfigError: the recipe is invalid, or an argument names no pipeline parameter.
        PipelineError: a step failed (its name and log tail in the message).
    """
    from kfp import local

    from mmjobs.config import flatten
    from mmjobs.pipeline_parent import parent_name, parent_tags
    from mmjobs.tracking import Tracker

    started = time.monotonic()
    recipe = load_recipe(path, overrides)
    run_id = run_id or default_run_id(recipe)
    store = settings.store_root()
    _, checked = build_pipeline(recipe, run_id=run_id, store_root=store, source=str(path))
    unknown = sorted(set(arguments or {}) - set(checked.parameters))
    if unknown:
        known = ", ".join(sorted(checked.parameters)) or "none"
        raise ConfigError(str(path), [f"{name}: not a parameter of this pipeline; it has "
                                      f"{known}" for name in unknown])
    run_dir = _run_folder(store, recipe, run_id)
    log.info("run %s of %s: outputs under %s", run_id, recipe.recipe, run_dir)
    tracker = Tracker(recipe.experiment or "default")
    parent = tracker.start_run(parent_name(recipe.recipe, run_id),
                               tags=parent_tags(recipe.recipe, run_id, recipe.pipeline))
    parent.log_params(flatten(recipe))
    parent.log_text(dump_recipe(recipe), "recipe.yaml")
    pipeline, build = build_pipeline(recipe, run_id=run_id, store_root=store,
                                     parent_run_id=parent.run_id, source=str(path))
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(settings.kfp_root()), raise_on_error=True)
    _fix_local_loop_inputs()
    status, model = "FAILED", None
    full_log = storage.join(run_dir, "logs", f"{time.strftime('%Y%m%d-%H%M%S')}.log")
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log_file:
        try:
            # engine_local.session: no `mmjobs serve` started for eval.engine outlives the run
            with step_logs(verbose, build, full_log=log_file) as logs, engine_local.session():
                try:
                    pipeline(**(arguments or {}))
                except RuntimeError as e:
                    raise step_error(e, build, logs, full_log) from None
            status = "FINISHED"
            model = roll_up_parent_run(recipe, parent, tracker)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            parent.end(status)
            tracker.close(timeout=10)
            _keep_log(log_file, full_log)
    outcome = RunOutcome(run_id=run_id, run_dir=run_dir, mlflow_run_id=parent.run_id,
                         seconds=time.monotonic() - started, results=None, log=full_log,
                         model=model)
    collect_results(build, outcome)
    outcome.stages_cached = cached_stages(recipe.experiment or "default", parent.run_id)
    return outcome


def _fix_local_loop_inputs() -> None:
    """Work around kfp 2.17's local runner handing the loop item to every input of a
    `dsl.ParallelFor` iteration that comes from an upstream task's output.

    `kfp.local.orchestrator.task_spec_utils.create_parameter_loop_iteration_task_spec`
    replaces each `task_output_parameter` input of the loop task with the loop item, so a
    sweep's training steps would get the settings dict instead of the pretokenized data's
    URI. Inputs other than the iterator's own item source are put back as compiled. Clusters
    are unaffected (the KFP backend resolves loops itself). Idempotent.
    """
    from kfp.local.orchestrator import enhanced_dag_orchestrator as dag
    from kfp.local.orchestrator import task_spec_utils

    original = task_spec_utils.create_parameter_loop_iteration_task_spec
    if getattr(original, "_mmjobs_fixed", False):
        return

    def create(original_task_spec: Any, loop_item: Any, loop_task_name: str) -> Any:
        spec = original(original_task_spec, loop_item, loop_task_name)
        items_source = original_task_spec.parameter_iterator.items.input_parameter
        for name, given in original_task_spec.inputs.parameters.items():
            if given.HasField("task_output_parameter") and name != items_source:
                spec.inputs.parameters[name].CopyFrom(given)
        return spec

    create._mmjobs_fixed = True  # type: ignore[attr-defined]
    task_spec_utils.create_parameter_loop_iteration_task_spec = create
    if hasattr(dag.task_spec_utils, "create_parameter_loop_iteration_task_spec"):
        dag.task_spec_utils.create_parameter_loop_iteration_task_spec = create


# --------------------------------------------------------------------------- cluster


class SubmitError(RuntimeError):
    """The KFP API could not be reached or refused the run; the message says which and why."""


def cluster_store(recipe: RecipeConfig, source: str) -> str:
    """Where stage outputs go on the cluster: the recipe's `cluster.env.MMJOBS_STORE`."""
    store = recipe.cluster.env.get("MMJOBS_STORE")
    if not store:
        raise ConfigError(source, ["cluster.env.MMJOBS_STORE: required to compile for a "
                                   "cluster — the s3:// prefix where stage outputs go (the "
                                   "pods read it too), e.g. s3://mmjobs/store"])
    return store


def compile_recipe(path: str | Path, output: str | Path, overrides: Sequence[str] = (), *,
                   run_id: str | None = None) -> str | None:
    """Compile the recipe's pipeline with cluster settings to KFP IR YAML at `output`.

    Without `run_id` every run of the compiled pipeline writes under its own KFP job id
    (`{store}/{experiment}/<job uuid>/{step}`); a `run_id` is baked in instead, so runs
    that name it share their folders and reuse each other's committed outputs (resuming a
    failed run; `mmjobs run`'s default locally). Either way the steps of one KFP run nest
    under one MLflow parent run, which the report step rolls up (`mmjobs.pipeline_parent`).

    Returns:
        The run id baked into the output paths, or None (KFP's job id at run time).
    """
    from kfp import compiler

    from mmjobs.pipeline_parent import cluster_ref
    from mmjobs.stage_contract import KFP_RUN_ID_TOKEN

    recipe = load_recipe(path, overrides)
    given = run_id
    run_id = run_id or KFP_RUN_ID_TOKEN
    # The steps of each KFP run share one MLflow parent run, keyed by the KFP job id (also
    # with a baked run id: each run is its own pipeline run in MLflow, as locally).
    parent = cluster_ref(recipe.pipeline or recipe.recipe)
    pipeline, _ = build_pipeline(recipe, run_id=run_id, store_root=cluster_store(recipe, str(
        path)), parent_run_id=parent, for_cluster=True, source=str(path))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    _quietly(compiler.Compiler().compile, pipeline, str(output))
    return given


def submit(path: str | Path, host: str, overrides: Sequence[str] = (), *,
           experiment: str | None = None, no_cache: bool = False,
           run_id: str | None = None) -> str:
    """Compile and submit the recipe to the KFP API at `host`; returns the run's URL.

    Credentials for the KFP endpoint itself come from kfp.Client's usual sources (in-cluster
    service account, `KF_PIPELINES_*` environment); nothing secret goes into the pipeline.

    Raises:
        ConfigError: the recipe is invalid (nothing is sent).
        SubmitError: the KFP API cannot be reached or refused the run.
    """
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    recipe = load_recipe(path, overrides)
    with tempfile.TemporaryDirectory(prefix="mmjobs-submit-") as tmp:
        package = str(Path(tmp) / f"{recipe.recipe}.yaml")
        compile_recipe(path, package, overrides, run_id=run_id)
        try:
            with warnings.catch_warnings():  # "only works with KFP 2.0.0-beta.2 and later"
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host)
            result = client.create_run_from_pipeline_package(
                package, arguments={},
                run_name=f"{recipe.recipe} {run_id or time.strftime('%Y-%m-%d %H:%M:%S')}",
                experiment_name=experiment or recipe.experiment, enable_caching=not no_cache)
        except ApiException as e:  # the server answered, and refused
            raise SubmitError(f"{host}: the KFP API answered {e.status} {e.reason}: "
                              f"{(e.body or '').strip()[:300]} — check the credentials "
                              "(KF_PIPELINES_* environment, service account) and that --host "
                              "is the KFP API's address") from e
        except (OSError, urllib3.exceptions.HTTPError) as e:  # refused, unresolvable, timed out
            raise SubmitError(f"{host}: cannot reach the KFP API ({e}); check --host (e.g. "
                              "https://kfp.example.com, or a port-forward such as "
                              "http://127.0.0.1:8080)") from e
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


# --------------------------------------------------------------------------- validate


def validate(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> int:
    """`mmjobs validate`: the recipe schema and every step section; 0 when all are valid."""
    status = 0
    for path in paths:
        try:
            recipe = load(path, overrides)
        except ConfigError as e:
            print(e, file=sys.stderr)
            status = 1
        else:
            print(f"OK {path} (recipe {recipe.recipe}, pipeline {recipe.pipeline})")
    return status
