"""What a report knows about one MLflow run, and how it reads a run's role from its data.

`RunRecord` is a plain copy of an MLflow run (params, tags, latest metrics, the metric
histories the plots need), so tables and plots are testable without MLflow. The helpers here
answer the questions every part of a report asks:

- which benchmark an evaluate run scored (`benchmark`) and its summary, rebuilt from the
  run's flat metrics (`summary_of`: `chartqa.human_0.05` -> `accuracy["0.05"]["human"]`), in
  the shape `mmjobs.eval.report` tables and charts take;
- which sweep setting a run belongs to (`RunSet.setting`): its own param or tag, else its
  pipeline (parent) run's, else the one value its sibling training runs agree on;
- which params vary across runs and so are sweep params (`RunSet.detect_sweep_params`);
- a short unique name for a run in tables and legends (`RunSet.display_names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmjobs.eval.report import SCIENCEQA_COLUMNS, headline

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "mmjobs.stage"  # mmjobs.tracking's
SWEEP_TAG = "sweep.setting"
_MISSING = {"", "null", "None", "none"}  # how `flatten` and MLflow spell "not set"
_CHARTQA = re.compile(r"^chartqa\.(human|augmented|average|overall)_(.+)$")
_MME_PARTS = ("perception", "cognition", "total")
# Prefixes whose params can name a sweep setting when sweep_params is not given.
SWEEP_PREFIXES = ("sweep.", "train.")


@dataclass
class RunRecord:
    """One MLflow run as the report sees it.

    Attributes:
        history: metric key -> [(step, value)], sorted by step, one value per step (the last
            one logged: a resumed run logs its resumed steps again).
    """

    run_id: str
    name: str
    status: str = "FINISHED"
    start_time: int = 0
    end_time: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def stage(self) -> str | None:
        """The stage type (tag `mmjobs.stage`; `stage` on runs of earlier versions)."""
        return self.tags.get(STAGE_TAG) or self.tags.get("stage")

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)

    @property
    def label(self) -> str | None:
        return self.value("label")

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    def value(self, key: str) -> str | None:
        """The run's param `key`, else its tag `key`; None when unset (or logged as null)."""
        for source in (self.params, self.tags):
            value = source.get(key)
            if value is not None and value.strip() not in _MISSING:
                return value
        return None

    @property
    def is_training(self) -> bool:
        """Whether the run logged a training loss (train, align, preference stages)."""
        return "loss" in self.metrics

    @property
    def benchmark(self) -> str | None:
        """The metric an evaluate run scored (tag/param `metric`, else guessed from metric
        names); None for runs without benchmark numbers (judge-only runs included)."""
        name = self.value("metric")
        if name == "judge":
            return None
        if name is None:
            from mmjobs.eval.metrics import METRICS

            prefixes = {k.split(".", 1)[0] for k in self.metrics if "." in k}
            found = [m for m in METRICS if m in prefixes]
            name = found[0] if len(found) == 1 else None
        return name if name and any(k.startswith(f"{name}.") for k in self.metrics) else None


def summary_of(run: RunRecord) -> dict[str, Any] | None:
    """The run's evaluation summary rebuilt from its flat metrics (the inverse of
    `mmjobs.eval.report.summary_metrics` for the parts tables and charts use), or None.

    Metrics, not the `summary.json` artifact, are the source: every evaluate run logs them
    (reused outputs too), and reading them needs no download per run.
    """
    bench = run.benchmark
    if bench is None:
        return None
    own = {k[len(bench) + 1:]: v for k, v in run.metrics.items() if k.startswith(f"{bench}.")}
    summary: dict[str, Any] = {"metric": bench, "label": run.label}
    if bench == "chartqa":
        accuracy: dict[str, dict[str, float]] = {}
        for key, value in run.metrics.items():
            if m := _CHARTQA.match(key):
                accuracy.setdefault(m.group(2), {})[m.group(1)] = value
        if not accuracy:
            return None
        tols = sorted(accuracy, key=_as_float)
        return {**summary, "unit": "fraction", "tolerances": tols,
                "accuracy": {t: accuracy[t] for t in tols}}
    if bench == "scienceqa":
        order = {c: i for i, c in enumerate((*SCIENCEQA_COLUMNS, "Avg"))}
        acc = dict(sorted(own.items(), key=lambda kv: order.get(kv[0], len(order))))
        return {**summary, "unit": "percent", "accuracy": acc} if "Avg" in acc else None
    if bench == "mme":
        if "total" not in own:
            return None
        tasks = {t: {"score": v, "acc": own.get(f"{t}.acc"), "acc_plus": own.get(f"{t}.acc_plus")}
                 for t, v in own.items()
                 if t not in _MME_PARTS and not t.endswith((".acc", ".acc_plus"))}
        return {**summary, "unit": "score", "tasks": tasks,
                **{part: own[part] for part in _MME_PARTS if part in own}}
    if "accuracy" not in own:
        return None
    categories = {k: v for k, v in own.items() if k != "accuracy"}
    return {**summary, "unit": "percent", "accuracy": own["accuracy"],
            "per_category": categories}


