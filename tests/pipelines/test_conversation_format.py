"""`model.conversation_format` in a recipe reaches every step that renders conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmjobs import pipeline_runner
from mmjobs.config import ConfigError


def _step_configs(out: Path) -> dict[str, dict]:
    spec = next(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    configs = {}
    for task in spec["root"]["dag"]["tasks"].values():
        params = task.get("inputs", {}).get("parameters", {})
        if "config_json" in params:
            configs[task["taskInfo"]["name"]] = json.loads(
                params["config_json"]["runtimeValue"]["constant"])
    return configs


def test_the_recipes_format_goes_to_pretokenize_infer_and_the_server(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/chart-demo.yaml", out,
                                   ["model.conversation_format=vicuna_v1",
                                    "stages.deploy.enabled=true"])
    configs = _step_configs(out)
    renders = {name: c for name, c in configs.items()
               if name.startswith(("pretokenize", "infer"))}
    assert renders and all(c["conversation_format"] == "vicuna_v1" for c in renders.values())
    assert configs["deploy"]["serve"]["conversation_format"] == "vicuna_v1"
    # Steps that do not render conversations do not get the key (their configs would refuse it).
    assert all("conversation_format" not in c for name, c in configs.items()
               if name.startswith(("merge", "prepare", "apply-connector")))


def test_default_auto_adds_nothing_and_unknown_names_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/chart-demo.yaml", out, [])
    assert all("conversation_format" not in c for c in _step_configs(out).values()
               if "serve" not in c)
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml",
                             ["model.conversation_format=vicuna"])
    assert any(err.startswith("--set model.conversation_format=vicuna: got 'vicuna'")
               and "'vicuna_v1'" in err for err in e.value.errors), e.value.errors
