"""The serve stage's config, and `mmjobs serve` forwarding to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import mmjobs.stages.serve as serve_stage
from mmjobs.cli import main as mmjobs_main
from mmjobs.config import ConfigError, load_config
from mmjobs.serve.limits import LIMIT_DOCS, ConnectionLimits, Limits
from mmjobs.stages.serve import ServeConfig, ServeResult, default_model_name


def test_cli_forwards_flags_and_overrides(monkeypatch):
    seen: list[ServeConfig] = []

    def fake_main(cfg: ServeConfig) -> ServeResult:
        seen.append(cfg)
        return ServeResult(output="http://x", model_name="m", requests=0)

    monkeypatch.setattr(serve_stage, "STAGE", dataclasses.replace(serve_stage.STAGE,
                                                                  main=fake_main))
    assert mmjobs_main(["serve", "s3://runs/x/merge", "--adapter", "/a", "--port", "9001",
                        "--host", "0.0.0.0", "--api-key-env", "MY_KEY",
                        "--set", "max_batch_size=4"]) == 0
    cfg = seen[0]
    assert (cfg.model, cfg.adapter, cfg.port, cfg.host, cfg.key_env, cfg.max_batch_size) == (
        "s3://runs/x/merge", "/a", 9001, "0.0.0.0", "MY_KEY", 4)
    assert cfg.allow_image_urls is False and cfg.served_model_name is None


def test_config_errors_are_collected():
    with pytest.raises(ConfigError) as err:
        load_config(ServeConfig, {"model": "m", "key_env": "sk-live-123",
                                  "default_max_new_tokens": 99, "max_new_tokens_cap": 10,
                                  "max_image_bytes": 100, "max_request_bytes": 50})
    message = str(err.value)
    assert "key_env must name an environment variable" in message
    assert "default_max_new_tokens=99 is above max_new_tokens_cap=10" in message
    assert "max_image_bytes=100 is above max_request_bytes=50" in message


@pytest.mark.parametrize(("uri", "name"), [
    ("s3://runs/x/merge", "merge"), ("/models/tiny-llava/", "tiny-llava"),
    ("llava-hf/llava-1.5-7b-hf@main", "llava-1.5-7b-hf"), ("s3://bucket", "bucket"),
])
def test_default_model_name(uri, name):
    assert default_model_name(uri) == name


def test_an_empty_key_variable_stops_before_loading(monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_SERVE_KEY", raising=False)
    code = serve_stage.STAGE.cli(["--set", "model=/nowhere", "--set", "key_env=NO_SUCH_SERVE_KEY"])
    assert code == 1
    assert "$NO_SUCH_SERVE_KEY is unset or empty" in capsys.readouterr().err


def test_every_limit_is_a_config_field_and_in_the_help(capsys):
    """One description per limit: the config fields, `mmjobs serve --help` and /v1/models
    all come from mmjobs.serve.limits, so none can be missing or drift."""
    for cls in (Limits, ConnectionLimits):
        for f in dataclasses.fields(cls):
            field = ServeConfig.model_fields[f.name]
            assert field.default == f.default and field.description == LIMIT_DOCS[f.name]
    with pytest.raises(SystemExit):
        mmjobs_main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for name in LIMIT_DOCS:
        assert f"{name} (" in shown, name
        assert f"`{name}`" in readme, f"the README's serve section does not describe {name}"
    assert "max_prompt_tokens (unset): Prompt tokens per request" in shown
    assert "header_timeout_s (10)" in shown
