"""Evaluation report tables, metric names and the bar chart, from hand-made summaries.

The numbers are the seed READMEs' own (ChartMoE's reproduced @AP table, LaVIN's ScienceQA
table, MLLM-DataEngine's Main Results), so each table must print them as the seed does.
"""

from __future__ import annotations

from typing import Any

import pytest
from matplotlib.figure import Figure

from mmjobs.eval.report import (
    ap_table,
    category_bar_chart,
    data_amount_text,
    headline,
    metric_key,
    results_table,
    scienceqa_table,
    summary_metrics,
)

TOLS = ("0.05", "0.1", "0.2")


def chartqa(human: list[float], augmented: list[float]) -> dict[str, Any]:
    return {"metric": "chartqa", "unit": "fraction", "count": 2500, "tolerances": list(TOLS),
            "counts": {"human": 1250, "augmented": 1250},
            "accuracy": {t: {"human": h, "augmented": a, "average": (h + a) / 2,
                             "overall": (h + a) / 2}
                         for t, h, a in zip(TOLS, human, augmented, strict=True)}}


def scienceqa(values: list[float]) -> dict[str, Any]:
    keys = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
    return {"metric": "scienceqa", "unit": "percent", "count": 4241,
            "accuracy": dict(zip(keys, values, strict=True)), "counts": {}, "unparsed": 0}


CHARTMOE = {"w/o PoT": chartqa([0.704, 0.7376, 0.772], [0.9056, 0.9192, 0.9352]),
            "w/ PoT": chartqa([0.7952, 0.8128, 0.828], [0.904, 0.9176, 0.932])}


def test_ap_table_reproduces_chartmoe_numbers() -> None:
    """The seed README's two tables (w/o PoT, PoT): rows Human / Augmented / Averaged, columns
    @AP 0.05 / 0.1 / 0.2, one table per mode."""
    assert ap_table(CHARTMOE) == "\n".join([
        "**w/o PoT**",
        "",
        "| @AP       |   0.05 |    0.1 |    0.2 |",
        "|:----------|-------:|-------:|-------:|",
        "| Human     | 0.7040 | 0.7376 | 0.7720 |",
        "| Augmented | 0.9056 | 0.9192 | 0.9352 |",
        "| Averaged  | 0.8048 | 0.8284 | 0.8536 |",
        "",
        "**w/ PoT**",
        "",
        "| @AP       |   0.05 |    0.1 |    0.2 |",
        "|:----------|-------:|-------:|-------:|",
        "| Human     | 0.7952 | 0.8128 | 0.8280 |",
        "| Augmented | 0.9040 | 0.9176 | 0.9320 |",
        "| Averaged  | 0.8496 | 0.8652 | 0.8800 |",
    ])
    assert ap_table(CHARTMOE, fmt="csv").splitlines() == [
        "setting,@AP,0.05,0.1,0.2",
        "w/o PoT,Human,0.7040,0.7376,0.7720",
        "w/o PoT,Augmented,0.9056,0.9192,0.9352",
        "w/o PoT,Averaged,0.8048,0.8284,0.8536",
        "w/ PoT,Human,0.7952,0.8128,0.8280",
        "w/ PoT,Augmented,0.9040,0.9176,0.9320",
        "w/ PoT,Averaged,0.8496,0.8652,0.8800"]
    with pytest.raises(ValueError, match="ap_table: sqa is not chartqa summaries"):
        ap_table({"sqa": scienceqa([1.0] * 9)})


def test_scienceqa_table_reproduces_lavin_rows() -> None:
    runs = {"Base": scienceqa([88.45, 94.71, 84.82, 87.59, 86.37, 87.8, 90.2, 86.35, 88.82]),
            "Cyclical LR": scienceqa([85.48, 92.58, 82.18, 84.51, 83.44, 84.88, 87.15, 84.25,
                                      86.11])}
    assert scienceqa_table(runs) == "\n".join([
        "| Method      |   NAT |   SOC |   LAN |   TXT |   IMG |    NO |  G1-6 | G7-12 "
        "| Average |",
        "|:------------|------:|------:|------:|------:|------:|------:|------:|------:"
        "|--------:|",
        "| Base        | 88.45 | 94.71 | 84.82 | 87.59 | 86.37 | 87.80 | 90.20 | 86.35 "
        "|   88.82 |",
        "| Cyclical LR | 85.48 | 92.58 | 82.18 | 84.51 | 83.44 | 84.88 | 87.15 | 84.25 "
        "|   86.11 |",
    ])
    assert scienceqa_table(runs, fmt="csv") == (
        "Method,NAT,SOC,LAN,TXT,IMG,NO,G1-6,G7-12,Average\n"
        "Base,88.45,94.71,84.82,87.59,86.37,87.80,90.20,86.35,88.82\n"
        "Cyclical LR,85.48,92.58,82.18,84.51,83.44,84.88,87.15,84.25,86.11\n")


