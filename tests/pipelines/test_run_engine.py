"""`mmjobs run` of chart-demo with `eval.engine`: the infer steps answer through `mmjobs serve`
on 127.0.0.1, started by engine-up and stopped by engine-down, and no server outlives the run,
also when an infer step fails.

Each test reruns the shared scaled-down chart-demo run (tests/pipelines/runs.py) in a copy of
its store and MLflow database under the same run id, so every step up to merge is reused and
only the engine, infer, evaluate and report steps run (about a minute each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmjobs import pipeline_runner
from mmjobs.pipeline_logs import PipelineError
from tests.pipelines.runs import RecipeRuns, SharedRun, run_variables, uses_run

pytestmark = [pytest.mark.slow, uses_run("chart-demo")]
ENGINE = "eval.engine={image: 'vllm/vllm-openai:v0.11.0', gpus: 1}"


def serve_processes(marker: str) -> list[int]:
    """Pids of `mmjobs serve` processes whose command line mentions `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"mmjobs.cli\0serve" in cmdline and marker.encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def rerun(demo: SharedRun, home: Path, *overrides: str) -> pipeline_runner.RunOutcome:
    """The demo again, in a copy of its store and MLflow database, under its run id."""
    shutil.copytree(demo.home, home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJOBS_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.delenv("MMJOBS_STORE", raising=False)
        run_variables(mp)
        return pipeline_runner.run_local(demo.path, [*demo.overrides, *overrides],
                                         run_id=demo.outcome.run_id)


def predictions(run_dir: str | Path, step: str) -> list[str]:
    rows = (Path(run_dir) / step / "predictions.jsonl").read_text().splitlines()
    return [json.loads(row)["prediction"] for row in rows]


def test_infer_steps_answer_through_the_local_engine(recipe_runs: RecipeRuns,
                                                     tmp_path: Path) -> None:
    demo = recipe_runs.get("chart-demo")
    home = tmp_path / "home"
    outcome = rerun(demo, home, ENGINE)
    run_dir = Path(outcome.run_dir)
    assert str(run_dir).startswith(str(home))
    for label in ("untrained", "trained"):
        summary = json.loads((run_dir / f"infer-{label}" / "infer.json").read_text())
        assert summary["endpoint"]["url"].startswith("http://127.0.0.1:"), summary
        assert summary["answered"] == summary["rows"] > 0
        # Greedy answers through the server are the in-process answers of the shared run.
        assert predictions(run_dir, f"infer-{label}") == \
            predictions(demo.outcome.run_dir, f"infer-{label}")
    full_log = Path(outcome.log).read_text()
    for label in ("untrained", "trained"):  # each engine started before, stopped after
        up = full_log.index(f"[engine-up-{label}]")
        assert up < full_log.index(f"[infer-{label}]") < full_log.index(
            f"[engine-down-{label}]")
    assert full_log.count("stopped mmjobs serve") == 2
    assert "[engine-cleanup]" in full_log
    assert outcome.headlines == demo.outcome.headlines
    assert serve_processes(str(home)) == []


def test_a_failing_infer_step_leaves_no_server_behind(recipe_runs: RecipeRuns,
                                                      tmp_path: Path) -> None:
    """The engine refuses every request (its answer cap is below the recipe's answer
    length): the infer step fails, naming the server's reason, and the engine is gone."""
    demo = recipe_runs.get("chart-demo")
    home = tmp_path / "home"
    with pytest.raises(PipelineError) as caught:
        rerun(demo, home, ENGINE,
              "eval.engine.local_serve={max_new_tokens_cap: 2, default_max_new_tokens: 1}")
    message = str(caught.value)
    assert "(stage infer) failed" in message
    assert "answered 400" in message and "max_new_tokens_cap" in message
    assert serve_processes(str(home)) == []
