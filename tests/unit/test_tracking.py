"""Tracking against the embedded sqlite database (no server), and against a closed port."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import matplotlib
import pytest
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from mmjobs import settings
from mmjobs.tracking import PARENT_TAG, Tracker, default_tags, flatten_params, flush_spool
from tests.servers import LOOPBACK, free_port

matplotlib.use("Agg")  # no display in tests
import matplotlib.pyplot as plt


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_parent_and_child_runs_carry_params_tags_metrics_and_artifacts(tmp_path):
    tracker = Tracker("unit-tracking")
    assert tracker.tracking_uri == settings.tracking_uri()  # the test's sqlite database
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    notes = outputs / "notes.txt"
    notes.write_text("hello")
    with tracker.start_run("pipeline", tags=default_tags("chart-demo", None)) as parent:
        with tracker.start_run("train", parent=parent,
                               tags=default_tags("chart-demo", "train", image="img:1",
                                                 data_fingerprint="abc123")) as child:
            child.log_params({"train": {"lr": 2e-5, "schedule": {"name": "cosine"}},
                              "data": [{"name": "charts", "weight": 1.0}], "seed": 7})
            for step in range(25):
                child.log_metrics({"loss": 1.0 / (step + 1), "lr": 2e-5}, step=step)
            fig, ax = plt.subplots()
            ax.plot([0, 1], [1, 0])
            child.log_figure(fig, "plots/loss.png")
            plt.close(fig)
            child.log_table([{"q": "max?", "pred": "7", "ok": True},
                             {"q": "min?", "pred": "1", "ok": False}], "eval/predictions.json")
            child.log_table({"category": ["NAT", "SOC"], "acc": [0.5, 0.75]}, "eval/acc.json")
            child.log_text("train:\n  lr: 2e-5\n", "config.yaml")
            child.log_artifact(notes, "extra")
            child.log_artifact(outputs, "dirs")  # a directory keeps its name
        assert child.end() == f"tracking: all delivered for run {child.run_id}"

    client = MlflowClient(settings.tracking_uri())
    parent_run, child_run = client.get_run(parent.run_id), client.get_run(child.run_id)
    assert child_run.info.experiment_id == parent_run.info.experiment_id
    assert client.get_experiment(child_run.info.experiment_id).name == "unit-tracking"
    assert child_run.data.tags[PARENT_TAG] == parent.run_id
    assert PARENT_TAG not in parent_run.data.tags
    assert child_run.info.run_name == "train"
    assert child_run.data.params == {"train.lr": "2e-05", "train.schedule.name": "cosine",
                                     "data.0.name": "charts", "data.0.weight": "1.0",
                                     "seed": "7"}
    tags = child_run.data.tags
    assert (tags["recipe"], tags["mmjobs.stage"], tags["image"], tags["data_fingerprint"]) == (
        "chart-demo", "train", "img:1", "abc123")
    assert parent_run.data.tags["recipe"] == "chart-demo" and "stage" not in parent_run.data.tags
    assert _steps(client, child.run_id, "loss") == list(range(25))
    assert _steps(client, child.run_id, "lr") == list(range(25))
    history = {m.step: m.value for m in client.get_metric_history(child.run_id, "loss")}
    assert history[4] == pytest.approx(0.2)
    assert _artifacts(client, child.run_id) == {"plots", "eval", "config.yaml", "extra", "dirs"}
    assert _artifacts(client, child.run_id, "plots") == {"plots/loss.png"}
    assert _artifacts(client, child.run_id, "eval") == {"eval/predictions.json", "eval/acc.json"}
    assert _artifacts(client, child.run_id, "dirs/outputs") == {"dirs/outputs/notes.txt"}
    table_file = client.download_artifacts(child.run_id, "eval/predictions.json",
                                           str(tmp_path / "dl"))
    table = json.loads(Path(table_file).read_text())
    assert table["columns"] == ["q", "pred", "ok"] and len(table["data"]) == 2
    assert (parent_run.info.status, child_run.info.status) == ("FINISHED", "FINISHED")
    # The embedded default keeps artifacts under MMJOBS_HOME, not in the cwd's ./mlruns.
    assert child_run.info.artifact_uri.startswith((settings.home() / "mlartifacts").as_uri())
    assert tracker.close() == "tracking: all delivered"


def test_context_manager_marks_failed_and_reraises():
    tracker = Tracker("unit-tracking")
    with pytest.raises(RuntimeError, match="boom"), tracker.start_run("eval") as run:
        run.log_metrics({"acc": 0.5}, step=1)
        raise RuntimeError("boom")
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert _steps(client, run.run_id, "acc") == [1]  # buffered metrics still delivered
    explicit = tracker.start_run("explicit")
    explicit.end("killed")
    assert client.get_run(explicit.run_id).info.status == "KILLED"


def test_metrics_are_buffered_until_interval_or_count():
    tracker = Tracker("unit-tracking", flush_interval=3600, flush_every=50)
    client = MlflowClient(tracker.tracking_uri)
    run = tracker.start_run("train")
    for step in range(49):
        run.log_metrics({"loss": 1.0}, step=step)
    assert client.get_metric_history(run.run_id, "loss") == []  # still in the buffer
    run.log_metrics({"loss": 1.0}, step=49)  # the 50th metric sends the batch
    assert _steps(client, run.run_id, "loss") == list(range(50))
    run.log_metrics({"loss": 1.0}, step=50)
    assert tracker.flush()
    assert _steps(client, run.run_id, "loss") == list(range(51))


def test_params_are_immutable_and_clipped():
    tracker = Tracker("unit-tracking")
    run = tracker.start_run("train")
    run.log_params({"lr": 0.1, "prompt": "x" * 7000, "bad key!": 1})
    run.log_params({"lr": 0.2, "epochs": 3})  # lr changed: kept as 0.1, epochs still logged
    run.end()
    params = MlflowClient(tracker.tracking_uri).get_run(run.run_id).data.params
    assert params["lr"] == "0.1" and params["epochs"] == "3" and params["bad key_"] == "1"
    assert len(params["prompt"]) == 6000 and params["prompt"].endswith("[truncated]")


def test_flatten_params_handles_models_dataclasses_and_lists():
    class Optim(BaseModel):
        lr: float = 1e-4
        betas: tuple[float, float] = (0.9, 0.95)

    @dataclasses.dataclass
    class Lora:
        r: int = 8
        targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    flat = flatten_params({"optim": Optim(), "lora": Lora(), "stages": [{"name": "align"}],
                           "empty": {}, "none": None})
    assert flat == {"optim.lr": "0.0001", "optim.betas": "[0.9, 0.95]", "lora.r": "8",
                    "lora.targets": "['q_proj', 'v_proj']", "stages.0.name": "align",
                    "empty": "{}", "none": "None"}


def test_default_tags_use_git_commit_from_env(monkeypatch):
    monkeypatch.setenv("MMJOBS_GIT_COMMIT", "0123abcd")
    assert default_tags("lavin-sweep", "prepare", step="prepare-test") == {
        "recipe": "lavin-sweep", "mmjobs.stage": "prepare", "mmjobs.step": "prepare-test",
        "mlflow.source.git.commit": "0123abcd"}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_unreachable_server_spools_without_raising_or_blocking(tmp_path):
    """Nothing listens on the port: every call returns at once, one warning, all spooled."""
    handler = _Lines()
    logger = logging.getLogger("mmjobs.tracking")
    logger.addHandler(handler)
    try:
        tracker = Tracker("unit-down", f"http://{LOOPBACK}:{free_port()}", flush_interval=0.0,
                          end_timeout=0.5)
        start = time.monotonic()
        run = tracker.start_run("train", tags={"stage": "train"})
        assert run.run_id is None and run.ref.startswith("spool:")
        for step in range(200):
            run.log_metrics({"loss": 1.0}, step=step)
        run.log_params({"lr": 0.1})
        artifact = tmp_path / "a.txt"
        artifact.write_text("kept")
        run.log_artifact(artifact)
        artifact.unlink()  # the spool holds a copy
        assert time.monotonic() - start < 10
        summary = run.end()
    finally:
        logger.removeHandler(handler)
    assert "200 metrics, 1 param, 1 artifact, run start, run end still pending" in summary
    spool = settings.spool_dir() / f"{run.key}.jsonl"
    assert str(spool) in summary and spool.exists()
    ops = [json.loads(line) for line in spool.read_text().splitlines()]
    assert ops[0]["key"] == run.key and ops[0]["run_id"] is None
    assert [op["op"] for op in ops[1:3]] == ["create", "batch"] and ops[-1]["op"] == "end"
    assert sum(len(op.get("metrics", [])) for op in ops[1:]) == 200
    copied = next(op for op in ops if op.get("op") == "artifact")["path"]
    assert (spool.parent / copied).read_text() == "kept"
    # One warning for the outage and the one summary line, not one per call.
    assert len(handler.lines) == 2 and "spooling to" in handler.lines[0], handler.lines
    assert handler.lines[1] == summary

    # A live job's spool is left alone; once released, it can go to another server (here the
    # embedded database, as if MLflow had moved).
    assert "skipped 1 spool file(s) in use" in flush_spool(settings.spool_dir())
    tracker.close(timeout=0)
    delivered = flush_spool(settings.spool_dir(), tracking_uri=settings.tracking_uri())
    run_id = delivered.split(" for run ")[1].split()[0]
    assert delivered == (f"tracking: flushed 200 metrics, 1 param, 1 artifact, run start, "
                         f"run end for run {run_id} after outage")
    client = MlflowClient(settings.tracking_uri())
    assert _steps(client, run_id, "loss") == list(range(200))
    assert client.get_run(run_id).data.tags["stage"] == "train"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _artifacts(client, run_id) == {"a.txt"}
    assert not spool.exists() and not spool.with_suffix(".artifacts").exists()
