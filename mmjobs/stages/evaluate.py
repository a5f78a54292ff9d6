"""Stage `evaluate`: score a predictions file with an official metric, optionally run PoT
programs first and/or ask an LLM judge; write the seed-style tables; log to MLflow.

    python -m mmjobs.stages.evaluate --set predictions=s3://bucket/exp/run/infer \\
        --set metric=chartqa --set pot=true --set label=trained

Input: `predictions`, a predictions JSONL (`id`, `prediction` + the metric's fields, see
`mmjobs.eval.score`) or a committed infer output folder holding `predictions.jsonl`.

Steps:

1. Every row is validated for `metric` (all problems reported together, nothing skipped).
2. `pot: true` or a `pot:` section (ChartQA program of thought, ChartMoE's `--pot`; see
   `mmjobs.eval.pot.settings`): each prediction's program (`mmjobs.eval.pot.extract_program`)
   runs in the sandbox (bubblewrap; in a credential-less pod on a cluster); what it prints,
   after ChartMoE's post-processing, becomes the prediction, and a failed run becomes
   ChartMoE's "error running..." (scored wrong). Hostile programs (endless loops, file writes,
   network, huge output) end as a per-sample status (`timeout`, `forbidden`, ...) and the
   evaluation carries on. A sandbox that cannot isolate (no bubblewrap, no user namespaces)
   fails the stage before any program runs, unless the recipe sets `pot.isolation: none`
   (then warned about and recorded in summary.json).
3. The metric scores every row (`variant`; `tolerances` for ChartQA).
4. `judge` (optional): an OpenAI-compatible judge grades each row (`single`) or compares it
   with a `baseline` predictions file (`pairwise`); the key is read from the environment
   variable `judge.key_env`, never from the config.

Committed output: `scores.jsonl` (per row: `id`, the metric's score fields, and `pot` with the
sandbox status), `summary.json` (the metric's summary + `label`, `pot`, `judge`),
`summary.md` (the tables), `categories.png`; with PoT `predictions_pot.jsonl` (response,
program, executed answer); with a judge `judge/judgments.jsonl` and `judge/summary.json`.

MLflow: one metric per benchmark/category/tolerance (`mmjobs.eval.report.summary_metrics`,
e.g. `chartqa.human_0.05`, `scienceqa.IMG`, `mme.total`), the bar chart and the markdown
table as artifacts, tags `metric`, `label`, `headline_metric`. The KFP component also shows
the metrics and the tables in the KFP UI (Metrics and Markdown artifacts). Re-running with the
same config and predictions reuses the committed output. The work is `mmjobs.eval.evaluation`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from mmjobs import storage
from mmjobs.eval.judging import JudgeSettings
from mmjobs.eval.metrics import METRICS
from mmjobs.eval.pot import SandboxError
from mmjobs.eval.pot.settings import POD_IMAGE_ENV, RENAMED, PotSettings
from mmjobs.eval.report import category_bar_chart, evaluation_markdown, headline, summary_metrics
from mmjobs.layout import EVAL_SUMMARY, SCORES_FILE
from mmjobs.stage_contract import (
    RUN_FIELDS,
    Input,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    run_stage,
)

NAME = "evaluate"
VERSION = 2  # bump when the outputs change: invalidates reused outputs


class EvaluateConfig(StageConfig):
    """Score a predictions JSONL with an official metric (optionally PoT and an LLM judge)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = RENAMED  # the flat pot_* keys of version 1

    predictions: str = Field(description="Predictions JSONL, or a committed infer output "
                             "folder holding predictions.jsonl (local or s3://).")
    metric: str | None = Field(None, description="Metric name: " + ", ".join(METRICS)
                               + ". None: judge only.")
    variant: str | None = Field(None, description="Metric variant (default: the reference "
                                "scorer's; see mmjobs.eval.metrics).")
    tolerances: list[float] | None = Field(
        None, min_length=1, description="ChartQA relaxed-accuracy tolerances; default "
        "0.05, 0.1, 0.2.")
    pot: PotSettings = Field(
        default_factory=PotSettings, description="ChartQA: run each prediction's Python "
        "program in the sandbox and score what it prints (ChartMoE's PoT); `true` is short "
        "for {enabled: true}.")
    judge: JudgeSettings | None = Field(None, description="Optional LLM judge.")
    label: str | None = Field(None, description="What these predictions are, e.g. trained, "
                              "untrained, w/ PoT: tagged and shown in tables.")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        problems = []
        spec = METRICS.get(self.metric) if self.metric else None
        if self.metric is not None and spec is None:
            problems.append(f"metric {self.metric!r} is unknown; choose one of "
                            f"{', '.join(METRICS)}")
        if self.metric is None and self.judge is None:
            problems.append("set metric (e.g. metric=chartqa), judge, or both")
        if spec is not None and self.variant is not None and self.variant not in spec.variants:
            problems.append(f"variant {self.variant!r} is not a variant of {spec.name}; choose "
                            f"one of {', '.join(spec.variants)}")
        if self.metric is None and self.variant is not None:
            problems.append("variant needs a metric")
        if self.tolerances is not None:
            if self.metric != "chartqa":
                problems.append(f"tolerances apply to metric chartqa only, not {self.metric}; "
                                "drop them")
            bad = [t for t in self.tolerances if not math.isfinite(t) or t < 0]
            if bad:
                problems.append(f"tolerances must be non-negative numbers, got {bad}")
        if self.pot.enabled and self.metric != "chartqa":
            problems.append(f"pot applies to metric chartqa (ChartMoE's PoT), not "
                            f"{self.metric}; set metric=chartqa or pot=false")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EvaluateResult(StageResult):
    """The summary, its headline number and where the outputs are."""

    metric: str | None
    label: str | None
    headline_metric: str | None
    headline: float | None
    summary: dict[str, Any]
    scores: str
    summary_uri: str


