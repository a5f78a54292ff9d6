"""Regenerate the vendored custom-resource schemas next to this file (tests never run it).

The tests have no network, so the schemas of the two training CRDs live here as JSON Schema,
generated from the official Kubeflow API models:

    trainjob.trainer.kubeflow.org.v1alpha1.json   kubeflow-trainer-api==2.3.0 (pydantic models)
    pytorchjob.kubeflow.org.v1.json               kubeflow-training==1.9.4 (OpenAPI models)

To regenerate (the wheels are only unpacked, not installed):

    pip download --no-deps kubeflow-trainer-api==2.3.0 kubeflow-training==1.9.4 -d /tmp/crd
    for w in /tmp/crd/*.whl; do unzip -qo "$w" -d /tmp/crd/src; done
    PYTHONPATH=/tmp/crd/src .venv/bin/python tests/k8s/schemas/generate_crd_schemas.py

What the generator does to the models' schemas:
- Kubernetes core types (PodTemplateSpec, Toleration, EnvVar, ResourceRequirements, ...) are
  not copied: they become `$ref`s into kubernetes-validate's bundled `_definitions.json`, so
  pod specs inside the custom resources are checked against the official schema of the
  Kubernetes version under test.
- Every object gets `additionalProperties: false`: the API server's strict field validation
  (kubectl's default) rejects unknown fields, so a misspelt field fails the test, not the apply.
- A few constraints the CRDs state as kubebuilder markers but the models do not carry are
  added by hand (`CRD_CONSTRAINTS` below), each with the Go type it comes from.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
SOURCES = {
    "trainjob": "kubeflow-trainer-api==2.3.0 (kubeflow_trainer_api.models.TrainerV1alpha1TrainJob)",
    "pytorchjob": "kubeflow-training==1.9.4 (kubeflow.training.models.KubeflowOrgV1PyTorchJob)",
}


def k8s_definition_names() -> dict[str, str]:
    """Normalised name ('iok8sapicorev1toleration') -> definition key, from kubernetes-validate."""
    import kubernetes_validate.utils as kv

    defs = kv.schema_contents(f"kubernetes-json-schema/v{kv.latest_version()}-local-strict/"
                              "_definitions.json", kv.latest_version())["$defs"]
    return {key.replace(".", "").replace("-", "").lower(): key for key in defs}


def k8s_ref(key: str) -> dict[str, str]:
    return {"$ref": f"{K8S_DEFS_ID}#/$defs/{key}"}


def strip_nullable(node: Any) -> Any:
    """Pydantic's Optional[X] is anyOf [X, null]; Kubernetes fields are simply optional."""
    if isinstance(node, dict):
        any_of = node.get("anyOf")
        if isinstance(any_of, list):
            rest = [n for n in any_of if n != {"type": "null"}]
            if len(rest) == 1:
                merged = {k: v for k, v in node.items() if k != "anyOf"}
                merged.update(rest[0])
                node = merged
        return {k: strip_nullable(v) for k, v in node.items()
                if k != "title" and not (k == "default" and v is None)}
    if isinstance(node, list):
        return [strip_nullable(n) for n in node]
    return node


