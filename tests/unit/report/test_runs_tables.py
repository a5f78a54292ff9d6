"""Summaries rebuilt from MLflow metrics, sweep settings, run names, cross-run tables, and a
report over hundreds of in-memory runs (no MLflow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmjobs.eval.report import ap_table, results_table, scienceqa_table, summary_metrics
from mmjobs.report import Collected, ReportOptions, RunRecord, RunSet, build_report
from mmjobs.report.runs import headline_of, summary_of
from mmjobs.report.tables import main_results_table, run_summary_table

CHARTQA = {"metric": "chartqa", "unit": "fraction", "tolerances": ["0.05", "0.1", "0.2"],
           "accuracy": {t: {"human": h, "augmented": a, "average": (h + a) / 2,
                            "overall": (h + a) / 2}
                        for t, h, a in (("0.05", 0.704, 0.9056), ("0.1", 0.7376, 0.9192),
                                        ("0.2", 0.772, 0.9352))}}
SCIENCEQA = {"metric": "scienceqa", "unit": "percent",
             "accuracy": dict(zip(("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12",
                                   "Avg"),
                                  (88.45, 94.71, 84.82, 87.59, 86.37, 87.8, 90.2, 86.35, 88.82),
                                  strict=True))}
MME = {"metric": "mme", "unit": "score", "perception": 1511.0, "cognition": 303.0,
       "total": 1814.0, "tasks": {"OCR": {"score": 140.0, "acc": 72.5, "acc_plus": 67.5},
                                  "code_reasoning": {"score": 60.0, "acc": 40.0,
                                                     "acc_plus": 20.0}}}
MMBENCH = {"metric": "mmbench", "unit": "percent", "accuracy": 67.18,
           "per_category": {"OCR": 70.0, "attribute_reasoning": 60.5}}


def record(run_id: str, summary: dict[str, Any] | None = None, *, parent: str = "p1",
           label: str | None = None, params: dict[str, str] | None = None,
           stage: str = "evaluate", start: int = 0) -> RunRecord:
    tags = {"stage": stage, "mlflow.parentRunId": parent}
    if summary is not None:
        tags["metric"] = summary["metric"]
    if label:
        tags["label"] = label
    return RunRecord(run_id=run_id, name=stage, start_time=start, tags=tags,
                     params=params or {},
                     metrics=summary_metrics(summary) if summary is not None else {})


@pytest.mark.parametrize("summary", [CHARTQA, SCIENCEQA, MME, MMBENCH],
                         ids=lambda s: s["metric"])
def test_summaries_rebuilt_from_metrics_give_the_same_tables(summary) -> None:
    rebuilt = summary_of(record("r1", summary))
    assert rebuilt is not None and rebuilt["metric"] == summary["metric"]
    if summary is CHARTQA:
        assert ap_table({"x": rebuilt}) == ap_table({"x": summary})
    elif summary is SCIENCEQA:
        assert scienceqa_table({"x": rebuilt}) == scienceqa_table({"x": summary})
    else:
        key = summary["metric"]
        assert results_table({"m": {key: rebuilt}}) == results_table({"m": {key: summary}})
    assert summary_metrics(rebuilt) == summary_metrics(summary)


def test_headline_and_unusable_runs() -> None:
    assert headline_of(record("r1", CHARTQA)) == ("chartqa.average_0.05", pytest.approx(0.8048))
    assert headline_of(record("r2", SCIENCEQA)) == ("scienceqa.Avg", 88.82)
    failed = record("r3", params={"metric": "mme"})
    assert failed.benchmark is None and summary_of(failed) is None
    judge = RunRecord("r4", "evaluate", tags={"metric": "judge"},
                      metrics={"judge.mean_score": 7.0})
    assert judge.benchmark is None
    untagged = RunRecord("r5", "score", metrics=summary_metrics(SCIENCEQA))
    assert untagged.benchmark == "scienceqa"  # guessed from the metric names


def test_settings_come_from_the_run_its_pipeline_or_its_training_runs() -> None:
    parents = {"p2": RunRecord("p2", "pipeline", params={"train.lr_schedule": "exponential"})}
    runs = [
        record("t1", stage="train", parent="p1", params={"train.lr_schedule": "step",
                                                          "train.final_uri": "s3://b/1"}),
        record("e1", SCIENCEQA, parent="p1"),  # inherits from its only training sibling
        record("e2", SCIENCEQA, parent="p2"),  # from its pipeline run
        record("e3", SCIENCEQA, parent="p3", params={"train.lr_schedule": "cosine"}),
        record("e4", SCIENCEQA, parent="p3"),  # p3's runs disagree: unknown
        record("t3", stage="train", parent="p3", params={"train.lr_schedule": "cosine",
                                                          "train.final_uri": "s3://b/3"}),
        record("t4", stage="train", parent="p3", params={"train.lr_schedule": "step",
                                                          "train.final_uri": "s3://b/4"}),
    ]
    for run in runs:
        if run.stage == "train":
            run.metrics["loss"] = 1.0
    runset = RunSet(runs, parents)
    evals = [r for r in runs if r.stage == "evaluate"]
    assert [runset.setting(r, "train.lr_schedule") for r in evals] == [
        "step", "exponential", "cosine", None]
    # URIs differ per run by construction and are never sweep params.
    assert runset.detect_sweep_params(evals) == ["train.lr_schedule"]
    names = runset.display_names(evals, ["train.lr_schedule"])
    assert list(names.values()) == ["step", "exponential", "cosine", "evaluate"]
    evals[0].tags["sweep.setting"] = "A"
    assert runset.detect_sweep_params(evals) == ["sweep.setting"]


def test_training_runs_are_named_by_step_with_only_their_own_settings() -> None:
    # The demo's align (no LoRA) and sft (LoRA) steps under one pipeline run: the legend of the
    # loss plot must not give align the sft step's LoRA rank (a sibling's setting).
    align = record("a1", stage="train", params={"train.lr": "0.001", "train.mode": "align"})
    sft = record("s1", stage="train", params={"train.lr": "0.002", "train.mode": "sft",
                                              "train.lora.r": "64"})
    align.name, sft.name = "align", "sft"
    for run in (align, sft):
        run.metrics["loss"] = 1.0
    runset = RunSet([align, sft])
    assert runset.setting(align, "train.lora.r") is None
    sweep = runset.detect_sweep_params([align, sft])
    assert "train.lora.r" not in sweep and "train.lr" in sweep
    names = runset.display_names([align, sft], ["train.lr", "train.lora.r"])
    assert names == {"a1": "align · lr=0.001", "s1": "sft · lr=0.002 · r=64"}
    # A sweep's steps already say their setting: it is not repeated.
    row = record("r1", stage="train", params={"train.lr_schedule": "cosine"})
    row.name, row.metrics["loss"] = "sft-cosine", 1.0
    assert RunSet([row]).display_names([row], ["train.lr_schedule"]) == {"r1": "sft-cosine"}


def test_display_names_use_labels_and_break_ties_with_run_ids() -> None:
    runs = [record("aaaaaaaa1", CHARTQA, label="trained"),
            record("bbbbbbbb2", CHARTQA, label="trained", parent="p2"),
            record("cccccccc3", CHARTQA, label="untrained")]
    names = RunSet(runs).display_names(runs)
    assert names == {"aaaaaaaa1": "trained [aaaaaaaa]", "bbbbbbbb2": "trained [bbbbbbbb]",
                     "cccccccc3": "untrained"}


def test_main_results_one_row_per_model_newest_run_wins() -> None:
    base = {**MME, "perception": 1475.0, "cognition": 290.0, "total": 1765.0}
    runs = [record("old", {**MMBENCH, "accuracy": 50.0}, parent="p1", start=0),
            record("a1", MMBENCH | {"accuracy": 66.66}, parent="p1", start=1),
            record("a2", base, parent="p1", start=2),
            record("b1", MMBENCH, parent="p2", label="MLLM-DataEngine", start=3),
            record("b2", MME, parent="p2", label="MLLM-DataEngine", start=4),
            record("b3", SCIENCEQA, parent="p2", label="MLLM-DataEngine", start=5)]
    runset = RunSet(runs, {"p1": RunRecord("p1", "baseline")})
    table, skipped = main_results_table(runset, runset.evaluations())
    assert table is not None
    assert table.markdown.splitlines()[2:] == [
        "| baseline        |    - |   66.66 | 1475/290(1765) |   - |     - |           - |",
        "| MLLM-DataEngine |    - |   67.18 | 1511/303(1814) |   - |     - | 88.82/86.37 |",
    ]
    assert table.csv.splitlines()[1] == "baseline,-,66.66,1475.00,290.00,1765.00,-,-,-,-"
    assert [(s.run_id, "superseded" in s.reason) for s in skipped] == [("old", True)]
    only_one, _ = main_results_table(runset, {"mme": runs[2:3]})
    assert only_one is None


def test_run_summary_table_markdown_and_csv() -> None:
    runs = [record("0123456789abcdef", SCIENCEQA, params={"train.lr_schedule": "cosine"})]
    table = run_summary_table(runs, RunSet(runs), sweep_params=["train.lr_schedule"],
                              metrics=["scienceqa.Avg", "final_loss"])
    cells = [c.strip() for c in table.markdown.splitlines()[2].strip("|").split("|")]
    assert cells == ["evaluate", "01234567", "evaluate", "-", "finished", "cosine", "88.82", "-"]
    assert table.csv.splitlines()[1] == (
        "evaluate,0123456789abcdef,evaluate,-,finished,cosine,88.82,")


@pytest.mark.slow
def test_hundreds_of_runs_are_split_over_figures(tmp_path: Path) -> None:
    runs, schedules = [], ("cosine", "step", "exponential", "cyclic_triangular")
    for i in range(100):
        train = record(f"t{i:03d}", stage="train", parent=f"p{i}", start=2 * i,
                       params={"train.lr_schedule": schedules[i % 4]})
        train.metrics.update(loss=1.0, lr=1e-4)
        train.history = {"loss": [(s, 2.0 / s) for s in range(1, 21)],
                         "lr": [(s, 1e-4) for s in range(1, 21)]}
        runs += [train, record(f"e{i:03d}", {**SCIENCEQA, "accuracy": {
            **SCIENCEQA["accuracy"], "Avg": 80.0 + i % 4}}, parent=f"p{i}", start=2 * i + 1)]
    collected = Collected("big", "1", "sqlite:///x", None, runs)
    info = build_report(collected, tmp_path, ReportOptions(title="big", max_series=34))
    assert info["sweep_params"] == ["train.lr_schedule"]  # inherited from the training runs
    assert {"loss.png", "loss_2.png", "loss_3.png", "lr_3.png",
            "categories_scienceqa_3.png"} <= set(info["plots"])
    assert "loss_4.png" not in info["plots"]
    sweep = json.loads((tmp_path / "report.json").read_text())["plots"]
    assert "sweep_scienceqa_scienceqa_Avg_by_train_lr_schedule.png" in sweep
    assert info["counts"]["runs"] == 200 and not info["skipped"]
