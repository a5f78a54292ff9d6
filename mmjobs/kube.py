"""The Kubernetes API from inside a pipeline step: client, namespace, responses and errors.

Steps that create objects on the cluster (the deploy stage's server, the multi-node launcher's
TrainJob, evaluate's PoT Job) reach the API with the pod's service account, or a kubeconfig
elsewhere (a laptop, the tests' API server on loopback), through the `kubernetes` client.
They use raw JSON responses (`_preload_content=False` + `json_body`), so no model classes of a
particular client version are needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmjobs.logs import get_logger

log = get_logger(__name__)

# Where Kubernetes mounts the service account's namespace into every pod.
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
NAMESPACE_ENV = "MMJOBS_NAMESPACE"  # the namespace elsewhere (tests, a laptop)
MAX_API_ERRORS = 10  # consecutive failed status reads (API server restarts) before giving up


class KubeAccessError(RuntimeError):
    """No usable in-cluster service account or kubeconfig, or no namespace; says which."""


def api_client(api: Any = None) -> Any:
    """`api` (a kubernetes ApiClient) itself, or one from the in-cluster service account,
    falling back to the kubeconfig.

    Raises:
        KubeAccessError: neither is usable.
    """
    from kubernetes import client, config

    if isinstance(api, client.ApiClient):
        return api
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except config.ConfigException as e:
            raise KubeAccessError(f"no Kubernetes API access: not in a pod with a service "
                                  f"account token, and no usable kubeconfig ({e})") from None
    return client.ApiClient()


def current_namespace(namespace_file: Path | None = None, *, env: bool = True) -> str | None:
    """The pod's namespace (its service account's file), else `$MMJOBS_NAMESPACE` (when `env`);
    None if neither says."""
    path = namespace_file or NAMESPACE_FILE
    if path.is_file():
        return path.read_text().strip()
    if env and os.environ.get(NAMESPACE_ENV):
        return os.environ[NAMESPACE_ENV]
    return None


def json_body(response: Any) -> dict[str, Any]:
    """The JSON object of a raw (`_preload_content=False`) response; {} for an empty one."""
    data = getattr(response, "data", response)
    return json.loads(data) if isinstance(data, bytes | str) and data else {}


def api_error(e: Any) -> str:
    """An API exception as one line: the server's message, else the HTTP status and reason."""
    try:
        return json.loads(e.body).get("message") or f"HTTP {e.status}"
    except (TypeError, ValueError, AttributeError):
        status = getattr(e, "status", None)
        return f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else str(e)


class StatusPoller:
    """Reads one object's status once per poll, as a step following it must.

    A 404 means someone deleted the object under us (`gone` says it); a failed read (an API
    server restarting) is retried at the next poll, up to `MAX_API_ERRORS` in a row; `note`
    logs the object's state when it changes. Failures are raised as `error(message)`.
    """

    def __init__(self, what: Any, *, error: Callable[[str], Exception],
                 transient: tuple[type[BaseException], ...], gone: str) -> None:
        self.what, self.error, self.transient, self.gone = what, error, transient, gone
        self.failures = 0
        self.last_state: str | None = None

    def read(self, read: Callable[[], Any]) -> Any | None:
        """`read()`'s value, or None after a failed read that will be retried."""
        try:
            value = read()
        except self.transient as e:
            if getattr(e, "status", None) == 404:
                raise self.error(f"{self.what}: {self.gone}") from None
            self.failures += 1
            if self.failures >= MAX_API_ERRORS:
                raise self.error(f"{self.what}: cannot read its status: {api_error(e)}") from None
            log.warning("%s: status read failed (%s); retrying", self.what, api_error(e))
            return None
        self.failures = 0
        return value

    def note(self, state: str) -> None:
        """Log `state` if it differs from the last one noted."""
        if state != self.last_state:
            log.info("%s: %s", self.what, state)
            self.last_state = state
