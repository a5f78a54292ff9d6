"""PoT on a cluster: the programs run in a Kubernetes Job of their own that holds no credentials.

The evaluate step (which has the store's credentials) writes the programs to the store,
presigns a GET for them and a PUT for the results, and creates a Job whose pod:

- gets only those two URLs and its limits in the environment (no Secrets, no env from the
  evaluate pod, `enableServiceLinks: false`, `automountServiceAccountToken: false`);
- runs `python -m mmjobs.eval.pot.job` from the eval image as a non-root user with a
  read-only root file system, no capabilities, no privilege escalation, a RuntimeDefault (or
  the recipe's Localhost) seccomp profile and, optionally, the recipe's `runtimeClassName`
  (e.g. gVisor), and inside it the programs in bubblewrap (`pot.isolation`);
- is labelled `app.kubernetes.io/component: pot-sandbox`, which the NetworkPolicy shipped in
  k8s/base and the Helm chart selects: no ingress, and egress only to the store (no DNS: the
  step resolves the store's host and passes it as a `hostAliases` entry).

The step polls the Job until it completes, fails or exceeds `pot.pod.timeout_s`, reads the
results back, then deletes the Job and the store objects in every case. The URLs expire
after `pot.pod.url_expiry_s`; the GET reads only the programs (model output, no secret), the
PUT writes only this run's results object.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import secrets
import socket
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from mmjobs import kube, storage, storage_s3
from mmjobs import settings as mmjobs_settings
from mmjobs.eval.pot.launch import SandboxError
from mmjobs.eval.pot.sandbox import PotResult
from mmjobs.eval.pot.settings import POD_IMAGE_ENV, PotSettings
from mmjobs.logs import get_logger

log = get_logger(__name__)
COMPONENT = "pot-sandbox"  # the label the shipped NetworkPolicy selects
LABELS = {"app.kubernetes.io/name": "mmjobs", "app.kubernetes.io/part-of": "mmjobs",
          "app.kubernetes.io/component": COMPONENT}
RUN_AS = 10001  # the eval image's user
MAX_RESULTS_BYTES = 512 << 20


class PotPodError(RuntimeError):
    """The PoT Job failed, timed out, or returned no (valid) results."""


def run_in_pod(settings: PotSettings, programs: Sequence[str], *, step: str, api: Any = None,
               namespace: str | None = None, image: str | None = None,
               poll_s: float = 2.0) -> tuple[list[PotResult], tuple[str, ...]]:
    """Run `programs` in a PoT Job; returns (results in input order, protections in force).

    Args:
        settings: the stage's `pot` section (limits, isolation, `pod` settings).
        step: the evaluate step's output URI: names the Job and its store objects.
        api: a kubernetes `ApiClient` (default: in-cluster config, else kubeconfig).
        namespace: default: `settings.pod.namespace`, else the evaluate pod's own.
        image: default: `settings.pod.image`, else $MMJOBS_POT_IMAGE.

    Raises:
        SandboxError: the pod could not isolate the programs (its message names the fix).
        PotPodError: the Job failed or timed out, or its results are missing or malformed.
        ValueError: no image, no namespace, or the store is not S3 (nothing to presign).
    """
    import os

    image = image or settings.pod.image or os.environ.get(POD_IMAGE_ENV)
    if not image:
        raise ValueError(f"pot.executor is pod: set pot.pod.image (an eval image) or "
                         f"${POD_IMAGE_ENV}")
    namespace = namespace or settings.pod.namespace or _current_namespace()
    root = mmjobs_settings.store_root()
    if not storage.is_s3(root):
        raise ValueError(f"pot.executor is pod: the store ({root}) must be S3, which the pod "
                         "reads through presigned URLs; set pot.executor: local")
    name = job_name(step)
    prefix = storage.join(root, "tmp", "pot", name)
    programs_uri, results_uri = (storage.join(prefix, "programs.json"),
                                 storage.join(prefix, "results.json"))
    storage.write_text(programs_uri, json.dumps({"programs": list(programs)},
                                                ensure_ascii=False))
    batch = _batch_api(api)
    try:
        expiry = settings.pod.url_expiry_s
        get_url = presign(programs_uri, "get_object", expiry)
        put_url = presign(results_uri, "put_object", expiry)
        manifest = job_manifest(name=name, namespace=namespace, image=image, settings=settings,
                                programs_url=get_url, results_url=put_url, step=step,
                                host_aliases=host_aliases(get_url))
        log.info("evaluate: %d PoT programs in Job %s/%s", len(programs), namespace, name)
        batch.create_namespaced_job(namespace, manifest)
        try:
            try:
                _wait(batch, namespace, name, settings.pod.timeout_s, poll_s)
            except PotPodError as failure:
                # A pod that could not isolate the programs says why before it fails.
                with contextlib.suppress(PotPodError):
                    reason = _read_results(results_uri, name).get("error")
                    if reason:
                        raise SandboxError(f"PoT pod {namespace}/{name}: {reason}") from failure
                raise
            document = _read_results(results_uri, name)
        finally:
            _delete_job(batch, namespace, name)
    finally:
        with contextlib.suppress(storage.StoreError):
            storage.delete(prefix)
    if "error" in document:
        raise SandboxError(f"PoT pod {namespace}/{name}: {document['error']}")
    return _parse_results(document, len(programs), name)


def job_name(step: str) -> str:
    """`pot-<hash of the step>-<random>`: unique per attempt, a DNS-1123 label."""
    digest = hashlib.sha256(step.encode()).hexdigest()[:10]
    return f"pot-{digest}-{secrets.token_hex(3)}"


def presign(uri: str, operation: str, expiry_s: int) -> str:
    """A presigned URL for `operation` (get_object/put_object) on the S3 object `uri`."""
    loc = storage.parse(uri)
    # The store's own client: it carries the endpoint and addressing settings.
    client = storage_s3.client()
    return client.generate_presigned_url(operation, Params={"Bucket": loc.bucket,
                                                            "Key": loc.key},
                                         ExpiresIn=int(expiry_s))


def host_aliases(url: str) -> list[dict[str, Any]]:
    """hostAliases resolving the URL's host, so the pod needs no DNS (none is allowed)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        return []  # already an address
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise PotPodError(f"cannot resolve the store host {host!r} for the PoT pod: {e}") from e
    ips = sorted({info[4][0] for info in infos})
    return [{"ip": ip, "hostnames": [host]} for ip in ips]


