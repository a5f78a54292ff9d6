"""Every recipe runs end to end locally (KFP's local runner), scaled down onto a tiny model
and generated fixtures in each recipe's published layout; failures name the step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mmjobs import pipeline_runner, storage
from tests.pipelines import fixtures

RUNS: dict[str, Callable[[Path, Path], list[str]]] = {
    "chartwiz": fixtures.make_chartwiz,
    "llava-dataengine": fixtures.make_llava_dataengine,
    "lavin-sweep": fixtures.make_lavin_sweep,
}
# Which evaluations each run reports (results.md rows), and the table it draws.
EXPECTED = {
    "chartwiz": ({"chartwiz"}, "## Headline per evaluation"),
    "chartmoe": ({"w/o PoT", "w/ PoT"}, "## ChartQA relaxed accuracy (@AP)"),
    "llava-dataengine": ({"mme", "gqa", "scienceqa"}, "## Main results"),
    "lavin-sweep": ({"baseline", "dec-dropout"}, "## ScienceQA accuracy (%)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_recipe_runs_scaled_down(recipe: str, tmp_path: Path, tiny_llava_dir: Path) -> None:
    overrides = RUNS[recipe](tmp_path / "data", tiny_llava_dir)
    imported = tmp_path / "store-copy" / "base-model"
    if recipe == "chartwiz":  # starts from a recipe import, as a cluster run from the hub would
        overrides += [f"imports={{base: {{source: '{tiny_llava_dir}', to: '{imported}'}}}}",
                      f"model.name_or_path={imported}"]
    outcome = pipeline_runner.run_local(f"pipelines/recipes/{recipe}.yaml", overrides)
    if recipe == "chartwiz":
        assert storage.is_committed(str(imported))
        assert any(name.startswith("import ") for name in outcome.stages_cached)
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
def test_chartmoe_runs_on_the_xcomposer2_replica(tmp_path: Path, replica_dir) -> None:
    """The hub-layout InternLM-XComposer2 replica (remote-code config, one `.bin`) through
    import -> convert -> pretokenize -> three align runs -> MoE build -> LoRA SFT -> merge ->
    ChartQA direct and PoT -> report, with trust_remote_code off throughout."""
    overrides = fixtures.make_chartmoe(tmp_path / "data",
                                       replica_dir("internlm/internlm-xcomposer2-7b"),
                                       replica_dir("openai/clip-vit-large-patch14-336"))
    outcome = pipeline_runner.run_local("pipelines/recipes/chartmoe.yaml", overrides)
    assert set(outcome.headlines) == {"w/o PoT", "w/ PoT"}
    assert all(value is not None for _, value in outcome.headlines.values())
    results = storage.read_text(outcome.results)
    assert "## ChartQA relaxed accuracy (@AP)" in results
    for row in ("Human", "Augmented", "Averaged"):
        assert f"| {row} |" in results, results
    assert "@0.05" in results and "@0.2" in results
    assert not any(outcome.stages_cached.values())


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
def test_demo_rerun_reuses_every_step(tmp_path: Path) -> None:
    recipe = "pipelines/recipes/chart-demo.yaml"
    first = pipeline_runner.run_local(recipe, fixtures.chart_demo())
    assert set(first.headlines) == {"untrained", "trained"}
    checkpoints = Path(first.run_dir) / "sft" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}
    assert before  # checkpoint_every_steps=1 committed some

    second = pipeline_runner.run_local(recipe, fixtures.chart_demo())
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
