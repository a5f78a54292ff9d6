"""The chart's optional model server (serve.*), rendered by the real Helm v4 SDK.

With serve.enabled the chart adds a Deployment running `mmjobs serve`, its Service and a
NetworkPolicy; with serve.pipelineDeploy the runner Role may create model servers (a recipe's
deploy step) and the same NetworkPolicy covers them. For several value sets:
- `helm lint` is clean and every manifest validates against the Kubernetes schemas of both
  supported versions (strict); every pod has the security defaults (tests/k8s/policy.py);
- the server pod: command and arguments `mmjobs serve` parses back to the intended config,
  readiness on /readyz, liveness on /healthz, port 8000, GPUs as nvidia.com/gpu, the bearer
  key and the S3/MLflow credentials only as secretKeyRefs, /tmp an emptyDir, HOME=/tmp;
- it is the same pod a pipeline's deploy step builds (mmjobs.serve.k8s);
- the NetworkPolicy lets clients reach port 8000 and the server reach DNS, MLflow and S3 only;
- nothing of it by default; enabling it without a model fails with a message naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import helm_python as helm
import pytest

from mmjobs.serve import k8s
from tests.k8s import policy
from tests.k8s.test_chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    find,
    manifests,
    notes,
    render,
)
from tests.k8s.validation import KUBE_VERSIONS, describe, load_documents, validate_manifest

MODEL = "s3://mmjobs/store/chart-demo/run-1/merge"
KEY_SECRET = "review-key"

SERVE_SETS: dict[str, dict[str, Any]] = {
    # The chart's MinIO, a GPU, a bearer key, serve settings, GPU-pool placement.
    "gpu-key-minio": {
        "serve": {"enabled": True, "model": MODEL, "gpus": 1,
                  "apiKey": {"existingSecret": KEY_SECRET, "key": "token"},
                  "settings": {"max_batch_size": 16, "dtype": "bfloat16",
                               "allow_image_urls": True, "served_model_name": "chart-demo"},
                  "nodeSelector": {"nvidia.com/gpu.present": "true"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}],
                  "podAnnotations": {"prometheus.io/scrape": "true"},
                  "pipelineDeploy": True},
        "networkPolicy": {"allowFromNamespaces": ["kubeflow", "ingress-nginx"]},
        "nodeSelector": {"pool": "cpu"},
    },
    # External S3 on its own port, existing Secrets, MLflow auth, base model + adapter on CPU.
    "external-s3-adapter": {
        "minio": {"enabled": False},
        "s3": {"bucket": "team-bucket", "endpoint": "https://s3.example.com:9443",
               "existingSecret": "team-s3"},
        "mlflow": {"auth": {"enabled": True, "existingSecret": "team-mlflow"}},
        "serve": {"enabled": True, "model": "s3://team-bucket/models/llava-1.5-7b",
                  "adapter": "s3://team-bucket/store/x/run-2/sft", "replicas": 2,
                  "image": {"repository": "registry.example.com/mmjobs-eval", "tag": "0.2.0"},
                  "service": {"port": 80},
                  "networkPolicy": {"extraEgress": [
                      {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                       "ports": [{"protocol": "TCP", "port": 443}]}]}},
    },
    # AWS S3 (no endpoint), a hub id as the model, no key.
    "aws-hub-no-key": {
        "minio": {"enabled": False},
        "s3": {"bucket": "team-bucket", "existingSecret": "team-s3"},
        "serve": {"enabled": True, "model": "llava-hf/llava-1.5-7b-hf"},
    },
    # No server of the chart's own; pipelines may deploy theirs.
    "pipeline-deploy-only": {"serve": {"pipelineDeploy": True}},
}


@pytest.fixture(scope="module", params=list(SERVE_SETS))
def serve_set(request) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    return request.param, SERVE_SETS[request.param], manifests(render(SERVE_SETS[request.param]))


def server_pod(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of the chart's server."""
    (deployment,) = find(docs, "Deployment", "serve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def serve_policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (netpol,) = [d for d in docs if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"].endswith("-allow-serve")]
    return netpol


# --------------------------------------------------------------------------- lint, schemas, policy


