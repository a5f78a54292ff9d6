"""The Helm chart (charts/mmjobs), rendered by the real Helm v4 SDK (helm-python-sdk).

For the default values and several non-default value sets:
- `helm lint` is clean (no errors, no warnings; the one INFO message is justified below);
- every rendered manifest validates against the Kubernetes schemas (KUBE_VERSIONS, strict);
- every pod (Deployments, Jobs, the test Pod) carries the security defaults, RBAC is least
  privilege (tests/k8s/policy.py);
- no credential appears in plain text, and none at all when existingSecret is used;
- names stay within 63 characters for the longest release name Helm accepts.
Bad values are rejected: by values.schema.json (unknown key, wrong type), and by the templates
(contradictory settings), with messages that name the key.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.k8s import policy
from tests.k8s.validation import (
    KUBE_VERSIONS,
    describe,
    load_documents,
    validate_kfp_launcher,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mmjobs"
RELEASE, NAMESPACE = "mmjobs", "ml"

# Recognizable fake credentials: they must never show up where they do not belong.
FAKE_ACCESS_KEY = "AKIAFAKEMMJOBS0TEST1"
FAKE_SECRET_KEY = "fake/Secret+Key-mmjobs-0123456789abcdef"
FAKE_MLFLOW_PASSWORD = "fake-mlflow-Passw0rd-mmjobs"
FAKES = (FAKE_ACCESS_KEY, FAKE_SECRET_KEY, FAKE_MLFLOW_PASSWORD)

VALUE_SETS: dict[str, dict[str, Any]] = {
    # MinIO on, SQLite on a PVC, no auth, generated MinIO credentials.
    "default": {},
    # External S3 and every credential from existing Secrets. The inline values are set too,
    # to prove they are ignored (and never rendered) when an existingSecret wins.
    "external-s3-existing-secrets": {
        "minio": {"enabled": False},
        "s3": {"bucket": "team-bucket", "endpoint": "https://s3.example.com:9443",
               "region": "eu-west-1", "existingSecret": "team-s3",
               "accessKeyId": FAKE_ACCESS_KEY, "secretAccessKey": FAKE_SECRET_KEY},
        "mlflow": {"auth": {"enabled": True, "existingSecret": "team-mlflow",
                            "password": FAKE_MLFLOW_PASSWORD}},
    },
    # AWS S3 (no endpoint) with inline keys: the chart creates the Secret.
    "aws-inline-credentials": {
        "minio": {"enabled": False},
        "s3": {"bucket": "team-bucket", "accessKeyId": FAKE_ACCESS_KEY,
               "secretAccessKey": FAKE_SECRET_KEY},
    },
    # MinIO without persistence, MLflow basic auth with an inline password.
    "minio-auth": {
        "minio": {"persistence": {"enabled": False}},
        "mlflow": {"auth": {"enabled": True, "password": FAKE_MLFLOW_PASSWORD,
                            "defaultPermission": "NO_PERMISSIONS"}},
    },
    # PostgreSQL backend (DSN from a Secret), two replicas, auth in the same database.
    "postgres": {
        "mlflow": {"replicaCount": 2,
                   "backend": {"type": "postgresql", "existingSecret": "mlflow-db"},
                   "auth": {"enabled": True}},
    },
    # Every optional feature on.
    "everything": {
        "commonLabels": {"team": "vision"},
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml",
                         "effect": "NoSchedule"}],
        "image": {"tag": "0.2.0"},
        "mlflow": {"image": {"repository": "ghcr.io/example/mlflow", "tag": "3.17.0"},
                   "allowedHosts": ["mlflow.example.com"], "podAnnotations": {"a": "b"}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "rbac": {"extraSubjects": [{"kind": "ServiceAccount", "name": "pipeline-runner",
                                    "namespace": "kubeflow"},
                                   {"kind": "ServiceAccount", "name": "default-editor"},
                                   {"kind": "Group", "name": "ml-admins"}]},
        "networkPolicy": {"allowFromNamespaces": ["kubeflow", "ingress-nginx"]},
        "pipelineUpload": {"enabled": True, "kfpToken": True, "kfpNamespace": "team-a",
                           "namePrefix": "team-a-", "overrides": ["cluster.gpus=1"],
                           "image": {"repository": "ghcr.io/example/mmjobs-tools", "tag": "1"},
                           "workingDir": "/opt/mmjobs-src"},
    },
}


def render(values: dict[str, Any], name: str = RELEASE) -> dict[str, str]:
    """{template path: rendered text} as `helm template` / `helm install` produce it."""
    chart = helm.Chart.load(str(CHART))
    try:
        return chart.render(values, name=name, namespace=NAMESPACE)
    finally:
        chart.close()


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for doc in load_documents(text)]


def notes(rendered: dict[str, str]) -> str:
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (
        component is None
        or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*(pod.get("initContainers") or []), *pod["containers"]]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def value_set(request) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return request.param, values, manifests(render(values))


# --------------------------------------------------------------------------- lint


# `helm lint` INFO messages we accept, with the reason.
ACCEPTED_LINT_INFO = {
    # The chart has no logo to point at; an icon URL only decorates chart repositories.
    "icon is recommended",
}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSIONS[0]}.0")
    assert report["errors"] == []
    unexpected = [m for m in report["messages"]
                  if m["severity"] > 1 or m["error"] not in ACCEPTED_LINT_INFO]
    assert unexpected == []


# --------------------------------------------------------------------------- schemas and policy


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_manifests_validate(value_set, version):
    _, _, docs = value_set
    errors = [e for doc in docs for e in validate_manifest(doc, version)]
    assert errors == []


def test_every_pod_has_the_security_defaults_and_rbac_is_least_privilege(value_set):
    name, _, docs = value_set
    pods = [d for d in docs if policy.pod_specs(d)]
    assert {d["kind"] for d in pods} >= {"Deployment", "Pod"}, name
    assert policy.policy_violations(docs) == []
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_every_object_is_namespaced_and_labelled(value_set):
    _, _, docs = value_set
    for doc in docs:
        metadata = doc["metadata"]
        assert metadata["namespace"] == NAMESPACE, describe(doc)
        labels = metadata["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/component", "helm.sh/chart"):
            assert labels.get(key), (describe(doc), key)


def test_one_resource_per_template_file():
    for path, text in render(VALUE_SETS["everything"]).items():
        if not path.endswith("NOTES.txt"):
            assert len(load_documents(text)) <= 1, path


# --------------------------------------------------------------------------- credentials

SECRET_ENV = re.compile(r"(SECRET|PASSWORD|ACCESS_KEY|TOKEN|KEY_ID|BACKEND_STORE_URI|DATABASE_URI)")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_no_credentials_rendered_with_existing_secrets():
    """Fake inline credentials are set, but existingSecret wins: neither they nor their
    base64 appear anywhere in the output (NOTES included), and no Secret is rendered."""
    rendered = render(VALUE_SETS["external-s3-existing-secrets"])
    text = "\n".join(rendered.values())
    for fake in FAKES:
        assert fake not in text and b64(fake) not in text
    docs = manifests(rendered)
    assert find(docs, "Secret") == []
    # NOTES says which value won.
    assert "s3.accessKeyId / s3.secretAccessKey are ignored" in notes(rendered)
    assert "mlflow.auth.password is ignored" in notes(rendered)


@pytest.mark.parametrize("name", ["aws-inline-credentials", "minio-auth"])
def test_inline_credentials_only_in_secret_data(name):
    """Inline credentials end up base64-encoded in the chart's Secret and nowhere else."""
    rendered = render(VALUE_SETS[name])
    for fake in FAKES:
        assert fake not in "\n".join(rendered.values())  # never plain text, anywhere
    secrets = find(manifests(rendered), "Secret")
    stored = {base64.b64decode(v).decode() for s in secrets for v in s["data"].values()}
    used = [fake for fake in FAKES if fake in stored]
    assert used, "the inline credentials should be in a Secret"
    for path, text in rendered.items():
        if path.endswith("NOTES.txt") or not any(d["kind"] == "Secret"
                                                 for d in load_documents(text)):
            for fake in used:
                assert b64(fake) not in text, path


