"""Scaled-down recipe runs shared by the tests that inspect them.

A full recipe run is the most expensive thing the suite does (one to three minutes each), so
each recipe runs at most once per test session, through the session fixture `recipe_runs`
(tests/pipelines/conftest.py): `recipe_runs.get("lavin-sweep")` runs it the first time and hands
every later caller the same `SharedRun`. A test that inspects a run asks for it the same way
and adds `@uses_run(NAME)` (or `pytest.param(NAME, marks=uses_run(NAME))`), which keeps every
test of one run on the same pytest-xdist worker (`--dist loadgroup`), so the run is not made
twice in parallel.

Each run gets its own MMJOBS_HOME (store, MLflow database, KFP root) and data directory; the
outcome's paths stay valid for the whole session. Treat them as read-only: a test that runs
the recipe again does so inside `run.environment()` and must only add to what is there (the
demo rerun test checks that a rerun changes no committed output). A run that failed fails
every test that asks for it, with the same error, without running it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mmjobs import pipeline_runner
from tests.conftest import isolate
from tests.pipelines import fixtures

RECIPES = Path("pipelines/recipes")
# Recipe -> the overrides that scale it down onto files made under the given directory.
# The recipes whose base models have replicas run on them, once per module, in
# test_recipes_on_replicas.py, test_chameleon_recipe.py and test_chartmoe_recipe.py
# (tests/pipelines/replica_runs.py).
SCALE_DOWN: dict[str, Callable[[Path, Path], list[str]]] = {
    "chart-demo": lambda root, model: fixtures.chart_demo(),
    "lavin-sweep": lambda root, model: fixtures.make_lavin_sweep(root),  # its own replicas
}
# Variables a run needs besides its own MMJOBS_HOME: one intra-op thread per step process
# (see mmjobs.demo for why), no proxy between the judge client and its loopback server.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
             "ALL_PROXY", "OPENAI_API_KEY")


def uses_run(recipe: str) -> pytest.MarkDecorator:
    """Mark a test that inspects the shared run of `recipe` (one xdist worker per run)."""
    return pytest.mark.xdist_group(f"recipe-run-{recipe}")


def run_variables(mp: pytest.MonkeyPatch) -> None:
    """One intra-op thread per step process, no proxy between a client and a loopback server."""
    for name, value in RUN_ENV.items():
        mp.setenv(name, value)
    for name in PROXY_ENV:
        mp.delenv(name, raising=False)


@dataclasses.dataclass
class SharedRun:
    """One recipe's scaled-down run: its outcome and where it ran."""

    recipe: str
    outcome: pipeline_runner.RunOutcome
    root: Path  # everything of this run: data/ (its inputs), mmjobs-home/ (store, MLflow, KFP)
    overrides: list[str]

    @property
    def path(self) -> str:
        return str(RECIPES / f"{self.recipe}.yaml")

    @property
    def home(self) -> Path:
        return self.root / "mmjobs-home"

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """The variables the run ran with (its MMJOBS_HOME and MLflow database), for a test
        that runs the recipe again or reads its MLflow runs."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMJOBS_HOME", str(self.home))
            mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{self.home / 'mlflow.db'}")
            run_variables(mp)
            yield


class RecipeRuns:
    """Runs each recipe at most once (see the module docstring)."""

    def __init__(self, root: Path, tiny_llava: Path, mlflow_db_template: Path):
        self.root = root
        self.tiny_llava = tiny_llava
        self.mlflow_db_template = mlflow_db_template
        self.done: dict[str, SharedRun | Exception] = {}

    def get(self, recipe: str) -> SharedRun:
        """The shared run of `recipe`, made now if no test asked for it before."""
        if recipe not in self.done:
            try:
                self.done[recipe] = self._run(recipe)
            except Exception as e:  # every test of this run reports the same failure
                self.done[recipe] = e
        result = self.done[recipe]
        if isinstance(result, Exception):
            raise result
        return result

    def _run(self, recipe: str) -> SharedRun:
        root = self.root / recipe
        data = root / "data"
        data.mkdir(parents=True)
        path = str(RECIPES / f"{recipe}.yaml")
        with pytest.MonkeyPatch.context() as mp:
            isolate(mp, root / "mmjobs-home", self.mlflow_db_template)
            run_variables(mp)
            overrides = SCALE_DOWN[recipe](data, self.tiny_llava)
            return SharedRun(recipe, pipeline_runner.run_local(path, overrides), root, overrides)