@pytest.mark.parametrize("name", list(SERVE_SETS))
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), SERVE_SETS[name], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSIONS[0]}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_manifests_validate(serve_set, version):
    _, _, docs = serve_set
    assert [e for doc in docs for e in validate_manifest(doc, version)] == []


def test_security_defaults_and_least_privilege(serve_set):
    _, values, docs = serve_set
    assert policy.policy_violations(docs) == []
    if values["serve"].get("enabled"):
        pod, container = server_pod(docs)
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]]
        assert env_of(container)["HOME"]["value"] == "/tmp"


def test_every_serve_object_is_labelled_and_one_per_file(serve_set):
    _, _, docs = serve_set
    for doc in docs:
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "serve":
            assert doc["metadata"]["namespace"] == NAMESPACE
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mmjobs"
    for path, text in render(SERVE_SETS["gpu-key-minio"]).items():
        if not path.endswith("NOTES.txt"):
            assert len(load_documents(text)) <= 1, path


# --------------------------------------------------------------------------- the server pod


def test_server_pod_runs_mmjobs_serve_with_probes_and_gpus():
    docs = manifests(render(SERVE_SETS["gpu-key-minio"]))
    (deployment,) = find(docs, "Deployment", "serve")
    assert deployment["metadata"]["name"] == f"{RELEASE}-serve"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0,
                                                               "maxUnavailable": 1}
    pod, container = server_pod(docs)
    assert container["image"] == "ghcr.io/mmjobs/mmjobs-eval:0.1.0"  # appVersion
    assert container["command"] == ["python3", "-m", "mmjobs.cli", "serve"]
    assert container["args"][:4] == [MODEL, "--host=0.0.0.0", "--port=8000",
                                     f"--api-key-env={k8s.KEY_ENV}"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 == resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "16Gi"
    # serve.nodeSelector / tolerations replace the chart-wide ones (GPU pool, not pool=cpu).
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/scrape"] == "true"


def test_bearer_key_and_credentials_come_from_secrets():
    _, container = server_pod(manifests(render(SERVE_SETS["gpu-key-minio"])))
    env = env_of(container)
    assert env[k8s.KEY_ENV] == {"name": k8s.KEY_ENV, "valueFrom": {
        "secretKeyRef": {"name": KEY_SECRET, "key": "token"}}}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-s3", "key": key}
    assert env["MMJOBS_STORE"]["value"] == "s3://mmjobs/store"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://mmjobs-minio.ml.svc.cluster.local:9000"
    assert "MLFLOW_TRACKING_PASSWORD" not in env  # MLflow without auth
    # External S3, MLflow auth: the existing Secrets, by name.
    _, container = server_pod(manifests(render(SERVE_SETS["external-s3-adapter"])))
    env = env_of(container)
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "team-mlflow"
    assert k8s.KEY_ENV not in env and f"--api-key-env={k8s.KEY_ENV}" not in container["args"]


def test_arguments_parse_back_to_the_intended_serve_config(monkeypatch):
    """The container's arguments, given to the real `mmjobs` CLI, configure the serve stage
    as the values say (settings keep their types)."""
    from mmjobs import cli
    from mmjobs.stages import serve as stage

    seen = []

    def fake_main(cfg):
        seen.append(cfg)
        return stage.ServeResult(output="http://x", model_name="m", requests=0)

    monkeypatch.setattr(stage, "STAGE", dataclasses.replace(stage.STAGE, main=fake_main))
    for name in ("gpu-key-minio", "external-s3-adapter"):
        _, container = server_pod(manifests(render(SERVE_SETS[name])))
        assert container["command"][-1] == "serve"
        assert cli.main(["serve", *container["args"]]) == 0
    first, second = seen
    assert (first.model, first.host, first.port, first.key_env) == (
        MODEL, "0.0.0.0", 8000, k8s.KEY_ENV)
    assert (first.max_batch_size, first.dtype, first.allow_image_urls,
            first.served_model_name) == (16, "bfloat16", True, "chart-demo")
    assert second.adapter == "s3://team-bucket/store/x/run-2/sft" and second.key_env is None


def test_chart_server_is_the_pod_a_deploy_step_builds():
    """One server pod for both install paths: the chart's and mmjobs.serve.k8s's agree on
    everything but names, labels and the values each side takes from its own settings."""
    _, chart = server_pod(manifests(render(SERVE_SETS["gpu-key-minio"])))
    spec = k8s.ServerSpec(model=MODEL, image=chart["image"], gpus=1,
                          secrets={"bearer": KEY_SECRET, "bearer_item": "token"})
    built = k8s.deployment(spec, name="mmjobs-serve-demo", namespace=NAMESPACE)
    (step,) = built["spec"]["template"]["spec"]["containers"]
    for key in ("command", "ports", "startupProbe", "readinessProbe", "livenessProbe",
                "terminationMessagePolicy", "securityContext"):
        assert chart[key] == step[key], key
    assert chart["args"][:4] == step["args"][:4]
    assert env_of(chart)[k8s.KEY_ENV] == {**env_of(step)[k8s.KEY_ENV]}
    assert [m["mountPath"] for m in chart["volumeMounts"]] == \
        [m["mountPath"] for m in step["volumeMounts"]]


def test_service_reaches_the_server():
    docs = manifests(render(SERVE_SETS["external-s3-adapter"]))
    (service,) = find(docs, "Service", "serve")
    (deployment,) = find(docs, "Deployment", "serve")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http",
                                         "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] == 2
    _, container = server_pod(docs)
    assert container["image"] == "registry.example.com/mmjobs-eval:0.2.0"


# --------------------------------------------------------------------------- network policy


def _selects(netpol: dict[str, Any], labels: dict[str, str]) -> bool:
    return netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name,s3_rule", [
    ("gpu-key-minio", "minio"), ("external-s3-adapter", 9443), ("aws-hub-no-key", 443),
    ("pipeline-deploy-only", "minio")])
