"""Pipeline parameters change what a run does: a value given for a run (the KFP UI's run
form; here the local runner's arguments) reaches the step's config, and a cluster step
writes under KFP's job id."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

import pipelines
from mmjobs import pipeline_runner, settings, storage
from mmjobs.config import ConfigError
from mmjobs.stage_contract import KFP_RUN_ID_TOKEN
from mmjobs.stages import registry
from mmjobs.stages.prepare import CARD_FILE
from tests.integration.data.test_prepare_stage import make_raw, row

pytestmark = pytest.mark.integration


def datasets(root: Path) -> tuple[Path, Path]:
    """Two raw canonical datasets: 3 rows and 5 rows."""
    return (make_raw(root / "three", [row(i, f"charts/c{i}.png") for i in range(3)]),
            make_raw(root / "five", [row(i, f"charts/c{i}.png") for i in range(5)]))


def card(output: str) -> dict:
    return json.loads(storage.read_text(storage.join(output, CARD_FILE)))


def test_a_step_gets_the_run_s_parameter_values_and_kfp_s_job_id(tmp_path: Path) -> None:
    three, five = datasets(tmp_path)
    store = tmp_path / "store"
    config = {"source_format": "canonical", "input": str(three), "experiment": "knobs",
              "pipeline_run_id": KFP_RUN_ID_TOKEN,
              "output": str(store / "knobs" / KFP_RUN_ID_TOKEN / "prepare")}
    job = "7d1c2f4e-0b9a-4c55-9b0e-3f2a1c5d6e7f"
    out = registry.run_component("prepare", json.dumps(config), set__input=str(five),
                                 kfp_run_id=job)
    assert out == str(store / "knobs" / job / "prepare")
    assert (card(out)["input"], card(out)["counts"]["accepted"]) == (str(five), 5)
    # No value for the knob (a step without the parameter): the compiled config decides.
    again = registry.run_component("prepare", json.dumps({**config, "output": str(
        store / "other")}))
    assert card(again)["counts"]["accepted"] == 3


def test_local_run_with_a_parameter_override_changes_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's parameters through KFP's local runner: the recipe's value by default,
    the given one when the run names it."""
    three, five = datasets(tmp_path)
    module = types.ModuleType("one_prepare")
    module.NAME = "one-prepare"
    module.wire = lambda b: b.step("prepare", "prepare")
    monkeypatch.setitem(pipelines.PIPELINES, module.NAME, module)
    recipe = tmp_path / "one-prepare.yaml"
    recipe.write_text("recipe: one-prepare\npipeline: one-prepare\n"
                      "model: {name_or_path: tiny:llava}\n"
                      f"data: {{source_format: canonical, input: '{three}'}}\n",
                      encoding="utf-8")

    default = pipeline_runner.run_local(recipe, run_id="defaults")
    overridden = pipeline_runner.run_local(recipe, run_id="form",
                                           arguments={"prepare_input": str(five)})

    outputs = [storage.join(o.run_dir, "prepare") for o in (default, overridden)]
    assert [card(o)["counts"]["accepted"] for o in outputs] == [3, 5]
    # The step's typed Dataset artifact (KFP's lineage) stands for the committed output.
    written = [json.loads(f.read_text()) for f in settings.kfp_root().rglob("executor_output.json")]
    typed = [a for out in written
             for a in out.get("artifacts", {}).get("dataset", {}).get("artifacts", [])]
    assert {a["uri"] for a in typed} == set(outputs)
    assert all(a["metadata"] == {"stage": "prepare", "store_uri": a["uri"]} for a in typed)
    assert card(outputs[1])["input"] == str(five)
    with pytest.raises(ConfigError, match="prepare_lr: not a parameter of this pipeline; "
                                          "it has prepare_input"):
        pipeline_runner.run_local(recipe, arguments={"prepare_lr": 1.0})
