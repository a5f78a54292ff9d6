"""Tracking through a real MLflow server that dies and comes back (same port and database).

The client gets no AWS credentials (the autouse fixture removes them): artifacts are proxied by
the server to its S3 bucket, so the job only ever talks to MLflow.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmjobs import settings
from mmjobs.tracking import PARENT_TAG, Tracker, default_tags, flush_spool
from tests.servers import MLflowServer

pytestmark = pytest.mark.integration
OUTAGE_CALLS_BOUND_S = 20  # generous: the point is "seconds, not MLflow's minutes of retries"


@pytest.fixture
def server(mlflow_server: MLflowServer) -> Iterator[MLflowServer]:
    """The session's MLflow server, running again after the test whatever happened."""
    yield mlflow_server
    if mlflow_server.proc is None or mlflow_server.proc.poll() is not None:
        mlflow_server.start()


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _experiment() -> str:
    return f"outage-{uuid.uuid4().hex[:8]}"


def test_outage_mid_run_is_spooled_then_flushed_in_order(server, tmp_path):
    tracker = Tracker(_experiment(), server.uri, flush_interval=0.0, end_timeout=60)
    client = MlflowClient(server.uri)
    run = tracker.start_run("train", tags=default_tags("chart-demo", "train"))
    assert run.run_id
    for step in range(10):
        run.log_metrics({"loss": 10.0 - step}, step=step)
    assert _steps(client, run.run_id) == list(range(10))  # delivered live before the outage
    notes = tmp_path / "notes.txt"
    notes.write_text("written during the outage")

    server.kill()
    start = time.monotonic()
    for step in range(10, 30):
        run.log_metrics({"loss": 10.0 - step}, step=step)
    run.log_params({"optim": {"lr": 1e-3}})
    run.set_tags({"phase": "outage"})
    run.log_artifact(notes, "notes")
    assert time.monotonic() - start < OUTAGE_CALLS_BOUND_S
    notes.unlink()  # the spool kept a copy
    spool_path = run.spool_path
    assert spool_path is not None and spool_path.exists()

    server.start()
    for step in range(30, 40):
        run.log_metrics({"loss": 10.0 - step}, step=step)
    summary = run.end()

    assert _steps(client, run.run_id) == list(range(40))
    data = client.get_run(run.run_id)
    assert data.info.status == "FINISHED"
    assert data.data.params == {"optim.lr": "0.001"}
    assert data.data.tags["phase"] == "outage" and data.data.tags["mmjobs.stage"] == "train"
    downloaded = client.download_artifacts(run.run_id, "notes/notes.txt", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == "written during the outage"
    # At least the 20 outage-period steps went through the spool (later ones may have too,
    # depending on where the backoff was when the server came back).
    match = re.fullmatch(rf"tracking: flushed (\d+) metrics, 1 param, 1 tag, 1 artifact "
                         rf"for run {run.run_id} after outage", summary)
    assert match and int(match[1]) >= 20, summary
    assert not spool_path.exists() and run.spool_path is None
    assert not any(settings.spool_dir().glob("*.artifacts"))
    assert tracker.close() == summary


def test_runs_started_while_down_are_created_and_linked_later(server):
    experiment = _experiment()
    tracker = Tracker(experiment, server.uri, flush_interval=0.0, end_timeout=60)
    server.kill()
    start = time.monotonic()
    parent = tracker.start_run("pipeline", tags=default_tags("chart-demo", None))
    child = tracker.start_run("train", parent=parent, tags=default_tags("chart-demo", "train"))
    child.log_params({"lr": 0.1})
    for step in range(5):
        child.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert time.monotonic() - start < OUTAGE_CALLS_BOUND_S
    assert parent.run_id is None and child.run_id is None
    assert parent.spool_path.exists() and child.spool_path.exists()

    server.start()
    child_summary = child.end()
    parent_summary = parent.end()

    client = MlflowClient(server.uri)
    assert parent.run_id and child.run_id
    child_run, parent_run = client.get_run(child.run_id), client.get_run(parent.run_id)
    assert client.get_experiment(child_run.info.experiment_id).name == experiment
    assert child_run.data.tags[PARENT_TAG] == parent.run_id
    assert (child_run.info.run_name, parent_run.info.run_name) == ("train", "pipeline")
    assert child_run.data.params == {"lr": "0.1"}
    assert _steps(client, child.run_id) == list(range(5))
    assert (child_run.info.status, parent_run.info.status) == ("FINISHED", "FINISHED")
    assert child_summary == (f"tracking: flushed 5 metrics, 1 param, run start for "
                             f"run {child.run_id} after outage")
    assert parent_summary == f"tracking: flushed run start for run {parent.run_id} after outage"
    # Only the key → run id index stays (children spooled elsewhere may name these runs).
    assert [p.name for p in settings.spool_dir().iterdir()] == ["_index.jsonl"]
    tracker.close()


def test_server_still_down_at_end_then_flush_spool_delivers(server):
    experiment = _experiment()
    tracker = Tracker(experiment, server.uri, end_timeout=2)
    server.kill()
    parent = tracker.start_run("pipeline")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"), \
            tracker.start_run("eval", parent=parent) as child:
        child.log_params({"benchmark": "chartqa"})
        for step in range(5):
            child.log_metrics({"loss": float(step)}, step=step)
        child.log_table({"category": ["human", "augmented"], "acc": [0.5, 0.75]},
                        "eval/acc.json")
        raise RuntimeError("boom")
    assert time.monotonic() - start < 2 + OUTAGE_CALLS_BOUND_S  # end_timeout is honoured
    child_summary = child.end()  # already ended: the same summary again
    parent_file, child_file = parent.spool_path, child.spool_path
    assert child_summary.startswith(
        "tracking: 5 metrics, 1 param, 1 artifact, run start, run end still pending for run "
        f"spool:{child.key} (MLflow at {server.uri} unreachable)")
    assert str(child_file) in child_summary and "mmjobs tracking flush" in child_summary
    assert "run start, run end still pending" in parent.end("FINISHED")
    assert "still pending" in tracker.close(timeout=0)  # releases the files for flush_spool
    assert parent_file.exists() and child_file.exists()

    server.start()
    # The child alone cannot be created before its parent: it waits, nothing is lost.
    waiting = flush_spool(child_file)
    assert "still pending" in waiting and "parent run is not created yet" in waiting
    parent_result = flush_spool(parent_file)
    assert parent_result.startswith("tracking: flushed run start, run end for run ")
    assert flush_spool(settings.spool_dir()).startswith(
        "tracking: flushed 5 metrics, 1 param, 1 artifact, run start, run end for run ")
    assert not parent_file.exists() and not child_file.exists()

    client = MlflowClient(server.uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    assert set(runs) == {"pipeline", "eval"}
    child_run, parent_run = runs["eval"], runs["pipeline"]
    assert child_run.data.tags[PARENT_TAG] == parent_run.info.run_id
    assert (child_run.info.status, parent_run.info.status) == ("FAILED", "FINISHED")
    assert child_run.data.params == {"benchmark": "chartqa"}
    assert _steps(client, child_run.info.run_id) == list(range(5))
    assert {a.path for a in client.list_artifacts(child_run.info.run_id, "eval")} == {
        "eval/acc.json"}
    assert flush_spool(settings.spool_dir()).startswith("tracking: nothing to flush")
