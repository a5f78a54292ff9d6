"""A synthetic experiment in the test's embedded MLflow database (tests/conftest.py gives each
test a fresh one): one pipeline run with the stage runs a report reads.

- two train runs (`train.lr_schedule` cosine / step) with 40 steps of loss, lr, grad_norm and
  an eval_loss every 10 steps, plus a train run that logged no loss (reused output);
- ChartQA evaluate runs labelled untrained / trained, human/augmented/average/overall at
  tolerances 0.05, 0.1, 0.2 (ChartMoE's reproduced numbers for "trained");
- ScienceQA evaluate runs for a 3-setting sweep over `train.lr_schedule`, with LaVIN's Base,
  Cyclical LR and Step Decay rows; a failed evaluate run without metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mmjobs import settings

EXPERIMENT = "lavin-report"
TOLS = ("0.05", "0.1", "0.2")
SQA_KEYS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
LAVIN = {"cosine": [88.45, 94.71, 84.82, 87.59, 86.37, 87.8, 90.2, 86.35, 88.82],
         "cyclic_triangular": [85.48, 92.58, 82.18, 84.51, 83.44, 84.88, 87.15, 84.25, 86.11],
         "step": [86.23, 94.15, 83.27, 85.34, 85.42, 86.48, 88.36, 84.9, 87.13]}
CHARTQA = {"untrained": ([0.30, 0.34, 0.40], [0.50, 0.55, 0.61]),
           "trained": ([0.704, 0.7376, 0.772], [0.9056, 0.9192, 0.9352])}
STEPS = 40


@dataclass
class Experiment:
    """Ids of what `make_experiment` created."""

    name: str
    experiment_id: str
    parent: str
    train: dict[str, str] = field(default_factory=dict)  # lr_schedule -> run id
    chartqa: dict[str, str] = field(default_factory=dict)  # label -> run id
    scienceqa: dict[str, str] = field(default_factory=dict)  # lr_schedule -> run id
    no_loss: str = ""
    failed_eval: str = ""


class Builder:
    """Creates runs the way the stages log them (stage tags, flattened params, metrics)."""

    def __init__(self, client: MlflowClient, experiment_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.clock = int(time.time() * 1000)

    def run(self, name: str, *, parent: str | None = None, tags: dict[str, str] | None = None,
            params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
            status: str = "FINISHED") -> str:
        self.clock += 1000  # distinct, increasing start times: run order is deterministic
        all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(self.experiment_id, start_time=self.clock,
                                     tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id, metrics=[Metric(k, v, self.clock, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()])
        self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        return run_id

    def series(self, run_id: str, values: dict[str, list[float]]) -> None:
        """Per-step metrics, steps 1..n."""
        rows = [Metric(k, v, self.clock + step, step) for k, vs in values.items()
                for step, v in enumerate(vs, start=1)]
        for i in range(0, len(rows), 900):
            self.client.log_batch(run_id, metrics=rows[i:i + 900])


def chartqa_metrics(human: list[float], augmented: list[float]) -> dict[str, float]:
    out = {}
    for tol, h, a in zip(TOLS, human, augmented, strict=True):
        out |= {f"chartqa.human_{tol}": h, f"chartqa.augmented_{tol}": a,
                f"chartqa.average_{tol}": (h + a) / 2, f"chartqa.overall_{tol}": (h + a) / 2}
    return out


def make_experiment(name: str = EXPERIMENT) -> Experiment:
    client = MlflowClient(settings.tracking_uri())
    exp_id = client.create_experiment(name)
    b = Builder(client, exp_id)
    common = {"recipe": "lavin-sweep"}
    parent = b.run("pipeline", tags=common)
    exp = Experiment(name, exp_id, parent)
    for k, schedule in enumerate(("cosine", "step")):
        rid = b.run("train", parent=parent, tags={**common, "stage": "train"},
                    params={"train.lr_schedule": schedule, "train.mode": "sft",
                            "train.lr": "0.0002", "train.final_uri": f"/store/{schedule}/final"},
                    metrics={"final_loss": 0.5 + 0.1 * k, "train_steps": STEPS})
        lr = [2e-4 * (0.5 * (1 + math.cos(math.pi * s / STEPS))) if schedule == "cosine"
              else 2e-4 * 0.5 ** (s // 15) for s in range(1, STEPS + 1)]
        loss = [2.5 * math.exp(-s / (12 + 6 * k)) + 0.4 + 0.02 * math.sin(s)
                for s in range(1, STEPS + 1)]
        b.series(rid, {"loss": loss, "lr": lr, "grad_norm": [1.0 / s for s in range(1, 41)]})
        client.log_batch(rid, metrics=[Metric("eval_loss", loss[s - 1] + 0.1, b.clock, s)
                                       for s in (10, 20, 30, 40)])
        exp.train[schedule] = rid
    exp.no_loss = b.run("train", parent=parent, tags={**common, "stage": "train",
                                                      "cached": "true"},
                        params={"train.lr_schedule": "cosine"})
    for label, (human, augmented) in CHARTQA.items():
        exp.chartqa[label] = b.run(
            "evaluate", parent=parent,
            tags={**common, "stage": "evaluate", "metric": "chartqa", "label": label,
                  "headline_metric": "chartqa.average_0.05"},
            params={"metric": "chartqa", "label": label, "pot": "False"},
            metrics=chartqa_metrics(human, augmented))
    for schedule, values in LAVIN.items():
        exp.scienceqa[schedule] = b.run(
            "evaluate", parent=parent,
            tags={**common, "stage": "evaluate", "metric": "scienceqa",
                  "headline_metric": "scienceqa.Avg"},
            params={"metric": "scienceqa", "label": "null", "train.lr_schedule": schedule},
            metrics={f"scienceqa.{k}": v for k, v in zip(SQA_KEYS, values, strict=True)})
    exp.failed_eval = b.run("evaluate", parent=parent, status="FAILED",
                            tags={**common, "stage": "evaluate", "metric": "mme"},
                            params={"metric": "mme"})
    return exp


@pytest.fixture
def experiment() -> Experiment:
    return make_experiment()