def test_credential_env_vars_come_from_secrets(value_set):
    """Env vars that carry credentials (or a database URI, which can hold a password) are
    never literal values; the only literal URIs are SQLite file paths."""
    _, _, docs = value_set
    for doc in docs:
        for where, pod in policy.pod_specs(doc):
            for container in containers(pod):
                for env in container.get("env") or []:
                    if not SECRET_ENV.search(env["name"]):
                        continue
                    if "value" in env:
                        assert env["value"].startswith("sqlite:"), (where, env)
                    else:
                        assert "secretKeyRef" in env["valueFrom"], (where, env)


def test_generated_credentials_when_none_given():
    """MinIO without inline keys: random root credentials, long enough for MinIO (>= 8)."""
    (secret,) = find(manifests(render({})), "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert len(decoded["AWS_SECRET_ACCESS_KEY"]) >= 32
    assert len(decoded["AWS_ACCESS_KEY_ID"]) >= 8


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("release,values", [
    ("mmjobs-" + "x" * 46, {}),                              # 53: Helm's limit; has chart name
    ("r" * 53, {}),                                          # 53 without the chart name
    ("short", {"fullnameOverride": "f" * 63}),               # the longest override
], ids=["release-with-chart-name", "long-release", "long-fullname-override"])
def test_names_fit_in_63_characters(release, values):
    values = {**VALUE_SETS["everything"], **values}
    docs = manifests(render(values, name=release))
    seen: dict[str, set[str]] = {}
    dns_label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and dns_label.match(name), name
        assert name not in seen.setdefault(doc["kind"], set()), f"duplicate {doc['kind']} {name}"
        seen[doc["kind"]].add(name)
        for key, value in doc["metadata"]["labels"].items():
            assert len(value) <= 63, (name, key, value)


def test_release_named_mmjobs_gives_the_recipe_default_secret_names():
    """`helm install mmjobs` creates exactly the Secret names recipes use by default
    (cluster.secrets.s3 = mmjobs-s3, cluster.secrets.mlflow = mmjobs-mlflow)."""
    from mmjobs.config import SecretNames

    docs = manifests(render(VALUE_SETS["minio-auth"]))
    assert {s["metadata"]["name"] for s in find(docs, "Secret")} == {
        SecretNames().s3, SecretNames().mlflow}


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("values,expected", [
    ({"mlfow": {}}, ["additional properties 'mlfow' not allowed"]),
    ({"mlflow": {"replicas": 2}}, ["/mlflow", "'replicas' not allowed"]),
    ({"mlflow": {"service": {"port": "5000x"}}}, ["/mlflow/service/port", "want integer"]),
    ({"mlflow": {"backend": {"type": "mysql"}}},
     ["/mlflow/backend/type", "must be one of 'sqlite', 'postgresql'"]),
    ({"mlflow": {"resources": {"limits": {"gpu": 1}}}}, ["/mlflow/resources/limits", "'gpu'"]),
    ({"minio": {"enabled": "yes"}}, ["/minio/enabled", "want boolean"]),
    ({"s3": {"endpoint": "s3.example.com"}}, ["/s3/endpoint"]),
    ({"mlflow": {"auth": {"password": "short"}}}, ["/mlflow/auth/password"]),
], ids=["unknown-top-level", "unknown-nested", "wrong-type", "bad-enum", "unknown-resource",
        "string-for-bool", "endpoint-without-scheme", "short-mlflow-password"])
def test_schema_rejects_bad_values(values, expected):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    message = str(caught.value)
    for part in expected:
        assert part in message, message
    # `helm lint` reports the same problem.
    assert helm.lint(str(CHART), values)["errors"] or any(
        m["severity"] == 3 for m in helm.lint(str(CHART), values)["messages"])


@pytest.mark.parametrize("values,expected", [
    ({"minio": {"enabled": False}}, ["s3.bucket: required when minio.enabled is false",
                                     "s3.existingSecret: required with an external S3"]),
    ({"s3": {"endpoint": "https://s3.example.com"}}, ["s3.endpoint", "minio.enabled=false"]),
    ({"s3": {"accessKeyId": "x"}}, ["s3.accessKeyId / s3.secretAccessKey: set both or neither"]),
    ({"mlflow": {"backend": {"type": "postgresql"}}}, ["mlflow.backend.existingSecret"]),
    ({"mlflow": {"replicaCount": 3}}, ["mlflow.replicaCount: 3 replicas cannot share"]),
    ({"mlflow": {"auth": {"enabled": True, "username": ""}}}, ["mlflow.auth.username"]),
    ({"pipelineUpload": {"enabled": True, "recipes": []}}, ["pipelineUpload.recipes"]),
    ({"mlflow": {"image": {"repository": "example/mlflow"}}}, ["mlflow.image.tag"]),
    ({"pipelineUpload": {"enabled": True, "image": {"repository": "example/tools"}}},
     ["pipelineUpload.image.tag"]),
], ids=["no-bucket-no-credentials", "minio-with-endpoint", "half-credentials",
        "postgres-without-dsn", "sqlite-replicas", "auth-without-user", "no-recipes",
        "image-without-tag", "upload-image-without-tag"])
def test_templates_reject_contradictory_values(values, expected):
    with pytest.raises(helm.HelmRenderError) as caught:
        render(values)
    for part in expected:
        assert part in str(caught.value), str(caught.value)


# --------------------------------------------------------------------------- values documentation


def test_every_value_is_documented():
    """Each key in values.yaml has a comment right above it; a comment starting with "# --"
    documents the whole value (e.g. a securityContext object) including its sub-keys."""
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented as a whole)
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(whole for _, whole in stack):
            stack.append((indent, True))
            continue
        above = number - 1
        block = []
        while above >= 0 and lines[above].strip().startswith("#"):
            block.insert(0, lines[above].strip())
            above -= 1
        if not block and "#" not in line:
            undocumented.append(f"line {number + 1}: {match.group(2)}")
        stack.append((indent, bool(block) and block[0].startswith("# --")))
    assert undocumented == []


