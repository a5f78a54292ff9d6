"""`eval.engine` compiles to the engine steps around each model's infer steps (KFP IR).

chart-demo with `eval.engine` set: per evaluated model an `engine-up-<label>` launcher whose
output is the infer step's `endpoint_url`, an `engine-down-<label>` after the infer step that
also runs when it fails (KFP's ALL_UPSTREAM_TASKS_COMPLETED trigger), and one `engine-cleanup`
as the exit handler of the eval block. The GPU is the engine's (in its step's config, from
which its Deployment is made), not the launchers', and not the infer steps' when they only
send requests. Bad `eval.engine` sections fail validation naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmjobs import pipeline_runner
from mmjobs.config import ConfigError

RECIPE = "pipelines/recipes/chart-demo.yaml"
ENGINE = "eval.engine={image: 'vllm/vllm-openai:v0.11.0', gpus: 1, endpoint: {concurrency: 32}}"


def compile_ir(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, kubernetes platform spec) of chart-demo compiled with `overrides`."""
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe(RECIPE, out, list(overrides))
    docs = list(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks_by_step(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """step (display name) -> (task name, task spec), from every DAG of the pipeline."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    return {t["taskInfo"]["name"]: (name, t) for dag in dags
            for name, t in dag["tasks"].items() if "componentRef" in t
            and not t["componentRef"]["name"].startswith("comp-exit-handler")}


def config_of(task: dict[str, Any]) -> dict[str, Any]:
    return json.loads(task["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])


def executor_resources(spec: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"].get(
        "resources", {})


def test_engine_steps_wrap_each_model_s_infer_steps(tmp_path: Path) -> None:
    spec, _ = compile_ir(tmp_path, ENGINE)
    tasks = tasks_by_step(spec)
    for label in ("untrained", "trained"):
        up_name, up = tasks[f"engine-up-{label}"]
        infer_name, infer = tasks[f"infer-{label}"]
        _, down = tasks[f"engine-down-{label}"]
        # The infer step sends its prompts to the engine engine-up started.
        url = infer["inputs"]["parameters"]["endpoint_url"]["taskOutputParameter"]
        assert url == {"producerTask": up_name, "outputParameterKey": "Output"}
        endpoint = config_of(infer)["endpoint"]
        assert endpoint["model"] == "model" and endpoint["concurrency"] == 32
        assert "url" not in endpoint  # wired at run time
        # engine-up gets the model this infer step evaluates.
        assert up["inputs"]["parameters"]["model"] == infer["inputs"]["parameters"]["model"]
        up_config = config_of(up)
        assert up_config["action"] == "up" and up_config["label"] == label
        assert up_config["local"] is False and up_config["gpus"] == 1
        assert up_config["image"] == "vllm/vllm-openai:v0.11.0"
        assert up_config["fetch_image"].startswith("ghcr.io/mmjobs/mmjobs-eval:")
        # engine-down: after engine-up and the infer step, also when they fail.
        assert set(down["dependentTasks"]) == {up_name, infer_name}
        assert down["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
        assert config_of(down)["action"] == "down" and config_of(down)["label"] == label
        # GPUs: the engine's (its Deployment), not the launchers' nor the client's.
        for task in (up, down, infer):
            assert "accelerator" not in executor_resources(spec, task)
        assert up.get("cachingOptions", {}).get("enableCache") is not True
    # The exit handler: engine-cleanup runs when the eval block ends, however it ends.
    root = spec["root"]["dag"]["tasks"]
    handlers = [t for t in root.values() if t["componentRef"]["name"].startswith(
        "comp-exit-handler")]
    assert len(handlers) == 1
    (cleanup,) = [t for t in root.values() if t["taskInfo"]["name"] == "engine-cleanup"]
    assert cleanup["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    handler_name = next(n for n, t in root.items() if t is handlers[0])
    assert cleanup["dependentTasks"] == [handler_name]
    assert config_of(cleanup)["action"] == "cleanup"
    inside = spec["components"][handlers[0]["componentRef"]["name"]]["dag"]["tasks"]
    steps_inside = {t["taskInfo"]["name"] for t in inside.values()}
    assert {"engine-up-trained", "infer-trained", "engine-down-trained", "evaluate-trained",
            "report"} <= steps_inside
    # The merged model is made before the block (the block only reads it).
    assert "merge" not in steps_inside and "sft" not in steps_inside


def test_without_an_engine_the_pipeline_has_no_engine_steps(tmp_path: Path) -> None:
    spec, _ = compile_ir(tmp_path)
    tasks = tasks_by_step(spec)
    assert not [s for s in tasks if s.startswith("engine")]
    _, infer = tasks["infer-trained"]
    assert "endpoint_url" not in infer["inputs"]["parameters"]
    assert executor_resources(spec, infer)["accelerator"]["resourceType"] == "nvidia.com/gpu"


def test_an_agreement_sample_keeps_the_infer_step_s_gpu(tmp_path: Path) -> None:
    """The agreement check answers a sample in-process too: that needs the GPU."""
    spec, _ = compile_ir(tmp_path, ENGINE, "eval.engine.endpoint.agreement_sample=20")
    _, infer = tasks_by_step(spec)["infer-trained"]
    assert executor_resources(spec, infer)["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert config_of(infer)["endpoint"]["agreement_sample"] == 20


def test_a_keyed_engine_s_infer_steps_send_the_key_from_its_secret(tmp_path: Path) -> None:
    """`secrets.api_key`: the infer steps read the engine's bearer key from the Secret (never
    from the recipe) and send it; the engine step passes the Secret's name to the engine."""
    spec, executors = compile_ir(tmp_path, ENGINE, "eval.engine.secrets.api_key=team-engine-key")
    tasks = tasks_by_step(spec)
    for label in ("untrained", "trained"):
        _, infer = tasks[f"infer-{label}"]
        assert config_of(infer)["endpoint"]["api_key_env"] == "MMJOBS_ENGINE_API_KEY"
        executor = spec["components"][infer["componentRef"]["name"]]["executorLabel"]
        secrets = {s["secretName"]: s for s in executors[executor]["secretAsEnv"]}
        assert secrets["team-engine-key"]["keyToEnv"] == [
            {"secretKey": "api_key", "envVar": "MMJOBS_ENGINE_API_KEY"}]
        assert secrets["team-engine-key"].get("optional") is not True  # no key: no answers
        up_secrets = config_of(tasks[f"engine-up-{label}"][1])["secrets"]
        assert up_secrets == {"s3": "mmjobs-s3", "mlflow": "mmjobs-mlflow",
                              "api_key": "team-engine-key"}
    # Without the Secret nothing changes: no key variable, no Secret read.
    spec, executors = compile_ir(tmp_path, ENGINE)
    _, infer = tasks_by_step(spec)["infer-trained"]
    assert "api_key_env" not in config_of(infer)["endpoint"]
    executor = spec["components"][infer["componentRef"]["name"]]["executorLabel"]
    assert "team-engine-key" not in {s["secretName"] for s in executors[executor]["secretAsEnv"]}


@pytest.mark.parametrize(("override", "message"), [
    ("eval.engine={image: vllm/vllm-openai:v0.11.0, args: [--port, '{port}']}",
     "args: no {model}: the engine would not load"),
    ("eval.engine={image: vllm/vllm-openai:v0.11.0, args: [--model, '{model}', '{path}']}",
     "names {path}; the placeholders are {model}, {name} and {port}"),
    ("eval.engine={image: vllm/vllm-openai:v0.11.0, env: {HF_TOKEN: x}}",
     "(eval.engine.env.HF_TOKEN): credentials are never read from recipe files"),
    ("eval.engine={args: ['{model}']}", "eval.engine.image"),
    ("eval.engine={image: x, secrets: {api_key: k}, ready_path: /v1/models}",
     "ready_path: /v1/models needs the bearer key, which Kubernetes' probes do not send"),
    ("eval.engine={image: x, secrets: {api_key: Team_Key}}", "eval.engine.secrets.api_key"),
])
def test_bad_engine_sections_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pipeline_runner.load(RECIPE, [override])
    assert message in str(caught.value)


def test_a_recipe_names_the_variable_holding_an_endpoint_s_key_never_the_key() -> None:
    """`api_key_env: VLLM_API_KEY` (README: Evaluating through a serving engine) is allowed;
    a key pasted there by mistake is refused without being shown."""
    endpoint = "stages.infer.endpoint={url: 'http://vllm:8000/v1', api_key_env: %s}"
    recipe = pipeline_runner.load(RECIPE, [endpoint % "VLLM_API_KEY"])
    assert recipe.stages["infer"]["endpoint"]["api_key_env"] == "VLLM_API_KEY"
    for override in (endpoint % "sk-proj-abc123", "stages.infer.endpoint.api_key_env=sk-x y"):
        with pytest.raises(ConfigError) as caught:
            pipeline_runner.load(RECIPE, [override])
        assert "api_key_env: got <redacted>" in str(caught.value)
        assert "sk-" not in str(caught.value)


def test_an_infer_endpoint_besides_the_engine_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        pipeline_runner.load(RECIPE, [ENGINE, "stages.infer.endpoint={url: 'http://x:8000/v1'}"])
    assert "stages.infer.endpoint: eval.engine sets the infer steps' endpoint" in \
        str(caught.value)


def test_a_pipeline_that_does_not_wire_engines_refuses_the_section() -> None:
    """Silently evaluating in-process when the recipe asked for an engine would mislead."""
    with pytest.raises(ConfigError) as caught:
        pipeline_runner.load("pipelines/recipes/chartwiz.yaml", [ENGINE])
    assert "eval.engine: pipeline chartwiz does not evaluate through an engine yet" in \
        str(caught.value)


def test_llava_dataengine_serves_each_row_s_model_once_for_all_its_benchmarks(
        tmp_path: Path) -> None:
    """The seed's six benchmarks × two rows: one engine per row, every benchmark's infer step
    of that row its client, the engine removed after the last of them."""
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/llava-dataengine.yaml", out,
                                   [ENGINE, "eval.baseline=true"])
    spec = next(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    tasks = tasks_by_step(spec)
    assert sorted(s for s in tasks if s.startswith("engine")) == [
        "engine-cleanup", "engine-down-baseline", "engine-down-dataengine",
        "engine-up-baseline", "engine-up-dataengine"]
    for label, suffix in (("dataengine", ""), ("baseline", "-baseline")):
        up_name, _ = tasks[f"engine-up-{label}"]
        infers = {s: t for s, t in tasks.items()
                  if s.startswith("infer-") and s.endswith(suffix)
                  and (suffix or not s.endswith("-baseline"))}
        assert len(infers) == 6, sorted(infers)
        for step, (_, infer) in infers.items():
            url = infer["inputs"]["parameters"]["endpoint_url"]["taskOutputParameter"]
            assert url["producerTask"] == up_name, step
            assert config_of(infer)["benchmark"] == step.removeprefix("infer-").removesuffix(
                suffix)
        _, down = tasks[f"engine-down-{label}"]
        assert set(down["dependentTasks"]) == {up_name, *(n for n, _ in infers.values())}
