"""The evaluate stage fails closed when PoT programs cannot be isolated, and runs them with the
audit hook only when the recipe says `pot.isolation: none` (then warns and records it).

"No isolation here" is simulated the way a machine without it looks: the `pot.bwrap` setting
points at a missing binary, or at one that exits before running anything (as bwrap does when
it cannot create namespaces).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.stages.evaluate import STAGE
from tests.unit.eval.test_evaluate_stage import chartqa_pot_rows, read_jsonl, write_jsonl

pytestmark = pytest.mark.xdist_group("pot-sandbox")  # sandboxed programs: see test_pot_hostile


def _args(preds: Path, out: Path, *extra: str) -> list[str]:
    return ["--set", f"predictions={preds}", "--set", "metric=chartqa", "--set",
            f"output={out}", "--set", "experiment=pot-isolation", *extra]


@pytest.mark.parametrize(("bwrap", "says"), [
    ("missing", "bubblewrap not found"),
    ("/bin/false", "exited with 1 before running the program"),
], ids=["missing-binary", "cannot-create-namespaces"])
def test_evaluate_refuses_pot_when_isolation_is_unavailable(tmp_path, capsys, bwrap, says):
    outside = tmp_path / "outside.txt"
    preds = write_jsonl(tmp_path / "predictions.jsonl", chartqa_pot_rows(outside))
    out = tmp_path / "out"
    path = str(tmp_path / "no-such-bwrap") if bwrap == "missing" else bwrap
    code = STAGE.cli(_args(preds, out, "--set", "pot.enabled=true", "--set", f"pot.bwrap={path}"))
    err = capsys.readouterr().err
    assert code == 1
    assert says in err
    # One message naming every way out, no traceback.
    assert "apt-get install bubblewrap" in err and "user namespaces" in err
    assert "pot.isolation: none" in err
    assert "Traceback" not in err
    assert not storage.is_committed(str(out))
    assert not (out / "predictions_pot.jsonl").exists() and not outside.exists()


def test_isolation_none_runs_with_the_audit_hook_warns_and_records_it(tmp_path, capsys,
                                                                     caplog):
    outside = tmp_path / "outside.txt"
    preds = write_jsonl(tmp_path / "predictions.jsonl", chartqa_pot_rows(outside))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="mmjobs"):
        code = STAGE.cli(_args(preds, out, "--set", "pot.enabled=true", "--set",
                         "pot.isolation=none", "--set", "pot.wall_s=5", "--set", "pot.cpu_s=1",
                         "--set", f"pot.bwrap={tmp_path / 'no-such-bwrap'}"))
    assert code == 0, capsys.readouterr().err
    assert "WITHOUT operating-system isolation (pot.isolation: none)" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    pot = summary["pot"]
    assert (pot["isolation"], pot["executor"]) == ("none", "local")
    assert "WITHOUT operating-system isolation" in pot["warning"]
    assert "audit-hook" in pot["protections"] and "bubblewrap" not in pot["protections"]
    assert pot["status_counts"] == {"ok": 2, "timeout": 1, "forbidden": 1, "error": 1}
    assert not outside.exists()  # the hook still refuses the write outside
    assert "**Warning**: PoT programs run WITHOUT" in (out / "summary.md").read_text()
    assert {r["id"] for r in read_jsonl(out / "predictions_pot.jsonl")} == {
        "human-0", "human-1", "augmented-0", "augmented-1", "augmented-2"}


def test_pot_shorthand_and_renamed_keys(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [])
    code = STAGE.cli(_args(preds, tmp_path / "out", "--set", "pot=true", "--set", "pot_wall_s=3"))
    err = capsys.readouterr().err
    assert code == 2
    assert "pot_wall_s was renamed: set pot.wall_s instead" in err
    code = STAGE.cli(_args(preds, tmp_path / "out", "--set", "pot.isolation=docker"))
    assert code == 2
    assert "'bubblewrap' or 'none'" in capsys.readouterr().err
