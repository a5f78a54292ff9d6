"""The chart's helper programs (charts/mmjobs/files/*.py), run for real.

- write_auth_config.py: MLflow's own config reader parses what it writes (passwords with %).
- create_bucket.py: against the S3 test server (moto).
- upload_pipelines.py: compile + upload flow against a recording stand-in for kfp.Client, and
  the exact `mmjobs compile` command line the hook job runs, on the real chart-demo recipe.
- Integration: the chart's rendered MLflow pod (init container, command, args, env, with
  Secret references resolved from the rendered Secrets) is started locally against the S3 test
  server; then the rendered `helm test` pod's check passes, and a run's artifact goes through
  MLflow's proxy into the bucket.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.k8s.test_chart import CHART, ROOT, VALUE_SETS, containers, find, manifests, render
from tests.servers import LOOPBACK, _stop, _wait_http, free_port

FILES = CHART / "files"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"chart_files_{name}", FILES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- write_auth_config


def mlflow_auth_config_module() -> ModuleType:
    """MLflow's basic-auth config reader (mlflow/server/auth/config.py), loaded on its own:
    the mlflow.server.auth package refuses to import without Flask-WTF (mlflow[auth]), which
    only the server image needs."""
    spec = importlib.util.find_spec("mlflow")
    path = Path(spec.submodule_search_locations[0]) / "server" / "auth" / "config.py"
    module_spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module



def test_auth_config_round_trips_through_mlflow(tmp_path, monkeypatch):
    script = load_script("write_auth_config")
    uri = "postgresql://mlflow:p%40ss%word@db.example:5432/mlflow"  # URL-encoded password
    monkeypatch.setenv("MLFLOW_AUTH_DATABASE_URI", uri)
    monkeypatch.setenv("MLFLOW_AUTH_DEFAULT_PERMISSION", "EDIT")
    path = tmp_path / "basic_auth.ini"
    assert script.main([str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600  # it may hold the database password

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    config = mlflow_auth_config_module().read_auth_config()
    assert (config.database_uri, config.default_permission) == (uri, "EDIT")


def test_auth_config_needs_a_database(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_AUTH_DATABASE_URI", raising=False)
    assert load_script("write_auth_config").main([str(tmp_path / "x.ini")]) == 2
    assert "MLFLOW_AUTH_DATABASE_URI" in capsys.readouterr().err


# --------------------------------------------------------------------------- create_bucket


def run_script(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FILES / f"{name}.py"), *args],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=120)


def test_create_bucket_against_s3(s3_server):
    bucket = f"chart-{uuid.uuid4().hex[:10]}"
    first = run_script("create_bucket", [bucket], s3_server.env())
    assert first.returncode == 0 and f"bucket {bucket}: created" in first.stdout, first.stderr
    second = run_script("create_bucket", [bucket], s3_server.env())
    assert second.returncode == 0 and f"bucket {bucket}: exists" in second.stdout
    s3_server.client().head_bucket(Bucket=bucket)


def test_create_bucket_gives_up_on_an_unreachable_endpoint(s3_server):
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{free_port()}",
           "CREATE_BUCKET_TIMEOUT": "0", "AWS_MAX_ATTEMPTS": "1"}
    result = run_script("create_bucket", ["b"], env)
    assert result.returncode == 1 and "not reachable" in result.stderr


# --------------------------------------------------------------------------- upload_pipelines


class RecordingKfpClient:
    """Stands in for kfp.Client: the calls upload_pipelines.py makes, recorded."""

    def __init__(self, existing: dict[str, str], versions: set[tuple[str, str]]):
        self.pipelines = dict(existing)  # name -> id
        self.versions = set(versions)  # (pipeline id, version name)
        self.calls: list[tuple] = []

    def __call__(self, host: str, namespace: str) -> RecordingKfpClient:
        self.calls.append(("connect", host, namespace))
        return self

    def list_pipelines(self, filter: str, namespace: str | None):
        (predicate,) = json.loads(filter)["predicates"]
        found = self.pipelines.get(predicate["stringValue"])
        return SimpleNamespace(pipelines=[SimpleNamespace(pipeline_id=found)] if found else None)

    def upload_pipeline(self, path: str, pipeline_name: str, namespace: str | None,
                        description: str):
        assert yaml.safe_load(Path(path).read_text())["compiled"]
        self.calls.append(("pipeline", pipeline_name, namespace))

    def upload_pipeline_version(self, path: str, pipeline_version_name: str, pipeline_id: str):
        if (pipeline_id, pipeline_version_name) in self.versions:
            raise RuntimeError("(409) Conflict: version already exists")
        self.calls.append(("version", pipeline_id, pipeline_version_name))


def test_upload_pipelines_new_existing_and_failing(tmp_path, monkeypatch, capsys):
    import kfp

    script = load_script("upload_pipelines")
    recipes = []
    for name in ("new-one", "old-one", "done-one"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"recipe: {name}\n")
        recipes.append(str(path))
    recipes.insert(1, str(tmp_path / "missing.yaml"))
    compiled = []

    def fake_compile(recipe: str, output: str, overrides: list[str]) -> None:
        compiled.append((Path(recipe).stem, overrides))
        Path(output).write_text("compiled: true\n")

    client = RecordingKfpClient(existing={"t-old-one": "id-old", "t-done-one": "id-done"},
                                versions={("id-done", "0.1.0-r2")})
    monkeypatch.setattr(script, "compile_recipe", fake_compile)
    monkeypatch.setattr(kfp, "Client", client)
    monkeypatch.setenv("KFP_HOST", "http://kfp.example:8888")
    monkeypatch.setenv("KFP_NAMESPACE", "")
    monkeypatch.setenv("PIPELINE_PREFIX", "t-")
    monkeypatch.setenv("PIPELINE_VERSION", "0.1.0-r2")
    monkeypatch.setenv("RECIPES", "\n".join(recipes) + "\n")
    monkeypatch.setenv("OVERRIDES", "cluster.env.MMJOBS_STORE=s3://b/store\n\ncluster.gpus=1")

    assert script.main() == 1  # the missing recipe fails the job ...
    assert client.calls == [  # ... after every other recipe was handled
        ("connect", "http://kfp.example:8888", "kubeflow"),
        ("pipeline", "t-new-one", None),
        ("version", "id-old", "0.1.0-r2"),
    ]
    overrides = ["cluster.env.MMJOBS_STORE=s3://b/store", "cluster.gpus=1"]
    assert compiled == [(n, overrides) for n in ("new-one", "old-one", "done-one")]
    out, err = capsys.readouterr()
    assert "pipeline t-done-one already has version 0.1.0-r2" in out
    assert "FAIL" in err and "missing.yaml" in err


@pytest.mark.slow
def test_upload_job_compiles_the_real_recipe(tmp_path, monkeypatch):
    """The exact compile the hook runs: `mmjobs compile` with the rendered overrides."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    (job,) = find(manifests(render(VALUE_SETS["everything"])), "Job", "pipeline-upload")
    env = {e["name"]: e.get("value", "") for e in job["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    script = load_script("upload_pipelines")
    output = tmp_path / "chart-demo.yaml"
    monkeypatch.chdir(ROOT)  # the image's working directory holds pipelines/recipes/
    (recipe,) = script.lines(env["RECIPES"])
    script.compile_recipe(recipe, str(output), script.lines(env["OVERRIDES"]))
    compiled = output.read_text()
    assert "s3://mmjobs/store" in compiled and "mmjobs-s3" in compiled
    assert script.recipe_name(recipe) == "chart-demo"


# --------------------------------------------------------------------------- the rendered pods, run


def passthrough_env() -> dict[str, str]:
    """The test process's PYTHONPATH (if any), so subprocesses import what it imports."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


class RenderedPod:
    """Runs a rendered container on this machine: Secret references resolved from the
    rendered Secrets, in-cluster paths and endpoints mapped to local ones."""

    def __init__(self, docs: list[dict[str, Any]], tmp: Path, s3_endpoint: str, port: int):
        import base64

        self.secrets = {(s["metadata"]["name"], key): base64.b64decode(value).decode()
                        for s in find(docs, "Secret") for key, value in s["data"].items()}
        self.s3_endpoint, self.port = s3_endpoint, port
        self.paths = {"/data/": f"{tmp}/data/", "/auth/": f"{tmp}/auth/",
                      "/scripts/": f"{FILES}/"}
        for local in self.paths.values():
            Path(local).mkdir(parents=True, exist_ok=True)
        self.home = tmp / "home"
        self.home.mkdir()

    def local(self, text: str) -> str:
        for cluster_path, local_path in self.paths.items():
            text = text.replace(cluster_path, local_path)
        return text.replace("--host=0.0.0.0", f"--host={LOOPBACK}").replace(
            "--port=5000", f"--port={self.port}")

    def env(self, container: dict[str, Any], **extra: str) -> dict[str, str]:
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               **passthrough_env()}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = self.local(item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[(ref["name"], ref["key"])]
        for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            env[name] = self.s3_endpoint
        env["HOME"] = str(self.home)
        return {**env, **extra}

    def command(self, container: dict[str, Any]) -> list[str]:
        argv = [self.local(a) for a in [*container["command"], *container.get("args", [])]]
        return [sys.executable if argv[0] == "python3" else argv[0], *argv[1:]]


def flask_wtf_installed() -> bool:
    return importlib.util.find_spec("flask_wtf") is not None


@pytest.mark.integration
@pytest.mark.parametrize("auth", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        not flask_wtf_installed(), reason="MLflow basic auth needs mlflow[auth] (Flask-WTF)")),
], ids=["no-auth", "basic-auth"])
def test_rendered_mlflow_pod_serves_and_helm_test_passes(tmp_path, s3_server, auth):
    bucket = s3_server.create_bucket(f"chart-{uuid.uuid4().hex[:10]}")
    values = {"s3": {"bucket": bucket},
              "mlflow": {"workers": 1, "auth": {"enabled": auth, "password": "it-password-123"}}}
    docs = manifests(render(values))
    (deployment,) = find(docs, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    (test_pod,) = find(docs, "Pod", "test")
    port = free_port()
    run = RenderedPod(docs, tmp_path, s3_server.endpoint, port)

    for init in pod.get("initContainers") or []:
        subprocess.run(run.command(init), env=run.env(init), check=True, timeout=60)
    log = tmp_path / "mlflow.log"
    proc = subprocess.Popen(run.command(server), env=run.env(server), cwd=tmp_path,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        _wait_http(f"{uri}/health", 180, proc, log)
        (check,) = containers(test_pod["spec"])
        check_env = run.env(check, MLFLOW_TRACKING_URI=uri)
        result = subprocess.run(run.command(check), env=check_env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "OK: MLflow is healthy and the bucket is reachable" in result.stdout

        wrong_bucket = subprocess.run(run.command(check), capture_output=True, text=True,
                                      timeout=120, env={**check_env, "S3_BUCKET": "no-such"})
        assert wrong_bucket.returncode == 1 and "S3 bucket 'no-such'" in wrong_bucket.stderr
        credentials = {}
        if auth:
            wrong = subprocess.run(run.command(check), capture_output=True, text=True,
                                   timeout=120,
                                   env={**check_env, "MLFLOW_TRACKING_PASSWORD": "wrong"})
            assert wrong.returncode == 1 and "login as 'admin' failed: HTTP 401" in wrong.stderr
            credentials = {"MLFLOW_TRACKING_USERNAME": "admin",
                           "MLFLOW_TRACKING_PASSWORD": "it-password-123"}

        # Proxied artifacts: a client without S3 credentials logs an artifact; the server
        # writes it under s3://<bucket>/mlflow/.
        client = subprocess.run(
            [sys.executable, "-c",
             "import mlflow; mlflow.set_experiment('chart-it');\n"
             "with mlflow.start_run(): mlflow.log_text('hello', 'hello.txt')"],
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": uri,
                 **passthrough_env(), **credentials},
            capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert client.returncode == 0, client.stderr[-3000:]
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(
            Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith("/hello.txt") for k in keys), keys
    finally:
        _stop(proc)