def _schema_objects(node: Any, path: str = ""):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for key, value in node.items():
            yield from _schema_objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schema_objects(value, f"{path}/{i}")


# Kubernetes types the chart copies verbatim into pod specs (affinity terms, an env var's
# valueFrom, volume sources): the schema checks their top level only; the API server's strict
# field validation checks the rest on apply, and test_rendered_manifests_validate checks them
# against the Kubernetes schema here.
KUBERNETES_PASSTHROUGH = {
    "/$defs/affinity/properties/nodeAffinity",
    "/$defs/affinity/properties/podAffinity",
    "/$defs/affinity/properties/podAntiAffinity",
    "/$defs/envVar/properties/valueFrom",
    "/$defs/volume",
}


def test_schema_is_closed_at_every_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, node in _schema_objects(schema):
        if path in KUBERNETES_PASSTHROUGH:
            continue
        extra = node.get("additionalProperties")
        # Closed objects, or maps whose values have a schema (labels, annotations, ...).
        assert extra is False or isinstance(extra, dict), f"{path} is open"


def test_schema_and_values_describe_the_same_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(schema_node: dict[str, Any], value: Any, path: str) -> list[str]:
        problems = []
        for key, sub in (schema_node.get("properties") or {}).items():
            if not isinstance(value, dict) or key not in value:
                problems.append(f"{path}.{key} is in the schema but not in values.yaml")
            elif "properties" in sub:
                problems += walk(sub, value[key], f"{path}.{key}")
        return problems

    assert walk(schema, values, "") == []


