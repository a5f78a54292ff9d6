"""The model-server manifests a deploy step creates (mmjobs.serve.k8s) and the deploy stage's
config (mmjobs.stages.deploy) and rollout status logic (mmjobs.serve.rollout), without a
cluster.

- Deployment and Service validate against the Kubernetes schemas of both supported versions
  (strict) for several specs; the pod has the security defaults of every mmjobs pod, the
  chart's own security contexts, and credentials only as secretKeyRefs;
- names are DNS labels short enough for pod names; arguments parse back in `mmjobs serve`;
- DeployConfig refuses what the deployment sets itself, credentials as plain env and invalid
  serve settings; rollout and pod states are read as `kubectl rollout status` would.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mmjobs.serve import k8s, rollout
from mmjobs.stages import deploy
from tests.k8s import policy
from tests.k8s.validation import KUBE_VERSIONS, validate_manifest

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "mmjobs" / "values.yaml"
MODEL = "s3://mmjobs/store/chart-demo/run-1/merge"
IMAGE = "ghcr.io/mmjobs/mmjobs-eval:0.1.0"
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|ACCESS_KEY|TOKEN|KEY_ID|API_KEY)")

SPECS: dict[str, dict[str, Any]] = {
    "cpu-minimal": {"model": MODEL, "image": IMAGE},
    "gpu-everything": {
        "model": "s3://mmjobs/models/llava-1.5-7b", "adapter": "s3://mmjobs/store/x/run/sft",
        "image": IMAGE, "replicas": 2, "gpus": 2, "cpu": 8, "memory": "64Gi",
        "tmp_size": "100Gi",
        "serve": {"max_batch_size": 16, "dtype": "bfloat16", "batch_wait_ms": 2.5e-1,
                  "allow_image_urls": True, "served_model_name": "llava"},
        "secrets": {"s3": "team-s3", "mlflow": "team-mlflow", "bearer": "review-key",
                    "bearer_item": "token"},
        "env": {"MMJOBS_STORE": "s3://mmjobs/store", "AWS_ENDPOINT_URL": "https://s3.example"},
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                         "toleration_seconds": 300}],
        "image_pull_secrets": ["regcred"]},
}


def build(name: str) -> tuple[k8s.ServerSpec, dict[str, Any], dict[str, Any]]:
    spec = k8s.ServerSpec.model_validate(SPECS[name])
    return (spec, k8s.deployment(spec, name="mmjobs-serve-demo", namespace="team-a",
                                 annotations={"mmjobs.io/model": spec.model}),
            k8s.service(name="mmjobs-serve-demo", namespace="team-a"))


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(SPECS))
def test_manifests_validate(name, version):
    _, deployment, service = build(name)
    assert validate_manifest(deployment, version) == []
    assert validate_manifest(service, version) == []


@pytest.mark.parametrize("name", list(SPECS))
def test_pod_has_the_security_defaults_of_every_mmjobs_pod(name):
    _, deployment, _ = build(name)
    assert policy.policy_violations([deployment]) == []
    pod = deployment["spec"]["template"]["spec"]
    values = yaml.safe_load(CHART_VALUES.read_text())
    # The same security contexts as the chart's pods.
    assert pod["securityContext"] == values["podSecurityContext"]
    assert container_of(deployment)["securityContext"] == values["containerSecurityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container_of(deployment)["volumeMounts"]
    assert {"name": "HOME", "value": "/tmp"} in container_of(deployment)["env"]


@pytest.mark.parametrize("name", list(SPECS))
def test_credentials_only_as_secret_refs(name):
    spec, deployment, _ = build(name)
    env = container_of(deployment)["env"]
    for var in env:
        if SECRET_ENV.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in env if "valueFrom" in v}
    assert refs["AWS_SECRET_ACCESS_KEY"]["name"] == spec.secrets.s3
    assert refs["MLFLOW_TRACKING_PASSWORD"] == {"name": spec.secrets.mlflow,
                                                "key": "MLFLOW_TRACKING_PASSWORD",
                                                "optional": True}
    if spec.secrets.bearer:
        assert refs[k8s.KEY_ENV] == {"name": "review-key", "key": "token"}
        assert f"--api-key-env={k8s.KEY_ENV}" in container_of(deployment)["args"]
    else:
        assert k8s.KEY_ENV not in refs


def test_labels_selectors_probes_resources_and_placement():
    _, deployment, service = build("gpu-everything")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/part-of"] == "mmjobs"
    assert labels["app.kubernetes.io/component"] == "serve"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items() and service["spec"]["selector"] == selector
    assert deployment["metadata"]["labels"] == labels
    container = container_of(deployment)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 8000
    assert service["spec"]["ports"][0] == {"name": "http", "port": 8000, "targetPort": "http",
                                           "protocol": "TCP"}
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoExecute", "tolerationSeconds": 300}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "100Gi"}}]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {
        "mmjobs.io/model": "s3://mmjobs/models/llava-1.5-7b"}
    cpu = container_of(build("cpu-minimal")[1])["resources"]
    assert "nvidia.com/gpu" not in cpu["requests"] and "nvidia.com/gpu" not in cpu["limits"]


def test_arguments_parse_back_in_mmjobs_serve(monkeypatch):
    from mmjobs import cli
    from mmjobs.stages import serve as stage

    seen = []
    monkeypatch.setattr(stage, "STAGE", dataclasses.replace(
        stage.STAGE, main=lambda cfg: seen.append(cfg) or stage.ServeResult(
            output="http://x", model_name="m", requests=0)))
    container = container_of(build("gpu-everything")[1])
    assert container["command"] == ["python3", "-m", "mmjobs.cli", "serve"]
    assert cli.main(["serve", *container["args"]]) == 0
    (cfg,) = seen
    assert (cfg.model, cfg.adapter, cfg.host, cfg.port, cfg.key_env) == (
        "s3://mmjobs/models/llava-1.5-7b", "s3://mmjobs/store/x/run/sft", "0.0.0.0", 8000,
        k8s.KEY_ENV)
    assert (cfg.max_batch_size, cfg.dtype, cfg.batch_wait_ms, cfg.allow_image_urls,
            cfg.served_model_name) == (16, "bfloat16", 0.25, True, "llava")


def test_no_image_is_an_error():
    with pytest.raises(ValueError, match="needs an image"):
        k8s.deployment(k8s.ServerSpec(model=MODEL), name="x", namespace="y")


@pytest.mark.parametrize("experiment", ["chart-demo", "Chart_Demo v2", "x" * 80, "---", "7b"])
def test_server_names_are_short_dns_labels(experiment):
    name = k8s.server_name(experiment)
    assert len(name) <= k8s.MAX_NAME and re.fullmatch(k8s.DNS_1035, name), name
    assert k8s.server_name("a" * 60 + "1") != k8s.server_name("a" * 60 + "2")
    assert k8s.server_name("chart-demo") == "mmjobs-serve-chart-demo"


# --------------------------------------------------------------------------- DeployConfig


@pytest.mark.parametrize("overrides,expected", [
    ({"serve": {"port": 9000}}, "port: set by the deployment"),
    ({"serve": {"key_env": "KEY"}}, "key_env: set by the deployment"),
    ({"serve": {"max_batch_sze": 4}}, "max_batch_sze: Extra inputs are not permitted"),
    ({"serve": {"default_max_new_tokens": 9999}}, "is above max_new_tokens_cap"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "come from Secrets"),
    ({"env": {k8s.KEY_ENV: "x"}}, "come from Secrets"),
    ({"name": "Review_Server"}, "String should match pattern"),
    ({"name": "x" * 41}, "at most 40 characters"),
    ({"replicas": 0}, "greater than or equal to 1"),
], ids=["port", "key-env", "typo", "serve-own-check", "credential-env", "key-env-var",
        "bad-name", "long-name", "no-replicas"])
def test_deploy_config_refuses(overrides, expected):
    with pytest.raises(ValidationError) as caught:
        deploy.DeployConfig.model_validate({"model": MODEL, **overrides})
    assert expected in str(caught.value)


def test_deploy_config_takes_recipe_spellings():
    cfg = deploy.DeployConfig.model_validate({"model": MODEL, "cpu": 4, "memory": "8Gi",
                                              "secrets": {"bearer": "k"}, "enabled": True})
    assert (cfg.cpu, cfg.secrets.s3, cfg.secrets.bearer_item) == ("4", "mmjobs-s3", "api-key")


# --------------------------------------------------------------------------- rollout and pods


@pytest.mark.parametrize("obj,expected", [
    ({"metadata": {"generation": 2}, "spec": {"replicas": 1},
      "status": {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1,
                 "replicas": 1}}, (False, None, "waiting for the controller to see the new spec")),
    ({"metadata": {"generation": 1}, "spec": {"replicas": 2},
      "status": {"observedGeneration": 1, "updatedReplicas": 1, "replicas": 1}},
     (False, None, "1 of 2 replicas updated")),
    ({"metadata": {"generation": 1}, "spec": {"replicas": 1},
      "status": {"observedGeneration": 1, "updatedReplicas": 1, "replicas": 2}},
     (False, None, "1 old replicas terminating")),
    ({"metadata": {"generation": 1}, "spec": {"replicas": 1},
      "status": {"observedGeneration": 1, "updatedReplicas": 1, "replicas": 1}},
     (False, None, "0 of 1 updated replicas ready")),
    ({"metadata": {"generation": 3}, "spec": {"replicas": 2},
      "status": {"observedGeneration": 3, "updatedReplicas": 2, "replicas": 2,
                 "availableReplicas": 2}}, (True, None, "2 of 2 replicas ready")),
], ids=["stale", "updating", "old-left", "not-ready", "ready"])
def test_rollout_status(obj, expected):
    assert rollout.rollout_status(obj) == expected


def test_pod_problems():
    def pod(statuses=None, **status):
        return {"metadata": {"name": "p"}, "status": {
            "phase": status.pop("phase", "Running"), "containerStatuses": statuses or [],
            **status}}

    assert rollout.pod_problems(pod([{"ready": True, "state": {"running": {}}}]), 2) == []
    loading = rollout.pod_problems(pod([{"ready": False, "state": {"running": {}}}]), 2)
    assert loading == [("p: running, not ready (/readyz: the model is still loading, or "
                        "failed to load)", False)]
    pulling = rollout.pod_problems(pod([{"state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image x"}}}],
        phase="Pending"), 2)
    assert pulling == [("p: ImagePullBackOff: Back-off pulling image x", False)]
    evicted = rollout.pod_problems(pod(phase="Failed", reason="Evicted",
                                      message="low on ephemeral-storage"), 2)
    assert evicted == [("p: failed (Evicted): low on ephemeral-storage", True)]
    assert rollout.pod_problems({"metadata": {"name": "old", "deletionTimestamp": "now"},
                                "status": {"phase": "Running"}}, 2) == []
