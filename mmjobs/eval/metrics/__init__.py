"""The official benchmark metrics, each reproducing a named reference scorer with its quirks.

`METRICS` maps a metric name (the `mmjobs score --metric` value) to its `Metric`; every module's
docstring names the upstream file and function it reproduces and what each variant changes.

| name        | reproduces                                                        |
|-------------|-------------------------------------------------------------------|
| `chartqa`   | pix2struct `relaxed_correctness`; ChartMoE `eval_ChartQA.py`      |
| `vqav2`     | GT-Vision-Lab/VQA `vqaEval.py` (official / legacy / lmms-eval)    |
| `scienceqa` | ScienceQA `evaluate_acc.py` categories + LLaVA answer parsing     |
| `mme`       | MME `eval_tool/calculation.py`                                    |
| `mmbench`   | VLMEvalKit circular evaluation with `can_infer` (exact matching)  |
| `gqa`       | GQA `eval.py` accuracy (optionally LLaVA's preprocessing)         |
| `seedbench` | SEED-Bench / LLaVA per-question-type accuracy                     |
| `chartwiz`  | ChartWiz has no scorer: relaxed 5 % on numbers, exact otherwise  |
"""

from __future__ import annotations

from mmjobs.eval.metrics import (
    chartqa,
    chartwiz,
    gqa,
    mmbench,
    mme,
    scienceqa,
    seedbench,
    vqav2,
)
from mmjobs.eval.metrics.base import Metric, ScoreInputError, ScoreOptions

METRICS: dict[str, Metric] = {m.METRIC.name: m.METRIC for m in
                              (chartqa, vqav2, scienceqa, mme, mmbench, gqa, seedbench,
                               chartwiz)}

__all__ = ["METRICS", "Metric", "ScoreInputError", "ScoreOptions"]
