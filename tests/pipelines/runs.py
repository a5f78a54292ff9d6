"""Scaled-down recipe runs shared by the tests that inspect them.

A full recipe run is the most expensive thing the suite does (one to three minutes each), so
each recipe runs at most once per test session, through the session fixture `recipe_runs`
(tests/pipelines/conftest.py): `recipe_runs.get("chartmoe")` runs it the first time and hands
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
from typing import Any

import pytest

from mmjobs import pipeline_runner
from tests.conftest import isolate
from tests.integration.eval.test_judge import FakeJudgeServer
from tests.pipelines import fixtures

RECIPES = Path("pipelines/recipes")
# Recipe -> the overrides that scale it down onto files made under the given directory.
SCALE_DOWN: dict[str, Callable[[Path, Path], list[str]]] = {
    "chart-demo": lambda root, model: fixtures.chart_demo(),
    "chartwiz": fixtures.make_chartwiz,
    "chartmoe": fixtures.make_chartmoe,
    "llava-dataengine": fixtures.make_llava_dataengine,
    "lavin-sweep": fixtures.make_lavin_sweep,
}
# Where chartwiz's recipe import puts the base model, under its run's root.
IMPORTED = Path("store-copy/base-model")
# Variables a run needs besides its own MMJOBS_HOME: one intra-op thread per step process
# (see mmjobs.demo for why), no proxy between the judge client and its loopback server.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
             "ALL_PROXY", "OPENAI_API_KEY")


def uses_run(recipe: str) -> pytest.MarkDecorator:
    """Mark a test that inspects the shared run of `recipe` (one xdist worker per run)."""
    return pytest.mark.xdist_group(f"recipe-run-{recipe}")


def _run_variables(mp: pytest.MonkeyPatch) -> None:
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
    judge_requests: list[Any] = dataclasses.field(default_factory=list)

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
            _run_variables(mp)
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
            _run_variables(mp)
            if recipe == "chameleon-interleaved":  # judged by a fake server on loopback
                judge = FakeJudgeServer().start()
                try:
                    overrides = fixtures.make_chameleon_interleaved(data, judge.base_url)
                    outcome = pipeline_runner.run_local(path, overrides)
                finally:
                    judge.stop()
                return SharedRun(recipe, outcome, root, overrides, list(judge.seen))
            overrides = SCALE_DOWN[recipe](data, self.tiny_llava)
            if recipe == "chartwiz":  # starts from a recipe import, as a cluster run would
                imported = root / IMPORTED
                overrides += [f"imports={{base: {{source: '{self.tiny_llava}', "
                              f"to: '{imported}'}}}}", f"model.name_or_path={imported}"]
            return SharedRun(recipe, pipeline_runner.run_local(path, overrides), root, overrides)
