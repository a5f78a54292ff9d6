"""The plain manifests under k8s/: schema-valid, least privilege, secure pods.

- Every manifest (base files, example jobs, and the kustomize builds of the base and the
  example overlay) validates against the official Kubernetes OpenAPI schemas of each version
  in KUBE_VERSIONS; TrainJob and PyTorchJob against their vendored CRD schemas.
- The kfp-launcher ConfigMaps match KFP's launcher config format.
- RBAC and pods pass tests/k8s/policy.py, and the policy itself catches a ClusterRole, a
  wildcard verb and a pod without the security defaults.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

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
K8S = ROOT / "k8s"
BASE = K8S / "base"
EXAMPLES = sorted((K8S / "examples").glob("*.yaml"))
KUSTOMIZATIONS = [BASE, K8S / "overlays" / "example"]


def base_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def file_documents(paths: list[Path]) -> list[dict[str, Any]]:
    return [doc for path in paths for doc in load_documents(path.read_text())]


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` (kustomize is built into kubectl; offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the kustomize builds need it)")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return load_documents(result.stdout)


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def built(request) -> list[dict[str, Any]]:
    return kustomize_build(request.param)


def test_kustomization_lists_every_base_file():
    """A manifest added to k8s/base but not listed in kustomization.yaml would never apply."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in base_files()]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_files_validate_against_kubernetes_schemas(version):
    docs = file_documents(base_files() + EXAMPLES)
    kinds = {d["kind"] for d in docs}
    assert {"TrainJob", "PyTorchJob", "Role", "NetworkPolicy", "ConfigMap"} <= kinds
    errors = [e for doc in docs for e in validate_manifest(doc, version)]
    assert errors == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_kustomize_builds_validate(built, version):
    errors = [e for doc in built for e in validate_manifest(doc, version)]
    assert errors == []