def job_manifest(*, name: str, namespace: str, image: str, settings: PotSettings,
                 programs_url: str, results_url: str, step: str,
                 host_aliases: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch/v1 Job of one PoT run (see the module docstring)."""
    pod_cfg = settings.pod
    config = {"limits": {"wall_s": settings.wall_s, "cpu_s": settings.cpu_s,
                         "memory_bytes": settings.memory_mb << 20,
                         "disk_bytes": settings.disk_mb << 20},
              "isolation": {"kind": settings.isolation, "bwrap": settings.bwrap},
              "workers": settings.workers, "split_locals": settings.split_locals}
    seccomp: dict[str, Any] = {"type": "RuntimeDefault"}
    if pod_cfg.seccomp_localhost_profile:
        seccomp = {"type": "Localhost", "localhostProfile": pod_cfg.seccomp_localhost_profile}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "seccompProfile": seccomp},
        "containers": [{
            "name": "pot",
            "image": image,
            "command": ["python3", "-m", "mmjobs.eval.pot.job"],
            "env": [{"name": "POT_PROGRAMS_URL", "value": programs_url},
                    {"name": "POT_RESULTS_URL", "value": results_url},
                    {"name": "POT_CONFIG", "value": json.dumps(config)},
                    {"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
            "resources": {"requests": {"cpu": pod_cfg.cpu, "memory": pod_cfg.memory},
                          "limits": {"cpu": pod_cfg.cpu, "memory": pod_cfg.memory}},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    if host_aliases:
        spec["hostAliases"] = host_aliases
    if pod_cfg.runtime_class_name:
        spec["runtimeClassName"] = pod_cfg.runtime_class_name
    if pod_cfg.node_selector:
        spec["nodeSelector"] = dict(pod_cfg.node_selector)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS),
                     "annotations": {"mmjobs.io/step": step}},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": int(pod_cfg.timeout_s) + 60,
                 "ttlSecondsAfterFinished": 600,
                 "template": {"metadata": {"labels": dict(LABELS)}, "spec": spec}},
    }


def _current_namespace() -> str:
    namespace = kube.current_namespace(env=False)  # a PoT Job runs beside its step's pod
    if namespace is None:
        raise ValueError(f"pot.executor is pod: set pot.pod.namespace ({kube.NAMESPACE_FILE} "
                         "is missing: not running in a pod)")
    return namespace


def _batch_api(api: Any) -> Any:
    from kubernetes import client

    return client.BatchV1Api(kube.api_client(api))


def _wait(batch: Any, namespace: str, name: str, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = batch.read_namespaced_job(name, namespace).status
        if status is not None and (status.succeeded or 0) >= 1:
            return
        failed = [c for c in (status.conditions or []) if c.type == "Failed"
                  and c.status == "True"] if status is not None else []
        if failed or (status is not None and (status.failed or 0) >= 1):
            why = "; ".join(f"{c.reason}: {c.message}" for c in failed) or "its pod failed"
            raise PotPodError(f"PoT Job {namespace}/{name} failed ({why}); see `kubectl -n "
                              f"{namespace} logs job/{name}` before it is cleaned up")
        if time.monotonic() >= deadline:
            raise PotPodError(f"PoT Job {namespace}/{name} did not finish within "
                              f"{timeout_s:.0f}s (pot.pod.timeout_s)")
        time.sleep(poll_s)


def _delete_job(batch: Any, namespace: str, name: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            log.warning("evaluate: could not delete PoT Job %s/%s (%s %s); its "
                        "ttlSecondsAfterFinished removes it", namespace, name, e.status,
                        e.reason)


def _read_results(uri: str, name: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(uri)
    except storage.StoreError as e:
        raise PotPodError(f"PoT Job {name} finished without results ({uri}): {e}") from e
    if len(data) > MAX_RESULTS_BYTES:
        raise PotPodError(f"PoT Job {name}: results larger than {MAX_RESULTS_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError as e:
        raise PotPodError(f"PoT Job {name}: results are not JSON: {e}") from e
    if not isinstance(document, dict):
        raise PotPodError(f"PoT Job {name}: results are not a JSON object")
    return document


def _parse_results(document: dict[str, Any], expected: int,
                   name: str) -> tuple[list[PotResult], tuple[str, ...]]:
    raw = document.get("results")
    if not isinstance(raw, list) or len(raw) != expected:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise PotPodError(f"PoT Job {name}: expected {expected} results, got {got}")
    fields = set(PotResult.__dataclass_fields__)
    results = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != fields:
            raise PotPodError(f"PoT Job {name}: result {i} is malformed")
        item = {**item, "protections": tuple(item["protections"])}
        results.append(PotResult(**item))
    return results, tuple(document.get("protections") or ())
