"""A review server's Deployment + Service in the Kubernetes API: create or update, then watch
the rollout until every replica is ready, or say why it is not.

`ServerObjects` applies the manifests of `mmjobs.serve.k8s` (refusing to touch objects of that
name that another tool manages) and follows the Deployment as `kubectl rollout status` judges
it (`rollout_status`); the pods' own states (`pod_problems`) turn a crash loop (the model
failed to load: its log tail is the reason), a container that cannot start (a missing Secret)
or an unschedulable pod into the failure message, at once for the ones that will not fix
themselves. The deploy stage is the pipeline step around this.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mmjobs import kube
from mmjobs.logs import get_logger
from mmjobs.serve import k8s

log = get_logger(__name__)
# Container states that will not fix themselves: fail at once instead of waiting for the timeout.
FATAL_WAITING = {"CreateContainerConfigError", "CreateContainerError", "InvalidImageName",
                 "ErrImageNeverPull"}
MESSAGE_LINES = 6  # lines of a crashed container's log tail quoted in the failure


class DeployError(RuntimeError):
    """The server could not be created, or did not become ready (the message says why)."""


class ServerObjects:
    """One server's Deployment and Service in the API (raw JSON: no model classes needed)."""

    def __init__(self, api: Any, name: str, namespace: str, *,
                 selector: Mapping[str, str] | None = None, manager: str = k8s.MANAGER,
                 rename_hint: str = "stages.deploy.name") -> None:
        """`selector` finds the server's pods (default a review server's), `manager` is the
        managed-by label of objects this tool may change, `rename_hint` the setting that
        names them (said when an object of that name is someone else's)."""
        from kubernetes import client

        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.name, self.namespace = name, namespace
        self.selector = dict(selector or k8s.selector(name))
        self.manager, self.rename_hint = manager, rename_hint

    def __str__(self) -> str:
        return f"Deployment {self.namespace}/{self.name}"

    # ------------------------------------------------------------------ create or update

    def apply_deployment(self, manifest: dict[str, Any]) -> str:
        """Create the Deployment, or replace the spec of our existing one; 'created'/'updated'."""
        if self._create("deployments", self.apps.create_namespaced_deployment, manifest):
            return "created"
        self._check_ours("deployments", self.apps.read_namespaced_deployment)
        # A JSON patch replacing the spec: lists (env, args) are replaced, not merged, so a
        # setting removed from the config disappears from the pod too.
        ops = [{"op": "add", "path": f"/{path}", "value": value} for path, value in (
            ("metadata/labels", manifest["metadata"]["labels"]),
            ("metadata/annotations", manifest["metadata"]["annotations"]),
            ("spec", manifest["spec"]))]
        self._call("patch", "deployments", self.apps.patch_namespaced_deployment, self.name,
                   self.namespace, ops)
        return "updated"

    def apply_service(self, manifest: dict[str, Any]) -> None:
        """Create the Service, or patch our existing one (its cluster IP stays)."""
        if self._create("services", self.core.create_namespaced_service, manifest):
            return
        self._check_ours("services", self.core.read_namespaced_service)
        patch = {"metadata": {"labels": manifest["metadata"]["labels"]},
                 "spec": {key: manifest["spec"][key] for key in ("type", "selector", "ports")}}
        self._call("patch", "services", self.core.patch_namespaced_service, self.name,
                   self.namespace, patch)

    def _create(self, resource: str, method: Any, manifest: dict[str, Any]) -> bool:
        """True if created, False if it exists already."""
        from kubernetes.client.exceptions import ApiException

        try:
            method(self.namespace, manifest, _preload_content=False)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise DeployError(self._refused("create", resource, e)) from None

    def _check_ours(self, resource: str, read: Any) -> None:
        self._ensure_ours(resource, self._call("get", resource, read, self.name, self.namespace))

    def _ensure_ours(self, resource: str, obj: dict[str, Any]) -> None:
        manager = ((obj.get("metadata") or {}).get("labels") or {}).get(
            "app.kubernetes.io/managed-by")
        if manager != self.manager:
            raise DeployError(f"{resource} {self.namespace}/{self.name} exists and is not an "
                              f"mmjobs server (managed by {manager or 'nobody known'}); choose "
                              f"another name ({self.rename_hint})")

    def _call(self, verb: str, resource: str, method: Any, *args: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return kube.json_body(method(*args, _preload_content=False))
        except ApiException as e:
            raise DeployError(self._refused(verb, resource, e)) from None

    def _refused(self, verb: str, resource: str, e: Any) -> str:
        message = f"cannot {verb} {resource} {self.namespace}/{self.name}: {kube.api_error(e)}"
        if e.status == 403:
            message += (f" (the pipeline's service account needs create, get, patch, list and "
                        f"delete on deployments and services in {self.namespace}: install "
                        "the mmjobs "
                        "chart with serve.pipelineDeploy=true and bind that account to its "
                        "runner Role with rbac.extraSubjects)")
        return message

    # ------------------------------------------------------------------ delete

    def delete(self) -> list[str]:
        """Delete the Deployment (its pods go with it) and the Service, if they exist and
        are ours; what was deleted, as `kind/name` (nothing: already gone)."""
        from kubernetes.client.exceptions import ApiException

        deleted = []
        for resource, read, remove in (
                ("deployments", self.apps.read_namespaced_deployment,
                 self.apps.delete_namespaced_deployment),
                ("services", self.core.read_namespaced_service,
                 self.core.delete_namespaced_service)):
            try:
                obj = kube.json_body(read(self.name, self.namespace, _preload_content=False))
            except ApiException as e:
                if e.status == 404:
                    continue
                raise DeployError(self._refused("get", resource, e)) from None
            self._ensure_ours(resource, obj)
            try:
                remove(self.name, self.namespace, body={"propagationPolicy": "Background"},
                       _preload_content=False)
            except ApiException as e:
                if e.status != 404:  # deleted meanwhile: what we wanted
                    raise DeployError(self._refused("delete", resource, e)) from None
            deleted.append(f"{resource}/{self.name}")
        return deleted

    # ------------------------------------------------------------------ rollout

    def wait(self, *, timeout_s: float, poll_s: float, max_restarts: int) -> int:
        """Poll until every replica is updated and ready; the number of ready replicas.

        Raises:
            DeployError: the rollout failed (deadline exceeded, a pod that cannot start or
                keeps crashing) or `timeout_s` passed; the message quotes the pods' reasons.
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        deadline = time.monotonic() + timeout_s
        poller = kube.StatusPoller(self, error=DeployError, transient=(ApiException, HTTPError),
                                   gone="deleted while rolling out (by someone else)")
        problems: list[str] = []
        while True:
            obj = poller.read(lambda: kube.json_body(self.apps.read_namespaced_deployment(
                self.name, self.namespace, _preload_content=False)))
            if obj is not None:
                ready, failure, state = rollout_status(obj)
                poller.note(state)
                if ready:
                    return int((obj.get("status") or {}).get("availableReplicas") or 0)
                problems, fatal = self._pod_problems(max_restarts)
                if failure or fatal:
                    others = [p for p in problems if p not in fatal]
                    raise DeployError(f"{self}: did not become ready: "
                                      f"{failure or '; '.join(fatal)}{self._more(others)}")
            if time.monotonic() >= deadline:
                state = poller.last_state or "no status yet"
                raise DeployError(f"{self}: not ready after {timeout_s:g} s ({state})"
                                  f"{self._more(problems)}")
            time.sleep(poll_s)

    def _pod_problems(self, max_restarts: int) -> tuple[list[str], list[str]]:
        """(every not-ready pod's reason, the fatal ones); ([], []) if pods cannot be read."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        selector = ",".join(f"{k}={v}" for k, v in self.selector.items())
        try:
            pods = kube.json_body(self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _preload_content=False))
        except (ApiException, HTTPError) as e:
            log.warning("%s: cannot list its pods (%s)", self, kube.api_error(e))
            return [], []
        problems, fatal = [], []
        for pod in pods.get("items") or []:
            for text, is_fatal in pod_problems(pod, max_restarts):
                problems.append(text)
                if is_fatal:
                    fatal.append(text)
        return problems, fatal

    def _more(self, problems: list[str]) -> str:
        """The pods' reasons (if any) and where to look further."""
        selector = ",".join(f"{k}={v}" for k, v in self.selector.items())
        pods = f"; pods: {'; '.join(problems)}" if problems else ""
        return (f"{pods} (more: kubectl -n {self.namespace} describe pods -l {selector}; "
                f"kubectl -n {self.namespace} logs deployment/{self.name})")


def rollout_status(obj: Mapping[str, Any]) -> tuple[bool, str | None, str]:
    """(done, failure or None, one-line state) of a Deployment, as `kubectl rollout status`
    judges it: the controller saw the latest spec, every replica is updated, no old replica is
    left and every updated one is available (ready)."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    want = int(spec.get("replicas", 1))
    generation = int((obj.get("metadata") or {}).get("generation") or 0)
    if int(status.get("observedGeneration") or 0) < generation:
        return False, None, "waiting for the controller to see the new spec"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == \
                "ProgressDeadlineExceeded":
            return False, f"ProgressDeadlineExceeded: {cond.get('message') or ''}".strip(), \
                "progress deadline exceeded"
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < want:
        return False, None, f"{updated} of {want} replicas updated"
    if total > updated:
        return False, None, f"{total - updated} old replicas terminating"
    if available < updated:
        return False, None, f"{available} of {updated} updated replicas ready"
    return True, None, f"{available} of {want} replicas ready"


def pod_problems(pod: Mapping[str, Any], max_restarts: int) -> list[tuple[str, bool]]:
    """(reason, fatal) for what keeps a pod from being ready; [] for a ready pod.

    Fatal: a container that cannot be created or started (missing Secret or key, bad image
    name), or one that crashed more than `max_restarts` times (its log tail is the reason:
    the container reports FallbackToLogsOnError).
    """
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = meta.get("name", "?")
    if meta.get("deletionTimestamp"):
        return []  # an old pod on its way out
    if status.get("phase") == "Failed":
        return [(f"{name}: failed ({status.get('reason') or 'Failed'}): "
                 f"{status.get('message') or 'no message'}", True)]
    out: list[tuple[str, bool]] = []
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            out.append((f"{name}: not scheduled ({cond.get('reason') or 'Unschedulable'}): "
                        f"{cond.get('message') or 'no message'}", False))
    statuses = [*(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or [])]
    for cs in statuses:
        state, restarts = cs.get("state") or {}, int(cs.get("restartCount") or 0)
        last = _termination((cs.get("lastState") or {}).get("terminated"))
        if "waiting" in state:
            waiting = state["waiting"] or {}
            reason = waiting.get("reason") or "Waiting"
            text = f"{name}: {reason}"
            if waiting.get("message") and reason != "CrashLoopBackOff":
                text += f": {waiting['message']}"
            if restarts:
                text += f" (restarted {restarts}x; last exit {last})" if last else \
                    f" (restarted {restarts}x)"
            fatal = reason in FATAL_WAITING or (reason == "CrashLoopBackOff"
                                                and restarts > max_restarts)
            out.append((text, fatal))
        elif "terminated" in state:
            out.append((f"{name}: exited {_termination(state['terminated'])}", False))
        elif "running" in state and not cs.get("ready"):
            text = (f"{name}: running, not ready (/readyz: the model is still loading, or "
                    "failed to load)")
            if restarts and last:
                text += f"; restarted {restarts}x, last exit {last}"
            out.append((text, False))
    if not statuses and not out and status.get("phase") == "Pending":
        out.append((f"{name}: pending", False))
    return out


def _termination(term: Mapping[str, Any] | None) -> str:
    """'1 (Error): <last lines of the log>' of a terminated container state, or ''."""
    if not term:
        return ""
    text = f"{term.get('exitCode', '?')} ({term.get('reason') or 'Terminated'})"
    lines = [ln.strip() for ln in str(term.get("message") or "").splitlines() if ln.strip()]
    if lines:
        text += ": " + " | ".join(lines[-MESSAGE_LINES:])
    return text
