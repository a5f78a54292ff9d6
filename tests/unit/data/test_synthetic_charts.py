"""synthetic-charts: determinism, schema, question answers, held-out split, options."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from mmjobs.data.charts import ChartTable, Series
from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.converters.synthetic_charts import QUESTION_TYPES, questions, split_of
from mmjobs.data.records import JsonlWriter, Sample, iter_records


def run(out: Path, seed: int = 0, **options) -> list[Sample]:
    ctx = ConvertContext(input=None, image_root=None, output_images=out / "images",
                         options=options, seed=seed)
    records = list(get_converter("synthetic-charts").fn(ctx))
    with JsonlWriter(out / "samples.jsonl") as w:
        for r in records:
            w.write(r)
    return records


def test_registered_as_drawing_converter():
    conv = get_converter("synthetic-charts")
    assert conv.draws_images and conv.kind == "sample"


def test_same_seed_gives_byte_identical_jsonl_and_images(tmp_path):
    a, b, c = (run(tmp_path / n, seed=s, num=6) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    jsonl = [(tmp_path / n / "samples.jsonl").read_bytes() for n in ("a", "b")]
    assert jsonl[0] == jsonl[1]
    images = sorted(p.name for p in (tmp_path / "a/images").iterdir())
    assert len(images) == 6
    for name in images:
        assert (tmp_path / "a/images" / name).read_bytes() == \
            (tmp_path / "b/images" / name).read_bytes()
    assert [r.conversations for r in a] != [r.conversations for r in c]
    assert len(a) == len(b) and len(c) > 0


def test_a_larger_num_extends_without_changing_earlier_charts(tmp_path):
    small, large = run(tmp_path / "s", num=2), run(tmp_path / "l", num=4)
    assert small == large[:len(small)]


def test_sample_schema_and_images(tmp_path):
    records = run(tmp_path, num=8, image_size=[160, 120])
    assert list(iter_records(tmp_path / "samples.jsonl")) == records
    charts = {r.meta["chart_id"] for r in records}
    assert len(charts) == 8 and len({r.id for r in records}) == len(records)
    for r in records:
        chart_id = r.meta["chart_id"]
        assert r.images == [f"images/{chart_id}.png"]
        assert r.conversations[0].role == "user"
        assert r.conversations[0].content.startswith("<image>\n")
        assert r.meta["split"] in ("train", "test")
        assert r.meta["chart_type"] in ("bar", "hbar", "line", "pie")
        if r.meta["task"] == "table":
            assert r.conversations[1].content == r.meta["table_markdown"]
            assert r.conversations[1].content.startswith("| ")
        else:
            assert r.meta["task"] == "qa" and r.meta["question_type"] in QUESTION_TYPES
            assert r.conversations[1].content == r.meta["answer"] == r.meta["answers"][0]
            assert set(r.meta) >= {"question", "chart_type", "split", "chart_id"}
    with Image.open(tmp_path / "images" / f"{sorted(charts)[0]}.png") as im:
        assert im.size == (160, 120)
    # Every sample of a chart shares its split.
    splits = {(r.meta["chart_id"], r.meta["split"]) for r in records}
    assert len(splits) == len(charts)


def test_questions_answer_from_the_table():
    t = ChartTable("T", "bar", ["Apple", "Pear", "Plum"],
                   [Series("2022", [3, 4.5, 1]), Series("2023", [5, 1, 2])])
    got = {q: (text, a) for q, text, a, _ in questions(t, random.Random(0), list(QUESTION_TYPES))}
    assert got["chart_type"] == ("What type of chart is this?", "bar")
    assert got["num_categories"] == ("How many groups of bars are there?", "3")
    assert got["num_series"] == ("How many data series are shown?", "2")
    assert got["max_label"] == ("Which category has the largest value of 2022?", "Pear")
    assert got["min_label"] == ("Which category has the smallest value of 2022?", "Plum")
    assert got["max_value"] == ("What is the largest value of 2022?", "4.5")
    text, answer = got["value"]
    values = dict(zip(t.categories, ["3", "4.5", "1"], strict=True))
    prefix = "What is the value of 2022 for "
    assert text.startswith(prefix) and answer == values[text[len(prefix):-1]]
    pie = ChartTable("T", "pie", ["a", "b"], [Series("s", [1.5, 4])])
    got = {q: a for q, _, a, _ in questions(pie, random.Random(0), list(QUESTION_TYPES))}
    assert "num_series" not in got  # a pie always has one
    assert got["chart_type"] == "pie" and got["difference"] == "2.5"


def test_question_types_and_kinds_restrict_the_output(tmp_path):
    records = run(tmp_path, num=3, kinds=["qa"], question_types=["chart_type", "num_categories"])
    assert {r.meta["question_type"] for r in records} == {"chart_type", "num_categories"}
    assert len(records) == 6


def test_split_is_a_stable_hash_near_the_fraction():
    splits = [split_of(0, i, 0.2) for i in range(2000)]
    assert 0.17 < splits.count("test") / len(splits) < 0.23
    assert splits == [split_of(0, i, 0.2) for i in range(2000)]
    assert {split_of(0, i, 0.0) for i in range(50)} == {"train"}
    assert {split_of(0, i, 1.0) for i in range(50)} == {"test"}


def test_bad_options_are_reported_together(tmp_path):
    with pytest.raises(ValueError) as e:
        run(tmp_path, num=-1, test_fraction=2, kinds=["table", "caption"], image_size=5, colour=1)
    message = str(e.value)
    for part in ("unknown option 'colour'", "num=-1", "test_fraction=2", "kinds=",
                 "image_size=5"):
        assert part in message
