"""The deploy stage against a Kubernetes API server on loopback, through the real client.

The fake server keeps apps/v1 Deployments and v1 Services in memory and answers create, get
and patch (JSON patch and strategic merge, as the client sends them), lists pods by label
selector, records every request, and reports a scripted sequence of Deployment statuses (the
controller's view) and pods. The kubernetes client talks to it over HTTP on 127.0.0.1.

- a new server: Deployment and Service created (schema-valid, restricted pods), the rollout
  followed until the replicas are ready, the in-cluster URL returned;
- a later run: the existing server is patched (spec replaced, the Service keeps its cluster
  IP) and a stale "ready" status of the old spec is not mistaken for the new one;
- a sweep's settings (`models`): one Deployment whose server serves them all;
- failures name the pods' reasons: a crash loop quotes the log tail, a missing Secret fails at
  once, an unschedulable pod fails at the timeout, an exceeded progress deadline fails;
- RBAC refusals say which chart setting grants the rules; a Deployment of that name that is
  not an mmjobs server is left alone; a transient API error is retried;
- the KFP component runs the stage with the client configured from a kubeconfig.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from mmjobs.serve import k8s
from mmjobs.stages import deploy
from tests.fake_kube import fake_kube_api, use_kubeconfig
from tests.k8s import policy
from tests.k8s.validation import KUBE_VERSIONS, validate_manifest

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
IMAGE = "ghcr.io/mmjobs/mmjobs-eval:0.1.0"
MODEL = "s3://mmjobs/store/chart-demo/run-1/merge"
NAME = "mmjobs-serve-chart-demo"
PATH = re.compile(r"^/(?:api/v1|apis/apps/v1)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/?]+)"
                  r"(?:/(?P<name>[^/?]+))?$")
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
SERVICES = f"/api/v1/namespaces/{NAMESPACE}/services"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def status(updated: int = 1, available: int = 1, replicas: int | None = None,
           observed: int | None = None, conditions: list[dict] | None = None) -> dict:
    """A Deployment status; `observed` None: the controller has seen the latest spec."""
    out: dict[str, Any] = {"updatedReplicas": updated, "availableReplicas": available,
                           "replicas": updated if replicas is None else replicas,
                           "readyReplicas": available}
    if observed is not None:
        out["observedGeneration"] = observed
    if conditions:
        out["conditions"] = conditions
    return out


def pod(name: str, *, phase: str = "Running", statuses: list[dict] | None = None,
        conditions: list[dict] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": k8s.labels(NAME)},
            "spec": {"containers": [{"name": "serve", "image": IMAGE}]},
            "status": {"phase": phase, "containerStatuses": statuses or [],
                       "conditions": conditions or []}}


class FakeKube:
    """Deployments, Services and Pods in memory (see the module docstring).

    `statuses` are what successive GETs of the Deployment report (the last one stays);
    `pods` what successive pod lists return (the last one stays); `fail` maps
    (method, plural) to an HTTP status answered once per entry.
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []  # method, path, content type
        self.statuses: list[dict[str, Any]] = [status()]
        self.pods: list[list[dict[str, Any]]] = [[]]
        self.fail: dict[tuple[str, str], list[int]] = {}
        self.lock = threading.Lock()

    def add(self, plural: str, obj: dict[str, Any], generation: int = 1) -> None:
        obj = copy.deepcopy(obj)
        obj["metadata"]["generation"] = generation
        self.objects[(plural, obj["metadata"]["name"])] = obj

    def calls(self, method: str | None = None) -> list[str]:
        return [f"{m} {p}" for m, p, _ in self.requests if method in (None, m)]

    def handle(self, method: str, url: str, body: Any, content_type: str) -> tuple[int, Any]:
        parts = urlsplit(url)
        match = PATH.match(parts.path)
        if not match or match["ns"] != NAMESPACE:
            return 404, _status(404, "NotFound", url)
        plural, name = match["plural"], match["name"]
        with self.lock:
            self.requests.append((method, parts.path, content_type))
            codes = self.fail.get((method, plural))
            if codes:
                code = codes.pop(0)
                return code, _status(code, "Forbidden" if code == 403 else "InternalError",
                                     f"{method} {plural}: refused by the test")
            if plural == "pods":
                selector = parse_qs(parts.query).get("labelSelector", [""])[0]
                wanted = dict(kv.split("=", 1) for kv in selector.split(",") if kv)
                items = self.pods[0] if len(self.pods) == 1 else self.pods.pop(0)
                return 200, {"kind": "PodList", "apiVersion": "v1", "items": [
                    p for p in items if wanted.items() <= p["metadata"]["labels"].items()]}
            if method == "POST":
                name = body["metadata"]["name"]
                if (plural, name) in self.objects:
                    return 409, _status(409, "AlreadyExists", f"{plural} {name} already exists")
                obj = copy.deepcopy(body)
                obj["metadata"]["generation"] = 1
                if plural == "services":
                    obj["spec"]["clusterIP"] = "10.96.0.42"
                self.objects[(plural, name)] = obj
                return 201, obj
            obj = self.objects.get((plural, name))
            if obj is None:
                return 404, _status(404, "NotFound", f"{plural} {name} not found")
            if method == "PATCH":
                before = copy.deepcopy(obj.get("spec"))
                if content_type == "application/json-patch+json":
                    _json_patch(obj, body)
                else:  # strategic merge, simplified: maps merged, lists replaced
                    _merge(obj, body)
                if obj.get("spec") != before:
                    obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
                return 200, obj
            if plural == "deployments":
                current = self.statuses[0] if len(self.statuses) == 1 else self.statuses.pop(0)
                obj["status"] = {"observedGeneration": obj["metadata"]["generation"],
                                 **current}
            return 200, obj