# Fields that do not change the output (where it goes, how it is tracked, how fast).
_POT_NOT_FINGERPRINTED = {"workers", "bwrap", "executor", "pod"}


def main(cfg: EvaluateConfig) -> EvaluateResult:
    """Run the stage; see the module docstring.

    Raises:
        mmjobs.eval.metrics.ScoreInputError: the predictions do not fit the metric (every
            problem, with line numbers).
        mmjobs.eval.pot.SandboxError: PoT programs cannot be run at all here.
        mmjobs.eval.judge.JudgeConfigError: the judge endpoint rejects every request.
        mmjobs.storage.StoreError: inputs cannot be read or outputs written.
    """
    from mmjobs.eval.evaluation import evaluate, predictions_file, predictions_fingerprint

    source = predictions_file(cfg.predictions)
    baseline = (predictions_file(cfg.judge.baseline)
                if cfg.judge is not None and cfg.judge.baseline else None)
    exclude: dict[str, Any] = {k: True for k in RUN_FIELDS}
    exclude["pot"] = _POT_NOT_FINGERPRINTED
    if cfg.judge is not None:
        exclude["judge"] = {"workers"}
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=exclude),
                     predictions_fingerprint(cfg.predictions, source),
                     predictions_fingerprint(cfg.judge.baseline, baseline) if baseline else None)
    tags = {"metric": cfg.metric or "judge", **({"label": cfg.label} if cfg.label else {}),
            **({"pot": "true"} if cfg.pot.enabled else {})}

    def score(stage: StageRun) -> dict[str, Any]:
        with stage.commit({"stage": NAME, "metric": cfg.metric, "label": cfg.label}) as scratch:
            summary = evaluate(cfg, source, scratch, baseline=baseline, pod_step=stage.out)
            _log_run(stage.run, summary, scratch)
        return summary

    def reused(out: str, manifest: storage.Manifest, run: Any) -> dict[str, Any]:
        summary = json.loads(storage.read_text(storage.join(out, EVAL_SUMMARY)))
        _log_run(run, summary, None)
        return summary

    # An older output is un-committed first, so a failure never leaves one looking current.
    return run_stage(cfg, NAME, fp, score, result=_result, reused=reused, tags=tags,
                     uncommit_first=True)


def _log_run(run: Any, summary: dict[str, Any], scratch: Path | None) -> None:
    """Metrics, tags, the bar chart and the tables to the MLflow run."""
    run.log_metrics(summary_metrics(summary))
    name, _ = headline(summary)
    if name:
        run.set_tags({"headline_metric": name})
    run.log_text(evaluation_markdown(summary) + "\n", "summary.md")
    if scratch is None:  # a reused output: draw the chart again rather than download it
        run.log_figure(category_bar_chart(summary), "plots/categories.png")
    else:
        run.log_artifact(scratch / "categories.png", "plots")
        run.log_artifact(scratch / EVAL_SUMMARY)


def _result(out: str, summary: dict[str, Any], cached: bool,
            run_id: str | None) -> EvaluateResult:
    name, value = headline(summary)
    scores = storage.join(out, SCORES_FILE) if summary.get("metric") else ""
    return EvaluateResult(output=out, cached=cached, mlflow_run_id=run_id,
                          metric=summary.get("metric"), label=summary.get("label"),
                          headline_metric=name, headline=value, summary=summary, scores=scores,
                          summary_uri=storage.join(out, EVAL_SUMMARY))


def component(cfg: EvaluateConfig, *, metrics: Any, summary: Any) -> str:
    """The KFP component's body: run the stage, then show its numbers and tables in the KFP
    UI (`metrics`: a Metrics artifact, `summary`: a Markdown one)."""
    result = main(cfg)
    for name, value in summary_metrics(result.summary).items():
        metrics.log_metric(name, value)
    with open(summary.path, "w", encoding="utf-8") as f:
        f.write(evaluation_markdown(result.summary))
    return result.output


# The PoT Job (mmjobs.eval.pot.pod) runs the same eval image, named by $MMJOBS_POT_IMAGE.
STAGE = Stage(name=NAME, config=EvaluateConfig, result=EvaluateResult, main=main, image="eval",
              inputs=(Input("predictions"),), outputs={"metrics": "Metrics", "summary": "Markdown"},
              component=component, pod_env={POD_IMAGE_ENV: "eval"}, errors=(SandboxError,))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
