"""A pipeline run's summary in MLflow: headline metrics on the parent run, models registered.

    summary = rollup(client, parent_run_id, registered_model="chart-demo")
    final = roll_up_run(parent_run_id, "chart-demo")  # the same, MLflow trouble a warning

After the steps of a pipeline run finished, its parent (pipeline) run gets:

- the headline metric of each evaluation as `<label>.<metric>` (`trained.chartqa.average_0.05`,
  `untrained.chartqa.average_0.05`), so pipeline runs sort and compare by their scores;
- the final model's scores without the label (`chartqa.average_0.05`): the same column for
  every recipe; the final model is the evaluated model a step of this run made (a logged
  model, see `RunHandle.log_model`), the best-scoring one when there are several (a sweep);
- a link to that model: its logged model as the run's output (the runs table's Models
  column) and the tags `mmjobs.final_model.uri`, `.id` and `.version`.

Each evaluated logged model is registered as a version of the registered model named after
the recipe, its source the model's store URI, with the evaluation scores as version tags (the
parent's metrics above are linked to the logged models too, so a model's page shows them); a
version for the same URI and fingerprint is reused, not duplicated. Which model an evaluation
scored is read from the runs' params: the evaluate run's `predictions` are an infer run's
`output`, whose `adapter` or `model` is a logged model's URI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from mmjobs import settings
from mmjobs.logs import get_logger
from mmjobs.report.runs import PARENT_TAG

log = get_logger(__name__)
URI_TAG, FINGERPRINT_TAG = "mmjobs.uri", "mmjobs.fingerprint"  # logged models' (tracking_spool)
FINAL_TAGS = ("mmjobs.final_model.uri", "mmjobs.final_model.id", "mmjobs.final_model.version")
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # MLflow's link from a logged model to versions


@dataclass
class Evaluation:
    """One evaluate run: its label, headline metric and value, and the model it scored."""

    run_id: str
    label: str
    metric: str
    value: float
    scores: dict[str, float]
    model: Any = None  # the LoggedModel it scored, when a step of this run made it


@dataclass
class Rollup:
    """What `rollup` did: evaluations found, metrics logged on the parent, the final model."""

    evaluations: list[Evaluation] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    final_model: Any = None
    versions: dict[str, str] = field(default_factory=dict)  # model id -> "name/version"


def rollup(client: Any, parent_run_id: str, *, registered_model: str | None) -> Rollup:
    """Roll the pipeline run `parent_run_id` up (see the module docstring); register the
    evaluated models under `registered_model` (None: no registry).

    Raises what MLflow raises; the caller decides whether a failure matters.
    """
    parent = client.get_run(parent_run_id)
    children = _children(client, parent.info.experiment_id, parent_run_id)
    models = _logged_models(client, children)
    out = Rollup(evaluations=_evaluations(children, models))
    if not out.evaluations:
        return out
    trained = [e for e in out.evaluations if e.model is not None]
    final = max(trained, key=lambda e: e.value) if trained else None
    now = int(time.time() * 1000)
    from mlflow.entities import Metric

    metrics = []
    for e in out.evaluations:
        metrics.append(Metric(f"{e.label}.{e.metric}", e.value, now, 0,
                              model_id=e.model.model_id if e.model else None))
    if final is not None:
        metrics += [Metric(k, v, now, 0, model_id=final.model.model_id)
                    for k, v in final.scores.items()]
    out.metrics = {m.key: m.value for m in metrics}
    new = [m for m in metrics if parent.data.metrics.get(m.key) != m.value]  # rolled up again
    if new:
        client.log_batch(parent_run_id, metrics=new)
    if registered_model:
        for e in trained:
            out.versions[e.model.model_id] = _register(client, registered_model, e, parent)
    if final is not None:
        from mlflow.entities import LoggedModelOutput

        out.final_model = final.model
        linked = {o.model_id for o in (parent.outputs.model_outputs if parent.outputs else [])}
        if final.model.model_id not in linked:
            client.log_outputs(parent_run_id, [LoggedModelOutput(final.model.model_id, 0)])
        values = (final.model.tags.get(URI_TAG, ""), final.model.model_id,
                  out.versions.get(final.model.model_id, ""))
        for key, value in zip(FINAL_TAGS, values, strict=True):
            if value:
                client.set_tag(parent_run_id, key, value)
    return out


def roll_up_run(parent_run_id: str, registered_model: str | None,
                tracking_uri: str | None = None) -> str | None:
    """`rollup` at the end of a pipeline run, where MLflow trouble is a warning (the run's
    results are in the store): by `mmjobs run` locally, by the report step on a cluster.
    Returns "name/version (URI)" of the final model, or None."""
    try:
        from mlflow import MlflowClient

        summary = rollup(MlflowClient(tracking_uri or settings.tracking_uri()), parent_run_id,
                         registered_model=registered_model)
    except Exception as e:  # a summary nicety: never fail the run over it
        log.warning("could not add headline metrics and the final model to MLflow run %s: %s",
                    parent_run_id, e)
        return None
    model = summary.final_model
    if model is None:
        return None
    version = summary.versions.get(model.model_id) or model.model_id
    return f"{version} ({model.tags.get(URI_TAG)})"


def _children(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=500, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _logged_models(client: Any, runs: list[Any]) -> dict[str, Any]:
    """Store URI -> the logged model the runs output (made now, or re-linked when reused)."""
    ids = {o.model_id for r in runs for o in (r.outputs.model_outputs if r.outputs else [])}
    models = {}
    for model_id in sorted(ids):
        model = client.get_logged_model(model_id)
        if model.tags.get(URI_TAG):
            models[model.tags[URI_TAG].rstrip("/")] = model
    return models


def _evaluations(runs: list[Any], models: dict[str, Any]) -> list[Evaluation]:
    """The finished evaluate runs with a headline metric, each with the model it scored."""
    by_output = {r.data.params.get("output", "").rstrip("/"): r for r in runs}
    found = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags, params = run.data.tags, run.data.params
        metric = tags.get("headline_metric")
        if _stage(run) != "evaluate" or metric not in run.data.metrics:
            continue
        scores = {k: v for k, v in run.data.metrics.items() if k.split(".", 1)[0] in
                  (metric.split(".", 1)[0], "judge")}
        infer = by_output.get(params.get("predictions", "").rstrip("/"))
        label = params.get("label") or tags.get("label") or run.info.run_name
        found.append(Evaluation(run.info.run_id, label if label != "None" else run.info.run_name,
                                metric, run.data.metrics[metric], scores,
                                _scored_model(infer, models) if infer else None))
    return found


def _stage(run: Any) -> str | None:
    return run.data.tags.get("mmjobs.stage") or run.data.tags.get("stage")


def _scored_model(infer: Any, models: dict[str, Any]) -> Any:
    """The logged model an infer run answered with: its adapter's (a training output, its
    final/ or the adapter inside), else its model's; None for a model no step made."""
    params = infer.data.params
    for key in ("adapter", "model"):
        uri = (params.get(key) or "").rstrip("/")
        if not uri or uri == "None":
            continue
        # The longest logged URI that is the input itself, inside it or around it.
        matches = [u for u in models
                   if u == uri or uri.startswith(u + "/") or u.startswith(uri + "/")]
        if matches:
            return models[max(matches, key=len)]
    return None