def _json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        assert op["op"] in ("add", "replace"), op
        *parents, last = op["path"].lstrip("/").split("/")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(op["value"])


def _merge(obj: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(obj.get(key), dict):
            _merge(obj[key], value)
        else:
            obj[key] = copy.deepcopy(value)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
            "message": message, "code": code}


@pytest.fixture
def kube() -> Iterator[tuple[FakeKube, Any, str]]:
    """The fake API server, a kubernetes ApiClient pointed at it, and its URL."""
    fake = FakeKube()
    with fake_kube_api(fake.handle) as (api, host):
        yield fake, api, host


def schema_problems(doc: dict[str, Any]) -> list[str]:
    """An object as the fake API server stored it, checked against every Kubernetes version's
    schema (without the fields the server adds: status, generation)."""
    clean = {k: v for k, v in doc.items() if k != "status"}
    clean["metadata"] = {k: v for k, v in doc["metadata"].items() if k != "generation"}
    return [p for version in KUBE_VERSIONS for p in validate_manifest(clean, version)]


def config(**overrides: Any) -> deploy.DeployConfig:
    base = {"model": MODEL, "image": IMAGE, "experiment": "chart-demo",
            "pipeline_run_id": "run-1", "namespace": NAMESPACE, "gpus": 1,
            "env": {"MMJOBS_STORE": "s3://mmjobs/store",
                    "AWS_ENDPOINT_URL": "http://minio.team-a.svc:9000"},
            "secrets": {"s3": "team-s3", "bearer": "review-key"},
            "serve": {"max_batch_size": 4}, "poll_s": 0.01, "timeout_s": 20}
    return deploy.DeployConfig.model_validate({**base, **overrides})


# --------------------------------------------------------------------------- success


