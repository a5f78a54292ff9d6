"""Reaching and operating the chart's servers, rendered by the real Helm v4 SDK.

- Ingress and Gateway API HTTPRoute options for MLflow and the model server: the objects
  validate (Kubernetes schemas; the HTTPRoute and ServiceMonitor CRDs by the schemas in
  tests/k8s/schemas/), point at the component's Service port, and MLflow accepts the Host
  headers users reach it by;
- a ServiceMonitor scrapes /metrics of the chart's model server and of the servers pipelines
  deploy (it selects the labels mmjobs.serve.k8s gives their Services);
- per-component nodeSelector / tolerations / affinity replace the chart-wide ones, and
  extraEnv / extraVolumes / extraVolumeMounts land in the component's pod;
- enabling an Ingress without hosts, or a route without a Gateway, fails naming the key.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from mmjobs.serve import k8s
from tests.k8s import policy
from tests.k8s.test_chart import CHART, NAMESPACE, containers, find, manifests, render
from tests.k8s.validation import KUBE_VERSIONS, describe, validate_manifest

MODEL = "s3://mmjobs/store/chart-demo/run-1/merge"
GATEWAY = {"name": "public", "namespace": "gateway-system"}
GPU_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
    "nodeSelectorTerms": [{"matchExpressions": [
        {"key": "nvidia.com/gpu.product", "operator": "In",
         "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}
CA_VOLUME = {"name": "ca", "configMap": {"name": "corp-ca"}}
CA_MOUNT = {"name": "ca", "mountPath": "/etc/ssl/corp", "readOnly": True}
PROXY = {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"}

ACCESS_SETS: dict[str, dict[str, Any]] = {
    # Ingress (nginx, TLS) for both, a ServiceMonitor, per-component placement and extras.
    "ingress-monitor": {
        "nodeSelector": {"pool": "cpu"},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
        "networkPolicy": {"allowFromNamespaces": ["ingress-nginx", "monitoring"]},
        "mlflow": {"ingress": {"enabled": True, "className": "nginx",
                               "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
                               "hosts": ["mlflow.example.com"],
                               "tls": [{"secretName": "mlflow-tls",
                                        "hosts": ["mlflow.example.com"]}]},
                   "extraEnv": [PROXY], "extraVolumes": [CA_VOLUME],
                   "extraVolumeMounts": [CA_MOUNT],
                   "nodeSelector": {"pool": "services"}},
        "minio": {"extraEnv": [{"name": "MINIO_BROWSER", "value": "off"}],
                  "tolerations": [{"key": "storage", "operator": "Exists",
                                   "effect": "NoSchedule"}]},
        "serve": {"enabled": True, "model": MODEL, "gpus": 1,
                  "affinity": GPU_AFFINITY, "extraEnv": [PROXY],
                  "extraVolumes": [CA_VOLUME], "extraVolumeMounts": [CA_MOUNT],
                  "ingress": {"enabled": True, "hosts": ["chat.example.com"], "path": "/"},
                  "serviceMonitor": {"enabled": True, "interval": "15s",
                                     "scrapeTimeout": "10s",
                                     "labels": {"release": "kube-prometheus-stack"}}},
        "pipelineUpload": {"enabled": True, "extraEnv": [PROXY],
                           "nodeSelector": {"pool": "jobs"}},
    },
    # Gateway API routes for both; the monitor alone (servers only from pipeline deploys).
    "gateway-routes": {
        "mlflow": {"httpRoute": {"enabled": True, "parentRefs": [GATEWAY],
                                 "hostnames": ["mlflow.internal.example.com"]}},
        "serve": {"enabled": True, "model": MODEL,
                  "httpRoute": {"enabled": True, "parentRefs": [GATEWAY], "path": "/"},
                  "serviceMonitor": {"enabled": True}},
    },
    "monitor-only": {"serve": {"pipelineDeploy": True, "serviceMonitor": {"enabled": True}}},
}


@pytest.fixture(scope="module", params=list(ACCESS_SETS))
def access_set(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, manifests(render(ACCESS_SETS[request.param]))


def pod_of(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    (doc,) = find(docs, kind, component)
    return doc["spec"]["template"]["spec"]


def env_of(pod: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return next(c for c in containers(pod) if c["name"] == name)["env"]


@pytest.mark.parametrize("name", list(ACCESS_SETS))
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), ACCESS_SETS[name], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSIONS[0]}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_validate_and_keep_the_security_defaults(access_set, version):
    _, docs = access_set
    assert [e for doc in docs for e in validate_manifest(doc, version)] == []
    assert policy.policy_violations(docs) == []


def test_ingresses_route_to_the_services_and_mlflow_accepts_their_hosts():
    docs = manifests(render(ACCESS_SETS["ingress-monitor"]))
    for component, host, port in (("mlflow", "mlflow.example.com", 5000),
                                  ("serve", "chat.example.com", 8000)):
        (ingress,) = find(docs, "Ingress", component)
        (service,) = find(docs, "Service", component)
        (rule,) = ingress["spec"]["rules"]
        assert rule["host"] == host
        backend = rule["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"] == {"name": "http"}
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
        assert {p["containerPort"] for c in containers(pod_of(docs, "Deployment", component))
                for p in c.get("ports", [])} == {port}
    (mlflow_ingress,) = find(docs, "Ingress", "mlflow")
    assert mlflow_ingress["spec"]["ingressClassName"] == "nginx"
    assert mlflow_ingress["spec"]["tls"][0]["secretName"] == "mlflow-tls"
    allowed = next(e["value"] for e in env_of(pod_of(docs, "Deployment", "mlflow"), "mlflow")
                   if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert "mlflow.example.com" in allowed


def test_http_routes_attach_to_the_gateway_and_mlflow_accepts_their_hostnames():
    docs = manifests(render(ACCESS_SETS["gateway-routes"]))
    for component, port in (("mlflow", 5000), ("serve", 8000)):
        (route,) = find(docs, "HTTPRoute", component)
        (service,) = find(docs, "Service", component)
        assert route["spec"]["parentRefs"] == [GATEWAY]
        (rule,) = route["spec"]["rules"]
        assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
        assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": port}]
    allowed = next(e["value"] for e in env_of(pod_of(docs, "Deployment", "mlflow"), "mlflow")
                   if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert "mlflow.internal.example.com" in allowed
    assert not find(docs, "Ingress")


def test_service_monitor_scrapes_the_chart_server_and_pipeline_deployed_servers():
    for name in ACCESS_SETS:
        docs = manifests(render(ACCESS_SETS[name]))
        (monitor,) = find(docs, "ServiceMonitor")
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
        # The Service a pipeline's deploy step creates for its server.
        deployed = k8s.service(name="review-chart-demo", namespace=NAMESPACE)
        targets = [deployed, *find(docs, "Service", "serve")]
        for service in targets:
            labels = service["metadata"]["labels"]
            assert selector.items() <= labels.items(), describe(service)
            assert "http" in [p["name"] for p in service["spec"]["ports"]], describe(service)
    docs = manifests(render(ACCESS_SETS["ingress-monitor"]))
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"


def test_nothing_of_it_by_default():
    docs = manifests(render({"serve": {"enabled": True, "model": MODEL}}))
    assert not [d for d in docs if d["kind"] in ("Ingress", "HTTPRoute", "ServiceMonitor")]
    assert "affinity" not in pod_of(docs, "Deployment", "mlflow")


def test_component_placement_replaces_the_chart_wide_one():
    docs = manifests(render(ACCESS_SETS["ingress-monitor"]))
    chart_wide = ACCESS_SETS["ingress-monitor"]
    mlflow = pod_of(docs, "Deployment", "mlflow")
    assert mlflow["nodeSelector"] == {"pool": "services"}
    assert mlflow["affinity"] == chart_wide["affinity"]
    minio = pod_of(docs, "Deployment", "minio")
    assert minio["nodeSelector"] == {"pool": "cpu"}
    assert minio["tolerations"] == chart_wide["minio"]["tolerations"]
    serve = pod_of(docs, "Deployment", "serve")
    assert serve["affinity"] == GPU_AFFINITY
    upload = pod_of(docs, "Job", "pipeline-upload")
    assert upload["nodeSelector"] == {"pool": "jobs"}


def test_extra_env_and_volumes_land_in_the_component_pods():
    docs = manifests(render(ACCESS_SETS["ingress-monitor"]))
    for kind, component, container in (("Deployment", "mlflow", "mlflow"),
                                        ("Deployment", "serve", "serve")):
        pod = pod_of(docs, kind, component)
        assert PROXY in env_of(pod, container)
        assert CA_VOLUME in pod["volumes"]
        main = next(c for c in pod["containers"] if c["name"] == container)
        assert CA_MOUNT in main["volumeMounts"]
    assert {"name": "MINIO_BROWSER", "value": "off"} in env_of(
        pod_of(docs, "Deployment", "minio"), "minio")
    upload = pod_of(docs, "Job", "pipeline-upload")
    assert PROXY in upload["containers"][0]["env"]


@pytest.mark.parametrize(("values", "message"), [
    ({"mlflow": {"ingress": {"enabled": True}}}, "mlflow.ingress.hosts: list at least one"),
    ({"serve": {"enabled": True, "model": MODEL, "httpRoute": {"enabled": True}}},
     "serve.httpRoute.parentRefs: name the Gateway"),
])
def test_incomplete_routes_fail_naming_the_key(values, message):
    with pytest.raises(helm.HelmRenderError, match=message.replace(".", r"\.")):
        render(values)


@pytest.mark.parametrize(("values", "key"), [
    ({"mlflow": {"extraEnv": [{"value": "x"}]}}, "name"),
    ({"serve": {"serviceMonitor": {"interval": "soon"}}}, "interval"),
    ({"mlflow": {"ingress": {"hosts": ["Not A Host"]}}}, "hosts"),
    ({"minio": {"affinity": {"nodeAfinity": {}}}}, "nodeAfinity"),
])
def test_schema_rejects_bad_access_values(values, key):
    with pytest.raises(helm.HelmValuesError, match=key):
        render(values)
