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
table as artifacts, tags `metric`, `label`, `headline_metric`. A KFP component passes
`kfp_metrics(summary)` to its Metrics artifact and `kfp_markdown(summary)` to a Markdown one.
Re-running with the same config and predictions reuses the committed output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from mmjobs import settings, storage
from mmjobs.config import StrictModel
from mmjobs.eval.metrics import METRICS, ScoreOptions
from mmjobs.eval.metrics.base import markdown_table
from mmjobs.eval.metrics.chartqa import TOLERANCES
from mmjobs.eval.pot.settings import RENAMED, PotSettings
from mmjobs.eval.report import category_bar_chart, headline, summary_metrics
from mmjobs.eval.score import read_rows, summary_markdown
from mmjobs.logs import get_logger
from mmjobs.stages.common import (
    StageConfig,
    StageResult,
    fingerprint,
    input_fingerprint,
    output_uri,
    reusable_output,
    stage_cli,
    stage_tracking,
    staged_output,
)

STAGE = "evaluate"
VERSION = 2  # bump when the outputs change: invalidates reused outputs
PREDICTIONS_FILE = "predictions.jsonl"
log = get_logger(__name__)


class JudgeSettings(StrictModel):
    """An OpenAI-compatible LLM judge (`mmjobs.eval.judge`)."""

    base_url: str = Field(description="API root with version, e.g. http://vllm:8000/v1.")
    model: str = Field(description="Judge model name.")
    mode: Literal["single", "pairwise"] = Field(
        "single", description="single: 1-10 grade per answer; pairwise: A vs B verdicts.")
    key_env: str = Field(
        "OPENAI_API_KEY", validation_alias=AliasChoices("key_env", "api_key_env"),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (unset: no key). "
        "The key itself never goes in a config.")
    baseline: str | None = Field(
        None, description="pairwise: predictions JSONL (or infer folder) of the model to "
        "compare against (B); rows are matched by id. Without it, rows need prediction_a/_b.")
    workers: int = Field(4, ge=1, description="Concurrent judge requests.")
    swap: bool = Field(True, description="pairwise: judge both orders (position-bias check).")
    requests_per_minute: float | None = Field(None, gt=0, description="Client rate limit.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries for 429/5xx/connection errors.")
    image_root: str | None = Field(None, description="Where relative row images live.")
    cache: bool = Field(True, description="Cache replies under {store}/cache/judge (re-runs "
                        "send nothing).")


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
_NOT_FINGERPRINTED = {"experiment", "pipeline_run_id", "output", "recipe", "parent_run_id",
                      "force"}
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
    source = predictions_file(cfg.predictions)
    baseline = (predictions_file(cfg.judge.baseline)
                if cfg.judge is not None and cfg.judge.baseline else None)
    out = output_uri(cfg, STAGE)
    exclude: dict[str, Any] = {k: True for k in _NOT_FINGERPRINTED}
    exclude["pot"] = _POT_NOT_FINGERPRINTED
    if cfg.judge is not None:
        exclude["judge"] = {"workers"}
    fp = fingerprint(STAGE, VERSION, cfg.model_dump(exclude=exclude),
                     _fingerprint(cfg.predictions, source),
                     _fingerprint(cfg.judge.baseline, baseline) if baseline else None)
    tags = {"metric": cfg.metric or "judge", **({"label": cfg.label} if cfg.label else {}),
            **({"pot": "true"} if cfg.pot.enabled else {})}
    with stage_tracking(cfg, STAGE, tags=tags) as run:
        if reusable_output(out, fp, cfg.force) is not None:
            summary = json.loads(storage.read_text(storage.join(out, "summary.json")))
            run.set_tags({"cached": "true"})
            _log_run(run, summary, None)
            return _result(out, summary, cached=True, run_id=run.run_id)
        # Un-commit an older output first, so a failure below never leaves one looking current.
        storage.delete(storage.join(out, storage.MANIFEST_NAME))
        meta = {"stage": STAGE, "metric": cfg.metric, "label": cfg.label}
        with staged_output(out, fp, meta=meta) as scratch:
            summary = evaluate(cfg, source, scratch, baseline=baseline)
            _log_run(run, summary, scratch)
        return _result(out, summary, cached=False, run_id=run.run_id)