def test_kustomize_builds_are_namespaced(built):
    """Everything but the Namespace object lives in one namespace; nothing is cluster-wide."""
    namespaces = {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces
    assert {d["kind"] for d in built} <= {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy"}


def test_example_overlay_binds_the_profile_account():
    docs = kustomize_build(K8S / "overlays" / "example")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("mmjobs-runner", "team-a"), ("default-editor", "team-a")}
    assert not [d for d in docs if d["kind"] == "Namespace"]


def test_kfp_launcher_configs(built):
    launcher = next(d for d in built if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == "kfp-launcher")
    assert validate_kfp_launcher(launcher) == []
    providers = yaml.safe_load(launcher["data"]["providers"])
    # The launcher reads the keys from the Secret the Role lets it read.
    secret_ref = providers["s3"]["default"]["credentials"]["secretRef"]
    role = next(d for d in built if d["kind"] == "Role")
    secret_rule = next(r for r in role["rules"] if "secrets" in r["resources"])
    assert secret_ref["secretName"] in secret_rule["resourceNames"]
    assert (secret_ref["accessKeyKey"], secret_ref["secretKeyKey"]) == (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_manifests_pass_the_policy(built):
    assert policy.policy_violations(built + file_documents(EXAMPLES)) == []


def test_role_grants_what_the_training_launcher_needs():
    role = next(d for d in file_documents(base_files()) if d["kind"] == "Role")
    granted = {(group, resource, verb) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    for group, resource in (("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs")):
        for verb in ("create", "get", "list", "watch", "delete"):
            assert (group, resource, verb) in granted
    assert {("", "pods", "watch"), ("", "pods/log", "get"), ("", "secrets", "get")} <= granted
    # The evaluate stage's PoT Job (mmjobs.eval.pot.pod reads it with read_namespaced_job).
    assert {("batch", "jobs", verb) for verb in ("create", "get", "delete")} <= granted


def test_pot_sandbox_pods_get_no_ingress_and_egress_only_to_the_store():
    """The NetworkPolicy selects the labels mmjobs.eval.pot.pod puts on PoT pods; the base
    denies all their traffic, the example overlay opens only MinIO's S3 port."""
    from mmjobs.eval.pot.pod import LABELS

    policies = {}
    for path in KUSTOMIZATIONS:
        (pol,) = [d for d in kustomize_build(path) if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "mmjobs-pot-sandbox"]
        policies[path.name] = pol
        assert pol["spec"]["podSelector"]["matchLabels"].items() <= LABELS.items()
        assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert not pol["spec"].get("ingress")
    assert not policies["base"]["spec"].get("egress")
    assert policies["example"]["spec"]["egress"] == [{
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}],
        "ports": [{"protocol": "TCP", "port": 9000}]}]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_jobs_are_multi_node_gpu_jobs(path):
    """Shared memory as a memory-backed emptyDir, GPU requests = limits, a GPU toleration and
    the label the allow-training-ranks NetworkPolicy selects."""
    (doc,) = load_documents(path.read_text())
    specs = policy.pod_specs(doc)
    assert specs
    for where, pod in specs:
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, f"{where}: no memory emptyDir"
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/dev/shm") == shm[0]["name"]
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            pod["tolerations"]
    if doc["kind"] == "TrainJob":
        assert doc["spec"]["trainer"]["numNodes"] >= 2
        labels = (doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
                  ["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"])
    else:
        replicas = doc["spec"]["pytorchReplicaSpecs"]
        assert sum(r["replicas"] for r in replicas.values()) >= 2
        # training-operator only manages a container named "pytorch".
        assert all(r["template"]["spec"]["containers"][0]["name"] == "pytorch"
                   for r in replicas.values())
        labels = replicas["Worker"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "training"


def test_trainjob_with_the_official_models():
    """Round trip through kubeflow-trainer-api's pydantic models: a field they do not know
    would be dropped, so equality means every field is part of the API."""
    models = pytest.importorskip("kubeflow_trainer_api.models")
    (doc,) = load_documents((K8S / "examples" / "trainjob.yaml").read_text())
    model = models.TrainerV1alpha1TrainJob.from_dict(doc)
    assert model.to_dict() == doc


# --------------------------------------------------------------------------- the validators fail


def test_custom_resource_schema_rejects_unknown_and_missing_fields():
    (trainjob,) = load_documents((K8S / "examples" / "trainjob.yaml").read_text())
    trainjob["spec"]["trainer"]["numNode"] = 2  # misspelt
    del trainjob["spec"]["runtimeRef"]
    errors = validate_manifest(trainjob, KUBE_VERSIONS[0])
    assert any("numNode" in e for e in errors), errors
    assert any("runtimeRef" in e for e in errors), errors

    (pytorchjob,) = load_documents((K8S / "examples" / "pytorchjob.yaml").read_text())
    pytorchjob["spec"]["pytorchReplicaSpecs"]["Chief"] = pytorchjob["spec"][
        "pytorchReplicaSpecs"].pop("Worker")
    # A Kubernetes type inside the custom resource: checked against the official schema.
    pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["tolerations"][0][
        "tolerationSecond"] = 5
    errors = validate_manifest(pytorchjob, KUBE_VERSIONS[0])
    assert any("Chief" in e for e in errors), errors
    assert any("tolerationSecond" in e for e in errors), errors


def test_kfp_launcher_validator_rejects_a_bad_providers_block():
    launcher = {"kind": "ConfigMap", "metadata": {"name": "kfp-launcher"}, "data": {
        "defaultPipelineRoot": "minio://mlpipeline/v2",
        "providers": yaml.safe_dump({"s3": {"default": {
            "endpoint": "https://s3.amazonaws.com",  # a scheme is not allowed
            "credentials": {"fromEnv": False}}}}),  # fromEnv false needs secretRef
    }}
    errors = validate_kfp_launcher(launcher)
    assert any("defaultPipelineRoot" in e for e in errors)
    assert any("endpoint" in e for e in errors)
    assert any("secretRef" in e for e in errors)


def test_policy_rejects_cluster_role_and_wildcards():
    cluster_role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": "too-much"},
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}
    wildcard = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "wild", "namespace": "mmjobs"},
                "rules": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                           "verbs": ["*"]},
                          {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "b", "namespace": "mmjobs"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "admin"}, "subjects": []}
    # Well-formed objects: the schema alone would let them through.
    for doc in (cluster_role, wildcard, binding):
        assert validate_manifest(doc, KUBE_VERSIONS[0]) == []
    assert any("cluster-wide" in v for v in policy.rbac_violations(cluster_role))
    problems = policy.rbac_violations(wildcard)
    assert any("wildcard in verbs" in v for v in problems)
    assert any("secrets without resourceNames" in v for v in problems)
    assert any("only get" in v for v in problems)
    assert any("ClusterRole" in v for v in policy.rbac_violations(binding))


def test_policy_rejects_a_pod_without_security_defaults():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
           "spec": {"containers": [{"name": "main", "image": "busybox"}]}}
    assert validate_manifest(pod, KUBE_VERSIONS[0]) == []
    problems = policy.pod_security_violations(pod)
    for expected in ("runAsNonRoot", "seccompProfile", "allowPrivilegeEscalation",
                     "readOnlyRootFilesystem", "capabilities.drop", "/tmp", "resources"):
        assert any(expected in p for p in problems), (expected, problems)


def test_policy_rejects_a_trainjob_without_patched_security():
    (doc,) = load_documents((K8S / "examples" / "trainjob.yaml").read_text())
    del doc["spec"]["runtimePatches"]
    problems = policy.pod_security_violations(doc)
    assert any("node" in p and "readOnlyRootFilesystem" in p for p in problems), problems


def test_every_manifest_kind_has_a_schema():
    """validate_manifest refuses kinds it cannot check rather than passing them."""
    with pytest.raises(LookupError, match="Widget"):
        validate_manifest({"apiVersion": "example.com/v1", "kind": "Widget",
                           "metadata": {"name": "w"}}, KUBE_VERSIONS[0])
    assert describe({"kind": "Pod", "metadata": {"name": "p"}}) == "Pod/p"
