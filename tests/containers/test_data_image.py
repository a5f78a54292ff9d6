"""The `data` image, built for real and run the way a pod runs it.

Built with `make images` (podman; see tests/containers/podman.py for this machine's recipe),
then run as its non-root user with a read-only root filesystem and only /tmp writable, against
the loopback S3 test server: `prepare` draws synthetic charts into S3, `pretokenize` reads them
and a tiny LLaVA (built on the host, uploaded to S3) and writes Parquet shards to S3. Both
outputs must be committed (manifest last). Skipped, with the reason, where podman cannot run.

The first build downloads the image's dependencies (~10 min here); later builds reuse podman's
layer cache unless pyproject.toml or docker/ changed (an mmjobs/ change rebuilds in seconds).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from mmjobs import storage
from tests.containers.podman import (
    BASE_IMAGE,
    HOST_CA_BUNDLE,
    REPO,
    Podman,
    podman_or_skip,
    torch_cpu_wheels_dir,
)

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = "localhost/mmjobs-data:test"
TORCH_VERSION = "2.13.0"  # docker/data.Dockerfile's TORCH_VERSION default
UID = "10001"


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    return podman_or_skip(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def data_image(podman, tmp_path_factory) -> str:
    """Build the data image with `make images`; the build log is kept next to the test's tmp."""
    wheels = torch_cpu_wheels_dir(TORCH_VERSION)
    if wheels is None:
        pytest.skip(f"no torch-{TORCH_VERSION}+cpu wheel in pip's find-links: PyPI has only "
                    "CUDA builds, and the data image must stay CPU-only")
    log = tmp_path_factory.mktemp("image-build") / "data-build.log"
    argv = ["make", "--no-print-directory", "images", "IMAGES=data",
            "IMAGE_PREFIX=localhost/mmjobs-", "IMAGE_TAG=test",
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
    print(f"data image built in {took:.0f}s (log: {log})")
    return IMAGE


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
