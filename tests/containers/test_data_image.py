"""The `data` image, built for real and run the way a pod runs it.

Built with `make images` (podman; see tests/containers/podman.py for this machine's recipe),
then run as its non-root user with a read-only root filesystem and only /tmp writable, against
the loopback S3 test server: `prepare` draws synthetic charts into S3, `pretokenize` reads them
and a tiny LLaVA (built on the host, uploaded to S3) and writes Parquet shards to S3. Both
outputs must be committed (manifest last). The image is also the Helm chart's default image,
so it also runs, the same way, what the chart runs in it: `mmjobs compile` of the chart's recipe
in the pipeline-upload job's working directory, and the MLflow server with basic auth (its ini
written by the chart's init-container script). Skipped, with the reason, where podman cannot run.

The first build downloads the image's dependencies (~6 min here); later builds reuse podman's
layer cache unless pyproject.toml or docker/ changed (an mmjobs/ change rebuilds only the last
layers), and a run whose build context is unchanged (the image tag carries its digest) builds
nothing.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from mmjobs import storage
from tests.containers.podman import (
    BASE_IMAGE,
    HOST_CA_BUNDLE,
    REPO,
    Podman,
    build_context_key,
    podman_or_skip,
    torch_cpu_wheels_dir,
)

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE_REPO = "localhost/mmjobs-data"
TORCH_VERSION = "2.13.0"  # docker/data.Dockerfile's TORCH_VERSION default
UID = "10001"
CHART_VALUES = REPO / "charts" / "mmjobs" / "values.yaml"
CHART_FILES = REPO / "charts" / "mmjobs" / "files"


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    return podman_or_skip(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def data_image(podman, tmp_path_factory) -> str:
    """The data image, built with `make images` once per build context: its tag carries a
    digest of the context (`build_context_key`), and an image already built from the same
    context is used as is. The build log is kept next to the test's tmp."""
    wheels = torch_cpu_wheels_dir(TORCH_VERSION)
    if wheels is None:
        pytest.skip(f"no torch-{TORCH_VERSION}+cpu wheel in pip's find-links: PyPI has only "
                    "CUDA builds, and the data image must stay CPU-only")
    settings = [f"BASE_IMAGE={BASE_IMAGE}", f"TORCH_VERSION={TORCH_VERSION}",
                *(f"WHEEL={w.name}" for w in sorted(wheels.glob(f"torch-{TORCH_VERSION}+cpu-*")))]
    tag = f"test-{build_context_key(podman, settings)}"
    image = f"{IMAGE_REPO}:{tag}"
    if podman("image", "exists", image, check=False).returncode == 0:
        print(f"data image {image} reused: built earlier from the same build context")
        return image
    log = tmp_path_factory.mktemp("image-build") / "data-build.log"
    argv = ["make", "--no-print-directory", "images", "IMAGES=data",
            "IMAGE_PREFIX=localhost/mmjobs-", f"IMAGE_TAG={tag}",
            f"CONTAINER={podman.argv[0]}", f"CONTAINER_FLAGS={' '.join(podman.argv[1:])}",
            f"CONTAINERS_CONF={podman.env['CONTAINERS_CONF']}", f"BASE_IMAGE={BASE_IMAGE}",
            f"WHEELS_DIR={wheels}", "BUILD_FLAGS=--network=host"]
    if HOST_CA_BUNDLE.is_file():
        argv.append(f"CA_BUNDLE={HOST_CA_BUNDLE}")
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(argv, cwd=REPO, env=podman.env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=1500)
    took = time.monotonic() - start
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` exited {proc.returncode} after {took:.0f}s; "
                    f"last lines of {log}:\n{log.read_text()[-5000:]}")
    print(f"data image {image} built in {took:.0f}s (log: {log})")
    return image


def run_stage(podman: Podman, image: str, env: dict[str, str], stage: str,
              *overrides: str) -> dict:
    """Run one stage through the image's entrypoint as a pod would; return its result JSON."""
    env_flags = [f"--env={k}={v}" for k, v in env.items()]
    proc = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network=host",
                  *env_flags, image, stage, *(f"--set={o}" for o in overrides), timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{stage}: no result line on stdout:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_data_image_runs_prepare_and_pretokenize_against_s3(
        podman, data_image, s3_server, s3_bucket, tiny_llava_dir):
    bucket = f"s3://{s3_bucket}"
    storage.put_dir(tiny_llava_dir, f"{bucket}/models/tiny-llava")
    env = {
        **s3_server.env(),  # AWS_* credentials and endpoint of the loopback S3 server
        "MMJOBS_STORE": f"{bucket}/store",
        # Tracking into a sqlite file on the tmpfs: exercised, and thrown away with the container.
        "MLFLOW_TRACKING_URI": "sqlite:////tmp/mlflow.db",
    }

    prepared = run_stage(podman, data_image, env, "prepare",
                         "source_format=synthetic-charts", "num=3", "options.image_size=56",
                         f"output={bucket}/datasets/charts")
    assert prepared["output"] == f"{bucket}/datasets/charts"
    assert prepared["accepted"] > 0 and prepared["rejected"] == 0
    assert storage.is_committed(prepared["output"])
    manifest = {f.path for f in storage.read_manifest(prepared["output"]).files}
    assert {"samples.jsonl", "dataset.json"} <= manifest

    tokenized = run_stage(podman, data_image, env, "pretokenize",
                          f"dataset={prepared['output']}", f"model={bucket}/models/tiny-llava",
                          "max_length=256")
    assert tokenized["output"].startswith(f"{bucket}/store/cache/pretokenized/")
    assert tokenized["rows_written"] == prepared["accepted"] and tokenized["shards"] >= 1
    assert storage.is_committed(tokenized["output"])
    assert any(f.path.endswith(".parquet")
               for f in storage.read_manifest(tokenized["output"]).files)


def test_data_image_user_and_contents(podman, data_image):
    """Runs as the fixed non-root UID, has kfp for KFP's executor, and a CPU-only torch."""
    proc = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", "sh",
                  data_image, "-c",
                  "id -u; python3 -c 'import kfp.dsl.executor_main, torch; "
                  "print(torch.version.cuda)'")
    uid, cuda = proc.stdout.split()
    assert uid == UID
    assert cuda == "None"
    labels = json.loads(podman("image", "inspect", data_image).stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.title"] == "mmjobs-data"


def test_data_image_compiles_the_chart_recipe_for_the_upload_job(podman, data_image):
    """What the chart's pipeline-upload job runs: `mmjobs compile` of its recipe in its
    workingDir, as the non-root user with a read-only root filesystem (HOME=/tmp, as the job)."""
    upload = yaml.safe_load(CHART_VALUES.read_text())["pipelineUpload"]
    recipe = upload["recipes"][0]
    proc = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network=none",
                  "--env=HOME=/tmp", f"--workdir={upload['workingDir']}", "--entrypoint", "sh",
                  data_image, "-c",
                  f"id -u >&2 && mmjobs compile {recipe} -o /tmp/x.yaml >&2 && cat /tmp/x.yaml",
                  timeout=300)
    assert proc.stderr.split()[0] == UID
    spec, *platform = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert spec["pipelineInfo"]["name"] == "chart-demo"
    assert spec["schemaVersion"].startswith("2.") and spec["deploymentSpec"]["executors"]
    assert platform and "kubernetes" in platform[0]["platforms"]  # from kfp-kubernetes


# The chart's MLflow pod with auth.enabled, in one container: the init container's script
# writes the ini, then the server starts and a client polls /health and calls the API.
MLFLOW_AUTH_SERVER = r"""set -e
python3 -c 'import flask_wtf, psycopg2'
python3 /scripts/write_auth_config.py "$MLFLOW_AUTH_CONFIG_PATH" >&2
mlflow server --host 127.0.0.1 --port 5000 --workers 1 --app-name basic-auth \
    --backend-store-uri sqlite:////tmp/mlflow.db >/tmp/mlflow.log 2>&1 &
python3 - <<'PY' || { tail -c 4000 /tmp/mlflow.log >&2; exit 1; }
import base64, json, sys, time, urllib.error, urllib.request
base = "http://127.0.0.1:5000"
deadline = time.monotonic() + 150
while True:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            health = r.read().decode()
            break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no answer on /health in 150 s")
        time.sleep(1)
def status(user):
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
print(json.dumps({"health": health, "anonymous": status(""),
                  "admin": status("admin:it-password-123")}))
PY
"""


def test_data_image_serves_mlflow_with_basic_auth(podman, data_image):
    """`mlflow server --app-name basic-auth` (mlflow[auth]) as the chart runs it, answering
    /health, refusing anonymous API calls and letting the admin in; psycopg2 (the chart's
    backend.type=postgresql) imports. Loopback only (--network=none), sqlite on the tmpfs."""
    env = {"HOME": "/tmp", "MLFLOW_AUTH_CONFIG_PATH": "/tmp/basic_auth.ini",
           "MLFLOW_AUTH_DATABASE_URI": "sqlite:////tmp/basic_auth.db",
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "it-password-123",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "container-test-key"}
    proc = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network=none",
                  f"--volume={CHART_FILES}:/scripts:ro",
                  *(f"--env={k}={v}" for k, v in env.items()),
                  "--entrypoint", "sh", data_image, "-c", MLFLOW_AUTH_SERVER, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"health": "OK", "anonymous": 401, "admin": 200}, proc.stderr[-3000:]
