"""ChartMoE data mixes as the converter's input: ChartMoE's `chartmoe/train` layout (mixes in
`data/*.txt`, paths relative to `chartmoe/train`), rows in ChartMoE-Data's format (image LIST,
`<ImageHere>`, user/assistant), drawn as ChartMoE's train.py draws them (N x 1000 rows)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmjobs.data.converters.chartmoe import draw_counts, mix_base
from tests.real_data import placeholder_images, real
from tests.unit.data._real import prepare


def chartmoe_rows(kind: str, n: int) -> list[dict]:
    """Rows as ChartMoE-Data's JSON has them (README "Data Format", as valid JSON)."""
    return [{"id": str(i), "image": [f"data/ChartMoE-Align/{kind}/{i}.png"],
             "conversations": [
                 {"from": "user", "value": f"<ImageHere> Convert the chart to {kind}. "},
                 {"from": "assistant", "value": f"{kind} answer {i}"}]}
            for i in range(n)]


def train_dir(tmp_path: Path, files: dict[str, list], mix: str, name: str = "sft.txt") -> Path:
    """`chartmoe/train` with `data/<file>.json`, the mix `data/<name>` (no trailing newline,
    as committed) and the images the rows name; returns the mix path."""
    root = tmp_path / "chartmoe" / "train"
    (root / "data").mkdir(parents=True)
    for file, rows in files.items():
        (root / "data" / file).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    names = {img for rows in files.values() for row in rows if isinstance(row, dict)
             for img in row.get("image", [])}
    placeholder_images(root, names)
    mix_path = root / "data" / name
    mix_path.write_text(mix, encoding="utf-8")
    return mix_path


def test_sft_mix_pads_short_files_and_takes_all_of_minus_one(tmp_path):
    """sft.txt's shape (`chartqa.json N` / `chartgemma.json -1`), with N in thousands: 0.007
    asks 7 rows of a 3-row file (all 3 plus 4 random duplicates), -1 takes all 4."""
    mix = train_dir(tmp_path, {"chartqa.json": chartmoe_rows("table", 3),
                               "chartgemma.json": chartmoe_rows("json", 4)},
                    "./data/chartqa.json 0.007\n./data/chartgemma.json -1")
    root = mix.parent.parent
    records, rejects = prepare("chartmoe", mix, root, tmp_path)
    assert rejects == []
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 7 + 4
    by_file = Counter(r.meta["mix_file"] for r in records)
    assert by_file == {"./data/chartqa.json": 7, "./data/chartgemma.json": 4}
    chartqa = [i for i in ids if i.startswith("chartqa:")]
    assert {i.split("#")[0] for i in chartqa} == {"chartqa:0", "chartqa:1", "chartqa:2"}
    assert sum("#" in i for i in chartqa) == 4  # the duplicates, numbered per copy
    assert [i for i in ids if i.startswith("chartgemma:")] == [f"chartgemma:{n}"
                                                                for n in range(4)]
    first = records[0]
    assert first.images == ["data/ChartMoE-Align/table/0.png"]
    assert first.conversations[0].content == "<image> Convert the chart to table."
    # the same seed draws the same rows
    again, _ = prepare("chartmoe", mix, root, tmp_path)
    assert [r.id for r in again] == ids


def test_align_mix_samples_without_replacement(tmp_path):
    """table_align.txt's shape: one file, more rows than asked: a sample, no duplicates."""
    mix = train_dir(tmp_path, {"chart2table.json": chartmoe_rows("table", 10)},
                    "./data/chart2table.json 0.004", name="table_align.txt")
    records, rejects = prepare("chartmoe", mix, mix.parent.parent, tmp_path,
                               id_prefix="table/")
    assert rejects == []
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 4 and all(i.startswith("table/chart2table:")
                                                  for i in ids)
    assert not any("#" in i for i in ids)


def test_bad_rows_are_rejected_once_per_draw_and_counts_reconcile(tmp_path):
    rows = [*chartmoe_rows("code", 2), {"id": "2", "image": ["x.png"]}]  # no conversations
    mix = train_dir(tmp_path, {"chart2code.json": rows}, "./data/chart2code.json -1",
                    name="code_align.txt")
    records, rejects = prepare("chartmoe", mix, mix.parent.parent, tmp_path)
    assert [r.id for r in records] == ["chart2code:0", "chart2code:1"]
    assert [(r.row, r.source.rsplit("/", 1)[1]) for r in rejects] == [("2", "chart2code.json")]
    assert "conversations" in rejects[0].reason


def test_the_real_mix_files_name_their_missing_data(tmp_path):
    """ChartMoE's committed sft.txt, in its folder without the JSON files next to it: the
    conversion stops before any output, naming the first file it cannot read."""
    train = tmp_path / "chartmoe" / "train"
    (train / "data").mkdir(parents=True)
    mix = train / "data" / "sft.txt"
    mix.write_bytes(real("chartmoe/train_data_mix/sft.txt").read_bytes())
    with pytest.raises(Exception, match=r"chartmoe/train/data/chartqa\.json"):
        prepare("chartmoe", mix, train, tmp_path)


def test_mix_options_and_paths_are_checked(tmp_path):
    mix = train_dir(tmp_path, {"a.json": chartmoe_rows("table", 1)}, "../../a.json 1")
    with pytest.raises(ValueError, match="leaves the base folder"):
        prepare("chartmoe", mix, mix.parent.parent, tmp_path)
    empty = train_dir(tmp_path / "e", {"a.json": []}, "./data/a.json 1")
    with pytest.raises(ValueError, match=r"line 1: .*a\.json has no rows to draw 1000 from"):
        prepare("chartmoe", empty, empty.parent.parent, tmp_path)
    single = mix.parent / "a.json"
    with pytest.raises(ValueError, match=r"mix_base apply to a data-mix \.txt input only"):
        prepare("chartmoe", single, mix.parent, tmp_path, mix_base="..")
    assert mix_base("/x/train/data/sft.txt", "..") == "/x/train"
    assert mix_base("s3://b/train/data/sft.txt", "..") == "s3://b/train"
    assert mix_base("s3://b/train/data/sft.txt", "s3://c/t") == "s3://c/t"
    with pytest.raises(ValueError, match="leaves the bucket"):
        mix_base("s3://b/sft.txt", "..")


def test_draw_counts_follow_train_py():
    import random

    rng = random.Random(0)
    assert draw_counts(5, 5, rng) == [1] * 5
    padded = draw_counts(3, 70, rng)
    assert sum(padded) == 70 and min(padded) >= 1
    sampled = draw_counts(10, 4, rng)
    assert sum(sampled) == 4 and max(sampled) == 1
    assert draw_counts(0, 0, rng) == []
