"""Multi-node training: launch the train stage as a TrainJob (or PyTorchJob) and follow it.

The pipeline's train component calls `launch_multinode` when a recipe sets `cluster.nodes`
> 1. It runs in the KFP pod (no GPU of its own), creates the job through the Kubernetes API
(manifests from `mmjobs.train.k8s_jobs`), polls its conditions until it completes or fails,
and returns the same `TrainResult` as `mmjobs.stages.train.main`, read from the committed
output in the store. The job's name is derived from experiment, run and step, so a KFP retry
of the step adopts the job its previous attempt created (or replaces it if it failed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmjobs import storage
from mmjobs.logs import get_logger
from mmjobs.stages.common import output_uri, reusable_output
from mmjobs.stages.train import STAGE, TrainResult, TrainStageConfig, train_fingerprint
from mmjobs.train import k8s_jobs
from mmjobs.train.k8s_jobs import JobSettings

log = get_logger(__name__)
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Condition types that end a job, per kind: (success, failure).
DONE = {"trainjob": ("Complete", "Failed"), "pytorchjob": ("Succeeded", "Failed")}
API = {"trainjob": k8s_jobs.TRAINJOB_API, "pytorchjob": k8s_jobs.PYTORCHJOB_API}
BUILD = {"trainjob": k8s_jobs.trainjob, "pytorchjob": k8s_jobs.pytorchjob}
MAX_API_ERRORS = 10  # consecutive failed polls (API server restarts) before giving up
# The train stage's output layout (mmjobs.train.trainer / checkpoint, which import torch; the
# launcher pod does not need it): {output}/final/train_info.json, {output}/checkpoints/.
FINAL_DIR, INFO_FILE, CHECKPOINTS_DIR = "final", "train_info.json", "checkpoints"


def current_namespace() -> str:
    """The pod's namespace (service account file), else $MMJOBS_NAMESPACE."""
    if NAMESPACE_FILE.is_file():
        return NAMESPACE_FILE.read_text().strip()
    if os.environ.get("MMJOBS_NAMESPACE"):
        return os.environ["MMJOBS_NAMESPACE"]
    raise RuntimeError(f"multi-node training: no namespace ({NAMESPACE_FILE} is missing and "
                       "MMJOBS_NAMESPACE is not set)")


def custom_objects_api(api: Any = None) -> Any:
    """A CustomObjectsApi: `api` itself, one over `api` (an ApiClient), or one from the
    in-cluster service account, falling back to the kubeconfig."""
    from kubernetes import client, config

    if isinstance(api, client.CustomObjectsApi):
        return api
    if isinstance(api, client.ApiClient):
        return client.CustomObjectsApi(api)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def step_name(cfg: TrainStageConfig) -> str:
    """The pipeline step (`{store}/{experiment}/{run}/{step}`: the output's last folder)."""
    return output_uri(cfg, STAGE).rstrip("/").rsplit("/", 1)[-1]


def build_manifest(cfg: TrainStageConfig, *, nodes: int, gpus_per_node: int, image: str,
                   namespace: str, settings: JobSettings) -> dict[str, Any]:
    """The job for `cfg` (its output resolved, so every rank writes to the same place)."""
    out = output_uri(cfg, STAGE)
    config = cfg.model_copy(update={"output": out}).model_dump(mode="json",
                                                               exclude_defaults=True)
    step = step_name(cfg)
    annotations = {"mmjobs.io/experiment": cfg.experiment,
                   "mmjobs.io/pipeline-run-id": cfg.pipeline_run_id,
                   "mmjobs.io/step": step, "mmjobs.io/output": out}
    return BUILD[settings.kind](
        name=k8s_jobs.job_name(cfg.experiment, cfg.pipeline_run_id, step), namespace=namespace,
        config=config, nodes=nodes, gpus=gpus_per_node, image=image, settings=settings,
        annotations=annotations)