def _register(client: Any, name: str, e: Evaluation, parent: Any) -> str:
    """A version of `name` for the evaluated model (reused if one has its URI and
    fingerprint), tagged with the scores; returns "name/version"."""
    model = e.model
    uri, fp = model.tags.get(URI_TAG, ""), model.tags.get(FINGERPRINT_TAG, "")
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=f"Models trained by recipe {name} "
                                       "(mmjobs); sources are store URIs.")
    except MlflowException as err:  # only "it exists already" is expected; the rest is trouble
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = next((v for v in client.search_model_versions(f"name = '{name}'")
                    if v.tags.get(URI_TAG) == uri and v.tags.get(FINGERPRINT_TAG) == fp), None)
    tags = {**{k: f"{v:.6g}" for k, v in e.scores.items()}, URI_TAG: uri, FINGERPRINT_TAG: fp,
            "evaluation": e.label, "pipeline_run_id": parent.data.tags.get("pipeline_run_id", "")}
    if version is None:
        version = _create_version(client, name, model, tags)
    else:
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    ref = f"{name}/{version.version}"
    known = json.loads(model.tags.get(MODEL_VERSIONS_TAG) or "[]")
    if not any(v.get("name") == name and str(v.get("version")) == str(version.version)
               for v in known):
        client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(
            [*known, {"name": name, "version": str(version.version)}])})
    log.info("registered %s (%s) as %s", uri, e.label, ref)
    return ref


def _create_version(client: Any, name: str, model: Any, tags: dict[str, str]) -> Any:
    """A version whose source is the store URI; a server that refuses local paths as sources
    (they must lie in the run's artifacts) gets the logged model's `models:/` URI, the store
    URI staying in the `mmjobs.uri` tag."""
    from mlflow.exceptions import MlflowException

    kwargs = {"run_id": model.source_run_id, "tags": tags, "model_id": model.model_id,
              "description": f"{model.name}: {tags[URI_TAG]}"}
    try:
        return client.create_model_version(name, tags[URI_TAG], **kwargs)
    except MlflowException as e:
        if "Invalid model version source" not in str(e):
            raise
        return client.create_model_version(name, f"models:/{model.model_id}", **kwargs)
