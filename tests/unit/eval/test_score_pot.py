"""`mmjobs score --pot`: a file of PoT responses on the real ChartQA excerpt, run in the sandbox
and scored with ChartMoE's relaxed accuracy, without the evaluate stage."""

from __future__ import annotations

import json

import pytest

from mmjobs.eval.pot.settings import PotSettings
from mmjobs.eval.score import score_file, score_main
from tests.real_data import REAL
from tests.unit.eval.conftest import write_jsonl
from tests.unit.eval.pot_support import needs_pot_isolation

pytestmark = pytest.mark.xdist_group("pot-sandbox")  # sandboxed programs: see test_pot_hostile

TEST = REAL / "chartqa" / "test"

# Responses as a PoT model writes them (ChartMoE's pot_idx 1 prompt), keyed by row id; every
# other row gets a program printing its label. Expected answers follow ChartMoE's
# eval_ChartQA.py: first ```python block (else the whole response), stdout stripped,
# "True"/"False" -> "Yes"/"No", a failed run -> "error running...".
PROGRAMS = {
    "human-0": ("The chart lists the foods.\n```python\nfoods = ['Lamb', 'Corn', 'Beef', "
                "'Pork', 'Rice', 'Milk', 'Eggs', 'Fish', 'Tofu', 'Nuts', 'Peas', 'Oats', "
                "'Soy', 'Tea']\nprint(len(foods))\n```"),
    "human-1": "```python\nlamb = 1.2\ncorn = 0.63\nprint(round(lamb - corn, 2))\n```",
    "human-3": "```python\nmadagascar, fiji = 5, 7\nprint(madagascar > fiji)\n```",  # No
    "human-8": "```python\nprint(1 / 0)\n```",  # raises: "error running..." vs "Inspired"
    "human-20": ("First:\n```python\nprint('green line')\n```\nthen\n```python\n"
                 "print('red line')\n```"),  # only the first block runs
    "augmented-0": "```python\nwhile True:\n    pass\n```",  # CPU limit: wrong
    "augmented-2": "print(6.8)",  # no fence: the whole response runs
    "augmented-10": "```python\nprint(open('/etc/shadow').read())\n```",  # refused: wrong
    "augmented-14": "```python\nprint('5G')\n```",
}
WRONG = {"human-8", "augmented-0", "augmented-10"}


def real_rows() -> list[dict]:
    rows = []
    for split in ("human", "augmented"):
        records = json.loads((TEST / f"test_{split}.json").read_text(encoding="utf-8"))
        for n, rec in enumerate(records):
            row_id = f"{split}-{n}"
            response = PROGRAMS.get(row_id, f"```python\nprint({rec['label']!r})\n```")
            rows.append({"id": row_id, "prediction": response, "answers": [rec["label"]],
                         "split": split})
    return rows


@needs_pot_isolation
def test_pot_file_on_real_chartqa_scores_what_the_programs_print(tmp_path):
    rows = real_rows()
    assert len(rows) == 36 + 30
    pred = write_jsonl(tmp_path / "pot.jsonl", rows)
    out = tmp_path / "out"
    summary = score_file("chartqa", pred, variant="chartmoe", output=out,
                         pot=PotSettings(wall_s=5, cpu_s=1))
    human, augmented = 35 / 36, 28 / 30
    for tol in ("0.05", "0.1", "0.2"):
        assert summary["accuracy"][tol]["human"] == pytest.approx(human)
        assert summary["accuracy"][tol]["augmented"] == pytest.approx(augmented)
        assert summary["accuracy"][tol]["average"] == pytest.approx((human + augmented) / 2)
    pot = summary["pot"]
    assert pot["programs"] == 66 and pot["isolation"] == "bubblewrap"
    assert pot["executor"] == "local" and sum(pot["status_counts"].values()) == 66
    assert pot["status_counts"]["ok"] == 63
    audit = {r["id"]: r for r in map(json.loads, (out / "predictions_pot.jsonl")
                                      .read_text(encoding="utf-8").splitlines())}
    assert audit["human-0"]["prediction"] == "14"
    assert audit["human-1"]["prediction"] == "0.57"
    assert audit["human-3"]["prediction"] == "No"  # False -> No, as ChartMoE replaces
    assert audit["human-20"]["prediction"] == "green line"
    assert audit["augmented-2"]["program"] == "print(6.8)"
    assert audit["augmented-0"]["pot"]["status"] == "timeout"
    assert {i for i, r in audit.items() if r["prediction"] == "error running..."} == WRONG
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in rows]  # every row, in order
    assert {s["id"] for s in scores if s["correct@0.05"] == 0.0} == WRONG
    assert all("pot" in s for s in scores)
    table = (out / "summary.md").read_text(encoding="utf-8")
    assert "| @AP       |   0.05 |    0.1 |    0.2 |" in table
    assert "| Human     | 0.9722 | 0.9722 | 0.9722 |" in table
    assert "| Augmented | 0.9333 | 0.9333 | 0.9333 |" in table
    assert "| Averaged  | 0.9528 | 0.9528 | 0.9528 |" in table


@needs_pot_isolation
def test_score_cli_pot_writes_the_audit_and_prints_the_ap_table(tmp_path, capsys):
    rows = [r for r in real_rows() if r["id"] in {"human-1", "human-3", "human-8"}]
    pred = write_jsonl(tmp_path / "pot.jsonl", rows)
    out = tmp_path / "out"
    code = score_main(["--metric", "chartqa", "--variant", "chartmoe", "--pot",
                       "--pot-workers", "1", "--predictions", str(pred), "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| Human     | 0.6667 | 0.6667 | 0.6667 |" in printed
    assert "| Averaged  |      - |      - |      - |" in printed  # no augmented rows
    assert "program of thought: 3 programs (ok 2, error 1); isolation bubblewrap" in printed
    assert (out / "predictions_pot.jsonl").is_file() and (out / "summary.json").is_file()


def test_score_cli_pot_refuses_other_metrics_and_stray_flags(tmp_path, capsys):
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "print(1)",
                                               "answers": ["1"]}])
    assert score_main(["--metric", "vqav2", "--pot", "--predictions", str(pred)]) == 1
    assert "--pot applies to metric chartqa" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        score_main(["--metric", "chartqa", "--pot-isolation", "none", "--predictions",
                    str(pred)])
    assert stop.value.code == 2
    assert "--pot-isolation and --pot-workers go with --pot" in capsys.readouterr().err


def test_score_cli_pot_fails_closed_without_isolation(tmp_path, capsys, monkeypatch):
    """A machine where bubblewrap cannot run: one message naming the fix, nothing scored."""
    rows = real_rows()[:2]
    pred = write_jsonl(tmp_path / "pot.jsonl", rows)
    out = tmp_path / "out"
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no bwrap on PATH
    code = score_main(["--metric", "chartqa", "--pot", "--predictions", str(pred),
                       "--output", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("mmjobs score: ") and "Traceback" not in err
    assert not (out / "summary.json").exists()
