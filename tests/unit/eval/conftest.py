"""Helpers for metric tests: score rows through the real `score_file` path."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from mmjobs.eval.score import score_file


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def score(tmp_path) -> Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]:
    """`score(metric, rows, **kw)` -> (summary, per-row scores), via files on disk."""
    calls = iter(range(1_000_000))

    def run(metric: str, rows: Sequence[dict[str, Any]], **kw: Any):
        n = next(calls)
        pred = write_jsonl(tmp_path / f"pred{n}.jsonl", rows)
        out = tmp_path / f"out{n}"
        summary = score_file(metric, pred, output=out, **kw)
        lines = (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()
        return summary, [json.loads(line) for line in lines]

    return run
