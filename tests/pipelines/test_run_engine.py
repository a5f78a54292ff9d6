"""`mmjobs run` of chart-demo with `eval.engine`: infer steps answer through `mmjobs serve` on
127.0.0.1, started by engine-up and stopped by engine-down, and no server outlives the run, also
when an infer step fails.

One scaled-down run (a few minutes of CPU: the demo trains before it evaluates) covers both:
the untrained model's engine serves its infer step (which also answers a sample in-process
and finds the same answers: `agreement_sample`), and the trained model's engine refuses every
request (its `stages.engine-up-trained.local_serve` caps answers below the recipe's length),
so infer-trained fails, naming the server's reason; its engine is stopped all the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmjobs import pipeline_runner, settings
from mmjobs.pipeline_logs import PipelineError
from tests.pipelines import fixtures

pytestmark = pytest.mark.slow
RECIPE = "pipelines/recipes/chart-demo.yaml"
ENGINE = ("eval.engine={image: 'vllm/vllm-openai:v0.11.0', gpus: 1, "
          "endpoint: {concurrency: 4, agreement_sample: 2}}")
REFUSING = "stages.engine-up-trained.local_serve={max_new_tokens_cap: 2, default_max_new_tokens: 1}"


def serve_processes(marker: str) -> list[int]:
    """Pids of live `mmjobs serve` processes whose command line mentions `marker`."""
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


def test_infer_answers_through_the_local_engine_and_no_server_outlives_the_run() -> None:
    home = settings.home()  # this test's own MMJOBS_HOME (tests/conftest.py)
    with pytest.raises(PipelineError) as caught:
        pipeline_runner.run_local(RECIPE, [*fixtures.chart_demo(), ENGINE, REFUSING],
                                  run_id="engine")
    message = str(caught.value)
    assert "step 'infer-trained' (stage infer) failed" in message
    assert "answered 400" in message and "max_new_tokens_cap" in message

    run_dir = home / "store" / "chart-demo" / "engine"
    summary = json.loads((run_dir / "infer-untrained" / "infer.json").read_text())
    assert summary["endpoint"]["url"].startswith("http://127.0.0.1:"), summary
    assert summary["answered"] == summary["rows"] > 0
    # The served answers are the in-process model's (greedy, same model and template).
    assert summary["endpoint"]["agreement"] == {"sample": 2, "differ": 0, "rows": []}
    assert (run_dir / "evaluate-untrained" / "summary.json").is_file()
    full_log = Path(sorted((run_dir / "logs").glob("*.log"))[-1]).read_text()
    for label in ("untrained", "trained"):  # each engine started before, stopped after
        up = full_log.index(f"[engine-up-{label}]")
        assert up < full_log.index(f"[infer-{label}]") < full_log.index(
            f"[engine-down-{label}]"), label
    assert full_log.count("stopped mmjobs serve") == 2
    assert "[engine-cleanup]" in full_log
    assert serve_processes(str(home)) == []
