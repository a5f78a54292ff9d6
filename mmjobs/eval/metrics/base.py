"""Shared pieces of the metric registry: `Metric`, `ScoreOptions`, `ScoreInputError`, field checks.

A metric is two pure functions over prediction rows (dicts read from a predictions JSONL):

- `score_row(row, options) -> dict`: the per-row score fields written to `scores.jsonl`;
- `summarize(rows, scores, options) -> dict`: the summary written to `summary.json`, computed
  from every row and its scores (group-level rules such as MME acc+ or MMBench circular groups
  live here).

Rows are validated before scoring (`Metric.check_row`), so metric code may assume the fields
named in `required_fields` exist and have the right shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Row = Mapping[str, Any]
Check = Callable[[Any], str | None]
"""A field check: returns a short description of what is wrong, or None when the value is fine."""


class ScoreInputError(ValueError):
    """A predictions file (or the options it is scored with) cannot be scored.

    Attributes:
        source: the predictions URI or path.
        errors: one line per problem, e.g. ``line 7: missing field 'answers'``.
    """

    MAX_LISTED = 20

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(source, self.errors)

    def __str__(self) -> str:
        n = len(self.errors)
        lines = [f"{self.source}: {n} problem{'' if n == 1 else 's'}"]
        lines += [f"  {e}" for e in self.errors[: self.MAX_LISTED]]
        if n > self.MAX_LISTED:
            lines.append(f"  ... and {n - self.MAX_LISTED} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class ScoreOptions:
    """How to score: the metric variant and, for ChartQA, the relaxed-accuracy tolerances."""

    variant: str
    tolerances: tuple[float, ...] = ()


@dataclass(frozen=True)
class Metric:
    """One benchmark metric.

    Attributes:
        name: registry key and `--metric` value.
        title: human-readable name for tables.
        variants: accepted `--variant` values; the first is the default.
        required_fields: field -> check, besides `id` and `prediction` (always required).
        score_row: per-row scorer (see module docstring).
        summarize: aggregate scorer (see module docstring).
        render: summary -> markdown table(s).
        optional_fields: field -> check, applied only when the field is present and not null.
        check_consistency: row -> problems involving several fields (e.g. answer index in range).
        check_dataset: (rows, where each came from, e.g. "line 7") -> problems involving
            several rows (e.g. MME pairs).
    """

    name: str
    title: str
    variants: tuple[str, ...]
    required_fields: Mapping[str, Check]
    score_row: Callable[[Row, ScoreOptions], dict[str, Any]]
    summarize: Callable[[Sequence[Row], Sequence[Mapping[str, Any]], ScoreOptions], dict[str, Any]]
    render: Callable[[Mapping[str, Any]], str]
    optional_fields: Mapping[str, Check] = field(default_factory=dict)
    check_consistency: Callable[[Row], list[str]] | None = None
    check_dataset: Callable[[Sequence[Row], Sequence[str]], list[str]] | None = None

    @property
    def default_variant(self) -> str:
        return self.variants[0]

    def check_row(self, row: Row) -> list[str]:
        """Every problem with one row (empty when it can be scored)."""
        problems: list[str] = []
        for name, check in {**COMMON_FIELDS, **self.required_fields}.items():
            if name not in row:
                problems.append(f"missing field {name!r}")
            elif (problem := check(row[name])) is not None:
                problems.append(f"field {name!r}: {problem}")
        for name, check in self.optional_fields.items():
            if row.get(name) is not None and (problem := check(row[name])) is not None:
                problems.append(f"field {name!r}: {problem}")
        if not problems and self.check_consistency is not None:
            problems += self.check_consistency(row)
        return problems


# --------------------------------------------------------------------------- field checks


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {show(value)}"


def is_id(value: Any) -> str | None:
    ok = isinstance(value, str | int) and not isinstance(value, bool)
    return None if ok else f"expected a string or integer id, got {show(value)}"


def is_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"expected an integer, got {show(value)}"


def is_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {show(value)}"


def is_str_list(length: int | None = None) -> Check:
    """A check for a list of strings, optionally of an exact length."""

    def check(value: Any) -> str | None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"expected a list of strings, got {show(value)}"
        if not value:
            return "expected a non-empty list"
        if length is not None and len(value) != length:
            return f"expected {length} strings, got {len(value)}"
        return None

    return check


def one_of(*allowed: str, lower: bool = False) -> Check:
    """A check for a string among `allowed` (compared lower-cased when `lower`)."""

    def check(value: Any) -> str | None:
        if isinstance(value, str) and (value.lower() if lower else value) in allowed:
            return None
        return f"expected one of {', '.join(allowed)}, got {show(value)}"

    return check


COMMON_FIELDS: dict[str, Check] = {"id": is_id, "prediction": is_str}


# --------------------------------------------------------------------------- summaries


def ratio(hits: float, total: int, scale: float = 100.0) -> float | None:
    """`scale * hits / total`, or None for an empty category (the references divide by zero)."""
    return scale * hits / total if total else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns (readable as plain text too); first column left."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if i == 0 else ("-" * (w + 1) + ":")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])