def test_new_server_is_created_followed_until_ready_and_its_url_returned(kube):
    fake, api, _ = kube
    fake.statuses = [status(updated=0, available=0, replicas=0), status(available=0),
                     status(available=0), status()]
    fake.pods = [[pod(f"{NAME}-abc-1", statuses=[{"name": "serve", "ready": False,
                                                    "restartCount": 0,
                                                    "state": {"running": {}}}])]]
    result = deploy.main(config(), api=api)

    assert result.output == f"http://{NAME}.{NAMESPACE}.svc.cluster.local:8000"
    assert (result.name, result.namespace, result.action, result.ready_replicas,
            result.model_name) == (NAME, NAMESPACE, "created", 1, "merge")
    assert fake.calls("POST") == [f"POST {DEPLOYMENTS}", f"POST {SERVICES}"]
    assert not fake.calls("PATCH")
    assert len([c for c in fake.calls("GET") if c == f"GET {DEPLOYMENTS}/{NAME}"]) == 4
    created = fake.objects[("deployments", NAME)]
    service = fake.objects[("services", NAME)]
    for doc in (created, service):
        assert schema_problems(doc) == []
    assert policy.policy_violations([created]) == []
    (container,) = created["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["args"] == [MODEL, "--host=0.0.0.0", "--port=8000",
                                 f"--api-key-env={k8s.KEY_ENV}", "--set", "max_batch_size=4"]
    env = {e["name"]: e for e in container["env"]}
    assert env[k8s.KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "review-key",
                                                             "key": "api-key"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    labels = created["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/part-of"] == "mmjobs"
    assert labels["app.kubernetes.io/component"] == "serve"
    assert service["spec"]["selector"] == created["spec"]["selector"]["matchLabels"]
    assert created["spec"]["progressDeadlineSeconds"] == 20
    assert created["metadata"]["annotations"]["mmjobs.io/model"] == MODEL


def test_a_later_run_updates_the_server_and_waits_for_the_new_spec(kube):
    fake, api, _ = kube
    old = k8s.deployment(k8s.ServerSpec(model="s3://mmjobs/store/chart-demo/run-0/merge",
                                        image=IMAGE, env={"OLD_SETTING": "1"}),
                         name=NAME, namespace=NAMESPACE)
    fake.add("deployments", old)
    fake.add("services", {**k8s.service(name=NAME, namespace=NAMESPACE)})
    fake.objects[("services", NAME)]["spec"]["clusterIP"] = "10.96.0.7"
    # The ownership check reads the old Deployment; then the controller first still reports
    # the old spec (generation 1) as fully ready, which must not count for the new one.
    fake.statuses = [status(observed=1), status(observed=1), status(available=0), status()]

    result = deploy.main(config(pipeline_run_id="run-2",
                                model="s3://mmjobs/store/chart-demo/run-2/merge"), api=api)

    assert result.action == "updated"
    assert fake.calls("POST") == [f"POST {DEPLOYMENTS}", f"POST {SERVICES}"]  # both 409
    patches = [(p, ct) for m, p, ct in fake.requests if m == "PATCH"]
    assert patches == [(f"{DEPLOYMENTS}/{NAME}", "application/json-patch+json"),
                       (f"{SERVICES}/{NAME}", "application/strategic-merge-patch+json")]
    updated = fake.objects[("deployments", NAME)]
    assert updated["metadata"]["generation"] == 2
    (container,) = updated["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "s3://mmjobs/store/chart-demo/run-2/merge"
    assert "OLD_SETTING" not in {e["name"] for e in container["env"]}  # replaced, not merged
    assert updated["spec"]["template"]["metadata"]["annotations"][
        "mmjobs.io/pipeline-run-id"] == "run-2"
    assert fake.objects[("services", NAME)]["spec"]["clusterIP"] == "10.96.0.7"
    reads = [c for c in fake.calls("GET") if c == f"GET {DEPLOYMENTS}/{NAME}"]
    assert len(reads) == 1 + 3  # the ownership check, then stale, not ready, ready


def test_a_sweep_s_settings_are_one_server(kube):
    """lavin-sweep's deploy step: every setting's merged model behind one Deployment."""
    fake, api, _ = kube
    fake.statuses = [status()]
    run = "s3://mmjobs/store/lavin-sweep/run-1"
    models = [{"name": s, "model": f"{run}/merge-{s}"} for s in ("baseline", "dec-dropout")]
    result = deploy.main(config(model=None, models=models, experiment="lavin-sweep",
                                serve={"conversation_format": "lavin",
                                       "max_loaded_models": 1}), api=api)
    name = "mmjobs-serve-lavin-sweep"
    assert (result.name, result.model_name, result.model_names) == (
        name, "baseline", ["baseline", "dec-dropout"])
    created = fake.objects[("deployments", name)]
    assert schema_problems(created) == []
    assert policy.policy_violations([created]) == []
    (container,) = created["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["--host=0.0.0.0", "--port=8000"]  # no single model
    (listed,) = [a.removeprefix("models=") for a in container["args"]
                 if a.startswith("models=")]
    assert yaml.safe_load(listed) == models  # `mmjobs serve --set models=...` reads it back
    notes = created["metadata"]["annotations"]
    assert "mmjobs.io/model" not in notes
    assert json.loads(notes["mmjobs.io/models"]) == {
        "baseline": f"{run}/merge-baseline", "dec-dropout": f"{run}/merge-dec-dropout"}
    with pytest.raises(ValueError, match="models"):  # a recipe cannot sneak them into serve
        config(serve={"models": models})


# --------------------------------------------------------------------------- failures


def test_crash_loop_fails_with_the_log_tail(kube):
    fake, api, _ = kube
    fake.statuses = [status(available=0)]
    log_tail = ("INFO loading s3://mmjobs/store/chart-demo/run-1/merge\n"
                "mmjobs serve: s3://mmjobs/store/chart-demo/run-1/merge: the model failed to "
                "load: no committed directory at s3://mmjobs/store/chart-demo/run-1/merge")
    crashing = {"name": "serve", "ready": False, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                                      "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                             "message": log_tail}}}
    first = {**crashing, "restartCount": 1}
    fake.pods = [[pod(f"{NAME}-abc-1", statuses=[first])],
                 [pod(f"{NAME}-abc-1", statuses=[crashing])]]
    with pytest.raises(deploy.DeployError) as caught:
        deploy.main(config(), api=api)
    message = str(caught.value)
    assert f"Deployment {NAMESPACE}/{NAME}: did not become ready" in message
    assert "CrashLoopBackOff (restarted 3x; last exit 1 (Error)" in message
    assert "the model failed to load: no committed directory" in message
    assert f"kubectl -n {NAMESPACE} describe pods -l app.kubernetes.io/name=mmjobs-serve," \
           f"app.kubernetes.io/instance={NAME}" in message
    assert len(fake.calls("GET")) == 4  # one restart was tolerated (max_restarts=2)


def test_a_missing_secret_fails_at_once(kube):
    fake, api, _ = kube
    fake.statuses = [status(available=0)]
    fake.pods = [[pod(f"{NAME}-abc-1", phase="Pending", statuses=[{
        "name": "serve", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "CreateContainerConfigError",
                              "message": 'secret "review-key" not found'}}}])]]
    with pytest.raises(deploy.DeployError,
                       match=r'CreateContainerConfigError: secret "review-key" not found'):
        deploy.main(config(), api=api)


def test_an_unschedulable_pod_fails_at_the_timeout_with_the_scheduler_message(kube):
    fake, api, _ = kube
    fake.statuses = [status(available=0)]
    fake.pods = [[pod(f"{NAME}-abc-1", phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])]]
    with pytest.raises(deploy.DeployError) as caught:
        deploy.main(config(timeout_s=0.3), api=api)
    message = str(caught.value)
    assert "not ready after 0.3 s (0 of 1 updated replicas ready)" in message
    assert "not scheduled (Unschedulable): 0/3 nodes are available: 3 Insufficient " \
           "nvidia.com/gpu." in message


def test_an_exceeded_progress_deadline_fails(kube):
    fake, api, _ = kube
    fake.statuses = [status(available=0, conditions=[{
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
        "message": f'ReplicaSet "{NAME}-abc" has timed out progressing.'}])]
    with pytest.raises(deploy.DeployError, match="ProgressDeadlineExceeded: ReplicaSet"):
        deploy.main(config(), api=api)


def test_rbac_refusal_names_the_chart_setting(kube):
    fake, api, _ = kube
    fake.fail[("POST", "deployments")] = [403]
    with pytest.raises(deploy.DeployError) as caught:
        deploy.main(config(), api=api)
    message = str(caught.value)
    assert f"cannot create deployments {NAMESPACE}/{NAME}: POST deployments: refused" in message
    assert "serve.pipelineDeploy=true" in message
    assert fake.calls("POST") == [f"POST {DEPLOYMENTS}"]


def test_someone_elses_deployment_of_that_name_is_left_alone(kube):
    fake, api, _ = kube
    theirs = k8s.deployment(k8s.ServerSpec(model=MODEL, image=IMAGE), name=NAME,
                            namespace=NAMESPACE)
    theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    fake.add("deployments", theirs)
    with pytest.raises(deploy.DeployError, match=r"is not an mmjobs server \(managed by Helm\)"):
        deploy.main(config(), api=api)
    assert not fake.calls("PATCH")


def test_a_transient_api_error_is_retried(kube):
    fake, api, _ = kube
    fake.fail[("GET", "deployments")] = [500]
    assert deploy.main(config(), api=api).ready_replicas == 1


# --------------------------------------------------------------------------- the KFP component


def test_component_deploys_with_the_client_from_a_kubeconfig(kube, tmp_path: Path,
                                                             monkeypatch):
    """The component body as KFP runs it: config JSON + the wired model; the client comes
    from the environment (a kubeconfig here; in a pod, the service account)."""

    from pipelines.components import component_function

    fake, _, host = kube
    use_kubeconfig(monkeypatch, tmp_path, host)
    monkeypatch.setenv("MMJOBS_NAMESPACE", NAMESPACE)
    cfg = config().model_dump(mode="json", exclude={"model", "namespace"})
    url = component_function("deploy")(json.dumps(cfg), MODEL)
    assert url == f"http://{NAME}.{NAMESPACE}.svc.cluster.local:8000"
    assert fake.calls("POST") == [f"POST {DEPLOYMENTS}", f"POST {SERVICES}"]
