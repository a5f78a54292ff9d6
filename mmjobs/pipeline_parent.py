"""The MLflow parent run of a pipeline run: its name and tags, and how a cluster run gets one.

Locally `mmjobs run` creates the parent before the steps start and hands its id to every step
(`parent_run_id`). A cluster run has no such moment: its steps are pods that start on their
own. There every step's config carries a *cluster reference* instead,
`kfp:<KFP job id>:<pipeline>` (compiled with `stage_contract.KFP_RUN_ID_TOKEN` in place of the
job id, replaced at run time by `registry.run_component`), and the first step to open its run
creates the parent, tagged `mmjobs.kfp_run_id=<job id>`; later steps find it by that tag.

MLflow has no create-if-absent, so parallel first steps race: each lists the runs carrying
the tag, and when there are none creates one, lists again and keeps the earliest by
(start_time, run_id); a step that created a later one deletes it and nests under the earliest.
Clock skew between pods can still, rarely, leave two parents (a step that created its
candidate after another step had already listed and kept its own, but with an earlier clock):
the report step, which every pipeline ends with, calls `consolidate` before rolling up, which
moves the children of every other candidate under the earliest and deletes the rest.

A step that fails (or is stopped: KILLED) ends the parent so too, when it is still RUNNING,
so a cluster run that fails before its report step does not stay RUNNING in MLflow; under
KFP retries a later attempt that succeeds, and then the report step, end it FINISHED after
all. A pod killed outright (OOM, eviction) ends nothing: its parent stays RUNNING.

A step whose MLflow is down spools its run with the reference (`Tracker.start_run(...,
shared_parent=...)`); whoever delivers it (the step when the server is back, or `mmjobs
tracking flush` later) finds or creates the parent the same way, so it still nests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mmjobs import settings
from mmjobs.config_errors import ConfigError
from mmjobs.logs import get_logger
from mmjobs.stage_contract import KFP_RUN_ID_TOKEN

log = get_logger(__name__)
__all__ = ["CLUSTER_PREFIX", "KFP_JOB_TAG", "cluster_ref", "consolidate", "end_parent_of",
           "find_or_create", "finish", "log_recipe", "parent_name", "parent_tags", "parse_ref",
           "resolve", "shared_parent"]
CLUSTER_PREFIX = "kfp:"
KFP_JOB_TAG = "mmjobs.kfp_run_id"
PARENT_TAG = "mlflow.parentRunId"


def parent_name(recipe: str | None, run_id: str) -> str:
    """The parent run's name: `<recipe> <pipeline run id>` (the KFP job id on a cluster)."""
    return f"{recipe or 'pipeline'} {run_id}"


def parent_tags(recipe: str | None, run_id: str, pipeline: str | None) -> dict[str, str]:
    """The parent run's tags, locally and on a cluster (`default_tags` for stage `pipeline`,
    the pipeline run id and the pipeline's name)."""
    from mmjobs.tracking import default_tags

    return {**default_tags(recipe, "pipeline"), "pipeline_run_id": run_id,
            "pipeline": pipeline or recipe or "pipeline"}


def cluster_ref(pipeline: str, job_id: str = KFP_RUN_ID_TOKEN) -> str:
    """The `parent_run_id` compiled into a cluster run's steps (see the module docstring)."""
    return f"{CLUSTER_PREFIX}{job_id}:{pipeline}"


def parse_ref(ref: str | None) -> tuple[str, str] | None:
    """(KFP job id, pipeline) of a cluster reference; None for a run id or nothing.

    Raises:
        ConfigError: a cluster reference whose job id was never filled in (the step was run
            outside KFP without `kfp_run_id`), or one without a pipeline name.
    """
    if not ref or not ref.startswith(CLUSTER_PREFIX):
        return None
    job_id, _, pipeline = ref.removeprefix(CLUSTER_PREFIX).partition(":")
    if not job_id or not pipeline or KFP_RUN_ID_TOKEN in ref or "'" in job_id:
        raise ConfigError("stage config", [
            f"parent_run_id: {ref!r} is not a complete cluster reference; it should be "
            f"{CLUSTER_PREFIX}<KFP job id>:<pipeline> (a step run outside KFP needs kfp_run_id, "
            "or give a real parent run id)"])
    return job_id, pipeline


def shared_parent(ref: str | None, recipe: str | None) -> dict[str, Any] | None:
    """What `Tracker.start_run(shared_parent=...)` needs to find or create the parent named
    by the cluster reference `ref` (None when `ref` is not one)."""
    parsed = parse_ref(ref)
    if parsed is None:
        return None
    job_id, pipeline = parsed
    return {"job_id": job_id, "name": parent_name(recipe, job_id),
            "tags": {**parent_tags(recipe, job_id, pipeline), KFP_JOB_TAG: job_id}}


