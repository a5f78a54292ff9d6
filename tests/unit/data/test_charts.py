"""ChartTable: validation, text renderings, and the code target that redraws the PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from mmjobs.data.charts import CHART_TYPES, ChartTable, Series, TableError, format_number


def sample_table(chart_type: str = "bar") -> ChartTable:
    if chart_type == "pie":
        return ChartTable("Share", "pie", ["Apple", "Pear", "Plum"],
                          [Series("2023", [50, 30.5, 19.5])])
    return ChartTable("Fruit sales", chart_type, ["Apple", "Pear", "Plum"],
                      [Series("2022", [3, 4.5, None]), Series("2023", [5, 1, 2.25])],
                      x_label="Fruit", y_label="Sales", unit="t")


def test_markdown_csv_json_renderings():
    t = sample_table()
    assert t.to_markdown() == (
        "| Fruit | 2022 (t) | 2023 (t) |\n| --- | --- | --- |\n"
        "| Apple | 3 | 5 |\n| Pear | 4.5 | 1 |\n| Plum |  | 2.25 |")
    assert t.to_markdown(category_header="분류", with_title=True).splitlines()[:2] == [
        "TITLE | Fruit sales", "| 분류 | 2022 (t) | 2023 (t) |"]
    assert t.to_csv() == "Fruit,2022 (t),2023 (t)\nApple,3,5\nPear,4.5,1\nPlum,,2.25"
    assert json.loads(t.to_json()) == {
        "title": "Fruit sales", "chart_type": "bar", "x_label": "Fruit", "y_label": "Sales",
        "unit": "t", "data": [{"category": "Apple", "2022": 3, "2023": 5},
                              {"category": "Pear", "2022": 4.5, "2023": 1},
                              {"category": "Plum", "2022": None, "2023": 2.25}]}


def test_markdown_escapes_pipes_and_newlines():
    t = ChartTable("a|b", "bar", ["x|y", "z\nw"], [Series("s", [1, 2])])
    assert t.to_markdown(with_title=True).splitlines() == [
        "TITLE | a\\|b", "| Category | s |", "| --- | --- |", "| x\\|y | 1 |", "| z w | 2 |"]


@pytest.mark.parametrize(("value", "text"), [
    (23.0, "23"), (23, "23"), (4.5, "4.5"), (-0.25, "-0.25"), (None, ""), (1e20, "1e+20"),
    (0.1 + 0.2, "0.3"),
])
def test_format_number_is_chartqa_style(value, text):
    assert format_number(value) == text


def test_dict_round_trip():
    t = sample_table()
    assert ChartTable.from_dict(t.to_dict()) == t


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"chart_type": "scatter"},
     "unknown chart_type 'scatter' (expected one of: bar, hbar, stacked_bar, stacked_hbar, "
     "line, pie)"),
    ({"categories": []}, "empty table: no categories"),
    ({"series": []}, "empty table: no series"),
    ({"series": [Series("s", [1])]}, "ragged series 's': 1 values for 2 categories"),
    ({"series": [Series("s", [1, "x"])]}, "non-numeric value 'x' in series 's' at category 'b'"),
    ({"series": [Series("s", [1, True])]},
     "non-numeric value True in series 's' at category 'b'"),
    ({"series": [Series("s", [1, float("nan")])]}, "non-finite value nan in series 's'"),
    ({"series": [Series("s", [None, None])]}, "empty table: every value is missing"),
    ({"series": [Series("s", [1, 2]), Series("s", [3, 4])]},
     "duplicate series names: ['s', 's']"),
    ({"chart_type": "pie", "series": [Series("s", [1, 2]), Series("t", [3, 4])]},
     "a pie chart has exactly one series, got 2"),
    ({"chart_type": "pie", "series": [Series("s", [1, -2])]},
     "a pie chart cannot show negative values"),
])
def test_invalid_tables_say_why(kwargs, reason):
    args = {"title": "t", "chart_type": "bar", "categories": ["a", "b"],
            "series": [Series("s", [1, 2])], **kwargs}
    with pytest.raises(TableError) as e:
        ChartTable(**args)
    assert str(e.value) == reason


def test_from_dict_reasons():
    with pytest.raises(TableError) as e:
        ChartTable.from_dict({"chart_type": "bar", "series": []})
    assert str(e.value) == "missing field 'categories'"
    with pytest.raises(TableError) as e:
        ChartTable.from_dict({"chart_type": "bar", "categories": ["a"], "series": [[1]]})
    assert str(e.value) == "series 1 is not an object with a 'values' list"
    t = ChartTable.from_dict({"chart_type": "line", "categories": [2020, 2021],
                              "series": [{"values": [1, 2]}]})
    assert t.categories == ["2020", "2021"] and t.series[0].name == "Series 1"


@pytest.mark.parametrize("chart_type", CHART_TYPES)
def test_draw_writes_exact_size_deterministic_png(tmp_path, chart_type):
    t = sample_table(chart_type)
    for name in ("a.png", "b.png"):
        t.draw(tmp_path / name, size=(224, 160), value_labels=True)
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.size == (224, 160)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_draw_leaves_no_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    sample_table("line").draw(tmp_path / "x.png")
    assert plt.get_fignums() == before


@pytest.mark.parametrize("chart_type", CHART_TYPES)
def test_plot_code_redraws_the_chart_in_a_clean_interpreter(tmp_path, chart_type):
    t = sample_table(chart_type)
    script = tmp_path / "plot.py"
    script.write_text(t.to_plot_code("out.png", value_labels=True), encoding="utf-8")
    subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    t.draw(tmp_path / "drawn.png", value_labels=True)
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (224, 224)
    # Same statements, same pixels: the code target provably redraws the image.
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "drawn.png").read_bytes()
