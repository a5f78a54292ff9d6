"""The stage registry: every module in mmjobs/stages declares itself once, and everything that
needs to know a stage (CLI, components, builder, cluster, images) reads that declaration."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from typing import Any

import pytest

from mmjobs import layout
from mmjobs.stage_contract import Stage, StageConfig, StageResult
from mmjobs.stages import registry
from pipelines.components import component_function

NAMES = registry.names()


def test_names_come_from_the_modules_and_match_their_declarations():
    assert "import" in NAMES and "make-tiny-model" in NAMES and "registry" not in NAMES
    for name in NAMES:
        stage = registry.get(name)
        assert isinstance(stage, Stage) and stage.name == name
        assert issubclass(stage.config, StageConfig) and issubclass(stage.result, StageResult)
        assert stage.image in ("data", "train", "eval")
        assert stage.summary and stage.summary == " ".join(stage.config.__doc__.split())


def test_declared_inputs_are_config_fields():
    for name in NAMES:
        stage = registry.get(name)
        for path in stage.wired:
            model: Any = stage.config
            for part in path.split("."):
                assert part in model.model_fields, (name, path)
                model = model.model_fields[part].annotation
                # An optional section (infer's `endpoint: EndpointConfig | None`): its model.
                model = next((a for a in typing.get_args(model) if hasattr(a, "model_fields")),
                             model)


def test_an_unknown_stage_lists_the_known_ones():
    with pytest.raises(registry.UnknownStageError, match="no stage 'nope'; available: "
                                                         "apply-connector, build-moe-connector"):
        registry.get("nope")


def test_image_import_checks_cover_the_stages_of_each_image(capsys):
    by_image = {image: [n for n in NAMES if registry.get(n).image == image]
                for image in ("data", "train", "eval")}
    for image, names in by_image.items():
        assert registry.check_imports(image) == names
        assert f"{image} image: stages {', '.join(names)} import" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no stage runs in an image named 'gpu'"):
        registry.check_imports("gpu")


def test_component_functions_take_the_declared_inputs():
    params = inspect.signature(component_function("train")).parameters
    assert list(params)[:3] == ["config_json", "data", "model"]
    assert params["nodes"].default == 1 and params["ptx_data"].default == ""
    evaluate = inspect.signature(component_function("evaluate")).parameters
    assert list(evaluate) == ["config_json", "predictions", "metrics", "summary", "kfp_run_id"]
    assert component_function("import").__name__ == "import_"  # a Python keyword
    assert "run_component('merge', config_json, base=base, adapter=adapter, " \
        "kfp_run_id=kfp_run_id, model=model)" in inspect.getsource(component_function("merge"))
    # Knobs: optional typed parameters (None: the step has no pipeline parameter for them).
    assert (params["set__train__lr"].annotation, params["set__train__lr"].default) == \
        (float, None)
    assert params["set__train__max_steps"].annotation is int
    assert "metrics" in params  # the final numbers, in the KFP UI


def test_training_shows_its_final_numbers_as_kfp_metrics():
    from mmjobs.stages.train import TrainResult, kfp_metrics

    result = TrainResult(output="s3://b/sft", final="s3://b/sft/final", checkpoints="c",
                         steps=10, final_loss=0.5, tokens=1000, seconds=4.0,
                         eval_metrics={"eval_accuracy": 0.75})
    assert kfp_metrics(result) == {"steps": 10.0, "final_loss": 0.5, "tokens": 1000.0,
                                   "seconds": 4.0, "tokens_per_s": 250.0,
                                   "eval_accuracy": 0.75}


@pytest.fixture
def recorded(monkeypatch):
    """Stages whose `main` records the validated config instead of running (and without a
    component body of their own, which would call the real one)."""
    seen: list[Any] = []

    def record(name: str) -> None:
        module = __import__(f"mmjobs.stages.{registry.module_name(name)}", fromlist=["STAGE"])

        def main(cfg: Any) -> Any:
            seen.append(cfg)
            return type("R", (), {"output": "out://x", "model": None})()

        monkeypatch.setattr(module, "STAGE", dataclasses.replace(module.STAGE, main=main,
                                                                 component=None))

    return record, seen


def test_run_component_fills_wired_inputs_into_their_config_fields(recorded):
    record, seen = recorded
    for name in ("train", "infer", "build-moe-connector", "mix"):
        record(name)
    assert registry.run_component("train", json.dumps({"model": {"dtype": "float32"}}),
                                  data="s3://b/shards", model="s3://b/model", ptx_data="",
                                  nodes=1, gpus_per_node=0, image="", launch_json="{}") == \
        "out://x"
    train = seen.pop()
    assert (train.data, train.model.name_or_path, train.model.dtype, train.ptx_data) == (
        "s3://b/shards", "s3://b/model", "float32", None)  # an empty optional is not wired
    registry.run_component("infer", json.dumps({"dataset": "s3://b/configured"}),
                           model="s3://b/m", dataset="", adapter="s3://b/a")
    infer = seen.pop()
    assert (infer.model, infer.dataset, infer.adapter) == ("s3://b/m", "s3://b/configured",
                                                           "s3://b/a")
    registry.run_component("build-moe-connector", "{}", base="s3://b/base",
                           expert_names=["table", "code"], experts=["s3://b/t", "s3://b/c"])
    assert seen.pop().experts == {"table": "s3://b/t", "code": "s3://b/c"}
    registry.run_component("mix", "{}", datasets=("s3://b/1", "s3://b/2"))
    assert seen.pop().datasets == ["s3://b/1", "s3://b/2"]


def test_layout_names_are_what_the_stages_write():
    from mmjobs.data.records import CARD_FILE, SAMPLES_FILE
    from mmjobs.eval.evaluation import PREDICTIONS_FILE

    assert (CARD_FILE, SAMPLES_FILE, PREDICTIONS_FILE) == (
        layout.DATASET_CARD, layout.SAMPLES_FILE, layout.PREDICTIONS_FILE)


@pytest.mark.parametrize(("stage", "name", "kind"), [
    ("prepare", "dataset", "system.Dataset"), ("mix", "dataset", "system.Dataset"),
    ("pretokenize", "shards", "system.Dataset"), ("train", "trained", "system.Model"),
    ("merge", "model", "system.Model"), ("convert", "model", "system.Model"),
    ("build-moe-connector", "connector", "system.Model")])
def test_data_and_model_stages_have_typed_kfp_outputs(stage, name, kind):
    """KFP's run graph and lineage show what a step made as a typed artifact (its URI is the
    store output: tests/pipelines/test_run_params.py), beside the URI string steps pass on."""
    from pipelines.components import component

    outputs = component(stage, "img").component_spec.outputs
    assert outputs[name].type.split("@")[0] == kind
    assert outputs["Output"].type == "String"
