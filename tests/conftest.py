"""Shared fixtures: isolated MMJOBS_HOME per test, real S3 and MLflow servers on loopback."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from mmjobs.logs import get_logger
from tests.once import build_once
from tests.servers import MLflowServer, S3Server

# Configure mmjobs', transformers' and DeepSpeed's logging now, on pytest's session-long
# capture: each binds its handler to sys.stderr (DeepSpeed: sys.stdout) when first configured,
# and configured first inside a test (a lazy import under capsys) it would sit on that test's
# stream, closed when the test ends, turning every later warning into a '--- Logging error ---'
# traceback in another test's stderr.
get_logger("mmjobs.tests")
hf_logging.get_logger("transformers")
if importlib.util.find_spec("deepspeed") is not None:  # the train extra
    importlib.import_module("deepspeed.utils.logging")

# Session fixtures building tiny models once (tiny_llava_dir, tiny_chameleon_dir, replica_dir),
# and the lane markers every test gets (tests/lanes.py).
pytest_plugins = ["tests.fixtures_models", "tests.fixtures_replicas", "tests.lanes"]

# Variables that would point a test at a developer's real services.
_LEAKY_ENV = (
    "MMJOBS_STORE", "MMJOBS_HOME", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL",
)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite database, made once per session.

    Creating one runs MLflow's schema migrations (~5 s); copying the result takes milliseconds.
    """
    from mlflow.tracking import MlflowClient

    def migrate(directory: Path) -> None:
        directory.mkdir()
        MlflowClient(f"sqlite:///{directory / 'mlflow.db'}").search_experiments()

    # Built once per run, also under pytest-xdist (the workers share it).
    return build_once(tmp_path_factory.getbasetemp(), "mlflow-template", migrate) / "mlflow.db"


def isolate(monkeypatch: pytest.MonkeyPatch, home: Path, mlflow_db_template: Path) -> Path:
    """Point MMJOBS_HOME at `home` (created) with a fresh MLflow database from the template,
    and drop every variable that could reach a developer's real services; returns `home`."""
    for name in _LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    home.mkdir(parents=True)
    shutil.copyfile(mlflow_db_template, home / "mlflow.db")
    monkeypatch.setenv("MMJOBS_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    return home


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch, mlflow_db_template) -> None:
    """Every test gets its own MMJOBS_HOME, MLflow database, and no credentials from the shell."""
    isolate(monkeypatch, tmp_path / "mmjobs-home", mlflow_db_template)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A moto_server subprocess for the whole session."""
    server = S3Server(workdir=tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """Point boto3 (through the standard AWS variables) at the test S3 server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the test S3 server; returns its name."""
    return s3_env.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server) -> Iterator[MLflowServer]:
    """An MLflow tracking server subprocess (sqlite backend, artifacts in the S3 server)."""
    server = MLflowServer(workdir=tmp_path_factory.mktemp("mlflow"), s3=s3_server).start()
    yield server
    server.stop()
