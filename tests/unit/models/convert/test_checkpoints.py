"""Restricted reading of pickled checkpoints, and sharded safetensors writing."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmjobs.models.convert import (
    ConversionError,
    UnsafeCheckpointError,
    load_checkpoint_dir,
    load_tensors,
    save_sharded,
)


class _WritesMarker:
    """Unpickling this runs `os.system` (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payloads(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a torch.save zip archive and as bare pickles, named like weights."""
    zipped = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": _WritesMarker(marker)}, zipped)
    bare = {}
    for protocol in (2, 4):
        bare[protocol] = tmp_path / f"consolidated.p{protocol}.pth"
        bare[protocol].write_bytes(pickle.dumps({"w": _WritesMarker(marker)}, protocol=protocol))
    return {"zip": zipped, "pickle-2": bare[2], "pickle-4": bare[4]}


@pytest.mark.parametrize("form", ["zip", "pickle-2", "pickle-4"])
def test_a_pickle_that_needs_code_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "MARKER"
    path = _payloads(tmp_path, marker)[form]
    with pytest.raises(UnsafeCheckpointError) as err:
        load_tensors(path)
    assert str(err.value).startswith(f"{path}: refused: ")
    assert "weights_only=True" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("form", ["zip", "pickle-2"])
def test_the_refusal_names_the_code_it_would_run(tmp_path, form):
    path = _payloads(tmp_path, tmp_path / "MARKER")[form]
    with pytest.raises(UnsafeCheckpointError,
                       match=r"would run code, not just build tensors .*GLOBAL posix\.system"):
        load_tensors(path)


def test_plain_state_dicts_load_zip_legacy_and_nested(tmp_path):
    tensors = {"a": torch.arange(4.0), "b.weight": torch.ones(2, 3, dtype=torch.float16)}
    torch.save(tensors, tmp_path / "zip.bin")
    torch.save(tensors, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "nested.ckpt")
    for name in ("zip.bin", "legacy.bin", "nested.ckpt"):
        loaded = load_tensors(tmp_path / name)
        assert set(loaded) == set(tensors), name
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors), name


@pytest.mark.parametrize(("content", "message"), [
    (b"PK\x03\x04 a truncated zip archive", "not a readable PyTorch checkpoint"),
    (b"definitely not a checkpoint", "refused: torch.load.weights_only=True. cannot read it"),
    (None, "entry 'epoch' is a int, not a tensor"),
])
def test_broken_or_non_tensor_checkpoints_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "pytorch_model.bin"
    if content is None:
        torch.save({"w": torch.zeros(1), "epoch": 3}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConversionError, match=message) as err:
        load_tensors(path)
    assert str(path) in str(err.value)


def test_an_index_may_not_point_outside_its_folder(tmp_path):
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"w": "../elsewhere/pytorch_model.bin"}}))
    with pytest.raises(ConversionError, match="not a plain file name"):
        load_checkpoint_dir(tmp_path)


def test_shards_must_match_their_index(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "s1.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.bin", "b": "s1.bin"}}))
    with pytest.raises(ConversionError, match=r"missing \['b'\]"):
        load_checkpoint_dir(tmp_path)


def test_save_sharded_writes_transformers_shards_and_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((64, 64), float(i)) for i in range(4)}
    tensors["tied"] = tensors["layer.0.weight"]  # shared storage: safetensors refuses those
    tensors["view"] = tensors["layer.1.weight"][:2]
    files = save_sharded(tensors, tmp_path, max_shard_size=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json"
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1
    assert all(f.startswith("model-0000") for f in index["weight_map"].values())
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