# --------------------------------------------------------------------------- what is rendered


def test_default_install_is_self_contained():
    docs = manifests(render({}))
    kinds = sorted(f"{d['kind']}/{d['metadata']['labels']['app.kubernetes.io/component']}"
                   for d in docs)
    assert kinds == sorted([
        "ConfigMap/kfp-launcher", "ConfigMap/scripts", "Deployment/minio", "Deployment/mlflow",
        "Job/create-bucket", "NetworkPolicy/network", "NetworkPolicy/network",
        "NetworkPolicy/network", "NetworkPolicy/network", "NetworkPolicy/network",
        "PersistentVolumeClaim/minio",
        "PersistentVolumeClaim/mlflow", "Pod/test", "Role/rbac", "RoleBinding/rbac",
        "Secret/s3", "Service/minio", "Service/mlflow", "ServiceAccount/rbac"])


def test_mlflow_server_settings():
    docs = manifests(render(VALUE_SETS["minio-auth"]))
    (deployment,) = find(docs, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["command"] == ["mlflow"]
    assert {"server", "--serve-artifacts", "--artifacts-destination=s3://mmjobs/mlflow",
            "--app-name=basic-auth", "--host=0.0.0.0", "--port=5000"} <= set(server["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////data/mlflow.db"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == \
        "http://mmjobs-minio.ml.svc.cluster.local:9000"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert {"mmjobs-mlflow.ml.svc.cluster.local:*", "localhost:*"} <= set(allowed)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert [c["name"] for c in pod["initContainers"]] == ["auth-config"]


def test_postgres_backend_reads_the_dsn_from_its_secret():
    docs = manifests(render(VALUE_SETS["postgres"]))
    (deployment,) = find(docs, "Deployment", "mlflow")
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]
    pod = deployment["spec"]["template"]["spec"]
    dsn_ref = {"secretKeyRef": {"name": "mlflow-db", "key": "MLFLOW_BACKEND_STORE_URI"}}
    (server,) = pod["containers"]
    (auth,) = pod["initContainers"]
    assert {e["name"]: e.get("valueFrom") for e in server["env"]}[
        "MLFLOW_BACKEND_STORE_URI"] == dsn_ref
    assert {e["name"]: e.get("valueFrom") for e in auth["env"]}[
        "MLFLOW_AUTH_DATABASE_URI"] == dsn_ref
    assert not find(docs, "PersistentVolumeClaim", "mlflow")


@pytest.mark.parametrize("name,endpoint,ssl_off,path_style", [
    ("default", "mmjobs-minio.ml.svc.cluster.local:9000", True, True),
    ("external-s3-existing-secrets", "s3.example.com:9443", False, True),
    ("aws-inline-credentials", "s3.amazonaws.com", False, False),
])
def test_kfp_launcher_config(name, endpoint, ssl_off, path_style):
    docs = manifests(render(VALUE_SETS[name]))
    (launcher,) = [d for d in docs if d["metadata"]["name"] == "kfp-launcher"]
    assert validate_kfp_launcher(launcher) == []
    default = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert (default["endpoint"], default["disableSSL"], default["forcePathStyle"]) == (
        endpoint, ssl_off, path_style)
    bucket = VALUE_SETS[name].get("s3", {}).get("bucket", "mmjobs")
    assert launcher["data"]["defaultPipelineRoot"] == f"s3://{bucket}/kfp"
    # The launcher can read the Secret it is pointed at.
    secret = default["credentials"]["secretRef"]["secretName"]
    (role,) = find(docs, "Role")
    assert secret in next(r for r in role["rules"] if "secrets" in r["resources"])[
        "resourceNames"]


def test_chart_role_matches_the_kustomize_role():
    """One least-privilege rule set for both install paths (Secret names aside)."""
    (chart_role,) = find(manifests(render({})), "Role")
    (base_role,) = load_documents((ROOT / "k8s" / "base" / "role.yaml").read_text())

    def normalized(rules):
        return [{k: v for k, v in r.items() if not (k == "resourceNames" and "secrets" in
                                                    r["resources"])} for r in rules]

    assert normalized(chart_role["rules"]) == normalized(base_role["rules"])


@pytest.mark.parametrize(("values", "egress"), [
    ({}, [{"to": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "mmjobs", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "minio"}}}], "ports": [{"protocol": "TCP",
                                                                "port": 9000}]}]),
    (VALUE_SETS["external-s3-existing-secrets"], [{"to": [
        {"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
        "ports": [{"protocol": "TCP", "port": 9443}]}]),
    ({"minio": {"enabled": False}, "s3": {"bucket": "team-bucket", "existingSecret": "team-s3"},
      "networkPolicy": {
        "potSandboxEgress": [{"to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}],
                              "ports": [{"protocol": "TCP", "port": 443}]}]}},
     [{"to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}], "ports": [{"protocol": "TCP",
                                                                "port": 443}]}]),
], ids=["minio", "external-s3", "explicit"])
def test_pot_sandbox_pods_reach_only_the_store(values, egress):
    """PoT pods (mmjobs.eval.pot.pod labels them) take no connections and reach the store only;
    no DNS (they get the store's address as a hostAliases entry)."""
    from mmjobs.eval.pot.pod import LABELS

    (pol,) = [d for d in find(manifests(render(values)), "NetworkPolicy")
              if d["metadata"]["name"].endswith("-pot-sandbox")]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= LABELS.items()
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert pol["spec"]["ingress"] == []
    assert pol["spec"]["egress"] == egress


