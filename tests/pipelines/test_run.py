"""Recipes run end to end locally (KFP's local runner), scaled down onto generated fixtures in
each recipe's published layout; failures name the step. lavin-sweep builds its LaVIN from the
Meta-format LLaMA and CLIP-224 replicas, runs all eight rows and serves them behind one chat
page (`mmjobs chat`);
llava-dataengine, chartwiz, chameleon-interleaved and chartmoe run on the replicas of their base
models in test_recipes_on_replicas.py, test_chameleon_recipe.py and test_chartmoe_recipe.py.
The demo (`make demo`) runs as shipped, on its own tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmjobs import pipeline_runner, storage
from tests.pipelines import fixtures
from tests.pipelines.runs import RecipeRuns, SharedRun, uses_run

# The eight rows of LaVIN's study (the recipe's sweep), each a setting of the scaled-down run.
LAVIN_ROWS = {"baseline", "cyclical-lr", "step-decay", "exp-decay", "inc-dropout", "dec-dropout",
              "inc-dropout-v2", "dec-dropout-v2"}
# Which evaluations each run reports (results.md rows), and the table it draws.
EXPECTED = {
    "lavin-sweep": (LAVIN_ROWS, "## ScienceQA accuracy (%)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=uses_run(r)) for r in sorted(EXPECTED)])
def test_recipe_runs_scaled_down(recipe: str, recipe_runs: RecipeRuns, tmp_path: Path) -> None:
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
    if recipe == "lavin-sweep":
        _check_lavin_rows(outcome, results, run.root / "data" / "models" / "lavin")
        _chat_with_the_swept_models(run, tmp_path)


def _check_lavin_rows(outcome: pipeline_runner.RunOutcome, results: str, built: Path) -> None:
    """The seed's eight-row table, each row a setting trained with its own schedule on the
    LaVIN the convert-lavin step made from the Meta-format replica."""
    table = results[results.index("## ScienceQA accuracy (%)"):].split("\n\n")[1]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in table.splitlines() if line.startswith("|")]
    assert cells[0] == ["Method", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12",
                        "Average"], table
    assert sorted(row[0] for row in cells[2:]) == sorted(LAVIN_ROWS), table
    run = Path(outcome.run_dir)
    assert storage.is_committed(str(built))  # one LaVIN (conversions.lavin.to) for all rows
    assert json.loads((built / "config.json").read_text())["model_type"] == "lavin"
    assert len([name for name in outcome.stages_cached if name.startswith("convert-")]) == 1
    adapters = {}
    for row in LAVIN_ROWS:
        config = json.loads((run / f"sft-{row}" / "final" / "adapter" / "adapter_config.json")
                            .read_text())
        assert config["mmjobs_adapter"] == "lavin-mma"
        adapters[row] = config["meta"]["adapter_dropout"]
        merged = json.loads((run / f"merge-{row}" / "config.json").read_text())
        assert merged["model_type"] == "lavin"
    # The dropout rows walk over the (two) LLaMA blocks as the seed fork's presets say
    # (inc: 0.1 x 1.01^i, dec: 0.2 x 0.99^i; V2: 1.03 / 0.97); the LR rows keep LaVIN's 0.1.
    walks = {"baseline": [0.1, 0.1], "step-decay": [0.1, 0.1], "inc-dropout": [0.1, 0.101],
             "dec-dropout": [0.2, 0.198], "inc-dropout-v2": [0.1, 0.103],
             "dec-dropout-v2": [0.2, 0.194]}
    for row, walk in walks.items():
        assert adapters[row]["text"] == pytest.approx(walk), row


def _chat_with_the_swept_models(run: SharedRun, tmp_path: Path) -> None:
    """`mmjobs chat RECIPE` (with the run's overrides) finds the finished run and serves all
    eight settings from one server, at most two in memory: `GET /v1/models` lists them, an
    image question and a text question go to the settings they name (one loaded on demand)."""
    from tests.integration.serve.client import Client, chart_png, chat_body
    from tests.servers import free_port

    with run.environment():
        # `mmjobs chat` finds the folder `mmjobs run` chose for this recipe and overrides.
        assert pipeline_runner.run_dir(run.path, run.overrides) == run.outcome.run_dir
        env = dict(os.environ)
    port = free_port()
    log = tmp_path / "chat.log"
    overrides = [arg for o in run.overrides for arg in ("--set", o)]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mmjobs"), "chat", run.path, *overrides,
         "--port", str(port), "--max-loaded-models", "2"],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
        stderr=log.open("wb"), start_new_session=True)
    try:
        client = Client(f"http://127.0.0.1:{port}")
        client.wait_ready(180)
        models = client.request("GET", "/v1/models").json()["data"]
        assert sorted(m["id"] for m in models) == sorted(LAVIN_ROWS)
        assert sum(m["loaded"] for m in models) == 2  # the first two (max_loaded_models)
        page = client.request("GET", "/").body.decode()
        assert all(f'<option value="{row}">' in page for row in LAVIN_ROWS)
        with_image = client.chat(chat_body("baseline", "Which color is the bar?",
                                           image=chart_png(1), temperature=0,
                                           max_tokens=6))
        assert with_image.status == 200, with_image.body
        usage = with_image.json()["usage"]
        deadline = time.monotonic() + 180
        while True:  # not in memory yet: it loads in place of an idle one
            text_only = client.chat(chat_body("dec-dropout", "Which word rhymes?",
                                              temperature=0, max_tokens=6))
            if text_only.status != 503 or time.monotonic() > deadline:
                break
            assert text_only.error["code"] == "model_loading", text_only.body
            time.sleep(0.5)
        assert text_only.status == 200, text_only.body
        assert text_only.json()["model"] == "dec-dropout"
        # LaVIN's layout: 6 visual tokens after "Image: " (text-only prompts say "N/A").
        assert usage["prompt_tokens"] > text_only.json()["usage"]["prompt_tokens"]
        assert 1 <= usage["completion_tokens"] <= 6
        client.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert "unloaded to make room" in log.read_text()


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
