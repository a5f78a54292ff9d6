"""`mmjobs stage train` as a subprocess: SIGKILL and SIGTERM mid-run, then resume.

The reference is an uninterrupted in-process run of the same config; the interrupted and
resumed runs must end with bit-identical weights (CPU, one thread, same seed). LoRA dropout
and gradient accumulation are on, and the run spans many epochs, so RNG streams, data
position, optimizer and LR schedule all have to be restored exactly.
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmjobs import storage
from mmjobs.config import load_config
from mmjobs.stages.train import TrainStageConfig, main
from mmjobs.train import checkpoint as ckpt
from tests.train_fixtures import (
    assert_tensors_equal,
    launch_train_stage,
    read_tensors,
    stage_settings,
    wait_for_first_commit,
)

pytestmark = pytest.mark.integration

STEPS = 24
TRAIN = {"max_steps": STEPS, "per_device_batch_size": 2, "grad_accum": 2,
         "checkpoint_every_steps": 3, "keep_last_checkpoints": 2,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llava_dir, chart_shards):
    """One uninterrupted run (in-process, one thread, its own MMJOBS_HOME and MLflow db)."""
    import torch

    tmp = tmp_path_factory.mktemp("train-ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJOBS_HOME", str(tmp / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg = load_config(TrainStageConfig, stage_settings(
                tiny_llava_dir, chart_shards, str(tmp / "out"), **TRAIN))
            result = main(cfg)
        finally:
            torch.set_num_threads(threads)
    return SimpleNamespace(result=result, tensors=read_tensors(result.adapter),
                           tracking=f"sqlite:///{tmp / 'mlflow.db'}")


def _config_file(tmp_path: Path, tiny_llava_dir, chart_shards) -> tuple[Path, str]:
    out = str(tmp_path / "out")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(stage_settings(tiny_llava_dir, chart_shards, out, **TRAIN)))
    return path, out


def _finish(config: Path, tmp_path: Path) -> str:
    log = tmp_path / "resume.log"
    proc = launch_train_stage(config, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llava_dir,
                                                          chart_shards, reference):
    config, out = _config_file(tmp_path, tiny_llava_dir, chart_shards)
    log = tmp_path / "killed.log"
    proc = launch_train_stage(config, log)
    root = storage.join(out, ckpt.CHECKPOINTS_DIR)
    wait_for_first_commit(root, proc, log)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in a later step (>= 21 steps remain)
    if proc.poll() is not None:
        pytest.fail("training finished before it could be killed; make it longer")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not storage.is_committed(storage.join(out, "final"))
    killed_at = ckpt.latest_committed(root).step

    text = _finish(config, tmp_path)
    resumed = int(re.search(r"resumed from .*step-(\d+) at step", text).group(1))
    assert resumed >= killed_at > 0
    assert_tensors_equal(read_tensors(Path(out) / "final" / "adapter"), reference.tensors)
    kept = [i.step for i in ckpt.list_checkpoints(root)]
    assert len(kept) == 2 and all(i.committed for i in ckpt.list_checkpoints(root)), kept


def test_sigterm_commits_the_step_reached_and_exits_143(tmp_path, tiny_llava_dir, chart_shards,
                                                       reference):
    config, out = _config_file(tmp_path, tiny_llava_dir, chart_shards)
    log = tmp_path / "term.log"
    proc = launch_train_stage(config, log)
    root = storage.join(out, ckpt.CHECKPOINTS_DIR)
    wait_for_first_commit(root, proc, log)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    step = int(re.search(r"SIGTERM received: stopped at step (\d+)/", text).group(1))
    latest = ckpt.latest_committed(root)
    assert latest.step == step
    assert storage.read_manifest(latest.uri).meta["step"] == step
    assert "Traceback" not in text
    assert not storage.exists(storage.join(out, "final"))

    text = _finish(config, tmp_path)
    assert f"resumed from {latest.uri} at step {step}" in text
    assert_tensors_equal(read_tensors(Path(out) / "final" / "adapter"), reference.tensors)


def test_the_run_logs_step_series_and_the_lr_plot_to_mlflow(reference):
    from mlflow import MlflowClient

    client = MlflowClient(reference.tracking)
    run_id = reference.result.mlflow_run_id
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s",
                "peak_memory_mb"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), key
    assert client.get_metric_history(run_id, "final_loss")[0].value == pytest.approx(
        reference.result.final_loss)
    artifacts = [a.path for a in client.list_artifacts(run_id, "plots")]
    assert artifacts == ["plots/lr_schedule.png"]
    run = client.get_run(run_id)
    assert run.data.tags["train.final_uri"] == reference.result.final
    assert float(run.data.params["run.flops_per_token"]) > 0
