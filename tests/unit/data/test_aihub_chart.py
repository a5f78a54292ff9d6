"""aihub-chart on generated AI-hub-style JSON files: every messy case and every reject reason."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.converters.aihub_chart import SUBTYPES
from mmjobs.data.records import Reject, Sample

VBAR_DIR = "text_data/text_vertical bar_standard"


def chart(sub: str, *annotations: dict[str, Any], filename: str = "C.jpg",
          **top: Any) -> dict[str, Any]:
    """An AI-hub file: image, metadata, annotations, plus top-level fields."""
    return {"image": [{"filename": filename, "width": 800, "height": 600}],
            "metadata": {"chart_main": "x", "chart_sub": sub},
            "annotations": list(annotations), **top}


def ann(data: list, x: Any = None, y: Any = None, legend: list | None = None,
        title: str = "제목", unit: str = "") -> dict[str, Any]:
    return {"title": title, "unit": unit, "axis_label": {"x_axis": x or [], "y_axis": y or []},
            "legend": legend or [], "data_label": data}


VBAR = chart("일반 세로 막대형",
             ann([[12, 15.5], [3, "4,000"]], ["2021", "2022"], "매출", ["국내", "해외"],
                 "연도별 매출", "억원"),
             filename="C_vbar.jpg", description="연도별 매출을 나타낸 차트이다.",
             summary=["국내 매출이 늘었다.", "해외는 더 늘었다."],
             qa=[{"question": "2022년 국내 매출은?", "answer": 15.5},
                 {"question": "가장 큰 값은?", "answer": "4000"}, {"question": "답 없음"}])

ACCEPTED: dict[str, Any] = {
    f"{VBAR_DIR}/vbar.json": VBAR,
    "hbar.json": chart("일반 가로 막대형", ann([[30, 20.5, 10]], "비율", ["서울", "부산", "대구"],
                                          unit="%")),
    "toplevel.json": {**chart("누적 세로 막대형"), "annotations": None, "title": "위",
                      "unit": "명", "axis_label": {"x_axis": ["a", "b"], "y_axis": ""},
                      "legend": ["남", "여"], "data_label": [[1, 2], [3, 4]]},
    "toplegend.json": chart("일반 세로 막대형", ann([[1, 2], [3, 4]], ["a", "b"]),
                            legend=["남", "여"]),
    "radar.json": chart("방사형", ann([[1, 2, 3, 4, 5], [1, 2, 3]], list("abcde"),
                                    legend=["A", "B"])),
    "mixed_same.json": chart("혼합형", ann([[10, 20]], ["1월", "2월"], legend=["방문자"],
                                         unit="명"),
                             ann([[1.5, 2.5]], ["1월", "2월"], legend=["비율"], unit="%")),
    "mixed_diff.json": chart("혼합형", ann([[10, 20]], ["1월", "2월"], legend=["방문자"]),
                             ann([[7]], ["3월"], title="둘째")),
    "firstrow.json": chart("선형", ann([["1월", "2월", "3월"], [1, 2, 3]], legend=["매출"])),
    "pie_legend.json": chart("원형", ann([[50, 30, 20]], legend=["A", "B", "C"])),
    "swapped.json": chart("일반 세로 막대형", ann([[5, 6]], "연도", ["2019", "2020"])),
    "bom.json": chart("100% 기준 누적 가로 막대형",
                      ann([["12.5%", "-"], [87.5, 100]], y=["가", "나"], legend=["p", "q"])),
    "flat.json": chart("선형", ann([1, 2], ["x", "y"])),
}
REJECTED: dict[str, tuple[Any, str]] = {
    "unknown.json": (chart("막대", ann([[1]], ["a"])),
                     f"unknown chart_sub '막대' (expected one of: {', '.join(SUBTYPES)})"),
    "nosub.json": ({**VBAR, "metadata": {}}, "missing metadata.chart_sub"),
    "noimage.json": ({**VBAR, "image": []}, "missing image[0].filename"),
    "nodata.json": (chart("선형", ann([], ["a"])), "no data: data_label is missing or empty"),
    "ragged.json": (chart("선형", ann([[1, 2, 3], [1, 2]], ["a", "b", "c"])),
                    "ragged data_label: series 2 has 2 values for 3 categories and no legend "
                    "names the series, so the missing cells cannot be placed"),
    "legendcount.json": (chart("선형", ann([[1, 2], [3, 4]], ["a", "b"], legend=["s"])),
                         "legend names 1 series but data_label has 2"),
    "nonnum.json": (chart("선형", ann([[1, "많음"]], ["a", "b"])),
                    "non-numeric value '많음' in data_label[0][1]"),
    "nocats.json": (chart("선형", ann([[1, 2]])),
                    "no category labels for 2 values (axis_label.x_axis has 0)"),
    "mixed_bad.json": (chart("혼합형", ann([[1, 2]], ["a", "b"]), ann([[1, "x"]], ["a", "b"])),
                       "annotation 2: non-numeric value 'x' in data_label[0][1]"),
    "pie_two.json": (chart("원형", ann([[1, 2], [3, 4]], ["a", "b"], legend=["s", "t"])),
                     "a pie chart has exactly one series, got 2"),
    "badjson.json": ("{", "invalid JSON: Expecting property name enclosed in double quotes: "
                          "line 1 column 2 (char 1)"),
    "array.json": ([], "not a JSON object"),
    # json.dumps writes float("nan") as NaN, which JSON forbids: the file is rejected.
    "nan.json": (chart("선형", ann([[1, math.nan]], ["a", "b"])),
                 "invalid JSON: NaN is not allowed in JSON (Python's json.dumps writes it for a "
                 "non-finite float); write null or a number"),
}


def write_tree(root: Path) -> None:
    for rel, data in {**ACCEPTED, **{k: v for k, (v, _) in REJECTED.items()}}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        path.write_text(("\ufeff" if rel == "bom.json" else "") + text, encoding="utf-8")
    (root / "img_data").mkdir()
    (root / "img_data/C.jpg").write_bytes(b"not an input")  # non-JSON files are not inputs


def run(input: str, tmp_path: Path, **options) -> tuple[list[Sample], list[Reject]]:
    ctx = ConvertContext(input=input, image_root=None, output_images=tmp_path / "unused",
                         options=options)
    out = list(get_converter("aihub-chart").fn(ctx))
    return [r for r in out if isinstance(r, Sample)], [r for r in out if isinstance(r, Reject)]


@pytest.fixture
def converted(tmp_path) -> tuple[dict[str, list[Sample]], list[Reject], Path]:
    root = tmp_path / "aihub"
    write_tree(root)
    samples, rejects = run(str(root), tmp_path)
    by_file: dict[str, list[Sample]] = {}
    for s in samples:
        by_file.setdefault(s.meta["source"], []).append(s)
    return by_file, rejects, root


def tables(by_file: dict[str, list[Sample]]) -> dict[str, str]:
    return {f: next(s for s in ss if s.meta["task"] == "table").conversations[1].content
            for f, ss in by_file.items()}


def test_every_file_is_accepted_or_rejected_once_with_its_exact_reason(converted):
    by_file, rejects, root = converted
    assert {r.row: r.reason for r in rejects} == {k: why for k, (_, why) in REJECTED.items()}
    assert all(r.source == str(root / r.row) for r in rejects)
    assert set(by_file) == set(ACCEPTED)
    assert len(by_file) + len(rejects) == len(list(root.rglob("*.json")))


def test_full_file_gives_table_description_summary_and_qa(converted):
    samples = converted[0][f"{VBAR_DIR}/vbar.json"]
    assert [s.id for s in samples] == ["vbar-table", "vbar-description", "vbar-summary",
                                       "vbar-qa1", "vbar-qa2"]  # qa3 has no answer
    table, description, summary, qa1, _ = samples
    assert table.conversations[0].content == "<image>\n이 차트를 표로 변환해 주세요."
    assert table.conversations[1].content == table.meta["table_markdown"] == (
        "TITLE | 연도별 매출\n| 분류 | 국내 (억원) | 해외 (억원) |\n| --- | --- | --- |\n"
        "| 2021 | 12 | 3 |\n| 2022 | 15.5 | 4000 |")
    assert table.images == ["img_data/img_vertical bar_standard/C_vbar.jpg"]
    assert table.meta == {"source": f"{VBAR_DIR}/vbar.json", "chart_sub": "일반 세로 막대형",
                          "chart_type": "bar", "title": "연도별 매출", "task": "table",
                          "table_markdown": table.conversations[1].content}
    assert description.conversations[1].content == "연도별 매출을 나타낸 차트이다."
    assert summary.conversations[1].content == "국내 매출이 늘었다. 해외는 더 늘었다."
    assert qa1.conversations[0].content == "<image>\n2022년 국내 매출은?"
    assert qa1.conversations[1].content == "15.5"
    assert qa1.meta["answers"] == ["15.5"] and qa1.meta["question"] == "2022년 국내 매출은?"


def test_messy_shapes_become_the_right_tables(converted):
    got = tables(converted[0])
    body = {f: t.split("\n") for f, t in got.items()}
    # Horizontal: categories from y_axis; empty legend names the series 계열1.
    assert body["hbar.json"][1:] == ["| 분류 | 계열1 (%) |", "| --- | --- |", "| 서울 | 30 |",
                                     "| 부산 | 20.5 |", "| 대구 | 10 |"]
    assert body["toplevel.json"] == ["TITLE | 위", "| 분류 | 남 (명) | 여 (명) |",
                                     "| --- | --- | --- |", "| a | 1 | 3 |", "| b | 2 | 4 |"]
    assert body["toplegend.json"][1] == "| 분류 | 남 | 여 |"
    assert body["radar.json"][-2:] == ["| d | 4 |  |", "| e | 5 |  |"]  # B padded
    assert body["mixed_same.json"][1:] == ["| 분류 | 방문자 (명) | 비율 (%) |",
                                          "| --- | --- | --- |", "| 1월 | 10 | 1.5 |",
                                          "| 2월 | 20 | 2.5 |"]
    assert got["mixed_diff.json"] == (
        "TITLE | 제목\n| 분류 | 방문자 |\n| --- | --- |\n| 1월 | 10 |\n| 2월 | 20 |\n\n"
        "TITLE | 둘째\n| 분류 | 계열2 |\n| --- | --- |\n| 3월 | 7 |")
    assert body["firstrow.json"][2:] == ["| --- | --- |", "| 1월 | 1 |", "| 2월 | 2 |",
                                         "| 3월 | 3 |"]
    assert body["pie_legend.json"][1:] == ["| 분류 | 계열1 |", "| --- | --- |", "| A | 50 |",
                                           "| B | 30 |", "| C | 20 |"]
    assert body["swapped.json"][1:] == ["| 연도 | 계열1 |", "| --- | --- |", "| 2019 | 5 |",
                                        "| 2020 | 6 |"]
    assert body["bom.json"][3:] == ["| 가 | 12.5 | 87.5 |", "| 나 |  | 100 |"]
    assert body["flat.json"][3:] == ["| x | 1 |", "| y | 2 |"]
    chart_types = {f: ss[0].meta["chart_type"] for f, ss in converted[0].items()}
    assert chart_types["bom.json"] == "stacked_hbar_100" and chart_types["radar.json"] == "radar"
    assert converted[0]["bom.json"][0].meta["chart_sub"] == "100%기준 누적 가로 막대형"


def test_templates_tasks_and_image_layout_options(tmp_path):
    root = tmp_path / "in"
    write_tree(root)
    single = str(root / VBAR_DIR / "vbar.json")
    samples, _ = run(single, tmp_path, tasks=["table", "qa"], image_layout="flat",
                     image_prefix="imgs", templates={"table": "표로!", "qa": "질문: {question}"})
    assert [s.id for s in samples] == ["vbar-table", "vbar-qa1", "vbar-qa2"]
    assert samples[0].images == ["imgs/C_vbar.jpg"]
    assert samples[0].conversations[0].content == "<image>\n표로!"
    assert samples[1].conversations[0].content == "<image>\n질문: 2022년 국내 매출은?"
    # A file with nothing for the requested tasks is a reject, so counts still reconcile.
    samples, rejects = run(str(root / "hbar.json"), tmp_path, tasks=["qa"])
    assert not samples and [(r.row, r.reason) for r in rejects] == [
        ("hbar.json", "nothing to convert: no qa content")]


def test_bad_options_are_reported_together(tmp_path):
    with pytest.raises(ValueError) as e:
        run(str(tmp_path), tmp_path, tasks=["caption"], templates={"qa": "no placeholder"},
            image_layout="tree", colour=1)
    for part in ("unknown option 'colour'", "tasks=['caption']", "templates.qa",
                 "image_layout='tree'"):
        assert part in str(e.value)


def test_chartwiz_table_format_writes_make_tabledata_text(tmp_path):
    """table_format: chartwiz gives ChartWiz's preprocess/make_tabledata.py text: with a
    legend, the category row and one `legend | v<unit>` row per series; without one,
    `label | v<unit>` rows; each annotation of a mixed chart in turn, under the first title."""
    files = {"vbar.json": VBAR, "hbar.json": ACCEPTED["hbar.json"],
             "mixed.json": ACCEPTED["mixed_diff.json"]}
    for name, data in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    samples, rejects = run(str(tmp_path / "in"), tmp_path, tasks=["table"],
                           table_format="chartwiz", image_layout="flat",
                           templates={"table": "이 차트를 테이블 정보로 변경해줘."})
    assert not rejects
    by_file = {s.meta["source"]: s.conversations[1].content for s in samples}
    assert by_file["vbar.json"] == ("TITLE | 연도별 매출\n| 2021 | 2022 \n"
                                    "국내 | 12억원 | 15.5억원 \n해외 | 3억원 | 4000억원 \n")
    assert by_file["hbar.json"] == "TITLE | 제목\n서울 | 30%\n부산 | 20.5%\n대구 | 10%\n"
    assert by_file["mixed.json"] == "TITLE | 제목\n| 1월 | 2월 \n방문자 | 10 | 20 \n3월 | 7\n"
    assert {s.conversations[0].content for s in samples} == {
        "<image>\n이 차트를 테이블 정보로 변경해줘."}
    # The markdown table stays in the sample's meta.
    assert all(s.meta["table_markdown"].startswith("TITLE") for s in samples)


def test_unknown_table_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="table_format='csv': use markdown or chartwiz"):
        run(str(tmp_path), tmp_path, table_format="csv")
