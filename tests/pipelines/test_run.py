"""Recipes run end to end locally (KFP's local runner), scaled down onto generated fixtures in
each recipe's published layout; failures name the step. lavin-sweep still runs on the tiny
LLaVA (its recipe issue moves it onto the LLaMA-7B replica); llava-dataengine, chartwiz,
chameleon-interleaved and chartmoe run on the replicas of their base models in
test_recipes_on_replicas.py, test_chameleon_recipe.py and test_chartmoe_recipe.py. The demo
(`make demo`) runs as shipped, on its own tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmjobs import pipeline_runner, storage
from tests.pipelines import fixtures
from tests.pipelines.runs import RecipeRuns, uses_run

# Which evaluations each run reports (results.md rows), and the table it draws.
EXPECTED = {
    "lavin-sweep": ({"baseline", "dec-dropout"}, "## ScienceQA accuracy (%)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=uses_run(r)) for r in sorted(EXPECTED)])
def test_recipe_runs_scaled_down(recipe: str, recipe_runs: RecipeRuns) -> None:
    run = recipe_runs.get(recipe)
    outcome = run.outcome
    labels, table = EXPECTED[recipe]
    assert set(outcome.headlines) == labels
    assert all(value is not None for _, value in outcome.headlines.values())
    results = storage.read_text(outcome.results)
    assert table in results
    assert outcome.mlflow_run_id and outcome.stages_cached
    assert not any(outcome.stages_cached.values())  # a first run computes everything
    if outcome.report:  # the report stage (once it exists) wrote its page
        assert storage.exists(outcome.report)


@pytest.mark.slow
def test_failed_step_is_named_with_its_log_tail(tmp_path: Path) -> None:
    # A converter that needs an input file, given none: the prepare step fails first.
    with pytest.raises(pipeline_runner.PipelineError) as e:
        pipeline_runner.run_local("pipelines/recipes/chart-demo.yaml", [
            *fixtures.chart_demo(), "stages.prepare.source_format=llava"])
    message = str(e.value)
    assert message.startswith("step 'prepare' (stage prepare) failed. Last lines of its log:")
    assert "llava" in message and "input" in message
    assert "run the same command again" in message


@pytest.mark.slow
@uses_run("chart-demo")
def test_demo_rerun_reuses_every_step(recipe_runs: RecipeRuns) -> None:
    demo = recipe_runs.get("chart-demo")
    first = demo.outcome
    assert set(first.headlines) == {"untrained", "trained"}
    checkpoints = Path(first.run_dir) / "sft" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}
    assert before  # checkpoint_every_steps=1 committed some

    with demo.environment():  # the same MMJOBS_HOME: the same store and MLflow database
        second = pipeline_runner.run_local(demo.path, demo.overrides)
    assert second.run_id == first.run_id  # the default id is the recipe's fingerprint
    # Every stage reuses its committed output, except the report: it reports on this new
    # pipeline run (its MLflow parent), so it has something new to say.
    reused = {name: cached for name, cached in second.stages_cached.items()
              if not name.startswith("report ")}
    assert len(reused) == 12 and all(reused.values()), second.stages_cached
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()} == before
    assert second.headlines == first.headlines
    summary = json.loads((Path(first.run_dir) / "evaluate-trained" / "summary.json").read_text())
    assert summary["label"] == "trained" and summary["metric"] == "chartqa"