def launch_multinode(cfg: TrainStageConfig, *, nodes: int, gpus_per_node: int, image: str,
                     settings: JobSettings | Mapping[str, Any] | None = None,
                     kind: str | None = None, namespace: str | None = None, api: Any = None,
                     poll_s: float = 15.0, timeout_s: float | None = None) -> TrainResult:
    """Run the train stage on `nodes` nodes x `gpus_per_node` GPUs and wait for it.

    Args:
        settings: cluster settings of the job (a `JobSettings` or its JSON-mode dict).
        kind: `trainjob` or `pytorchjob` (default: `settings.kind`).
        namespace: default: the pod's namespace (see `current_namespace`).
        api: a kubernetes `CustomObjectsApi` or `ApiClient` (default: in-cluster config).
        poll_s: seconds between status polls.
        timeout_s: give up (deleting the job) after this long; default: wait forever.

    Raises:
        RuntimeError: the job failed or timed out (naming the job, reason and message), or it
            completed without committing its output.
    """
    settings = JobSettings.model_validate(settings or {})
    if kind is not None:
        settings = settings.model_copy(update={"kind": kind})
    final = storage.join(output_uri(cfg, STAGE), FINAL_DIR)
    fp = _fingerprint(cfg)
    if fp and (manifest := reusable_output(final, fp, cfg.force)) is not None:
        return _result(cfg, final, manifest.meta, cached=True)
    manifest_doc = build_manifest(cfg, nodes=nodes, gpus_per_node=gpus_per_node, image=image,
                                  namespace=namespace or current_namespace(), settings=settings)
    job = _Job(custom_objects_api(api), settings.kind, manifest_doc)
    with _delete_on_sigterm(job):
        job.start()
        job.wait(poll_s=poll_s, timeout_s=timeout_s)
    if not storage.is_committed(final):
        raise RuntimeError(f"{job}: finished, but {final} holds no committed result")
    meta = storage.read_manifest(final).meta
    if fp and meta.get("fingerprint") != fp:
        raise RuntimeError(f"{job}: finished, but {final} was made from other inputs "
                           f"(fingerprint {meta.get('fingerprint')}, expected {fp})")
    return _result(cfg, final, meta, cached=False)


