"""AI-hub chart annotations: no real file is public (aihub_chart/SCHEMA.md, notes read off
ChartWiz's code). What the notes state is checked against the `aihub-chart` converter."""

from __future__ import annotations

import json
import re

from mmjobs.data.converters.aihub_chart import SUBTYPES
from tests.real_data import placeholder_images, real
from tests.unit.data._real import prepare

SCHEMA = real("aihub_chart/SCHEMA.md").read_text(encoding="utf-8")


def test_every_chart_sub_chartwiz_handles_is_known():
    listed = SCHEMA.split("`chart_sub` values handled by V1:", 1)[1].split("\n\n", 1)[0]
    values = re.findall(r"`([^`]+)`", listed)
    assert len(values) == 10
    known = {re.sub(r"\s+", "", name) for name in SUBTYPES}
    assert {re.sub(r"\s+", "", v) for v in values} <= known


def test_schema_layout_maps_text_folders_to_image_folders(tmp_path):
    """`{split}/text_data/text_<type>/*.json` pairs with `{split}/img_data/img_<type>/` (folder
    names with a space), and a horizontal bar's categories are on the y axis."""
    folder = "horizontal bar_standard"
    assert f"`{folder}`" in SCHEMA
    chart = {"image": [{"filename": "C_1.jpg", "width": 800, "height": 600}],
             "metadata": {"chart_main": "가로 막대형", "chart_sub": "일반 가로 막대형"},
             "annotations": [{"title": "매출", "unit": "억원", "legend": [],
                              "axis_label": {"x_axis": [], "y_axis": ["2021", "2022"]},
                              "data_label": [[12, 15]]}],
             "description": "연도별 매출.", "summary": ["늘었다."]}
    text = tmp_path / "train" / "text_data" / f"text_{folder}"
    text.mkdir(parents=True)
    (text / "C_1.json").write_text(json.dumps(chart, ensure_ascii=False), encoding="utf-8")
    root = placeholder_images(tmp_path / "train", [f"img_data/img_{folder}/C_1.jpg"])
    samples, rejects = prepare("aihub-chart", tmp_path / "train", root, tmp_path,
                               tasks=["table"])
    assert rejects == [] and samples[0].images == [f"img_data/img_{folder}/C_1.jpg"]
    table = samples[0].conversations[1].content
    assert "| 2021 | 12 |" in table and "| 2022 | 15 |" in table
