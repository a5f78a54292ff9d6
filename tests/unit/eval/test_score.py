"""score_file / score_main: files written, validation with line numbers, every metric x variant."""

from __future__ import annotations

import json

import pytest

from mmjobs.eval import METRICS
from mmjobs.eval.score import ScoreInputError, score_file, score_main, summary_markdown
from tests.unit.eval.conftest import write_jsonl

# One valid row set per metric (MME needs the two questions of an image).
SAMPLES = {
    "chartqa": [{"id": 1, "prediction": "12%", "answers": ["0.12"], "split": "human"},
                {"id": 2, "prediction": "7", "answers": ["8"], "split": "augmented"}],
    "vqav2": [{"id": 1, "prediction": "Two", "answers": ["2"] * 9 + ["3"]}],
    "scienceqa": [{"id": "q1", "prediction": "B", "choices": ["a", "b"], "answer": 1,
                   "subject": "social science", "grade": "grade4", "hint": "",
                   "has_image": True}],
    "mme": [{"id": 1, "prediction": "Yes", "task": "OCR", "image": "i.jpg", "gt": "yes"},
            {"id": 2, "prediction": "No", "task": "OCR", "image": "i.jpg", "gt": "no"}],
    "mmbench": [{"id": 1, "prediction": "A", "index": 3, "options": {"A": "x", "B": "y"},
                 "gt": "A"},
                {"id": 2, "prediction": "B", "index": 1_000_003, "options": {"A": "y", "B": "x"},
                 "gt": "B"}],
    "gqa": [{"id": 1, "prediction": "yes", "answer": "yes"}],
    "seedbench": [{"id": 1, "prediction": "C", "answer": "C", "question_type_id": 3}],
    "chartwiz": [{"id": 1, "prediction": "20.5", "answers": ["20"], "task": "qa"},
                 {"id": 2, "prediction": "부산", "answers": ["부산"], "task": "qa"}],
}


def test_every_metric_has_a_sample():
    assert set(SAMPLES) == set(METRICS)


@pytest.mark.parametrize(("metric", "variant"),
                         [(m, v) for m, spec in METRICS.items() for v in spec.variants])
def test_cli_runs_every_metric_and_variant(metric, variant, tmp_path, capsys):
    pred = write_jsonl(tmp_path / "pred.jsonl", SAMPLES[metric])
    out = tmp_path / "out"
    code = score_main(["--metric", metric, "--variant", variant, "--predictions", str(pred),
                       "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == metric and summary["variant"] == variant
    assert f"summary: {out / 'summary.json'}" in printed
    assert summary_markdown(metric, summary) in printed
    assert (out / "summary.md").read_text().strip() == summary_markdown(metric, summary)
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in SAMPLES[metric]]


def test_score_file_writes_files_and_returns_summary(tmp_path):
    pred = write_jsonl(tmp_path / "pred.jsonl", SAMPLES["chartqa"])
    summary = score_file("chartqa", str(pred), output=str(tmp_path / "o"))
    assert json.loads((tmp_path / "o" / "summary.json").read_text()) == summary
    assert summary["predictions"] == str(pred)
    assert summary["variant"] == "pix2struct"
    assert summary["accuracy"]["0.05"]["human"] == 1.0
    assert summary["accuracy"]["0.1"]["augmented"] == 0.0  # |7 - 8| / 8 = 0.125
    assert summary["accuracy"]["0.2"]["augmented"] == 1.0


def test_no_output_writes_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    pred = write_jsonl(work / "pred.jsonl", SAMPLES["gqa"])
    assert score_file("gqa", pred)["accuracy"] == 100.0
    assert sorted(p.name for p in work.iterdir()) == ["pred.jsonl"]


def test_markdown_tables_match_seed_layouts(tmp_path):
    chart = score_file("chartqa", write_jsonl(tmp_path / "c.jsonl", SAMPLES["chartqa"]))
    table = summary_markdown("chartqa", chart).splitlines()
    assert [c.strip() for c in table[2].split("|")[1:-1]] == ["@AP", "0.05", "0.1", "0.2"]
    assert len({len(line) for line in table[2:]}) == 1  # padded: columns line up
    assert [line.split("|")[1].strip() for line in table[4:]] == ["Human", "Augmented",
                                                                 "Averaged"]
    sqa = score_file("scienceqa", write_jsonl(tmp_path / "s.jsonl", SAMPLES["scienceqa"]))
    header = summary_markdown("scienceqa", sqa).splitlines()[2]
    assert [c.strip() for c in header.split("|")[2:-1]] == [
        "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    mme = score_file("mme", write_jsonl(tmp_path / "m.jsonl", SAMPLES["mme"]))
    text = summary_markdown("mme", mme)
    assert "| OCR " in text and "| Perception " in text and "200.00" in text


def test_malformed_rows_name_their_lines(tmp_path):
    good = SAMPLES["vqav2"][0]
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"id": 2, "answers": ["a"] * 10}),                   # no prediction
        "",                                                             # blank: not a row
        json.dumps({"id": 3, "prediction": "a", "answers": "a"}),       # answers not a list
        json.dumps([1, 2]),
        json.dumps({**good}),                                           # duplicate id 1
    ]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScoreInputError) as e:
        score_file("vqav2", pred, output=tmp_path / "out")
    errors = e.value.errors
    assert errors[0].startswith("line 2: not a JSON object")
    assert errors[1] == "line 3: missing field 'prediction'"
    assert errors[2].startswith("line 5: field 'answers': expected a list of strings")
    assert errors[3] == "line 6: expected a JSON object, got list"
    assert errors[4] == "line 7: duplicate id 1 (first on line 1)"
    assert len(errors) == 5
    assert not (tmp_path / "out").exists()