class _Job:
    """One training job in the API: create (or adopt), poll, delete."""

    def __init__(self, api: Any, kind: str, manifest: dict[str, Any]) -> None:
        self.api, self.kind, self.manifest = api, kind, manifest
        self.group, self.version, self.plural = API[kind]
        self.name = manifest["metadata"]["name"]
        self.namespace = manifest["metadata"]["namespace"]

    def __str__(self) -> str:
        return f"{self.manifest['kind']} {self.namespace}/{self.name}"

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.api, f"{method}_namespaced_custom_object")(
            self.group, self.version, self.namespace, self.plural, *args, **kwargs)

    def start(self) -> None:
        """Create the job; adopt an existing one of the same name unless it failed."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("create", self.manifest)
            log.info("%s: created (%s nodes)", self, _nodes(self.manifest))
            return
        except ApiException as e:
            if e.status != 409:
                raise RuntimeError(f"{self}: could not be created: {_api_error(e)}") from e
        existing = self._call("get", self.name)
        ended, failed = self.outcome(existing)
        if ended and failed is not None:
            log.warning("%s: exists from an earlier attempt and failed (%s); replacing it",
                        self, failed)
            self.delete()
            self._wait_gone()
            self._call("create", self.manifest)
            log.info("%s: recreated", self)
        else:
            log.info("%s: exists from an earlier attempt of this step; following it", self)

    def outcome(self, obj: Mapping[str, Any]) -> tuple[bool, str | None]:
        """(ended, failure description or None) from the object's conditions."""
        success, failure = DONE[self.kind]
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("status") != "True":
                continue
            if cond.get("type") == failure:
                return True, (f"{cond.get('reason') or 'Failed'}: "
                              f"{cond.get('message') or 'no message'}")
            if cond.get("type") == success:
                return True, None
        return False, None

    def wait(self, *, poll_s: float, timeout_s: float | None) -> None:
        """Poll until the job ends; raise if it failed or `timeout_s` passed."""
        from kubernetes.client.exceptions import ApiException

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_state, errors = None, 0
        while True:
            try:
                obj = self._call("get", self.name)
                errors = 0
            except ApiException as e:
                if e.status == 404:
                    raise RuntimeError(f"{self}: deleted while running (by someone else)") from e
                errors += 1
                if errors >= MAX_API_ERRORS:
                    raise RuntimeError(f"{self}: cannot read its status: {_api_error(e)}") from e
                log.warning("%s: status read failed (%s); retrying", self, _api_error(e))
                obj = None
            if obj is not None:
                state = _state(obj)
                if state != last_state:
                    log.info("%s: %s", self, state)
                    last_state = state
                ended, failed = self.outcome(obj)
                if failed is not None:
                    raise RuntimeError(f"{self} failed: {failed} (logs: kubectl -n "
                                       f"{self.namespace} logs -l {self._pod_selector()})")
                if ended:
                    return
            if deadline is not None and time.monotonic() >= deadline:
                self.delete()
                raise RuntimeError(f"{self}: timed out after {timeout_s:g} s ({last_state}); "
                                   "deleted it")
            time.sleep(poll_s)

    def _pod_selector(self) -> str:
        if self.kind == "trainjob":
            return f"jobset.sigs.k8s.io/jobset-name={self.name}"
        return f"training.kubeflow.org/job-name={self.name}"

    def delete(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("delete", self.name, propagation_policy="Foreground")
            log.info("%s: deleted", self)
        except ApiException as e:
            if e.status != 404:
                log.warning("%s: could not delete it: %s", self, _api_error(e))

    def _wait_gone(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._call("get", self.name)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(poll_s)
        raise RuntimeError(f"{self}: still exists {timeout_s:g} s after deleting it")


@contextlib.contextmanager
def _delete_on_sigterm(job: _Job) -> Iterator[None]:
    """Delete the job when the step's pod is stopped (a cancelled run: KFP deletes the pod,
    which gets SIGTERM); the job would otherwise keep its GPUs. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        log.warning("%s: step stopped (SIGTERM); deleting the job", job)
        job.delete()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _nodes(manifest: dict[str, Any]) -> int:
    spec = manifest["spec"]
    if "trainer" in spec:
        return spec["trainer"]["numNodes"]
    return sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())


def _state(obj: Mapping[str, Any]) -> str:
    """A one-line summary of the true conditions, e.g. 'Created, Running'."""
    conds = [c for c in (obj.get("status") or {}).get("conditions") or []
             if c.get("status") == "True"]
    return ", ".join(f"{c.get('type')}" + (f" ({c['reason']})" if c.get("reason") else "")
                     for c in conds) or "Pending"


def _api_error(e: Any) -> str:
    try:
        return json.loads(e.body).get("message") or f"HTTP {e.status}"
    except (TypeError, ValueError, AttributeError):
        return f"HTTP {e.status} {e.reason}"


def _fingerprint(cfg: TrainStageConfig) -> str | None:
    try:
        return train_fingerprint(cfg)
    except (storage.StoreError, FileNotFoundError) as e:  # the job's stage checks again
        log.warning("train: cannot fingerprint the inputs here (%s); launching anyway", e)
        return None


def _result(cfg: TrainStageConfig, final: str, meta: dict[str, Any], *,
            cached: bool) -> TrainResult:
    """The stage's result from the committed `final/` (its train_info.json)."""
    info = json.loads(storage.read_text(storage.join(final, INFO_FILE)))
    parts = {k: storage.join(final, v) for k, v in (info.get("outputs") or {}).items()
             if k in ("adapter", "model", "connector", "reward_model")}
    out = output_uri(cfg, STAGE)
    if cached:
        log.info("train: %s already holds the result for these inputs; no job needed", final)
    return TrainResult(output=out, cached=cached, final=final,
                       checkpoints=storage.join(out, CHECKPOINTS_DIR),
                       steps=int(info.get("steps", meta.get("steps", 0))),
                       final_loss=info.get("final_loss"),
                       eval_metrics=info.get("eval_metrics") or {}, **parts)
