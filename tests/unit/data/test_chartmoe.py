"""The `chartmoe` converter: ChartMoE / InternLM-XComposer2 JSON -> canonical samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import Reject


def run(path: Path, **options: Any) -> tuple[list[Any], list[Reject]]:
    ctx = ConvertContext(input=str(path), image_root=None, output_images=path.parent / "images",
                         options=options)
    out = list(get_converter("chartmoe").fn(ctx))
    return [o for o in out if not isinstance(o, Reject)], [o for o in out if isinstance(o, Reject)]


def turn(role: str, value: Any) -> dict[str, Any]:
    return {"from": role, "value": value}


ROWS: list[Any] = [
    {"id": "0", "image": ["ChartMoE-Align/table/0.png"], "task": "table",
     "conversations": [turn("user", "<ImageHere> Convert the chart to a table. "),
                       turn("assistant", " | year | sales |\n| 2020 | 3 | ")]},
    {"id": "1", "image": "ChartMoE-Align/json/1.png",
     "conversations": [turn("human", "<ImageHere>Give JSON."), turn("gpt", "{\"a\": 1}")]},
    {"id": "2", "conversations": [turn("user", "What is a pie chart?"),
                                  turn("assistant", "A circle split into slices.")]},
    {"id": "3", "image": [], "conversations": [turn("user", "x"), turn("robot", "y")]},
    {"image": ["a.png"], "conversations": [turn("user", "<ImageHere>"), turn("assistant", "y")]},
    {"id": "5", "image": ["a.png"], "conversations": "not a list"},
]


def test_chartmoe_rows_map_placeholder_roles_and_image_lists(tmp_path):
    path = tmp_path / "table_align.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    samples, rejects = run(path)

    assert [s.model_dump() for s in samples] == [
        {"id": "0", "images": ["ChartMoE-Align/table/0.png"],
         "meta": {"source": "chartmoe", "task": "table"},
         "conversations": [{"role": "user", "content": "<image> Convert the chart to a table."},
                           {"role": "assistant", "content": "| year | sales |\n| 2020 | 3 |"}]},
        {"id": "1", "images": ["ChartMoE-Align/json/1.png"], "meta": {"source": "chartmoe"},
         "conversations": [{"role": "user", "content": "<image>Give JSON."},
                           {"role": "assistant", "content": "{\"a\": 1}"}]},
        {"id": "2", "images": [], "meta": {"source": "chartmoe"},
         "conversations": [{"role": "user", "content": "What is a pie chart?"},
                           {"role": "assistant", "content": "A circle split into slices."}]},
    ]
    assert [(r.row, r.reason) for r in rejects] == [
        ("3", "conversations[1] has unknown role 'robot' "
              "(expected one of: user, human, assistant, gpt, system)"),
        ("table_align.json[4]", "missing id"),
        ("5", "missing or empty conversations"),
    ]
    assert len(samples) + len(rejects) == len(ROWS)


def test_chartmoe_id_prefix_and_custom_placeholder(tmp_path):
    path = tmp_path / "code.jsonl"
    row = {"id": "0", "image": ["c.png"],
           "conversations": [turn("user", "<img> plot code?"), turn("assistant", "plt.bar()")]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    samples, rejects = run(path, id_prefix="code-", placeholder="<img>")
    assert rejects == []
    assert samples[0].id == "code-0"
    assert samples[0].conversations[0].content == "<image> plot code?"
