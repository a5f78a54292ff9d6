"""Models in S3 (moto_server over HTTP): verified download + cache, uncommitted prefixes refused,
and the merge / build-moe-connector stages reading and writing the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mmjobs import settings, storage
from mmjobs.config import ModelConfig
from mmjobs.models.builder import connector_module, load_model, resolve_model_dir
from mmjobs.stages.build_moe_connector import BuildMoeConfig
from mmjobs.stages.build_moe_connector import main as build_moe
from mmjobs.stages.merge import MergeConfig
from mmjobs.stages.merge import main as merge
from mmjobs.train.moe import save_connector
from tests.fixtures_models import build_once
from tests.unit.train.test_merge import logits, make_adapter
from tests.unit.train.test_moe_stage import aligned

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The session's tiny LLaVA (the same build as tests.fixtures_models.tiny_llava_dir)."""
    from mmjobs.models.tiny import build_tiny_llava

    return build_once(tmp_path_factory.getbasetemp(), "llava", build_tiny_llava)


def test_s3_models_are_verified_cached_and_reused(llava_dir, s3_bucket, monkeypatch):
    uri = f"s3://{s3_bucket}/models/llava"
    storage.put_dir(llava_dir, uri)
    local = resolve_model_dir(uri)
    assert local.parent == settings.home() / "cache" / "models"
    assert (local / "model.safetensors").read_bytes() == \
        (llava_dir / "model.safetensors").read_bytes()

    def no_download(*_a, **_k):
        raise AssertionError("a verified cache must be reused")

    with monkeypatch.context() as m:
        m.setattr(storage, "get_dir", no_download)
        assert resolve_model_dir(uri) == local
    # A damaged cache copy is detected (size differs) and fetched again.
    with open(local / "model.safetensors", "ab") as f:
        f.write(b"x")
    assert resolve_model_dir(uri) == local
    assert (local / "model.safetensors").stat().st_size == \
        (llava_dir / "model.safetensors").stat().st_size

    loaded = load_model(ModelConfig(name_or_path=uri), for_training=False)
    assert loaded.kind == "llava" and loaded.info["source"] == uri


def test_uncommitted_prefixes_are_refused(llava_dir, s3_bucket):
    uri = f"s3://{s3_bucket}/half-uploaded"
    storage.put_file(llava_dir / "config.json", f"{uri}/config.json")
    with pytest.raises(storage.IncompleteDirectoryError, match="not a complete"):
        resolve_model_dir(uri)


def test_merge_and_build_moe_from_and_to_s3(llava_dir, s3_bucket, tmp_path):
    bucket = f"s3://{s3_bucket}"
    storage.put_dir(llava_dir, f"{bucket}/models/llava")
    # A training output committed at its root; only final/adapter is fetched.
    train = tmp_path / "train"
    expected, batch = make_adapter(llava_dir, train / "final" / "adapter")
    (train / "checkpoints").mkdir()
    (train / "checkpoints" / "big-optimizer-state.pt").write_bytes(b"0" * 1000)
    storage.put_dir(train, f"{bucket}/runs/r1/train")

    result = merge(MergeConfig(base=f"{bucket}/models/llava", adapter=f"{bucket}/runs/r1/train",
                               output=f"{bucket}/runs/r1/merge"))
    assert result.adapter == f"{bucket}/runs/r1/train/final/adapter"
    assert result.max_logit_diff < 1e-5 and storage.is_committed(result.output)
    fetched = list((settings.home() / "cache" / "adapters").glob("*/*"))
    assert fetched and not [p for p in fetched if p.name.endswith(".pt")]
    merged = load_model(ModelConfig(name_or_path=result.output), for_training=False)
    assert (logits(merged.model, batch) - expected).abs().max().item() < 1e-5
    assert merge(MergeConfig(base=f"{bucket}/models/llava", adapter=f"{bucket}/runs/r1/train",
                             output=f"{bucket}/runs/r1/merge")).cached

    # build-moe-connector on the merged model, experts from align outputs in S3.
    projector = connector_module(merged.model)
    for seed, name in enumerate(("table", "json"), start=1):
        local = tmp_path / f"align-{name}"
        save_connector(aligned(projector, seed), local / "connector")
        storage.put_dir(local, f"{bucket}/runs/r1/align-{name}")
        shutil.rmtree(local)
    built = build_moe(BuildMoeConfig(
        base=result.output, output=f"{bucket}/runs/r1/moe",
        experts={n: f"{bucket}/runs/r1/align-{n}" for n in ("table", "json")}))
    assert built.expert_names == ["original", "table", "json"]
    moe_model = load_model(ModelConfig(name_or_path=built.model), for_training=False).model
    connector_module(moe_model).force_expert(0)  # the original expert = the merged projector
    assert torch.equal(logits(moe_model, batch), logits(merged.model, batch))