def test_network_policy_lets_clients_in_and_the_server_out_to_dns_mlflow_s3(name, s3_rule):
    docs = manifests(render(SERVE_SETS[name]))
    netpol = serve_policy(docs)
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # Both kinds of server: the chart's and a deploy step's.
    built = k8s.deployment(k8s.ServerSpec(model=MODEL, image="img"), name="mmjobs-serve-x",
                           namespace=NAMESPACE)
    assert _selects(netpol, built["spec"]["template"]["metadata"]["labels"])
    for deployment in find(docs, "Deployment", "serve"):
        assert _selects(netpol, deployment["spec"]["template"]["metadata"]["labels"])
    assert not any(_selects(netpol, d["spec"]["template"]["metadata"]["labels"])
                   for d in find(docs, "Deployment") if d not in find(docs, "Deployment",
                                                                      "serve"))
    (ingress,) = netpol["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert {"podSelector": {}} in ingress["from"]
    allowed = SERVE_SETS[name].get("networkPolicy", {}).get("allowFromNamespaces")
    namespaces = [p["namespaceSelector"]["matchExpressions"][0]["values"]
                  for p in ingress["from"] if "namespaceSelector" in p]
    assert namespaces == ([allowed] if allowed else [])
    egress = netpol["spec"]["egress"]
    assert egress[0] == {"ports": [{"protocol": "UDP", "port": 53},
                                   {"protocol": "TCP", "port": 53}]}
    mlflow = egress[1]
    assert mlflow["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
        "mlflow" and mlflow["ports"] == [{"protocol": "TCP", "port": 5000}]
    s3 = egress[2]
    if s3_rule == "minio":
        assert s3["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
            "minio" and s3["ports"] == [{"protocol": "TCP", "port": 9000}]
    else:
        assert [p["ipBlock"]["cidr"] for p in s3["to"]] == ["0.0.0.0/0", "::/0"]
        assert s3["ports"] == [{"protocol": "TCP", "port": s3_rule}]
    extra = SERVE_SETS[name]["serve"].get("networkPolicy", {}).get("extraEgress", [])
    assert egress[3:] == extra


def test_network_policy_off_with_network_policies_off():
    values = copy.deepcopy(SERVE_SETS["gpu-key-minio"]) | {"networkPolicy": {"enabled": False}}
    assert not find(manifests(render(values)), "NetworkPolicy")


# --------------------------------------------------------------------------- RBAC for deploy steps


def test_pipeline_deploy_grants_exactly_what_the_deploy_and_engine_stages_use():
    (role,) = find(manifests(render(SERVE_SETS["pipeline-deploy-only"])), "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
             for r in role["rules"]}
    assert rules[(("apps",), ("deployments",))] == {"create", "get", "patch", "list", "delete"}
    assert rules[(("",), ("services",))] == {"create", "get", "patch", "list", "delete"}
    assert {"list"} <= rules[(("",), ("pods",))]  # the pods' reasons when a rollout fails
    assert policy.rbac_violations(role) == []
    (default_role,) = find(manifests(render({})), "Role")
    assert not [r for r in default_role["rules"]
                if {"deployments", "services"} & set(r["resources"])]


# --------------------------------------------------------------------------- off by default


def test_absent_by_default():
    rendered = render({})
    docs = manifests(rendered)
    assert not [describe(d) for d in docs
                if d["metadata"]["labels"].get("app.kubernetes.io/component") == "serve"]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-allow-serve")]
    assert "Model server" not in notes(rendered)


def test_enabling_without_a_model_fails_with_a_clear_message():
    with pytest.raises(helm.HelmRenderError) as caught:
        render({"serve": {"enabled": True}})
    message = str(caught.value)
    assert "invalid values for the mmjobs chart" in message
    assert "serve.model: required when serve.enabled is true" in message
    assert "s3://<bucket>/<storePrefix>/<experiment>/<run>/merge" in message


def test_settings_the_chart_sets_are_refused():
    with pytest.raises(helm.HelmRenderError) as caught:
        render({"serve": {"enabled": True, "model": MODEL,
                          "settings": {"port": 9000, "key_env": "X", "max_batch_size": 4}}})
    message = str(caught.value)
    assert "serve.settings.port: set by the chart" in message
    assert "serve.settings.key_env: set by the chart" in message
    assert "max_batch_size" not in message


@pytest.mark.parametrize("values,expected", [
    ({"serve": {"enabeld": True}}, ["/serve", "'enabeld' not allowed"]),
    ({"serve": {"gpus": "one"}}, ["/serve/gpus", "want integer"]),
    ({"serve": {"model": "/data/models/x"}}, ["/serve/model"]),
    ({"serve": {"apiKey": {"key": ""}}}, ["/serve/apiKey/key"]),
    ({"serve": {"resources": {"limits": {"gpu": 1}}}}, ["/serve/resources/limits", "'gpu'"]),
    ({"serve": {"settings": {"max_batch_size": [1]}}}, ["/serve/settings"]),
    ({"serve": {"networkPolicy": {"extraEgress": [{"to": [{"ipBlok": {}}]}]}}},
     ["/serve/networkPolicy/extraEgress", "'ipBlok' not allowed"]),
], ids=["unknown-key", "wrong-type", "not-a-store-uri", "empty-secret-key",
        "gpus-not-in-resources", "list-setting", "bad-egress-rule"])
def test_schema_rejects_bad_serve_values(values, expected):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    for part in expected:
        assert part in str(caught.value), str(caught.value)


def test_names_fit_in_63_characters_with_a_server():
    values = SERVE_SETS["gpu-key-minio"] | {"fullnameOverride": "f" * 63}
    for doc in manifests(render(values, name="short")):
        assert len(doc["metadata"]["name"]) <= 63, describe(doc)
    names = {d["metadata"]["name"] for d in manifests(render(values, name="short"))
             if d["kind"] in ("Deployment", "Service")}
    assert len(names) == 3  # mlflow, minio and serve objects stay apart (2 kinds each)


# --------------------------------------------------------------------------- NOTES


def test_notes_tell_how_to_open_the_chat_page():
    text = notes(render(SERVE_SETS["gpu-key-minio"]))
    assert "kubectl -n ml port-forward svc/mmjobs-serve 8000:8000" in text
    assert "chat page at http://localhost:8000/" in text
    assert "kubectl -n ml rollout status deployment/mmjobs-serve" in text
    assert "http://mmjobs-serve.ml.svc.cluster.local:8000/v1" in text
    assert f"get secret {KEY_SECRET} -o jsonpath='{{.data.token}}'" in text
    assert "stages.deploy.enabled: true" in text  # pipelineDeploy is on here
    text = notes(render(SERVE_SETS["aws-hub-no-key"]))
    assert "WARNING: serve.apiKey.existingSecret is not set" in text
