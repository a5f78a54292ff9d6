"""Policy checks for mmjobs manifests: least-privilege RBAC and secure pod defaults.

Schemas say whether a manifest is well formed; these checks say whether it is what we want to
ship. Each function returns a list of violations (empty when the manifest passes), each
naming the object and the field, so a failing test says what to change.

Least privilege (RBAC):
- namespace-scoped only: no ClusterRole / ClusterRoleBinding, no RoleBinding to a ClusterRole;
- no wildcards in apiGroups, resources or verbs; no nonResourceURLs;
- no privilege-granting verbs (escalate, bind, impersonate) and no pods/exec|attach|portforward;
- Secrets: `get` only, and only on named Secrets (resourceNames).

Pod defaults (the restricted Pod Security Standard plus our own rules), for every pod that a
manifest creates — Pods, workload templates, Jobs, PyTorchJob replicas, TrainJob trainers:
- runAsNonRoot and a RuntimeDefault (or Localhost) seccomp profile, on the pod or on every
  container; no host namespaces, no hostPath volumes;
- every container: allowPrivilegeEscalation false, readOnlyRootFilesystem true, capabilities
  drop ALL and add nothing, not privileged, a writable /tmp mount, CPU and memory requests
  and a memory limit.
"""

from __future__ import annotations

from typing import Any

from tests.k8s.validation import describe

FORBIDDEN_VERBS = {"escalate", "bind", "impersonate"}
FORBIDDEN_SUBRESOURCES = {"pods/exec", "pods/attach", "pods/portforward"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# --------------------------------------------------------------------------- RBAC


def rbac_violations(doc: dict[str, Any]) -> list[str]:
    """Least-privilege violations of one RBAC manifest ([] for other kinds)."""
    kind, name = doc.get("kind"), describe(doc)
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        return [f"{name}: cluster-wide RBAC; use a namespaced Role/RoleBinding"]
    if kind == "RoleBinding":
        if doc.get("roleRef", {}).get("kind") != "Role":
            return [f"{name}: roleRef must be a namespaced Role, not "
                    f"{doc.get('roleRef', {}).get('kind')}"]
        return []
    if kind != "Role":
        return []
    problems = []
    for i, rule in enumerate(doc.get("rules") or []):
        where = f"{name} rules[{i}]"
        if rule.get("nonResourceURLs"):
            problems.append(f"{where}: nonResourceURLs are cluster-level")
        for field in ("apiGroups", "resources", "verbs"):
            if "*" in (rule.get(field) or []):
                problems.append(f"{where}: wildcard in {field}; list what is needed")
        verbs = set(rule.get("verbs") or [])
        resources = set(rule.get("resources") or [])
        if verbs & FORBIDDEN_VERBS:
            problems.append(f"{where}: privilege-granting verbs {sorted(verbs & FORBIDDEN_VERBS)}")
        if resources & FORBIDDEN_SUBRESOURCES:
            problems.append(f"{where}: {sorted(resources & FORBIDDEN_SUBRESOURCES)} gives a "
                            "shell or tunnel into pods")
        if "secrets" in resources:
            if not rule.get("resourceNames"):
                problems.append(f"{where}: secrets without resourceNames (every Secret in the "
                                "namespace)")
            if verbs - {"get"}:
                problems.append(f"{where}: secrets verbs {sorted(verbs - {'get'})}; only get "
                                "by name")
    return problems


# --------------------------------------------------------------------------- pods


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod the manifest creates.

    A TrainJob has no pod spec of its own: its trainer pod is the runtime's, patched by
    `runtimePatches` and given `trainer.resourcesPerNode`; that merged view is returned for
    the `node` container (the torch/deepspeed runtimes' trainer container).
    """
    kind, name = doc.get("kind"), describe(doc)
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return [(name, spec)]
    if kind in WORKLOAD_KINDS or kind == "PodTemplate":
        template = doc.get("template") if kind == "PodTemplate" else spec.get("template")
        return [(name, (template or {}).get("spec") or {})]
    if kind == "CronJob":
        return [(name, spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
                 .get("spec") or {})]
    if kind == "PyTorchJob":
        return [(f"{name} {replica}", (replica_spec.get("template") or {}).get("spec") or {})
                for replica, replica_spec in (spec.get("pytorchReplicaSpecs") or {}).items()]
    if kind == "TrainJob":
        return [(f"{name} trainer", _trainjob_trainer_pod(spec))]
    return []


def _trainjob_trainer_pod(spec: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [{"name": "node"}]}
    for patch in spec.get("runtimePatches") or []:
        jobs = (patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
                .get("replicatedJobs") or [])
        for job in jobs:
            if job.get("name") != "node":
                continue
            pod_patch = job.get("template", {}).get("spec", {}).get("template", {}) \
                .get("spec") or {}
            pod.update({k: v for k, v in pod_patch.items() if k != "containers"})
            pod["containers"] = [c for c in pod_patch.get("containers") or []
                                 if c.get("name") == "node"] or pod["containers"]
    resources = (spec.get("trainer") or {}).get("resourcesPerNode")
    if resources:
        pod["containers"][0] = {**pod["containers"][0], "resources": resources}
    return pod


def pod_security_violations(doc: dict[str, Any]) -> list[str]:
    """Violations of the pod defaults in every pod the manifest creates."""
    problems = []
    for where, pod in pod_specs(doc):
        problems += _pod_violations(where, pod)
    return problems


def _pod_violations(where: str, pod: dict[str, Any]) -> list[str]:
    problems = []
    pod_sc = pod.get("securityContext") or {}
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{where}: {field} shares the node's namespace")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            problems.append(f"{where}: volume {volume.get('name')} is a hostPath")
    for container in containers:
        problems += _container_violations(f"{where} container {container.get('name')}",
                                          pod_sc, container)
    return problems


def _container_violations(where: str, pod_sc: dict[str, Any],
                          container: dict[str, Any]) -> list[str]:
    sc = container.get("securityContext") or {}
    problems = []

    def effective(field: str) -> Any:  # container settings override the pod's
        return sc.get(field, pod_sc.get(field))

    if effective("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true (pod or container)")
    if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: seccompProfile is not RuntimeDefault (pod or container)")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    if sc.get("privileged"):
        problems.append(f"{where}: privileged")
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{where}: capabilities.drop does not contain ALL")
    if capabilities.get("add"):
        problems.append(f"{where}: adds capabilities {capabilities['add']}")
    mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    if "/tmp" not in mounts:
        problems.append(f"{where}: no writable /tmp mount (the root filesystem is read-only)")
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    missing = [f"requests.{r}" for r in ("cpu", "memory") if r not in requests]
    missing += ["limits.memory"] if "memory" not in limits else []
    if missing:
        problems.append(f"{where}: resources missing {', '.join(missing)}")
    return problems


def policy_violations(docs: list[dict[str, Any]]) -> list[str]:
    """RBAC and pod violations of a set of manifests."""
    problems = []
    for doc in docs:
        problems += rbac_violations(doc) + pod_security_violations(doc)
    return problems
