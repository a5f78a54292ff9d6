"""`mmjobs serve --model NAME=URI ...` and `mmjobs chat RECIPE`: what reaches the serve stage's
config (the stage's own config loading, with `main` replaced by one that records the config:
starting a server is tests/integration/serve/test_multi_model.py's and the lavin-sweep run's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmjobs import pipeline_runner
from mmjobs.cli import main
from mmjobs.stages import serve


@pytest.fixture
def configs(monkeypatch) -> list[serve.ServeConfig]:
    seen: list[serve.ServeConfig] = []

    def record(cfg: serve.ServeConfig) -> serve.ServeResult:
        seen.append(cfg)
        return serve.ServeResult(output="http://x", model_name="m", requests=0)

    monkeypatch.setattr(serve, "STAGE", dataclasses.replace(serve.STAGE, main=record))
    return seen


def test_model_flags_become_named_models(configs):
    assert main(["serve", "/runs/merge-a", "--model", "dec=/runs/merge-dec",
                 "--model", "b=/base,adapter=/runs/sft-b", "--max-loaded-models", "2"]) == 0
    (cfg,) = configs
    assert cfg.model is None and cfg.max_loaded_models == 2
    assert [(m.name, m.model, m.adapter) for m in cfg.models] == [
        ("merge-a", "/runs/merge-a", None), ("dec", "/runs/merge-dec", None),
        ("b", "/base", "/runs/sft-b")]


def test_a_bad_model_flag_is_a_message(configs, capsys):
    assert main(["serve", "--model", "/no/name"]) == 2
    assert "expected NAME=MODEL_URI" in capsys.readouterr().err and not configs


def test_chat_serves_the_folder_mmjobs_run_writes(configs, capsys):
    recipe = "pipelines/recipes/lavin-sweep.yaml"
    overrides = ["stages.sft.train.max_steps=2"]
    assert main(["chat", recipe, "--set", overrides[0], "--port", "0"]) == 0
    (cfg,) = configs
    assert cfg.run == pipeline_runner.run_dir(recipe, overrides) and cfg.port == 0
    assert Path(cfg.run).name.startswith("run-")
    assert main(["chat", recipe, "--run-id", "run-7"]) == 0
    assert configs[-1].run.endswith("/lavin-sweep/run-7")
    assert main(["chat", "pipelines/recipes/nope.yaml"]) == 2  # the recipe's error, no trace
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "Traceback" not in err