def test_rbac_extra_subjects():
    (binding,) = find(manifests(render(VALUE_SETS["everything"])), "RoleBinding")
    assert binding["subjects"][1:] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"},
        {"kind": "ServiceAccount", "name": "default-editor", "namespace": NAMESPACE},
        {"kind": "Group", "name": "ml-admins", "apiGroup": "rbac.authorization.k8s.io"}]


def test_pipeline_upload_job_overrides_are_valid_recipe_overrides():
    """The overrides the hook passes to `mmjobs compile` load with the real recipe and point
    the pipelines at this release's store, MLflow and Secrets."""
    from mmjobs.recipe import load_recipe

    docs = manifests(render(VALUE_SETS["everything"]))
    (job,) = find(docs, "Job", "pipeline-upload")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/example/mmjobs-tools:1"
    assert container["workingDir"] == "/opt/mmjobs-src"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KFP_NAMESPACE"] == "team-a" and env["PIPELINE_VERSION"] == "0.1.0-r1"
    recipes = env["RECIPES"].splitlines()
    assert recipes == ["pipelines/recipes/chart-demo.yaml"]
    recipe = load_recipe(ROOT / recipes[0], env["OVERRIDES"].splitlines())
    assert recipe.cluster.env["MMJOBS_STORE"] == "s3://mmjobs/store"
    assert recipe.cluster.env["MLFLOW_TRACKING_URI"] == \
        "http://mmjobs-mlflow.ml.svc.cluster.local:5000"
    assert recipe.cluster.env["AWS_ENDPOINT_URL"] == \
        "http://mmjobs-minio.ml.svc.cluster.local:9000"
    assert (recipe.cluster.secrets.s3, recipe.cluster.secrets.mlflow) == (
        "mmjobs-s3", "mmjobs-mlflow")
    assert recipe.images.tag == "0.2.0" and recipe.cluster.gpus == 1
    # The KFP token for multi-user KFP is a projected, audience-bound token.
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    (source,) = volumes["kfp-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


def test_scripts_used_by_pods_are_in_the_configmap():
    docs = manifests(render(VALUE_SETS["everything"] | {"mlflow": {"auth": {"enabled": True}}}))
    (scripts,) = find(docs, "ConfigMap", "scripts")
    assert set(scripts["data"]) == {p.name for p in (CHART / "files").glob("*.py")}
    for doc in docs:
        for where, pod in policy.pod_specs(doc):
            for container in containers(pod):
                for arg in container.get("command") or []:
                    if arg.startswith("/scripts/"):
                        assert arg.removeprefix("/scripts/") in scripts["data"], where


def test_hooks_and_helm_test():
    docs = manifests(render({}))
    (test_pod,) = find(docs, "Pod", "test")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"][-1] == "/scripts/check_install.py"
    (bucket_job,) = find(docs, "Job", "create-bucket")
    assert bucket_job["metadata"]["annotations"]["helm.sh/hook-weight"] == "0"


def test_notes_tell_how_to_reach_mlflow_and_submit():
    text = notes(render(VALUE_SETS["minio-auth"]))
    assert "kubectl -n ml port-forward svc/mmjobs-mlflow 5000:5000" in text
    assert "mmjobs submit pipelines/recipes/chart-demo.yaml --host" in text
    assert "--set cluster.secrets.s3=mmjobs-s3" in text
    assert "get secret mmjobs-mlflow" in text  # how to read the generated password
    assert "helm test mmjobs" in text
