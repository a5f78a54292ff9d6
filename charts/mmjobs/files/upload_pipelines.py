"""Compile recipes for this cluster and upload them to Kubeflow Pipelines (Helm hook job).

Each recipe is compiled with `mmjobs compile` (with the release's store, MLflow URL, S3
endpoint and Secret names as overrides) and uploaded as a KFP pipeline named
PREFIX + recipe name; when the pipeline exists, as a new version of it.

Usage: python3 upload_pipelines.py
Env:
  KFP_HOST           KFP API endpoint
  KFP_NAMESPACE      namespace for namespaced pipelines (empty: shared pipelines)
  PIPELINE_PREFIX    prefix of the pipeline names
  PIPELINE_VERSION   version name (the chart sets "<appVersion>-r<release revision>")
  RECIPES            recipe paths, one per line
  OVERRIDES          KEY=VALUE recipe overrides, one per line, applied to every recipe
Exit status: 0 when every recipe was uploaded, 1 otherwise (the others are still tried).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def lines(value: str | None) -> list[str]:
    """Non-empty, stripped lines of an env var."""
    return [line.strip() for line in (value or "").splitlines() if line.strip()]


def compile_recipe(recipe: str, output: str, overrides: list[str]) -> None:
    """`mmjobs compile RECIPE -o OUTPUT --set ...`; raises CalledProcessError on failure."""
    command = ["mmjobs", "compile", recipe, "-o", output]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True)


def recipe_name(recipe: str) -> str:
    """The recipe's `recipe:` name (kebab-case), the base of the pipeline name."""
    with open(recipe, encoding="utf-8") as f:
        return yaml.safe_load(f)["recipe"]


def find_pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """ID of the pipeline called `name` (in `namespace`), or None."""
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
    result = client.list_pipelines(filter=json.dumps({"predicates": [predicate]}),
                                   namespace=namespace)
    pipelines = result.pipelines or []
    return pipelines[0].pipeline_id if pipelines else None


def upload(client, package: str, name: str, version: str, namespace: str | None) -> str:
    """Upload `package` as pipeline `name` or as version `version` of it; returns what
    happened, for the log. An existing version of the same name is left alone (job retry)."""
    pipeline_id = find_pipeline_id(client, name, namespace)
    if pipeline_id is None:
        client.upload_pipeline(package, pipeline_name=name, namespace=namespace,
                               description=f"mmjobs recipe {name} ({version})")
        return f"uploaded pipeline {name}"
    try:
        client.upload_pipeline_version(package, pipeline_version_name=version,
                                       pipeline_id=pipeline_id)
    except Exception as e:  # kfp_server_api.ApiException; "already exists" on a retry
        if "exist" not in str(e).lower():
            raise
        return f"pipeline {name} already has version {version}"
    return f"uploaded version {version} of pipeline {name}"


def main() -> int:
    import kfp

    host = os.environ["KFP_HOST"]
    namespace = os.environ.get("KFP_NAMESPACE") or None
    prefix = os.environ.get("PIPELINE_PREFIX", "")
    version = os.environ.get("PIPELINE_VERSION", "manual")
    overrides = lines(os.environ.get("OVERRIDES"))
    client = kfp.Client(host=host, namespace=namespace or "kubeflow")
    failed = []
    with tempfile.TemporaryDirectory(prefix="mmjobs-upload-") as tmp:
        for recipe in lines(os.environ.get("RECIPES")):
            try:
                name = prefix + recipe_name(recipe)
                package = str(Path(tmp) / f"{name}.yaml")
                compile_recipe(recipe, package, overrides)
                print(upload(client, package, name, version, namespace), flush=True)
            except Exception as e:  # report every recipe, then fail the job
                print(f"FAIL {recipe}: {e}", file=sys.stderr, flush=True)
                failed.append(recipe)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
