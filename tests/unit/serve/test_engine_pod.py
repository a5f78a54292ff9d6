"""The recipe's `eval.engine` (`mmjobs.serve.engine_pod`): placeholders filled, names that are
DNS labels unique per run and model, and an infer output keyed by the engine, not its URL."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from mmjobs.serve import engine_pod
from mmjobs.serve.engine_pod import EngineSpec
from mmjobs.stages.infer import InferConfig, _rows_fingerprint


def test_vllm_args_by_default_with_the_placeholders_filled():
    command, args = EngineSpec(image="vllm/vllm-openai:v0.11.0", served_model_name="m",
                               port=8001).command_line()
    assert command == []  # the image's entrypoint (vllm-openai: the OpenAI server)
    assert args == ["--model", engine_pod.MODEL_DIR, "--served-model-name", "m", "--host",
                    "0.0.0.0", "--port", "8001"]


def test_braces_that_are_not_placeholders_need_doubling():
    spec = EngineSpec(image="x", args=["{model}", "--override-generation-config",
                                       '{{"temperature": 0}}'])
    assert spec.command_line()[1][2] == '{"temperature": 0}'
    with pytest.raises(ValidationError, match="write literal braces"):
        EngineSpec(image="x", args=["{model}", '{"temperature": 0'])


def test_names_are_dns_labels_unique_per_run_and_model():
    names = {engine_pod.engine_name("chart-demo", run, label)
             for run in ("run-1", "run-2") for label in ("trained", "untrained")}
    assert len(names) == 4
    long = engine_pod.engine_name("x", "run-1", "Setting_With.A-Very-Long-Name-" * 3)
    for name in (*names, long, engine_pod.engine_name("x", "r", "*")):
        assert len(name) <= engine_pod.MAX_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?",
                                                                 name), name
    assert engine_pod.run_key("e", "r") == engine_pod.run_key("e", "r") != \
        engine_pod.run_key("e", "r2")


def test_an_engine_s_infer_output_is_keyed_by_the_engine_not_its_url(tiny_llava_dir,
                                                                     tmp_path):
    (tmp_path / "data").mkdir()

    def fingerprint(**endpoint: str) -> str:
        cfg = InferConfig(model=str(tiny_llava_dir), dataset=str(tmp_path / "data"),
                          endpoint={"model": "model", **endpoint})
        return _rows_fingerprint(cfg)

    engine = '{"image": "vllm/vllm-openai:v0.11.0"}'
    # A pipeline's engine: a new port each run, the same rows.
    assert fingerprint(url="http://127.0.0.1:1/v1", engine=engine) == \
        fingerprint(url="http://127.0.0.1:2/v1", engine=engine)
    assert fingerprint(url="http://127.0.0.1:1/v1", engine=engine) != \
        fingerprint(url="http://127.0.0.1:1/v1", engine='{"image": "other"}')
    # A server the user names: its URL keys the output, as before.
    assert fingerprint(url="http://a:1/v1") != fingerprint(url="http://b:1/v1")
