"""Build something once per test run, also when pytest-xdist runs the suite in several workers.

`build_once(base, name, build)` builds a self-contained directory (a tiny model, a migrated
MLflow database) under the run's shared temp directory; the first worker builds it while the
others wait on a lock, then every worker reads the same copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def run_root(base: Path) -> Path:
    """The directory shared by the whole test run: `base` (the session's base temp), or under
    pytest-xdist the parent of the workers' base temps (`.../pytest-N/popen-gw0` -> `pytest-N`),
    so that what `build_once` builds is built by one worker and read by all."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return base.parent if worker and base.name == f"popen-{worker}" else base


def build_once(base: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`build(directory)` into `built-once/name` under the run's shared directory
    (`run_root`) unless it is already there; parallel workers wait for the first. What is
    built must be self-contained: it is built elsewhere and then moved into place."""
    target = run_root(base) / "built-once" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not target.is_dir():
            scratch = target.with_name(f".{name}-{os.getpid()}")
            shutil.rmtree(scratch, ignore_errors=True)
            build(scratch)
            os.replace(scratch, target)  # complete or absent, never half-built
    return target
