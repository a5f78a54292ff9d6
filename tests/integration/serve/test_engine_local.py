"""The local stand-in engine (`mmjobs.serve.engine_local`): a real `mmjobs serve` of the tiny
LLaVA started on loopback, answering on its /v1 URL; stopped by `stop` (idempotent), and by
the runner's `session` when the run fails while it is up. A record whose pid is not an
`mmjobs serve` (a reused pid) is never signalled. A server that cannot start fails with its
log tail."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from mmjobs.serve import engine_local

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    return engine_local._alive(pid)


def test_a_started_engine_answers_and_a_failing_run_still_stops_it(tiny_llava_dir: Path):
    with pytest.raises(RuntimeError, match="a step failed"), engine_local.session() as folder:
        url = engine_local.start("engine-a", str(tiny_llava_dir), served_name="tiny",
                                 serve={"max_batch_size": 2}, timeout_s=120, run="r1")
        record = json.loads((folder / "engine-a.json").read_text())
        with urllib.request.urlopen(f"{url}/models", timeout=10) as reply:
            assert [m["id"] for m in json.load(reply)["data"]] == ["tiny"]
        assert alive(record["pid"])
        raise RuntimeError("a step failed")
    assert not alive(record["pid"])
    assert not folder.exists()
    assert engine_local.ENV not in os.environ


def test_stop_is_idempotent_and_never_signals_a_process_that_is_not_a_server(tmp_path, monkeypatch):
    monkeypatch.setenv(engine_local.ENV, str(tmp_path))
    assert engine_local.stop("nothing-here") is False
    # A stale record whose pid now belongs to another process (here: this test's own).
    (tmp_path / "stale.json").write_text(json.dumps({"pid": os.getpid(), "run": "r1"}))
    assert engine_local.stop_all(run="r1") == []
    assert not (tmp_path / "stale.json").exists()  # forgotten, and we are still here


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv(engine_local.ENV, str(tmp_path))
    with pytest.raises(engine_local.LocalEngineError) as caught:
        engine_local.start("engine-b", str(tmp_path / "no-model"), served_name="m",
                           serve={"no_such_setting": 1}, timeout_s=120, run="r1")
    message = str(caught.value)
    assert "engine engine-b: `mmjobs serve` exited with" in message
    assert "no_such_setting" in message
    assert list(tmp_path.glob("*.json")) == []
