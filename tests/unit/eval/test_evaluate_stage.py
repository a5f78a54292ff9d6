"""The evaluate stage end to end on hand-written predictions: ChartQA with PoT programs (some
hostile), ScienceQA categories, an LLM judge on a local OpenAI-compatible server, MLflow
metrics in the embedded sqlite database, the committed output and its reuse."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from mmjobs import settings, storage
from mmjobs.eval.evaluation import predictions_file
from mmjobs.eval.metrics import ScoreInputError
from mmjobs.eval.report import evaluation_markdown, summary_metrics
from mmjobs.stages.evaluate import STAGE, EvaluateConfig, main
from tests.integration.eval.test_judge import FakeJudgeServer
from tests.unit.eval.pot_support import needs_pot_isolation

pytestmark = pytest.mark.xdist_group("pot-sandbox")  # sandboxed programs: see test_pot_hostile


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_data(run_id: str) -> tuple[dict[str, float], dict[str, str], set[str]]:
    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run_id, "plots")}
    return run.data.metrics, run.data.tags, artifacts


def chartqa_pot_rows(outside: Path) -> list[dict[str, Any]]:
    def program(code: str) -> str:
        return f"Here is the program:\n```python\n{code}\n```\n"

    return [
        {"id": "human-0", "answers": ["13"], "split": "human",
         "prediction": program("values = [10, 13, 7]\nprint(max(values))")},
        {"id": "human-1", "answers": ["Yes"], "split": "human",
         "prediction": program("while True:\n    pass")},  # endless loop
        {"id": "augmented-0", "answers": ["79.6"], "split": "augmented",
         "prediction": program(f"open({str(outside)!r}, 'w').write('pwned')\nprint(79.6)")},
        {"id": "augmented-1", "answers": ["Yes"], "split": "augmented",
         "prediction": program("print(3 > 2)")},  # True -> Yes, as ChartMoE does
        {"id": "augmented-2", "answers": ["Yes"], "split": "augmented",
         "prediction": "Yes"},  # not a program: runs as Python, NameError
    ]


@needs_pot_isolation
def test_chartqa_with_pot_scores_what_programs_print_and_survives_hostile_ones(tmp_path):
    outside = tmp_path / "outside.txt"
    preds = write_jsonl(tmp_path / "predictions.jsonl", chartqa_pot_rows(outside))
    out = tmp_path / "out"
    cfg = EvaluateConfig(experiment="eval-unit", predictions=str(preds), metric="chartqa",
                         pot={"enabled": True, "wall_s": 5.0, "cpu_s": 1}, label="w/ PoT",
                         output=str(out))
    result = main(cfg)

    assert not outside.exists()  # the hostile write never happened
    assert storage.is_committed(str(out)) and not result.cached
    scores = {s["id"]: s for s in read_jsonl(out / "scores.jsonl")}
    assert {i: s["pot"]["status"] for i, s in scores.items()} == {
        "human-0": "ok", "human-1": "timeout", "augmented-0": "forbidden", "augmented-1": "ok",
        "augmented-2": "error"}
    assert scores["human-0"]["pot"]["answer"] == "13" and scores["human-0"]["correct@0.05"] == 1
    assert scores["augmented-1"]["pot"]["answer"] == "Yes"
    assert scores["augmented-0"]["correct@0.05"] == 0.0
    assert "NameError" in scores["augmented-2"]["pot"]["detail"]

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pot"]["isolation"], summary["pot"]["executor"]) == ("bubblewrap", "local")
    assert {"bubblewrap", "seccomp", "audit-hook"} <= set(summary["pot"]["protections"])
    assert "warning" not in summary["pot"]
    acc = summary["accuracy"]["0.05"]
    assert (acc["human"], acc["augmented"]) == (0.5, pytest.approx(1 / 3))
    assert summary["pot"]["status_counts"] == {"ok": 2, "timeout": 1, "forbidden": 1,
                                               "error": 1}
    assert summary["label"] == "w/ PoT" and summary["variant"] == "pix2struct"
    assert result.summary == summary
    assert (result.headline_metric, result.headline) == ("chartqa.average_0.05",
                                                         pytest.approx((0.5 + 1 / 3) / 2))
    audit = {r["id"]: r for r in read_jsonl(out / "predictions_pot.jsonl")}
    assert audit["augmented-2"]["prediction"] == "error running..."
    assert audit["human-0"]["program"] == "\nvalues = [10, 13, 7]\nprint(max(values))\n"

    md = (out / "summary.md").read_text()
    assert md.startswith("### w/ PoT\n\n**ChartQA relaxed accuracy**")
    assert "| Human     | 0.5000 | 0.5000 | 0.5000 |" in md
    assert "| Augmented | 0.3333 | 0.3333 | 0.3333 |" in md
    assert "**Program of thought**: 5 programs, 40.0% ran to completion" in md
    assert "| forbidden  |        1 |" in md
    assert (out / "categories.png").stat().st_size > 1000

    metrics, tags, artifacts = run_data(result.mlflow_run_id)
    assert metrics["chartqa.human_0.05"] == 0.5
    assert metrics["chartqa.augmented_0.2"] == pytest.approx(1 / 3)
    assert {"chartqa.average_0.1", "chartqa.overall_0.05", "pot.ok_rate", "pot.timeout",
            "pot.forbidden"} <= set(metrics)
    assert tags["label"] == "w/ PoT" and tags["metric"] == "chartqa" and tags["pot"] == "true"
    assert tags["headline_metric"] == "chartqa.average_0.05"
    assert {"summary.md", "summary.json", "config.yaml", "plots/categories.png"} <= artifacts
    assert summary_metrics(summary) == {k: v for k, v in metrics.items()}
    assert evaluation_markdown(summary) + "\n" == md

    # Same predictions and config: the committed output is reused.
    again = main(cfg)
    assert again.cached and again.summary == summary
    assert run_data(again.mlflow_run_id)[0]["chartqa.human_0.05"] == 0.5


def test_chartqa_custom_tolerances_and_variant_without_pot(tmp_path):
    rows = [{"id": "h", "answers": ["100"], "split": "human", "prediction": "108"},
            {"id": "a", "answers": ["-5%"], "split": "augmented", "prediction": "5"}]
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    result = main(EvaluateConfig(predictions=str(preds), metric="chartqa", variant="chartmoe",
                                 tolerances=[0.1], output=str(tmp_path / "out")))
    assert result.summary["tolerances"] == ["0.1"]
    assert result.summary["accuracy"]["0.1"]["human"] == 1.0
    assert result.summary["accuracy"]["0.1"]["augmented"] == 1.0  # ChartMoE ignores signs
    assert "pot" not in read_jsonl(tmp_path / "out" / "scores.jsonl")[0]


def scienceqa_rows() -> list[dict[str, Any]]:
    base = {"choices": ["a", "b"], "answer": 1}
    return [
        {**base, "id": "1", "prediction": "B", "subject": "natural science", "grade": "grade3",
         "hint": "", "has_image": True},
        {**base, "id": "2", "prediction": "A", "subject": "social science", "grade": "grade8",
         "hint": "ctx", "has_image": False},
        {**base, "id": "3", "prediction": "The answer is B.", "subject": "language science",
         "grade": "grade11", "hint": "", "has_image": False},
    ]


def test_scienceqa_category_table_and_metrics(tmp_path):
    preds = write_jsonl(tmp_path / "infer" / "predictions.jsonl", scienceqa_rows())
    storage.commit_dir(str(tmp_path / "infer"))  # an infer stage's committed output
    result = main(EvaluateConfig(predictions=str(tmp_path / "infer"), metric="scienceqa",
                                 label="trained", output=str(tmp_path / "out")))
    assert result.summary["predictions"] == str(preds)
    acc = result.summary["accuracy"]
    assert (acc["NAT"], acc["SOC"], acc["LAN"], acc["IMG"], acc["NO"]) == (
        100.0, 0.0, 100.0, 100.0, 100.0)
    assert acc["Avg"] == pytest.approx(200 / 3)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| ScienceQA |    NAT |  SOC |    LAN |  TXT |    IMG |     NO |   G1-6 | G7-12 " \
           "|   Avg |" in md
    assert "| Accuracy  | 100.00 | 0.00 | 100.00 | 0.00 | 100.00 | 100.00 | 100.00 | 50.00 " \
           "| 66.67 |" in md
    metrics, tags, _ = run_data(result.mlflow_run_id)
    assert metrics["scienceqa.IMG"] == 100.0 and metrics["scienceqa.G7-12"] == 50.0
    assert tags["headline_metric"] == "scienceqa.Avg"
    assert result.headline == pytest.approx(200 / 3)


def test_bad_rows_fail_the_stage_and_commit_nothing(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "B"}])
    out = tmp_path / "out"
    with pytest.raises(ScoreInputError, match="line 1: missing field 'choices'"):
        main(EvaluateConfig(predictions=str(preds), metric="scienceqa", output=str(out)))
    assert not storage.is_committed(str(out))


def test_predictions_inputs(tmp_path):
    write_jsonl(tmp_path / "half" / "predictions.jsonl", scienceqa_rows())
    with pytest.raises(storage.IncompleteDirectoryError, match="infer stage that writes it "
                                                               "did not finish"):
        predictions_file(str(tmp_path / "half"))
    with pytest.raises(storage.StoreNotFoundError, match="no predictions"):
        predictions_file(str(tmp_path / "nothing"))
    assert predictions_file(str(tmp_path / "half" / "predictions.jsonl")) == str(
        tmp_path / "half" / "predictions.jsonl")


def test_config_errors_are_reported_together(tmp_path, capsys):
    code = STAGE.cli(["--set", "predictions=p.jsonl", "--set", "metric=gqa", "--set", "pot=true",
                      "--set", "tolerances=[0.1]", "--set", "variant=nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert "variant 'nope' is not a variant of gqa; choose one of official, llava" in err
    assert "tolerances apply to metric chartqa only, not gqa" in err
    assert "pot applies to metric chartqa (ChartMoE's PoT), not gqa" in err
    assert STAGE.cli(["--set", "predictions=p.jsonl"]) == 2
    assert "set metric (e.g. metric=chartqa), judge, or both" in capsys.readouterr().err
    assert STAGE.cli(["--set", "predictions=p.jsonl", "--set", "metric=chartqaa"]) == 2
    assert "metric 'chartqaa' is unknown; choose one of chartqa" in capsys.readouterr().err


def test_cli_prints_the_result(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", scienceqa_rows())
    code = STAGE.cli(["--set", f"predictions={preds}", "--set", "metric=scienceqa",
                      "--set", f"output={tmp_path / 'out'}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["headline_metric"] == "scienceqa.Avg" and result["metric"] == "scienceqa"


# --------------------------------------------------------------------------- judge


@pytest.fixture
def judge_server(monkeypatch) -> Iterator[FakeJudgeServer]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-unit-test")
    server = FakeJudgeServer().start()
    yield server
    server.stop()


def test_judge_single_with_a_metric(tmp_path, judge_server):
    rows = [{"id": "1", "prompt": "What color are the shorts?", "prediction": "GOOD: black",
             "answer": "black"},
            {"id": "2", "prompt": "Is it raining?", "prediction": "No.", "answer": "no"}]
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    judge = {"base_url": judge_server.base_url, "model": "judge-1",
             "api_key_env": "MY_JUDGE_KEY"}  # the brief's name, accepted as an alias of key_env
    result = main(EvaluateConfig(predictions=str(preds), metric="gqa", variant="llava",
                                 judge=judge, output=str(tmp_path / "out")))
    assert result.summary["accuracy"] == 50.0  # "GOOD: black" != "black"; "No." -> "no"
    judged = result.summary["judge"]
    assert (judged["mode"], judged["rows"], judged["judged"]) == ("single", 2, 2)
    assert judged["mean_score"] == 6.0  # 9 and 3
    assert judge_server.seen[0].headers["Authorization"] == "Bearer sk-unit-test"
    records = read_jsonl(tmp_path / "out" / "judge" / "judgments.jsonl")
    assert [r["score"] for r in records] == [9.0, 3.0]
    metrics, _, _ = run_data(result.mlflow_run_id)
    assert metrics["judge.mean_score"] == 6.0 and metrics["gqa.accuracy"] == 50.0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "**LLM judge** (`judge-1`, single)" in md


def test_judge_pairwise_against_a_baseline(tmp_path, judge_server):
    trained = write_jsonl(tmp_path / "trained.jsonl", [
        {"id": i, "prompt": f"Draw a chart {i}", "prediction": f"GOOD chart {i}"}
        for i in ("a", "b")])
    untrained = write_jsonl(tmp_path / "untrained.jsonl", [
        {"id": i, "prompt": f"Draw a chart {i}", "prediction": f"weak chart {i}"}
        for i in ("b", "a")])
    result = main(EvaluateConfig(
        predictions=str(trained), label="trained", output=str(tmp_path / "out"),
        judge={"base_url": judge_server.base_url, "model": "judge-1", "mode": "pairwise",
               "baseline": str(untrained), "cache": False}))
    judged = result.summary["judge"]
    assert (judged["wins_a"], judged["wins_b"], judged["ties"]) == (2, 0, 0)
    assert judged["win_rate_a_excluding_ties"] == 1.0
    assert len(judge_server.seen) == 4  # both orders of both pairs
    assert result.metric is None and result.scores == ""
    assert (result.headline_metric, result.headline) == ("judge.win_rate_a_excluding_ties", 1.0)
    metrics, tags, _ = run_data(result.mlflow_run_id)
    assert metrics["judge.wins_a"] == 2.0 and tags["metric"] == "judge"