def headline_of(run: RunRecord) -> tuple[str | None, float | None]:
    """The run's headline metric and value: the `headline_metric` tag the evaluate stage
    sets, else the one `mmjobs.eval.report.headline` picks from the rebuilt summary."""
    name = run.tags.get("headline_metric")
    if name and name in run.metrics:
        return name, run.metrics[name]
    summary = summary_of(run)
    if summary is None:
        return None, None
    try:
        return headline(summary)
    except (KeyError, IndexError):  # a summary missing the headline's own numbers
        return None, None


def _as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _trains(run: RunRecord) -> bool:
    return run.is_training or run.stage == "train"


def _looks_like_location(value: str) -> bool:
    # URIs and paths differ per run by construction; they are never sweep settings.
    return "://" in value or value.startswith(("/", "./", "~"))


class RunSet:
    """The runs of a report and the pipeline (parent) runs they belong to.

    Args:
        runs: the stage runs, oldest first.
        parents: pipeline runs by run id (for settings inherited from a pipeline run).
    """

    def __init__(self, runs: Sequence[RunRecord],
                 parents: Mapping[str, RunRecord] | None = None) -> None:
        self.runs = list(runs)
        self.parents = dict(parents or {})
        self._siblings: dict[str | None, list[RunRecord]] = {}
        for run in self.runs:
            if _trains(run):
                self._siblings.setdefault(run.parent_run_id, []).append(run)

    @property
    def training(self) -> list[RunRecord]:
        return [r for r in self.runs if r.is_training]

    def evaluations(self) -> dict[str, list[RunRecord]]:
        """Runs with benchmark numbers, by benchmark (in run order)."""
        out: dict[str, list[RunRecord]] = {}
        for run in self.runs:
            if run.benchmark is not None and summary_of(run) is not None:
                out.setdefault(run.benchmark, []).append(run)
        return out

    def setting(self, run: RunRecord, key: str) -> str | None:
        """The run's value for sweep param `key`.

        Looked up on the run itself (param, then tag), then on its pipeline run, then on the
        training runs of the same pipeline run if they all agree (an evaluate run's config has
        no `train.*` fields; a pipeline run per sweep setting still places it).
        """
        if (value := run.value(key)) is not None:
            return value
        if _trains(run) and key.startswith("train."):
            return None  # its config has every train setting its mode uses (align: no LoRA)
        parent = self.parents.get(run.parent_run_id or "")
        if parent is not None and (value := parent.value(key)) is not None:
            return value
        siblings = self._siblings.get(run.parent_run_id, []) if run.parent_run_id else []
        values = {v for s in siblings if s is not run and (v := s.value(key)) is not None}
        return values.pop() if len(values) == 1 else None

    def detect_sweep_params(self, runs: Iterable[RunRecord], limit: int = 3) -> list[str]:
        """Params that take at least two values across `runs`: the `sweep.setting` tag if any
        run has one, else `sweep.*` / `train.*` params (URIs and paths excluded), at most
        `limit` of them, those with the fewest distinct values first (settings, not ids)."""
        runs = list(runs)
        if any(self.setting(r, SWEEP_TAG) for r in runs):
            return [SWEEP_TAG]
        candidates: list[str] = []
        for source in (*runs, *self.parents.values(), *self.training):
            candidates += [k for k in source.params if k.startswith(SWEEP_PREFIXES)]
        found: list[tuple[int, str]] = []
        for key in dict.fromkeys(candidates):
            values = [self.setting(r, key) for r in runs]
            distinct = {v for v in values if v is not None}
            if len(distinct) >= 2 and not any(_looks_like_location(v) for v in distinct):
                found.append((len(distinct), key))
        return [key for _, key in sorted(found)[:limit]]

    def display_names(self, runs: Sequence[RunRecord],
                      sweep_params: Sequence[str] = ()) -> dict[str, str]:
        """run id -> a short name unique among `runs`: label and sweep settings ("trained",
        "cosine", "lr_schedule=step, dropout=inc"); a training run's step name and the
        settings it has ("sft · lr=0.002"); else the run name; run ids are appended where
        names collide."""
        names: dict[str, str] = {}
        for run in runs:
            settings = [(k, v) for k in sweep_params if (v := self.setting(run, k)) is not None]
            parts = [run.label] if run.label else []
            step = _trains(run) and not run.label
            if step:  # its step (align, sft-baseline) first, then settings it does not say
                parts = [run.name]
                settings = [(k, v) for k, v in settings if v not in run.name]
            if len(settings) == 1 and not step:
                parts.append(settings[0][1])
            else:
                parts += [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings]
            names[run.run_id] = " · ".join(dict.fromkeys(parts)) or run.name
        counts: dict[str, int] = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        return {rid: f"{name} [{rid[:8]}]" if counts[name] > 1 else name
                for rid, name in names.items()}


__all__ = ["PARENT_TAG", "SWEEP_TAG", "RunRecord", "RunSet", "headline_of", "summary_of"]
