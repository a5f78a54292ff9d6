"""Align-Anything's own text-to-text sample sets (first 8 of 32 records, values unchanged)."""

from __future__ import annotations

import json

from tests.real_data import real
from tests.unit.data._real import prepare

ASSETS = "align_anything/text_to_text_assets"


def test_preference_assets_convert(tmp_path):
    """PKU-SafeRLHF rows: response_0/response_1 with a 0-based better_response_id."""
    path = real(f"{ASSETS}/preference/train.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    pairs, rejects = prepare("preference", path, None, tmp_path)
    assert rejects == [] and len(pairs) == len(rows) == 8
    for pair, row in zip(pairs, rows, strict=True):
        better = int(row["better_response_id"])
        assert pair.chosen == row[f"response_{better}"]
        assert pair.rejected == row[f"response_{1 - better}"]
        assert pair.prompt[0].content == row["prompt"] and pair.images == []
        assert pair.meta["safer_response_id"] == row["safer_response_id"]
    assert [p.id for p in pairs] == [f"train-{i}" for i in range(8)]
    # the safety ranking is the other label these rows carry
    safer, _ = prepare("preference", path, None, tmp_path, preferred_key="safer_response_id")
    assert [p.chosen for p in safer] == [r[f"response_{int(r['safer_response_id'])}"]
                                         for r in rows]


def test_supervised_assets_convert(tmp_path):
    """Alpaca-layout rows (instruction, input, output, text) -> text-only samples."""
    path = real(f"{ASSETS}/supervised/train.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    samples, rejects = prepare("alpaca", path, None, tmp_path)
    assert rejects == [] and len(samples) == len(rows) == 8
    for sample, row in zip(samples, rows, strict=True):
        user, assistant = sample.conversations
        expected = " ".join(t for t in (row["instruction"], row["input"]) if t.strip())
        assert (user.role, user.content) == ("user", expected)
        assert (assistant.role, assistant.content) == ("assistant", row["output"])
        assert sample.images == [] and sample.meta["text"] == row["text"]
    assert samples[0].conversations[0].content == "Give three tips for staying healthy."
    assert any(r["input"] for r in rows)  # some rows carry an input, joined with a space
