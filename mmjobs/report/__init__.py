"""Plots and comparison tables across an experiment's runs (`mmjobs report`, stage `report`).

- `collect`: read the runs of an MLflow experiment, or of one pipeline run, page by page;
- `runs`: a run's role (training, which benchmark, which sweep setting) and its evaluation
  summary, rebuilt from its metrics;
- `plots`: loss/LR curves, per-category bars, metric vs sweep setting;
- `tables`: run summary, ChartQA @AP, ScienceQA categories, Main Results (the seed tables
  themselves are drawn by `mmjobs.eval.report`);
- `build`: all of it into a folder with `report.md`, `report.html` (plots inlined, `html`)
  and `report.json`;
- `rollup`: the pipeline run's headline metrics and final model on its MLflow parent run.
"""

from mmjobs.report.build import REPORT_HTML, REPORT_JSON, REPORT_MD, ReportOptions, build_report
from mmjobs.report.collect import Collected, ReportError, Skip, collect
from mmjobs.report.runs import RunRecord, RunSet

__all__ = ["REPORT_HTML", "REPORT_JSON", "REPORT_MD", "Collected", "ReportError", "ReportOptions",
           "RunRecord", "RunSet", "Skip", "build_report", "collect"]
