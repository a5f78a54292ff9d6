"""chart-align: the three ChartMoE targets, from generated or given tables, and exact rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmjobs.data.charts import ChartTable
from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import MalformedInputError, Reject, Sample

GOOD = {"id": "c1", "title": "Fruit sales", "chart_type": "bar", "categories": ["Apple", "Pear"],
        "series": [{"name": "2023", "values": [3, 4.5]}], "x_label": "Fruit", "unit": "t"}


def run(tmp_path: Path, input: str | None = None, image_root: str | None = None,
        **options) -> tuple[list[Sample], list[Reject]]:
    ctx = ConvertContext(input=input, image_root=image_root, output_images=tmp_path / "images",
                         options=options, seed=3)
    out = list(get_converter("chart-align").fn(ctx))
    return [r for r in out if isinstance(r, Sample)], [r for r in out if isinstance(r, Reject)]


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
                    encoding="utf-8")
    return str(path)


def test_generated_tables_give_one_sample_per_target(tmp_path):
    samples, rejects = run(tmp_path, num=2)
    assert not rejects and len(samples) == 6
    assert [s.meta["target"] for s in samples[:3]] == ["table", "json", "code"]
    assert [s.conversations[0].content for s in samples[:3]] == [
        "<image>\nConvert the chart to a table.", "<image>\nConvert the chart to JSON.",
        "<image>\nWrite python code that draws this chart."]
    chart_id = samples[0].meta["chart_id"]
    assert chart_id == "align-s3-000000" and samples[0].id == f"{chart_id}-table"
    assert samples[0].images == [f"images/{chart_id}.png"]
    assert (tmp_path / "images" / f"{chart_id}.png").is_file()
    assert all(s.meta["drawn"] and s.meta["task"] == "chart_align" for s in samples)
    data = json.loads(samples[1].conversations[1].content)
    assert set(data) == {"title", "chart_type", "x_label", "y_label", "unit", "data"}
    assert "fig.savefig('chart.png'" in samples[2].conversations[1].content


def test_input_rows_and_every_reject_reason(tmp_path):
    src = tmp_path / "in"
    (src / "png").mkdir(parents=True)
    (src / "png/c2.png").write_bytes(b"\x89PNG fake")
    rows = [
        GOOD,
        {**GOOD, "id": "c2", "image": "png/c2.png"},
        {**GOOD, "id": "ragged", "series": [{"name": "a", "values": [1]}]},
        {**GOOD, "id": "text", "series": [{"name": "a", "values": [1, "many"]}]},
        {**GOOD, "id": "empty", "categories": [], "series": []},
        {**GOOD, "id": "noseries", "series": []},
        {**GOOD, "id": "scatter", "chart_type": "scatter"},
        {**GOOD, "id": "nofile", "image": "png/missing.png"},
        {**GOOD, "id": "escape", "image": "../secret.png"},
        {"title": "no id, no chart_type", "categories": ["a"], "series": []},
        "{not json",
        "[1, 2]",
    ]
    uri = write_jsonl(src / "tables.jsonl", rows)
    samples, rejects = run(tmp_path, input=uri)
    assert {r.row: r.reason for r in rejects} == {
        "ragged": "ragged series 'a': 1 values for 2 categories",
        "text": "non-numeric value 'many' in series 'a' at category 'Pear'",
        "empty": "empty table: no categories",
        "noseries": "empty table: no series",
        "scatter": "unknown chart_type 'scatter' (expected one of: bar, hbar, stacked_bar, "
                   "stacked_hbar, line, pie)",
        "nofile": f"image not found: {src / 'png/missing.png'}",
        "escape": "unsafe image path '../secret.png' (must be relative, without '..')",
        "tables.jsonl:10": "missing field 'chart_type'",
        "tables.jsonl:11": "invalid JSON: Expecting property name enclosed in double quotes "
                           "at column 2",
        "tables.jsonl:12": "row is not a JSON object",
    }
    assert all(r.source == uri for r in rejects)
    assert len({s.meta["chart_id"] for s in samples}) + len(rejects) == len(rows)
    by_id = {s.id: s for s in samples}
    assert by_id["c1-table"].images == ["images/c1.png"] and by_id["c1-code"].meta["drawn"]
    # A given image is copied under images/, keeping one image root for the dataset.
    assert by_id["c2-json"].images == ["images/png/c2.png"] and not by_id["c2-json"].meta["drawn"]
    assert (tmp_path / "images/png/c2.png").read_bytes() == b"\x89PNG fake"
    table = ChartTable.from_dict(GOOD)
    assert by_id["c1-table"].conversations[1].content == table.to_markdown()
    assert by_id["c1-json"].conversations[1].content == table.to_json()
    assert by_id["c1-code"].conversations[1].content == table.to_plot_code(value_labels=True)


def test_nan_value_rejects_its_row_and_a_cut_last_line_fails(tmp_path):
    rows = [GOOD, {**GOOD, "id": "nan", "series": [{"name": "s", "values": [1, float("nan")]}]},
            {**GOOD, "id": "c3"}]
    path = write_jsonl(tmp_path / "tables.jsonl", rows)
    samples, rejects = run(tmp_path, path, targets=["table"])
    assert [s.id for s in samples] == ["c1-table", "c3-table"]
    assert [(r.row, r.reason.split(" (")[0]) for r in rejects] == \
        [("nan", "invalid JSON: NaN is not allowed in JSON")]
    Path(path).write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:30], encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"tables.jsonl: line 2 \(the last\) has no "
                                                  r"newline"):
        run(tmp_path, path, targets=["table"])


def test_directory_input_csv_tables_custom_prompts_and_targets(tmp_path):
    write_jsonl(tmp_path / "in/a.jsonl", [GOOD])
    write_jsonl(tmp_path / "in/sub/b.jsonl", [{**GOOD, "id": "c9"}])
    (tmp_path / "in/readme.txt").write_text("not a table")
    samples, rejects = run(tmp_path, input=str(tmp_path / "in"), targets=["table"],
                           table_format="csv", prompts={"table": "Table, please."})
    assert not rejects and [s.id for s in samples] == ["c1-table", "c9-table"]
    assert samples[0].conversations[0].content == "<image>\nTable, please."
    assert samples[0].conversations[1].content == "Fruit,2023 (t)\nApple,3\nPear,4.5"


def test_bad_options_are_reported_together(tmp_path):
    uri = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(ValueError) as e:
        run(tmp_path, input=uri, num=3, targets=["svg"], table_format="html", prompts={"x": 1})
    for part in ("num: generate tables (num) or read an input, not both", "targets=['svg']",
                 "table_format='html'", "prompts="):
        assert part in str(e.value)