def _candidates(client: Any, experiment_id: str, job_id: str, *,
                deleted: bool = False) -> list[Any]:
    """Runs tagged as the parent of KFP job `job_id`, earliest (start_time, run_id) first."""
    from mlflow.entities import ViewType

    runs = client.search_runs([experiment_id], f"tags.`{KFP_JOB_TAG}` = '{job_id}'",
                              run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY,
                              max_results=1000)
    # Only parents carry the tag at top level; children inherit nothing, but be strict.
    runs = [r for r in runs if PARENT_TAG not in r.data.tags]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_or_create(client: Any, experiment_id: str, spec: Mapping[str, Any],
                   start_time: int) -> str:
    """The run id of the parent described by `spec` (`shared_parent`), created when no step
    of the KFP job has made it yet (see the module docstring for the race). Raises what
    MLflow raises: the caller spools and retries."""
    job_id = spec["job_id"]
    found = _candidates(client, experiment_id, job_id)
    if found:
        return found[0].info.run_id
    mine = client.create_run(experiment_id, start_time=start_time, run_name=spec["name"],
                             tags=dict(spec["tags"])).info.run_id
    winner = _candidates(client, experiment_id, job_id)[0].info.run_id
    if winner != mine:
        log.info("tracking: another step created the parent run of KFP job %s first (%s); "
                 "deleting ours (%s)", job_id, winner, mine)
        client.delete_run(mine)
    return winner


def consolidate(client: Any, experiment_id: str, job_id: str) -> str | None:
    """Make the earliest parent of KFP job `job_id` the only one: the children of any other
    (a race lost to clock skew, or one deleted after children nested under it) move under it,
    and other active candidates are deleted. Returns its run id (None: no parent)."""
    from mlflow.entities import ViewType

    candidates = _candidates(client, experiment_id, job_id, deleted=True)
    active = [r for r in candidates if r.info.lifecycle_stage == "active"]
    if not active:
        return None
    keep = active[0].info.run_id
    for other in candidates:
        other_id = other.info.run_id
        if other_id == keep:
            continue
        children = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{other_id}'",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        for child in children:
            client.set_tag(child.info.run_id, PARENT_TAG, keep)
        if other.info.lifecycle_stage == "active":
            client.delete_run(other_id)
        if children or other.info.lifecycle_stage == "active":
            log.warning("tracking: KFP job %s had a second parent run %s; its %d child run(s) "
                        "moved under %s", job_id, other_id, len(children), keep)
    return keep


def resolve(experiment: str, ref: str, recipe: str | None,
            tracking_uri: str | None = None) -> str | None:
    """The run id of the parent named by the cluster reference `ref`, for the step that ends
    the run (report): found (made, if no step could track), consolidated. None when the
    experiment does not exist (no step tracked anything). Raises what MLflow raises."""
    from mlflow import MlflowClient

    spec = shared_parent(ref, recipe)
    if spec is None:
        raise ValueError(f"{ref!r} is not a cluster reference")
    client = MlflowClient(tracking_uri or settings.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    find_or_create(client, exp.experiment_id, spec, int(time.time() * 1000))
    return consolidate(client, exp.experiment_id, spec["job_id"])


def end_parent_of(client: Any, child_run_id: str, status: str, end_time: int) -> str | None:
    """End the parent of `child_run_id`, a cluster run's step that ended `status` (FAILED,
    KILLED), so too if it is still RUNNING (see the module docstring). Returns the parent's
    run id when it ended it. Raises what MLflow raises: the caller spools and retries."""
    parent_id = client.get_run(child_run_id).data.tags.get(PARENT_TAG)
    if not parent_id or client.get_run(parent_id).info.status != "RUNNING":
        return None
    client.set_terminated(parent_id, status, end_time)
    log.info("tracking: step run %s ended %s; so does its pipeline's parent run %s",
             child_run_id, status, parent_id)
    return parent_id


def log_recipe(run_id: str, params: Mapping[str, Any], recipe_yaml: str | None,
               tracking_uri: str | None = None) -> None:
    """Log a cluster run's compiled recipe on its parent run, as `mmjobs run` does locally:
    `params` (flattened, as `RunHandle.log_params` sends them) and `recipe.yaml`. A warning
    if MLflow refuses (e.g. a re-run whose recipe changed a param: params are immutable)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from mmjobs.tracking import MAX_PARAMS_TAGS_PER_BATCH, chunks, flatten_params

    client = MlflowClient(tracking_uri or settings.tracking_uri())
    flat = list(flatten_params(dict(params)).items()) if params else []
    try:
        for batch in chunks(flat, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=[Param(k, v) for k, v in batch])
        if recipe_yaml:
            client.log_text(run_id, recipe_yaml, "recipe.yaml")
    except Exception as e:  # a summary nicety: never fail the run over it
        log.warning("could not log the recipe on the MLflow parent run %s: %s", run_id, e)


def finish(run_id: str, status: str, tracking_uri: str | None = None) -> None:
    """End the parent run of a cluster run (`FINISHED`, `FAILED`); a warning if MLflow
    refuses: the run's results are in the store."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri or settings.tracking_uri()).set_terminated(
            run_id, status, int(time.time() * 1000))
    except Exception as e:  # a summary nicety: never fail the run over it
        log.warning("could not end the MLflow parent run %s: %s", run_id, e)
