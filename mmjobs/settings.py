"""Where mmjobs keeps things: embedded defaults, overridden by the environment.

`MMJOBS_HOME` (default `./.mmjobs`) holds the local store, the embedded MLflow database and the
KFP local root. `MMJOBS_STORE=s3://bucket/prefix` and `MLFLOW_TRACKING_URI=http://...` switch to
real services with no other change. Credentials are never settings: boto3 and MLflow read them
from the standard environment variables (filled from Kubernetes Secrets on a cluster).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The mmjobs home directory (`$MMJOBS_HOME`, default `./.mmjobs`), absolute."""
    return Path(os.environ.get("MMJOBS_HOME") or ".mmjobs").expanduser().resolve()


def store_root() -> str:
    """Root URI of the object store: `$MMJOBS_STORE` or `$MMJOBS_HOME/store`."""
    return os.environ.get("MMJOBS_STORE") or str(home() / "store")


def tracking_uri() -> str:
    """MLflow tracking URI: `$MLFLOW_TRACKING_URI` or the embedded sqlite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def kfp_root() -> Path:
    """Pipeline root for KFP's local runner."""
    return home() / "kfp"


def spool_dir() -> Path:
    """Where tracking calls wait while the MLflow server is unreachable."""
    return home() / "tracking-spool"
