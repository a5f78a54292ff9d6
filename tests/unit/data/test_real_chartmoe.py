"""ChartMoE's real data-mix files and README data format."""

from __future__ import annotations

import pytest

from mmjobs.data.converters.chartmoe import MixEntry, read_data_mix
from tests.real_data import real
from tests.unit.data._real import prepare

MIX = "chartmoe/train_data_mix"


def test_data_mix_files_parse(tmp_path):
    """The four mixes ChartMoE trains with: `path amount`, amounts in thousands of rows."""
    mixes = {name: read_data_mix(str(real(f"{MIX}/{name}.txt")))
             for name in ("table_align", "json_align", "code_align", "sft")}
    assert {name: [(e.path, e.amount) for e in entries] for name, entries in mixes.items()} == {
        "table_align": [("./data/chart2table.json", 500)],
        "json_align": [("./data/chart2json.json", 200)],
        "code_align": [("./data/chart2code.json", 300)],
        "sft": [("./data/chartqa.json", 70), ("./data/chartgemma.json", -1)],
    }
    # the committed files have no trailing newline; sft.txt's first line ends in one
    assert not real(f"{MIX}/sft.txt").read_bytes().endswith(b"\n")
    chartqa, chartgemma = mixes["sft"]
    # --given_num True (all four train scripts): thousands of rows; -1 = every row
    assert chartqa.rows(available=28_299) == 70_000  # padded with random duplicates
    assert chartgemma.rows(available=163_240) == 163_240
    assert mixes["table_align"][0].rows(available=1_000_000) == 500_000  # sampled
    # without --given_num the amount is a ratio of the file's rows
    assert MixEntry("./x.json", 0.5, 1).rows(available=10, given_num=False) == 5
    assert chartqa.resolve(str(tmp_path)) == str(tmp_path / "data" / "chartqa.json")
    bad = tmp_path / "bad.txt"
    bad.write_text("./data/a.json  70\n./data/b.json\n./data/c.json x\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        read_data_mix(str(bad))
    assert str(err.value).count("line ") == 3  # every bad line named at once


def test_readme_example_is_refused_with_the_reason(tmp_path):
    """The README's "Data Format" example is Python, not JSON (single-quoted image list, no
    comma after it): each of its two rows is rejected as invalid JSON naming the line and
    column of the quote, and the counts reconcile (2 rows in, 0 accepted, 2 rejected)."""
    text = real("chartmoe/train_README.md.lines29-62.md").read_text(encoding="utf-8")
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme_example.json"
    path.write_text(example, encoding="utf-8")
    samples, rejects = prepare("chartmoe", path, None, tmp_path)
    assert samples == []
    assert [(r.row, r.reason) for r in rejects] == [
        ("readme_example.json[0]", "invalid_json: invalid JSON: Expecting value at byte 43 "
                                   "(line 4, column 17)"),
        ("readme_example.json[1]", "invalid_json: invalid JSON: Expecting value at byte 348 "
                                   "(line 18, column 17)")]
    assert example.splitlines()[3][16] == "'"  # line 4, column 17: the single quote
