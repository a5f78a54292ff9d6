"""Evaluation: official benchmark metrics and scoring of prediction files.

`mmjobs.eval.metrics` holds one module per benchmark metric, each reproducing a named reference
scorer (see `METRICS`); `mmjobs.eval.score.score_file` scores a predictions JSONL with one of
them and backs the `mmjobs score` command. The scoring functions are imported lazily so that
`python -m mmjobs.eval.score` runs the module only once.
"""

from __future__ import annotations

from typing import Any

from mmjobs.eval.metrics import METRICS, Metric, ScoreInputError, ScoreOptions

__all__ = ["METRICS", "Metric", "ScoreInputError", "ScoreOptions", "score_file", "score_main",
           "summary_markdown"]
_SCORE_API = ("score_file", "score_main", "summary_markdown")


def __getattr__(name: str) -> Any:
    if name in _SCORE_API:
        from mmjobs.eval import score

        return getattr(score, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