def test_error_message_lists_at_most_twenty(tmp_path):
    rows = [{"id": i, "prediction": "x"} for i in range(30)]
    with pytest.raises(ScoreInputError) as e:
        score_file("gqa", write_jsonl(tmp_path / "p.jsonl", rows))
    text = str(e.value)
    assert len(e.value.errors) == 30
    assert "line 20: missing field 'answer'" in text
    assert "line 21:" not in text
    assert "... and 10 more" in text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"metric": "nope"}, "unknown metric 'nope'"),
    ({"metric": "vqav2", "variant": "fast"}, "unknown variant 'fast' for vqav2"),
    ({"metric": "gqa", "tolerance": 0.1}, "--tolerance applies only to chartqa"),
    ({"metric": "chartqa", "tolerance": -0.1}, "must be a non-negative number"),
])
def test_bad_options(kwargs, message, tmp_path):
    pred = write_jsonl(tmp_path / "p.jsonl", SAMPLES["chartqa"])
    metric = kwargs.pop("metric")
    with pytest.raises(ScoreInputError, match=message):
        score_file(metric, pred, **kwargs)


def test_empty_file(tmp_path):
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n")
    with pytest.raises(ScoreInputError, match="no prediction rows"):
        score_file("gqa", pred)


def test_cli_bad_input_exits_1_with_the_error(tmp_path, capsys):
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "prediction": "yes"}])
    code = score_main(["--metric", "mme", "--predictions", str(pred)])
    err = capsys.readouterr().err
    assert code == 1
    assert "line 1: missing field 'task'" in err
    assert score_main(["--metric", "gqa", "--predictions", str(tmp_path / "missing.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_prints_table_without_output(tmp_path, capsys):
    pred = write_jsonl(tmp_path / "p.jsonl", SAMPLES["chartqa"])
    assert score_main(["--metric", "chartqa", "--tolerance", "0.2", "--predictions",
                       str(pred)]) == 0
    printed = capsys.readouterr().out
    assert "| @AP" in printed and "0.2" in printed and "summary:" not in printed


@pytest.mark.integration
def test_reads_and_writes_s3(tmp_path, s3_bucket):
    from mmjobs import storage

    uri = f"s3://{s3_bucket}/run/predictions.jsonl"
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in SAMPLES["mme"]))
    summary = score_file("mme", uri, output=f"s3://{s3_bucket}/run/score")
    assert summary["total"] == 200.0
    assert json.loads(storage.read_text(f"s3://{s3_bucket}/run/score/summary.json")) == summary
    assert len(storage.read_text(f"s3://{s3_bucket}/run/score/scores.jsonl").splitlines()) == 2
