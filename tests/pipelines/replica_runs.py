"""Scaled-down recipe runs on the replicas of their real base models, and what tests read back.

A run is made once per test module by a module-scoped fixture (one per recipe), in its own
MMJOBS_HOME (store, MLflow database, KFP root) under the module's temp dir; every test of the
module inspects the same `ReplicaRun`. Readers here look at what a user would: committed step
outputs, the pretokenized shards' card and rejects, the labels as the base model's tokenizer
decodes them, the MLflow child runs' metrics, results.md and the evaluate summaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmjobs import pipeline_runner, storage
from tests.conftest import isolate
from tests.pipelines.runs import run_variables
from tests.shards import shard_files

IGNORE_INDEX = -100


@dataclasses.dataclass
class ReplicaRun:
    """One recipe's scaled-down run and where it ran."""

    recipe: str
    outcome: pipeline_runner.RunOutcome
    home: Path  # its MMJOBS_HOME
    overrides: list[str]

    @property
    def run_dir(self) -> Path:
        return Path(self.outcome.run_dir)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"


@contextlib.contextmanager
def run_environment(home: Path, mlflow_db_template: Path) -> Iterator[None]:
    """Its own MMJOBS_HOME and MLflow database, no credentials or proxies from the shell, one
    intra-op thread per step process (see mmjobs.demo for why)."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, home, mlflow_db_template)
        run_variables(mp)  # one thread per step, no proxy to the loopback judge
        yield


def run_recipe(recipe: str, root: Path, mlflow_db_template: Path,
               overrides: Callable[[Path], list[str]]) -> ReplicaRun:
    """Run `pipelines/recipes/<recipe>.yaml` with `overrides(data_dir)` under `root`."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    home = root / "mmjobs-home"
    with run_environment(home, mlflow_db_template):
        given = overrides(data)
        outcome = pipeline_runner.run_local(f"pipelines/recipes/{recipe}.yaml", given)
    return ReplicaRun(recipe, outcome, home, given)


# --------------------------------------------------------------------------- readers


def assert_steps_committed(run: ReplicaRun, steps: set[str], stage_count: int) -> None:
    """Every step ran now (none reused) and each of `steps` committed its output folder (a
    train step its `final/`, committed after its checkpoints)."""
    cached = run.outcome.stages_cached
    assert len(cached) == stage_count, sorted(cached)
    assert not any(cached.values()), cached  # a first run computes everything
    for step in steps:
        out = run.run_dir / step
        committed = storage.is_committed(str(out)) or storage.is_committed(str(out / "final"))
        assert committed, f"{step}: not committed"


def rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path`."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pretokenized(run: ReplicaRun, dataset_step: str) -> Path:
    """The committed pretokenized shards made from the run's `dataset_step` output."""
    dataset = str(run.run_dir / dataset_step)
    found = [card.parent for card in (run.home / "store" / "cache").rglob("card.json")
             if json.loads(card.read_text())["dataset"] == dataset]
    assert len(found) == 1, f"{dataset}: {len(found)} pretokenized outputs"
    assert storage.is_committed(str(found[0]))
    return found[0]


def assert_counts_reconcile(run: ReplicaRun, dataset_step: str) -> dict[str, Any]:
    """Rows in = rows written + rows rejected, the rows in are every row the dataset step
    committed, every reject has a row and a reason, and something is left to train on.
    Returns the card."""
    shards = pretokenized(run, dataset_step)
    card = json.loads((shards / "card.json").read_text())
    counts = card["counts"]
    samples = rows(run.run_dir / dataset_step / "samples.jsonl")
    assert counts["input"] == len(samples)
    assert counts["input"] == counts["written"] + counts["rejected"], counts
    assert counts["written"] > 0, card["rejected_by_reason"]
    rejects = rows(shards / "rejects.jsonl")
    assert len(rejects) == counts["rejected"]
    assert all(r["row"] and r["reason"] for r in rejects), rejects
    assert sum(card["rejected_by_reason"].values()) == counts["rejected"]
    assert card["max_length"] >= card["tokens"]["max_length"]
    return card


def decoded_labels(run: ReplicaRun, dataset_step: str, tokenizer_dir: Path) -> dict[str, str]:
    """Sample id -> its labelled tokens decoded by the base model's tokenizer (special tokens
    kept, so an EOS or separator the format trains on shows)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    out = {}
    for shard in shard_files(pretokenized(run, dataset_step)):
        table = pq.read_table(shard, columns=["id", "labels"]).to_pylist()
        for row in table:
            ids = [t for t in row["labels"] if t != IGNORE_INDEX]
            out[row["id"]] = tokenizer.decode(ids, skip_special_tokens=False)
    return out


def child_runs(run: ReplicaRun) -> list[Any]:
    """The MLflow runs of the pipeline run's steps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    parent = client.get_run(run.outcome.mlflow_run_id)
    return client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def train_losses(run: ReplicaRun) -> list[list[float]]:
    """Per train step run: its logged `loss` values in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    trains = [r for r in child_runs(run) if r.data.tags.get("mmjobs.stage") == "train"]
    histories = [sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)
                 for r in trains]
    return [[m.value for m in history] for history in histories]


def assert_trained(run: ReplicaRun, train_steps: int, max_steps: int = 2) -> None:
    """`train_steps` train runs, each logging a finite loss at every one of its steps."""
    losses = train_losses(run)
    assert len(losses) == train_steps, losses
    for values in losses:
        assert len(values) == max_steps and all(math.isfinite(v) for v in values), values


def evaluation(run: ReplicaRun, step: str) -> dict[str, Any]:
    """An evaluate step's summary.json."""
    return json.loads((run.run_dir / step / "summary.json").read_text())
