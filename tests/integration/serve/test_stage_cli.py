"""The real entrypoint as a subprocess: `python -m mmjobs.stages.serve`, SIGTERM, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.serve.client import Client, chart_png, chat_body
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[3]


def start(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmjobs.stages.serve", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=(tmp_path / "serve.log").open("wb"), start_new_session=True)


def test_serves_until_sigterm(tiny_llava_dir, tmp_path):
    port = free_port()
    proc = start(["--set", f"model={tiny_llava_dir}", "--set", f"port={port}",
                  "--set", "served_model_name=demo", "--set", "key_env=SERVE_CLI_KEY",
                  "--set", "default_max_new_tokens=6"], tmp_path, {"SERVE_CLI_KEY": "k1"})
    try:
        client = Client(f"http://127.0.0.1:{port}", api_key="k1")
        client.wait_ready(180)
        reply = client.chat(chat_body("demo", image=chart_png()))
        assert reply.status == 200, reply.body
        assert Client(f"http://127.0.0.1:{port}").chat(chat_body("demo")).status == 401
        client.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    log = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, log
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["model_name"] == "demo" and result["requests"] >= 3
    assert "k1" not in log  # the key is never logged


def test_a_model_that_fails_to_load_exits_non_zero(tmp_path):
    port = free_port()
    proc = start(["--set", f"model={tmp_path / 'missing-model'}", "--set", f"port={port}"],
                 tmp_path, {"HF_HUB_OFFLINE": "1"})
    try:
        proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the server kept running after the model failed to load")
    assert proc.returncode == 1
    assert "the model failed to load" in (tmp_path / "serve.log").read_text()
