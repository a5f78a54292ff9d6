"""The engine stage against a Kubernetes API server on loopback, through the real client.

The fake API server is the deploy stage tests' (tests/integration/test_deploy_stage.py), with
DELETE and label-selected lists of Deployments and Services added:

- engine-up: the engine's Deployment + Service created (valid against every supported
  Kubernetes version's schema, restricted pods: the vLLM image's root user overridden, caches
  on emptyDirs), an init container copying the model with the S3 Secret, the GPUs on the
  engine; followed until ready; its /v1 URL returned;
- a crash-looping engine fails the step quoting its log tail;
- engine-down deletes both objects and is idempotent; engine-cleanup deletes every engine of
  its run and nothing of another run's or anyone else's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mmjobs.serve import engine_pod
from mmjobs.serve.rollout import DeployError
from mmjobs.stages import engine
from tests.fake_kube import fake_kube_api
from tests.integration.test_deploy_stage import (
    DEPLOYMENTS,
    NAMESPACE,
    PATH,
    SERVICES,
    FakeKube,
    schema_problems,
    status,
)
from tests.k8s import policy

pytestmark = pytest.mark.integration

IMAGE = "vllm/vllm-openai:v0.11.0"
EVAL_IMAGE = "ghcr.io/mmjobs/mmjobs-eval:0.1.0"
MODEL = "s3://mmjobs/store/chart-demo/run-1/merge"
NAME = engine_pod.engine_name("chart-demo", "run-1", "trained")


class EngineKube(FakeKube):
    """FakeKube plus DELETE and lists of Deployments/Services by label selector."""

    def handle(self, method: str, url: str, body: Any, content_type: str) -> tuple[int, Any]:
        parts = urlsplit(url)
        match = PATH.match(parts.path)
        if match and match["plural"] in ("deployments", "services"):
            plural, name = match["plural"], match["name"]
            if method == "DELETE":
                with self.lock:
                    self.requests.append((method, parts.path, content_type))
                    gone = self.objects.pop((plural, name), None)
                return (200, {"kind": "Status", "status": "Success"}) if gone else \
                    (404, {"kind": "Status", "status": "Failure", "code": 404,
                           "reason": "NotFound", "message": f"{plural} {name} not found"})
            if method == "GET" and name is None:
                selector = parse_qs(parts.query).get("labelSelector", [""])[0]
                wanted = dict(kv.split("=", 1) for kv in selector.split(",") if kv)
                with self.lock:
                    self.requests.append((method, parts.path, content_type))
                    items = [copy.deepcopy(o) for (p, _), o in self.objects.items()
                             if p == plural and wanted.items()
                             <= (o["metadata"].get("labels") or {}).items()]
                return 200, {"kind": "List", "apiVersion": "v1", "items": items}
        return super().handle(method, url, body, content_type)


@pytest.fixture
def kube() -> Iterator[tuple[EngineKube, Any]]:
    fake = EngineKube()
    with fake_kube_api(fake.handle) as (api, _):
        yield fake, api


def config(action: str = "up", **overrides: Any) -> engine.EngineStageConfig:
    base = {"action": action, "label": "trained", "model": MODEL if action == "up" else None,
            "image": IMAGE, "fetch_image": EVAL_IMAGE, "experiment": "chart-demo",
            "pipeline_run_id": "run-1", "namespace": NAMESPACE, "gpus": 1, "cpu": "8",
            "memory": "64Gi", "secrets": {"s3": "team-s3"},
            "store_env": {"MMJOBS_STORE": "s3://mmjobs/store",
                          "AWS_ENDPOINT_URL": "http://minio.team-a.svc:9000"},
            "args": ["--model", "{model}", "--served-model-name", "{name}", "--port", "{port}",
                     "--max-model-len", "4096"],
            "poll_s": 0.01, "startup_timeout_s": 20}
    return engine.EngineStageConfig.model_validate({**base, **overrides})


def engine_pod_status(restarts: int = 0, **state: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{NAME}-abc-1", "namespace": NAMESPACE,
                         "labels": engine_pod.labels(NAME, "x")},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "engine", "ready": False, "restartCount": restarts, **state}]}}


def test_engine_up_creates_a_restricted_engine_and_returns_its_url(kube):
    fake, api = kube
    fake.statuses = [status(available=0), status()]
    fake.pods = [[engine_pod_status(state={"running": {}})]]
    result = engine.main(config(), api=api)

    assert result.output == f"http://{NAME}.{NAMESPACE}.svc.cluster.local:8000/v1"
    assert result.model_name == "model" and result.name == NAME
    assert fake.calls("POST") == [f"POST {DEPLOYMENTS}", f"POST {SERVICES}"]
    created, service = fake.objects[("deployments", NAME)], fake.objects[("services", NAME)]
    for doc in (created, service):
        assert schema_problems(doc) == []
    assert policy.policy_violations([created]) == []
    pod = created["spec"]["template"]["spec"]
    (fetch,), (container,) = pod["initContainers"], pod["containers"]
    # The model: copied from the store by the eval image with the S3 Secret, read-only after.
    assert fetch["image"] == EVAL_IMAGE
    assert fetch["command"][-3:] == ["cp", MODEL, engine_pod.MODEL_DIR]
    fetch_env = {e["name"]: e for e in fetch["env"]}
    assert fetch_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert fetch_env["AWS_ENDPOINT_URL"]["value"] == "http://minio.team-a.svc:9000"
    # The engine: the recipe's image and args with the placeholders filled, no credentials.
    assert container["image"] == IMAGE and "command" not in container  # the image's own
    assert container["args"] == ["--model", "/models/model", "--served-model-name", "model",
                                 "--port", "8000", "--max-model-len", "4096"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == "/tmp" and env["HF_HUB_OFFLINE"] == "1"
    assert not any("valueFrom" in e for e in container["env"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "8"
    assert "nvidia.com/gpu" not in fetch["resources"]["requests"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and {"/tmp", "/dev/shm"} <= set(mounts)
    labels = created["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "serve"  # the serve NetworkPolicy
    assert labels["app.kubernetes.io/part-of"] == "mmjobs"
    assert labels[engine_pod.RUN_LABEL] == engine_pod.run_key("chart-demo", "run-1")
    assert service["spec"]["selector"] == created["spec"]["selector"]["matchLabels"]
    assert created["spec"]["strategy"] == {"type": "Recreate"}


def test_a_keyed_engine_reads_its_bearer_key_from_the_secret(kube):
    fake, api = kube
    fake.statuses = [status()]
    fake.pods = [[engine_pod_status(state={"running": {}})]]
    engine.main(config(secrets={"s3": "team-s3", "api_key": "team-engine-key"}), api=api)
    created = fake.objects[("deployments", NAME)]
    assert schema_problems(created) == [] and policy.policy_violations([created]) == []
    (container,) = created["spec"]["template"]["spec"]["containers"]
    keyed = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    ref = {"secretKeyRef": {"name": "team-engine-key", "key": "api_key"}}
    assert keyed == {"MMJOBS_ENGINE_API_KEY": ref, "VLLM_API_KEY": ref}
    assert "team-engine-key" not in json.dumps(container["args"])  # never on the command line


def test_a_crash_looping_engine_fails_the_step_with_its_log_tail(kube):
    fake, api = kube
    fake.statuses = [status(available=0)]
    tail = ("INFO Initializing a V1 LLM engine\n"
            "ValueError: The model's max seq len (4096) is larger than the maximum number of "
            "tokens that can be stored in KV cache")
    fake.pods = [[engine_pod_status(
        restarts=3, state={"waiting": {"reason": "CrashLoopBackOff"}},
        lastState={"terminated": {"exitCode": 1, "reason": "Error", "message": tail}})]]
    with pytest.raises(DeployError) as caught:
        engine.main(config(), api=api)
    message = str(caught.value)
    assert f"Deployment {NAMESPACE}/{NAME}: did not become ready" in message
    assert "CrashLoopBackOff (restarted 3x; last exit 1 (Error)" in message
    assert "larger than the maximum number of tokens that can be stored" in message
    assert f"app.kubernetes.io/name=mmjobs-engine,app.kubernetes.io/instance={NAME}" in message


def test_engine_down_deletes_the_objects_and_is_idempotent(kube):
    fake, api = kube
    engine.main(config(), api=api)
    assert engine.main(config("down"), api=api).deleted == [f"deployments/{NAME}",
                                                            f"services/{NAME}"]
    assert not fake.objects
    assert engine.main(config("down"), api=api).deleted == []  # already gone: fine


def test_engine_down_leaves_someone_else_s_objects_alone(kube):
    fake, api = kube
    fake.add("deployments", {"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": NAME, "namespace": NAMESPACE,
                                          "labels": {"app.kubernetes.io/managed-by": "helm"}}})
    with pytest.raises(DeployError, match="is not an mmjobs server"):
        engine.main(config("down"), api=api)
    assert ("deployments", NAME) in fake.objects


def test_cleanup_deletes_every_engine_of_its_run_only(kube):
    fake, api = kube
    for label in ("trained", "untrained"):
        engine.main(config(label=label), api=api)
    engine.main(config(label="trained", pipeline_run_id="run-2"), api=api)
    other = engine_pod.engine_name("chart-demo", "run-2", "trained")
    result = engine.main(config("cleanup", label="*"), api=api)
    assert len(result.deleted) == 4
    assert {name for _, name in fake.objects} == {other}
    assert engine.main(config("cleanup", label="*"), api=api).deleted == []


def test_up_without_a_model_is_a_config_error():
    with pytest.raises(ValueError, match="action=up needs `model`"):
        config("up", model=None)
