"""Pipeline runs: one intra-op thread per step process (see mmjobs.demo for why), and the
scaled-down recipe runs shared by the tests that inspect them (tests/pipelines/runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipelines.runs import RecipeRuns


@pytest.fixture(autouse=True)
def one_thread_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def recipe_runs(tmp_path_factory: pytest.TempPathFactory, tiny_llava_dir: Path,
                mlflow_db_template: Path) -> RecipeRuns:
    """Each recipe run once per session: `recipe_runs.get(NAME)` (mark the test `uses_run`)."""
    return RecipeRuns(tmp_path_factory.mktemp("recipe-runs"), tiny_llava_dir, mlflow_db_template)
