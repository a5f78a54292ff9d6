"""Multi-node training: launch a stage as a TrainJob (or PyTorchJob) and follow it.

The train stage's pipeline component launches itself this way when a recipe sets
`cluster.nodes` > 1 (`mmjobs.stages.train.launch`). It runs in the KFP pod (no GPU of its
own), creates the job through the Kubernetes API (manifests from `mmjobs.train.k8s_jobs`),
polls its conditions until it completes or fails, and returns the committed `final/` it left
in the store. The job's name is derived from experiment, run and step, so a KFP retry of the
step adopts the job its previous attempt created (or replaces it if it failed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mmjobs import kube, signals, storage
from mmjobs.layout import FINAL_DIR
from mmjobs.logs import get_logger
from mmjobs.stage_contract import StageConfig, reusable_output
from mmjobs.train import k8s_jobs
from mmjobs.train.k8s_jobs import JobSettings

log = get_logger(__name__)
NAMESPACE_FILE = kube.NAMESPACE_FILE
# Condition types that end a job, per kind: (success, failure).
DONE = {"trainjob": ("Complete", "Failed"), "pytorchjob": ("Succeeded", "Failed")}
API = {"trainjob": k8s_jobs.TRAINJOB_API, "pytorchjob": k8s_jobs.PYTORCHJOB_API}
BUILD = {"trainjob": k8s_jobs.trainjob, "pytorchjob": k8s_jobs.pytorchjob}


def current_namespace() -> str:
    """The pod's namespace (service account file), else $MMJOBS_NAMESPACE."""
    namespace = kube.current_namespace(NAMESPACE_FILE)
    if namespace is None:
        raise RuntimeError(f"multi-node training: no namespace ({NAMESPACE_FILE} is missing and "
                           f"{kube.NAMESPACE_ENV} is not set)")
    return namespace


def custom_objects_api(api: Any = None) -> Any:
    """A CustomObjectsApi: `api` itself, one over `api` (an ApiClient), or one from the
    in-cluster service account, falling back to the kubeconfig."""
    from kubernetes import client

    if isinstance(api, client.CustomObjectsApi):
        return api
    return client.CustomObjectsApi(kube.api_client(api))


def build_manifest(cfg: StageConfig, *, out: str, nodes: int, gpus_per_node: int, image: str,
                   namespace: str, settings: JobSettings) -> dict[str, Any]:
    """The job running the stage `cfg` configures, writing to `out` (its resolved output, so
    every rank writes to the same place; the last folder of `out` is the pipeline step)."""
    config = cfg.model_copy(update={"output": out}).model_dump(mode="json",
                                                               exclude_defaults=True)
    step = out.rstrip("/").rsplit("/", 1)[-1]
    annotations = {"mmjobs.io/experiment": cfg.experiment,
                   "mmjobs.io/pipeline-run-id": cfg.pipeline_run_id,
                   "mmjobs.io/step": step, "mmjobs.io/output": out}
    return BUILD[settings.kind](
        name=k8s_jobs.job_name(cfg.experiment, cfg.pipeline_run_id, step), namespace=namespace,
        config=config, nodes=nodes, gpus=gpus_per_node, image=image, settings=settings,
        annotations=annotations)


def launch_multinode(cfg: StageConfig, *, out: str, fingerprint: str | None, nodes: int,
                     gpus_per_node: int, image: str,
                     settings: JobSettings | Mapping[str, Any] | None = None,
                     kind: str | None = None, namespace: str | None = None, api: Any = None,
                     poll_s: float = 15.0, timeout_s: float | None = None
                     ) -> tuple[dict[str, Any], bool]:
    """Run `cfg`'s stage on `nodes` nodes x `gpus_per_node` GPUs and wait for its `final/`.

    Args:
        out: the stage's output; `{out}/final` is what the job commits.
        fingerprint: the inputs' fingerprint: a committed `final/` made from them is reused
            (no job), and the job's must match it (None: could not be computed here).
        settings: cluster settings of the job (a `JobSettings` or its JSON-mode dict).
        kind: `trainjob` or `pytorchjob` (default: `settings.kind`).
        namespace: default: the pod's namespace (see `current_namespace`).
        api: a kubernetes `CustomObjectsApi` or `ApiClient` (default: in-cluster config).
        poll_s: seconds between status polls.
        timeout_s: give up (deleting the job) after this long; default: wait forever.

    Returns:
        (the committed `final/`'s manifest meta, whether an earlier result was reused).

    Raises:
        RuntimeError: the job failed or timed out (naming the job, reason and message), or it
            completed without committing its output.
    """
    settings = JobSettings.model_validate(settings or {})
    if kind is not None:
        settings = settings.model_copy(update={"kind": kind})
    final = storage.join(out, FINAL_DIR)
    if fingerprint and (manifest := reusable_output(final, fingerprint, cfg.force)) is not None:
        log.info("%s already holds the result for these inputs; no job needed", final)
        return manifest.meta, True
    manifest_doc = build_manifest(cfg, out=out, nodes=nodes, gpus_per_node=gpus_per_node,
                                  image=image, namespace=namespace or current_namespace(),
                                  settings=settings)
    job = _Job(custom_objects_api(api), settings.kind, manifest_doc)
    with signals.handling(job.stop):
        job.start()
        job.wait(poll_s=poll_s, timeout_s=timeout_s)
    if not storage.is_committed(final):
        raise RuntimeError(f"{job}: finished, but {final} holds no committed result")
    meta = storage.read_manifest(final).meta
    if fingerprint and meta.get("fingerprint") != fingerprint:
        raise RuntimeError(f"{job}: finished, but {final} was made from other inputs "
                           f"(fingerprint {meta.get('fingerprint')}, expected {fingerprint})")
    return meta, False


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
                raise RuntimeError(f"{self}: could not be created: {kube.api_error(e)}") from e
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
        poller = kube.StatusPoller(self, error=RuntimeError, transient=(ApiException,),
                                   gone="deleted while running (by someone else)")
        while True:
            obj = poller.read(lambda: self._call("get", self.name))
            if obj is not None:
                poller.note(_state(obj))
                ended, failed = self.outcome(obj)
                if failed is not None:
                    raise RuntimeError(f"{self} failed: {failed} (logs: kubectl -n "
                                       f"{self.namespace} logs -l {self._pod_selector()})")
                if ended:
                    return
            if deadline is not None and time.monotonic() >= deadline:
                self.delete()
                raise RuntimeError(f"{self}: timed out after {timeout_s:g} s "
                                   f"({poller.last_state}); deleted it")
            time.sleep(poll_s)

    def stop(self, signum: int) -> None:
        """The step's pod was stopped (a cancelled run: KFP deletes the pod, which gets
        SIGTERM): delete the job, which would otherwise keep its GPUs, and exit."""
        log.warning("%s: step stopped (SIGTERM); deleting the job", self)
        self.delete()
        signals.exit_for(signum)

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
                log.warning("%s: could not delete it: %s", self, kube.api_error(e))

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