def evaluate(cfg: EvaluateConfig, source: str, out_dir: Path, *,
             baseline: str | None = None) -> dict[str, Any]:
    """Score `source` as `cfg` says and write the output files into the local `out_dir`.

    Returns:
        The summary (also written to `out_dir/summary.json`).
    """
    summary: dict[str, Any] = {"metric": cfg.metric, "label": cfg.label, "predictions": source}
    if cfg.metric is not None:
        summary.update(_score(cfg, source, out_dir))
    if cfg.judge is not None:
        summary["judge"] = _judge(cfg.judge, source, baseline, out_dir)
    markdown = kfp_markdown(summary)
    (out_dir / "summary.md").write_text(markdown + "\n", encoding="utf-8")
    figure = category_bar_chart(summary)
    figure.savefig(out_dir / "categories.png", dpi=120)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
    return summary


def _score(cfg: EvaluateConfig, source: str, out_dir: Path) -> dict[str, Any]:
    spec = METRICS[cfg.metric]  # type: ignore[index]  # checked by the config
    tolerances = tuple(cfg.tolerances or TOLERANCES) if spec.name == "chartqa" else ()
    options = ScoreOptions(cfg.variant or spec.default_variant, tolerances)
    rows, _ = read_rows(source, spec)
    pot_records: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = {}
    if cfg.pot.enabled:
        from mmjobs.eval.pot.batch import run_rows

        rows, pot_records, extra["pot"] = run_rows(cfg.pot, rows,
                                                   out_dir / "predictions_pot.jsonl",
                                                   pod_runner=_pod_runner(cfg))
    scores = [{"id": row["id"], **spec.score_row(row, options)} for row in rows]
    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as f:
        for i, sc in enumerate(scores):
            if pot_records is not None:
                sc = {**sc, "pot": pot_records[i]}
            f.write(json.dumps(sc, ensure_ascii=False) + "\n")
    return {"variant": options.variant, **spec.summarize(rows, scores, options), **extra}


# --------------------------------------------------------------------------- PoT


def _pod_runner(cfg: EvaluateConfig) -> Any:
    """Runs the programs in a credential-less Job (`pot.executor: pod`), named after the step."""
    import functools

    from mmjobs.eval.pot import pod

    return functools.partial(pod.run_in_pod, step=output_uri(cfg, STAGE))


# --------------------------------------------------------------------------- judge


def _judge(judge: JudgeSettings, source: str, baseline: str | None,
           out_dir: Path) -> dict[str, Any]:
    from mmjobs.eval.judge import JudgeClient, judge_predictions

    cache = storage.join(settings.store_root(), "cache", "judge") if judge.cache else None
    client = JudgeClient(judge.base_url, judge.model, api_key_env=judge.key_env,
                         timeout_s=judge.timeout_s, max_retries=judge.max_retries,
                         requests_per_minute=judge.requests_per_minute, cache_dir=cache)
    with tempfile.TemporaryDirectory(prefix="mmjobs-judge-",
                                     dir=os.environ.get("MMJOBS_TMP")) as tmp:
        # The judge reads its rows line by line from a local file (an S3 body iterates in
        # fixed-size chunks, not lines), so rows are always handed over as a local JSONL.
        rows = Path(tmp) / "rows.jsonl"
        if judge.mode == "pairwise" and baseline is not None:
            _write_pairs(source, baseline, rows)
        else:
            storage.get_file(source, rows)
        return judge_predictions(str(rows), client=client, mode=judge.mode,
                                 output_uri=str(out_dir / "judge"), workers=judge.workers,
                                 swap=judge.swap, image_root=judge.image_root)


def _write_pairs(source: str, baseline: str, path: Path) -> None:
    """Rows of `source` as A and the same ids of `baseline` as B, for pairwise judging."""
    b_rows = {row.get("id"): row for row in _jsonl(baseline)}
    with open(path, "w", encoding="utf-8") as f:
        for row in _jsonl(source):
            pair = {k: v for k, v in row.items() if k != "prediction"}
            pair["prediction_a"] = row.get("prediction")
            other = b_rows.get(row.get("id"))
            if other is not None:  # else the judge reports the row as invalid
                pair["prediction_b"] = other.get("prediction")
                pair.setdefault("prompt", other.get("prompt"))
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")