def close_objects(node: Any) -> Any:
    """additionalProperties: false on every object that lists its properties."""
    if isinstance(node, dict):
        node = {k: close_objects(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [close_objects(n) for n in node]
    return node


def trainjob_schema() -> dict[str, Any]:
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    k8s = k8s_definition_names()
    raw = TrainerV1alpha1TrainJob.model_json_schema(by_alias=True)
    text = json.dumps(raw)

    # Core types: point $refs at the Kubernetes definitions and drop the copies.
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if not name.startswith("IoK8s"):
            return match.group(0)
        return json.dumps(k8s_ref(k8s[name.lower()]))[1:-1]

    schema = json.loads(re.sub(r'"\$ref": "#/\$defs/(\w+)"', replace, text))
    schema["$defs"] = {k: v for k, v in schema["$defs"].items() if not k.startswith("IoK8s")}
    schema = close_objects(strip_nullable(schema))
    props = schema["properties"]
    props.pop("status")  # written by the controller, never by us
    props["apiVersion"] = {"const": "trainer.kubeflow.org/v1alpha1"}
    props["kind"] = {"const": "TrainJob"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def openapi_type(type_name: str, k8s: dict[str, str]) -> dict[str, Any]:
    """JSON Schema for one `openapi_types` entry of the OpenAPI-generated models."""
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": openapi_type(m.group(1), k8s)}
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": openapi_type(m.group(1), k8s)}
    scalars = {"str": {"type": "string"}, "int": {"type": "integer"},
               "bool": {"type": "boolean"}, "float": {"type": "number"},
               "datetime": {"type": "string", "format": "date-time"}, "object": {}}
    if type_name in scalars:
        return scalars[type_name]
    if type_name.startswith("KubeflowOrgV1"):
        return {"$ref": f"#/$defs/{type_name}"}
    if type_name == "Quantity":
        return k8s_ref("io.k8s.apimachinery.pkg.api.resource.Quantity")
    if type_name.startswith("K8sIoApi"):  # K8sIoApiAutoscalingV2MetricSpec
        return k8s_ref(k8s[("IoK8sApi" + type_name[len("K8sIoApi"):]).lower()])
    if type_name.startswith("V1"):
        for group in ("iok8sapicorev1", "iok8sapimachinerypkgapismetav1", "iok8sapibatchv1"):
            if (group + type_name[2:].lower()) in k8s:
                return k8s_ref(k8s[group + type_name[2:].lower()])
    raise ValueError(f"no schema for model type {type_name!r}")


def pytorchjob_schema() -> dict[str, Any]:
    models = importlib.import_module("kubeflow.training.models")
    k8s = k8s_definition_names()
    defs: dict[str, Any] = {}

    def add(class_name: str) -> None:
        if class_name in defs:
            return
        cls = getattr(models, class_name)
        source = Path(sys.modules[cls.__module__].__file__).read_text()
        properties, required = {}, []
        for attr, type_name in cls.openapi_types.items():
            json_name = cls.attribute_map[attr]
            properties[json_name] = openapi_type(type_name, k8s)
            if f"Invalid value for `{attr}`, must not be `None`" in source:
                required.append(json_name)
        defs[class_name] = {"type": "object", "properties": properties,
                            "additionalProperties": False}
        if required:
            defs[class_name]["required"] = required
        for type_name in re.findall(r"KubeflowOrgV1\w+", json.dumps(properties)):
            add(type_name)

    add("KubeflowOrgV1PyTorchJob")
    schema = defs.pop("KubeflowOrgV1PyTorchJob")
    schema["properties"].pop("status")
    schema["properties"]["apiVersion"] = {"const": "kubeflow.org/v1"}
    schema["properties"]["kind"] = {"const": "PyTorchJob"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["$defs"] = {k: v for k, v in defs.items() if k != "KubeflowOrgV1JobStatus"}
    return schema


def apply_constraints(schema: dict[str, Any], constraints: dict[str, dict[str, Any]]) -> None:
    """Merge hand-written constraints into schema nodes addressed by '/'-separated paths."""
    for path, extra in constraints.items():
        node = schema
        for part in path.split("/"):
            node = node[part]
        node.update(extra)


# Kubebuilder markers of the Go API types that the generated models do not carry.
CRD_CONSTRAINTS = {
    "trainjob": {
        # kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go, RuntimeRef.Kind/APIGroup
        "$defs/TrainerV1alpha1RuntimeRef/properties/kind":
            {"enum": ["TrainingRuntime", "ClusterTrainingRuntime"]},
        "$defs/TrainerV1alpha1RuntimeRef/properties/apiGroup":
            {"enum": ["trainer.kubeflow.org"]},
        # Trainer.NumNodes: +kubebuilder:validation:Minimum=1
        "$defs/TrainerV1alpha1Trainer/properties/numNodes": {"minimum": 1},
    },
    "pytorchjob": {
        # kubeflow/training-operator pkg/apis/kubeflow.org/v1: PyTorchJob replica types
        "$defs/KubeflowOrgV1PyTorchJobSpec/properties/pytorchReplicaSpecs":
            {"propertyNames": {"enum": ["Master", "Worker"]}},
        # common_types.go RestartPolicy and CleanPodPolicy
        "$defs/KubeflowOrgV1ReplicaSpec/properties/restartPolicy":
            {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "$defs/KubeflowOrgV1RunPolicy/properties/cleanPodPolicy":
            {"enum": ["All", "Running", "None"]},
    },
}


def main() -> None:
    outputs = {
        "trainjob": ("trainjob.trainer.kubeflow.org.v1alpha1.json", trainjob_schema),
        "pytorchjob": ("pytorchjob.kubeflow.org.v1.json", pytorchjob_schema),
    }
    for key, (filename, build) in outputs.items():
        schema = build()
        apply_constraints(schema, CRD_CONSTRAINTS[key])
        document = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"Generated by tests/k8s/schemas/generate_crd_schemas.py from "
                        f"{SOURCES[key]}; Kubernetes core types are $refs into "
                        f"kubernetes-validate's definitions ({K8S_DEFS_ID}). Do not edit.",
            **schema,
        }
        (HERE / filename).write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
        print(f"wrote {filename}")


if __name__ == "__main__":
    main()
