"""Train stage with shards, checkpoints and final outputs in S3 (moto_server over HTTP)."""

from __future__ import annotations

import pytest

from mmjobs import storage
from mmjobs.config import load_config
from mmjobs.stages.train import TrainStageConfig, main
from mmjobs.train import checkpoint as ckpt
from tests.train_fixtures import assert_tensors_equal, read_tensors, stage_settings

pytestmark = pytest.mark.integration


def test_s3_checkpoints_final_and_resume_past_an_interrupted_upload(tmp_path, s3_bucket,
                                                                   tiny_llava_dir, chart_shards,
                                                                   one_thread):
    bucket = f"s3://{s3_bucket}"
    data = f"{bucket}/shards"
    storage.copy(chart_shards, data)
    out = f"{bucket}/exp/run-1/train"
    cfg = load_config(TrainStageConfig, stage_settings(
        tiny_llava_dir, data, out, mode="align", max_steps=8, checkpoint_every_steps=3,
        keep_last_checkpoints=2, per_device_batch_size=2))

    first = main(cfg)
    assert first.connector == f"{out}/final/connector" and not first.cached
    root = f"{out}/checkpoints"
    assert [(i.step, i.committed) for i in ckpt.list_checkpoints(root)] == [(3, True),
                                                                          (6, True)]
    state = storage.read_manifest(f"{root}/step-6")
    assert {f.path for f in state.files} >= {"trainable.safetensors", "optimizer.pt",
                                             "scheduler.pt", "state.json",
                                             "ranks/rank-0/rng.pt", "ranks/rank-0/loader.json"}
    final = storage.verify_dir(f"{out}/final")
    assert {f.path for f in final.files} == {"connector/connector.safetensors",
                                             "connector/connector_config.json",
                                             "train_info.json"}
    local_first = tmp_path / "first"
    storage.get_dir(f"{out}/final", local_first)

    assert main(cfg).cached  # same inputs: the committed final/ is reused

    # Simulate a kill during the step-6 upload: files there, manifest missing; no final/.
    storage.delete(f"{out}/final")
    storage.delete(f"{root}/step-6/{storage.MANIFEST_NAME}")
    again = main(cfg)
    assert again.resumed_from_step == 3 and not again.cached
    local_again = tmp_path / "again"
    storage.get_dir(f"{out}/final", local_again)
    assert_tensors_equal(read_tensors(local_again), read_tensors(local_first))
    # step-6 was committed again by the resumed run.
    assert [(i.step, i.committed) for i in ckpt.list_checkpoints(root)] == [(3, True),
                                                                          (6, True)]