def test_results_table_dataengine_layout_markdown_and_csv() -> None:
    dataengine = {
        "seedbench": {"metric": "seedbench", "accuracy": 68.57},
        "mmbench": {"metric": "mmbench", "accuracy": 67.18},
        "mme": {"metric": "mme", "perception": 1511.4, "cognition": 302.9, "total": 1814.3},
        "gqa": {"metric": "gqa", "accuracy": 58.02},
        "scienceqa": scienceqa([0.0] * 4 + [71.15] + [0.0] * 3 + [73.17]),
        "vqav2": {"metric": "vqav2", "accuracy": 78.18},
    }
    rows = {"None(baseline)": {"seedbench": {"metric": "seedbench", "accuracy": 66.04},
                               "gqa": {"metric": "gqa", "accuracy": 57.27}},
            "MLLM-DataEngine": dataengine}
    # The README's column order; ScienceQA as its two figures, accuracy/IMG accuracy
    assert results_table(rows) == "\n".join([
        "| Model           |  SEED | MMBench |            MME |   GQA | VQAv2 |   ScienceQA |",
        "|:----------------|------:|--------:|---------------:|------:|------:|------------:|",
        "| None(baseline)  | 66.04 |       - |              - | 57.27 |     - |           - |",
        "| MLLM-DataEngine | 68.57 |   67.18 | 1511/303(1814) | 58.02 | 78.18 | 73.17/71.15 |",
    ])
    assert results_table(rows, fmt="csv") == (
        "Model,SEED,MMBench,MME-P,MME-C,MME,GQA,VQAv2,ScienceQA,ScienceQA-IMG\n"
        "None(baseline),66.04,-,-,-,-,57.27,-,-,-\n"
        "MLLM-DataEngine,68.57,67.18,1511.40,302.90,1814.30,58.02,78.18,73.17,71.15\n")
    # With the data amounts: the README's Incremental Dataset and Data Amount columns
    seed = results_table(rows, data_amounts={"None(baseline)": None,
                                             "MLLM-DataEngine": 220_113})
    assert seed.splitlines()[0].startswith("| Incremental Dataset | Data Amount |  SEED |")
    assert [line.split("|")[2].strip() for line in seed.splitlines()[2:]] == ["-", "220k"]
    assert data_amount_text(3) == "3" and data_amount_text(None) == "-"


def test_summary_metrics_names() -> None:
    metrics = summary_metrics({**CHARTMOE["w/ PoT"],
                               "pot": {"programs": 4, "ok_rate": 0.5,
                                       "status_counts": {"ok": 2, "timeout": 1,
                                                         "forbidden": 1}}})
    assert metrics["chartqa.human_0.05"] == 0.7952
    assert metrics["chartqa.average_0.2"] == pytest.approx(0.88)
    assert {"chartqa.augmented_0.1", "chartqa.overall_0.05", "pot.ok_rate", "pot.timeout"} \
        <= set(metrics)
    assert metric_key("vqav2", "yes/no") == "vqav2.yes_no"
    sqa = summary_metrics(scienceqa([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert sqa == {"scienceqa.NAT": 1.0, "scienceqa.SOC": 2.0, "scienceqa.LAN": 3.0,
                   "scienceqa.TXT": 4.0, "scienceqa.IMG": 5.0, "scienceqa.NO": 6.0,
                   "scienceqa.G1-6": 7.0, "scienceqa.G7-12": 8.0, "scienceqa.Avg": 9.0}
    seed = summary_metrics({"metric": "seedbench", "accuracy": 60.0,
                            "per_question_type": {"1": 70.0, "5": None},
                            "question_types": {"1": "Scene Understanding",
                                               "5": "Instances Counting"}})
    assert seed == {"seedbench.accuracy": 60.0, "seedbench.Scene_Understanding": 70.0}
    mme = summary_metrics({"metric": "mme", "perception": 1500.0, "cognition": 300.0,
                           "total": 1800.0, "tasks": {"OCR": {"acc": 90.0, "acc_plus": 80.0,
                                                              "score": 170.0}}})
    assert mme["mme.total"] == 1800.0 and mme["mme.OCR"] == 170.0
    assert mme["mme.OCR.acc_plus"] == 80.0
    judge = summary_metrics({"metric": None, "judge": {"mode": "single", "mean_score": 7.5,
                                                       "rows": 2, "judged": 2}})
    assert judge == {"judge.mean_score": 7.5, "judge.rows": 2.0, "judge.judged": 2.0}


def test_headline() -> None:
    assert headline(CHARTMOE["w/o PoT"]) == ("chartqa.average_0.05", pytest.approx(0.8048))
    assert headline(scienceqa([0] * 8 + [88.82])) == ("scienceqa.Avg", 88.82)
    assert headline({"metric": "mme", "total": 1814.3}) == ("mme.total", 1814.3)
    assert headline({"metric": "gqa", "accuracy": 58.0}) == ("gqa.accuracy", 58.0)
    assert headline({"metric": None, "judge": {"mode": "pairwise",
                                               "win_rate_a_excluding_ties": 0.6}}) == (
        "judge.win_rate_a_excluding_ties", 0.6)


def test_category_bar_chart_has_a_bar_per_category_and_series(tmp_path) -> None:
    fig = category_bar_chart(CHARTMOE["w/ PoT"], "chartqa")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.patches) == 9  # Human/Augmented/Avg x 3 tolerances
    assert [t.get_text() for t in ax.get_xticklabels()] == ["@0.05", "@0.1", "@0.2"]
    fig.savefig(tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    sqa = category_bar_chart({**scienceqa([50.0] * 9), "label": "trained"})
    assert len(sqa.axes[0].patches) == 9 and sqa.axes[0].get_title() == "scienceqa — trained"
    mmb = category_bar_chart({"metric": "mmbench", "unit": "percent", "accuracy": 60.0,
                              "per_category": {"ocr": 50.0, "scene": None}})
    assert [t.get_text() for t in mmb.axes[0].get_xticklabels()] == ["ocr", "scene", "Overall"]
