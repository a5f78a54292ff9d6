"""Offline schema validation of Kubernetes manifests.

- Built-in kinds: the official Kubernetes OpenAPI schemas bundled with kubernetes-validate,
  in strict mode (unknown fields are errors, as with kubectl's server-side strict validation).
- TrainJob (trainer.kubeflow.org/v1alpha1) and PyTorchJob (kubeflow.org/v1): the vendored
  JSON Schemas in tests/k8s/schemas/ (see generate_crd_schemas.py there for their source);
  ServiceMonitor (monitoring.coreos.com/v1) and HTTPRoute (gateway.networking.k8s.io/v1):
  schemas written by hand there from the API references, closed like the others;
  the Kubernetes types inside them (pod templates, tolerations, env, ...) resolve to the same
  official definitions of the version under test.
- The `providers` block of KFP's kfp-launcher ConfigMap:
  tests/k8s/schemas/kfp-launcher-providers.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).parent / "schemas"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest one
# kubernetes-validate bundles: manifests must be valid on both.
KUBE_VERSIONS = ("1.31", "1.37")
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
CUSTOM_SCHEMAS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob.trainer.kubeflow.org.v1alpha1.json",
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob.kubeflow.org.v1.json",
    # Written by hand from the API references (see their $comment): no Python package carries
    # these CRDs' models.
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute.gateway.networking.k8s.io.v1.json",
}


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a multi-document string."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def describe(doc: dict[str, Any]) -> str:
    """'Kind/name' of a manifest, for messages."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


@functools.cache
def _k8s_definitions(version: str) -> Resource:
    """kubernetes-validate's strict definitions for `version` as a referencing Resource."""
    full = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == version][-1]
    contents = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", full)
    return Resource.from_contents(contents)


@functools.cache
def _custom_validator(filename: str, version: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / filename).read_text())
    registry = Registry().with_resource(K8S_DEFS_ID, _k8s_definitions(version))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _error_path(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(root)"


def validate_manifest(doc: dict[str, Any], version: str) -> list[str]:
    """Schema errors of one manifest on Kubernetes `version` ([] when valid).

    Raises:
        LookupError: the kind has no schema here (neither built-in nor vendored).
    """
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        validator = _custom_validator(CUSTOM_SCHEMAS[key], version)
        return [f"{describe(doc)}: {_error_path(e)}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=str)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        raise LookupError(f"{describe(doc)}: no schema for {key} on Kubernetes {version}") from e
    except kubernetes_validate.ValidationError as e:
        return [f"{describe(doc)}: {_error_path(e)}: {e.message}"]
    return []


@functools.cache
def _providers_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / "kfp-launcher-providers.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_kfp_launcher(doc: dict[str, Any]) -> list[str]:
    """Errors in a kfp-launcher ConfigMap's data: an s3:// pipeline root and a providers
    block matching KFP's S3ProviderConfig."""
    data = doc.get("data") or {}
    errors = []
    if not str(data.get("defaultPipelineRoot", "")).startswith("s3://"):
        errors.append(f"defaultPipelineRoot {data.get('defaultPipelineRoot')!r} is not s3://")
    try:
        providers = yaml.safe_load(data.get("providers", ""))
    except yaml.YAMLError as e:
        return [*errors, f"providers is not YAML: {e}"]
    errors += [f"providers/{_error_path(e)}: {e.message}"
               for e in _providers_validator().iter_errors(providers)]
    return errors