def _jsonl(uri: str) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL, streamed (split on newlines: S3 bodies iterate in chunks)."""
    with storage.open_read(uri) as f:
        pending = b""
        while chunk := f.read(1 << 20):
            *lines, pending = (pending + chunk).split(b"\n")
            yield from (json.loads(line) for line in lines if line.strip())
        if pending.strip():
            yield json.loads(pending)


# --------------------------------------------------------------------------- inputs


def predictions_file(uri: str) -> str:
    """The predictions JSONL a `predictions` value names (a file, or an infer output folder).

    Raises:
        mmjobs.storage.IncompleteDirectoryError: a folder with predictions but no manifest
            (its infer stage did not finish).
        mmjobs.storage.StoreNotFoundError: nothing there.
    """
    if storage.is_committed(uri):
        inside = storage.join(uri, PREDICTIONS_FILE)
        if not storage.exists(inside):
            raise storage.StoreNotFoundError(f"{uri}: committed folder without "
                                             f"{PREDICTIONS_FILE}; is it an infer output?")
        return inside
    inside = storage.join(uri, PREDICTIONS_FILE)
    if storage.exists(inside):
        raise storage.IncompleteDirectoryError(
            f"{uri}: has {PREDICTIONS_FILE} but no {storage.MANIFEST_NAME}, so the infer stage "
            "that writes it did not finish; re-run it (or point predictions at the file)")
    loc = storage.parse(uri)
    is_file = Path(loc.key).is_file() if loc.scheme == "file" else (
        storage.exists(uri) and next(storage.list_objects(uri), None) is None)
    if not is_file:
        raise storage.StoreNotFoundError(f"{uri}: no predictions (expected a JSONL file or an "
                                         f"infer output folder holding {PREDICTIONS_FILE})")
    return str(loc)


def _fingerprint(given: str, source: str) -> str:
    """Committed folders by manifest; files by their bytes (streamed, also on S3)."""
    if source != str(storage.parse(given)) and storage.is_committed(given):
        return input_fingerprint(given)
    digest = hashlib.sha256()
    with storage.open_read(source) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------- reporting


def kfp_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers for a KFP `Metrics` artifact (`metrics.log_metric(name, value)` each)."""
    return summary_metrics(summary)


def kfp_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown for a KFP `Markdown` artifact (the same text as summary.md)."""
    parts = []
    if summary.get("label"):
        parts.append(f"### {summary['label']}")
    if summary.get("metric"):
        parts.append(summary_markdown(summary["metric"], summary))
    if pot := summary.get("pot"):
        counts = pot["status_counts"]
        rows = [[status, str(n)] for status, n in counts.items()]
        rate = "-" if pot["ok_rate"] is None else f"{pot['ok_rate']:.1%}"
        parts.append(f"**Program of thought**: {pot['programs']} programs, {rate} ran to "
                     f"completion (wall {pot['limits']['wall_s']}s, CPU "
                     f"{pot['limits']['cpu_s']}s each; isolation "
                     f"{pot.get('isolation', 'none')}, executor {pot.get('executor', 'local')})"
                     "\n\n" + markdown_table(["PoT status", "programs"], rows))
        if pot.get("warning"):
            parts.append(f"**Warning**: {pot['warning']}")
    if judge := summary.get("judge"):
        keys = ("rows", "judged", "mean_score") if judge["mode"] == "single" else (
            "rows", "judged", "wins_a", "wins_b", "ties", "win_rate_a",
            "win_rate_a_excluding_ties")
        cells = [_cell(judge.get(k)) for k in keys]
        parts.append(f"**LLM judge** (`{judge['model']}`, {judge['mode']})\n\n"
                     + markdown_table(["judge", *keys], [[judge["mode"], *cells]]))
        if judge.get("failures"):
            parts.append("judge failures: " + ", ".join(f"{k} {v}" for k, v in
                                                        judge["failures"].items()))
    return "\n\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _log_run(run: Any, summary: dict[str, Any], scratch: Path | None) -> None:
    """Metrics, tags, the bar chart and the tables to the MLflow run."""
    run.log_metrics(summary_metrics(summary))
    name, _ = headline(summary)
    if name:
        run.set_tags({"headline_metric": name})
    run.log_text(kfp_markdown(summary) + "\n", "summary.md")
    if scratch is None:  # a reused output: draw the chart again rather than download it
        run.log_figure(category_bar_chart(summary), "plots/categories.png")
    else:
        run.log_artifact(scratch / "categories.png", "plots")
        run.log_artifact(scratch / "summary.json")


def _result(out: str, summary: dict[str, Any], *, cached: bool,
            run_id: str | None) -> EvaluateResult:
    name, value = headline(summary)
    scores = storage.join(out, "scores.jsonl") if summary.get("metric") else ""
    return EvaluateResult(output=out, cached=cached, mlflow_run_id=run_id,
                          metric=summary.get("metric"), label=summary.get("label"),
                          headline_metric=name, headline=value, summary=summary, scores=scores,
                          summary_uri=storage.join(out, "summary.json"))


def cli(argv: list[str] | None = None) -> int:
    """`python -m mmjobs.stages.evaluate` / `mmjobs stage evaluate` (the image entrypoint)."""
    from mmjobs.eval.pot import SandboxError

    try:
        return stage_cli(STAGE, EvaluateConfig, main, argv)
    except SandboxError as e:  # one message naming the fix, not a traceback
        print(f"mmjobs stage {STAGE}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
