"""Replicas through the `make-tiny-model` stage and `python -m mmjobs.models.replicas`."""

from __future__ import annotations

import json

import pytest

from mmjobs import storage
from mmjobs.config import ConfigError, load_config
from mmjobs.models.replicas import REPLICAS, build_replica
from mmjobs.models.replicas.__main__ import main as replicas_main
from mmjobs.stages import make_tiny_model as stage

PROJECTOR = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"


def test_make_tiny_model_builds_a_replica_by_name(tmp_path):
    out = tmp_path / "store" / "projector"
    cfg = load_config(stage.MakeTinyModelConfig, {}, [f"replica={PROJECTOR}", f"output={out}"])
    result = stage.main(cfg)
    assert storage.is_committed(str(out)) and not result.cached
    assert result.num_parameters == 64 * 32 + 64 + 64 * 64 + 64  # read from the .bin pickle
    assert json.loads((out / "replica.json").read_text())["replica_of"] == PROJECTOR
    assert stage.main(cfg).cached


def test_replica_settings_are_checked_up_front():
    with pytest.raises(ConfigError, match="no such replica; use one of"):
        load_config(stage.MakeTinyModelConfig, {}, ["replica=llava-hf/llava-2"])
    with pytest.raises(ConfigError, match="image_size, kind: a replica keeps its real model"):
        load_config(stage.MakeTinyModelConfig, {}, [f"replica={PROJECTOR}", "image_size=56",
                                                    "kind=llava"])


def test_cli_lists_builds_and_refuses_cleanly(tmp_path, capsys):
    assert replicas_main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list(REPLICAS)
    assert replicas_main(["nobody/model", str(tmp_path / "x")]) == 2
    assert "no replica of 'nobody/model'" in capsys.readouterr().err
    assert replicas_main([PROJECTOR, str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "mm_projector.bin").is_file()
    assert replicas_main([PROJECTOR, str(tmp_path / "p")]) == 2  # not empty: never overwritten
    assert "not empty" in capsys.readouterr().err


def test_builds_are_deterministic(tmp_path):
    a = build_replica(PROJECTOR, tmp_path / "a", seed=3)
    b = build_replica(PROJECTOR, tmp_path / "b", seed=3)
    assert (a / "mm_projector.bin").read_bytes() == (b / "mm_projector.bin").read_bytes()
