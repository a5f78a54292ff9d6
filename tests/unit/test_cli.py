"""The `mmjobs` command line: help, validate, store, doctor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmjobs.cli import main

# validate checks the schema and every step section against its pipeline's stages.
GOOD_RECIPE = Path("pipelines/recipes/chart-demo.yaml").read_text(encoding="utf-8")


def test_help_lists_every_architecture_command():
    out = subprocess.run([sys.executable, "-m", "mmjobs.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("run", "compile", "submit", "stage", "validate", "prepare", "pretokenize",
                    "train", "score", "report", "store", "import", "serve", "ui", "doctor"):
        assert f"\n    {command}" in out, command


def test_validate_reports_ok_and_errors_with_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD_RECIPE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD_RECIPE.replace("warmup_ratio:", "warmup_ratoi:"))
    assert main(["validate", str(good)]) == 0
    assert f"OK {good} (recipe chart-demo, pipeline chart-demo)" in capsys.readouterr().out
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "train.warmup_ratoi: unknown key; did you mean 'warmup_ratio'?" in err
    assert main(["validate", str(good), "--set", "train.lr=fast"]) == 1
    assert "--set train.lr=fast: got 'fast'" in capsys.readouterr().err


def test_store_cp_and_ls_round_trip_locally(tmp_path, capsys):
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_text("hello")
    dst = tmp_path / "store" / "copied"
    assert main(["store", "cp", str(src), str(dst)]) == 1
    assert "no _MANIFEST.json" in capsys.readouterr().err
    assert main(["store", "cp", "--uncommitted", str(src), str(dst)]) == 0
    assert "and committed it" in capsys.readouterr().out
    assert main(["store", "ls", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "sub/x.txt" in out and "committed" in out and "not committed" not in out


def test_doctor_reports_embedded_defaults(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] store" in out and "(local, writable)" in out
    assert "[ok  ] tracking     sqlite:///" in out


def test_doctor_reports_whether_pot_programs_can_be_isolated(tmp_path):
    import shutil

    from mmjobs.doctor import check_pot

    missing = check_pot(str(tmp_path / "no-bwrap"))
    assert missing.ok is None  # informational: PoT is optional, the exit code stays 0
    assert "isolation unavailable" in missing.detail
    assert "apt-get install bubblewrap" in missing.detail
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: only the unavailable case can be shown")
    works = check_pot()
    assert works.ok is True and "bubblewrap" in works.detail and "seccomp" in works.detail


def test_doctor_fails_when_the_tracking_server_is_down(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: refused
    assert main(["doctor"]) == 1
    assert "[FAIL] tracking" in capsys.readouterr().out


def test_tracking_flush_delivers_a_spool_left_by_an_outage(capsys):
    import os

    from mlflow.tracking import MlflowClient

    from mmjobs import settings
    from mmjobs.tracking import Tracker

    tracker = Tracker("cli-flush", tracking_uri="http://127.0.0.1:9", end_timeout=0.5)
    run = tracker.start_run("stage")
    run.log_metrics({"loss": 1.5}, step=3)
    assert "still pending" in run.end()
    tracker.close(timeout=0)
    target = os.environ["MLFLOW_TRACKING_URI"]  # the embedded database stands in for the server
    assert main(["tracking", "flush", str(settings.spool_dir()), "--tracking-uri", target]) == 0
    assert "flushed" in capsys.readouterr().out
    client = MlflowClient(target)
    [delivered] = client.search_runs([client.get_experiment_by_name("cli-flush").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(delivered.info.run_id, "loss")] \
        == [(3, 1.5)]
    assert delivered.info.status == "FINISHED"


def test_store_output_escapes_control_characters_in_names(tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "two\nlines  <- not in the manifest").write_text("x")
    (src / "red\x1b[31m\x07.txt").write_text("y")
    dst = tmp_path / "store" / "odd\x1b]0;title\x07"
    assert main(["store", "cp", "--uncommitted", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "odd\\x1b]0;title\\x07" in out
    assert main(["store", "ls", str(dst)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["           1  red\\x1b[31m\\x07.txt",
                         "           1  two\\nlines  <- not in the manifest"]
    assert lines[2].startswith("2 objects, 2 bytes — committed") and len(lines) == 3
    assert main(["store", "ls", str(tmp_path / "no\nsuch")]) == 1
    assert capsys.readouterr().out == f"{tmp_path}/no\\nsuch: no objects there\n"
