"""Test lanes: every collected test gets exactly one lane marker, so `-m LANE` selects a lane.

    unit          tests/unit, tests/k8s: in-process, no servers (make test-fast runs these
                  without the `slow` ones)
    integration   tests/integration, and any unit/k8s test that starts the loopback S3 or
                  MLflow server (it asks for the `s3_server` or `mlflow_server` fixture)
    pipelines     tests/pipelines: recipes compiled, and run end to end scaled down
    containers    tests/containers: Dockerfiles linted, the data image built and run
    distributed   torchrun / DeepSpeed with two CPU ranks (marked explicitly)

A lane marker written on a test or module wins over the directory rule. Collection fails if a
test ends up with two lanes, or none: a new directory must be added to `DIRECTORY_LANES`.

Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup --no-loadscope-reorder`):
- a test module is one unit of work, so a module-scoped fixture (a shared run, a loaded model)
  is made once, on one worker; tests that share a session resource across modules (a recipe
  run, a built image) say so with `xdist_group`, which then replaces the module's group; the
  distributed lane is one group (each of its tests already keeps both cores busy);
- the longest lanes are handed out first (pipelines, distributed, containers, integration,
  unit; slow tests first within each), so no worker is left alone with a long run at the end;
- each worker runs torch on one intra-op thread: two workers with two threads each on two
  cores thrash.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LANES = ("unit", "integration", "pipelines", "containers", "distributed")
TESTS = Path(__file__).resolve().parent
# First path component under tests/ -> lane.
DIRECTORY_LANES = {"unit": "unit", "k8s": "unit", "integration": "integration",
                   "pipelines": "pipelines", "containers": "containers"}
# A unit-directory test that asks for one of these starts a real server: integration.
SERVER_FIXTURES = frozenset({"s3_server", "mlflow_server"})


def lane_of(item: pytest.Item) -> str:
    """The lane of one collected test (see the module docstring for the rules)."""
    explicit = {m.name for m in item.iter_markers() if m.name in LANES}
    if len(explicit) > 1:
        raise pytest.UsageError(f"{item.nodeid}: marked with lanes {sorted(explicit)}; "
                                "keep one of them")
    if explicit:
        return explicit.pop()
    try:
        top = Path(item.path).resolve().relative_to(TESTS).parts[0]
    except ValueError:  # a test outside tests/ (pytest given another path)
        top = ""
    lane = DIRECTORY_LANES.get(top)
    if lane is None:
        raise pytest.UsageError(f"{item.nodeid}: no lane for tests/{top}/; add the directory "
                                "to DIRECTORY_LANES in tests/lanes.py or mark the test with "
                                f"one of {', '.join(LANES)}")
    if lane == "unit" and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "integration"
    return lane


# Lanes in the order an xdist run hands them out: the longest first.
LONGEST_FIRST = ("pipelines", "distributed", "containers", "integration", "unit")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # before any test module imports torch
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker, and before xdist reads groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lanes = {}
    for item in items:
        lanes[item] = lane_of(item)
        item.add_marker(lanes[item])
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: collection order (fast lanes first, fixtures set up once)
    if config.getvalue("loadgroup"):
        for item in items:
            if item.get_closest_marker("xdist_group") is None:
                # Distributed tests take both cores each: one at a time, on one worker.
                distributed = lanes[item] == "distributed"
                group = "distributed" if distributed else item.nodeid.split("::")[0]
                item.add_marker(pytest.mark.xdist_group(group))
    # A stable sort: modules stay together, every worker computes the same order.
    items.sort(key=lambda item: (LONGEST_FIRST.index(lanes[item]),
                                 item.get_closest_marker("slow") is None))
