"""PoT over a predictions file's rows, for the evaluate stage.

`run_rows` extracts every row's program, runs them (here, or in a credential-less pod with
`executor: pod`), writes the audit file and returns the executed rows with per-row records
and the summary the stage commits.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmjobs.eval.pot.sandbox import (
    ERROR_ANSWER,
    PotResult,
    check_isolation,
    extract_program,
    run_programs,
)
from mmjobs.eval.pot.settings import PotSettings
from mmjobs.logs import get_logger, progress

log = get_logger(__name__)
BATCH = 64  # programs per local batch (a progress line per batch)
NO_ISOLATION_WARNING = (
    "PoT programs run WITHOUT operating-system isolation (pot.isolation: none): only the "
    "audit hook and rlimits stand between model-written code and this process's files, "
    "network and credentials. Use pot.isolation: bubblewrap wherever user namespaces work.")
NO_ISOLATION_IN_POD_WARNING = (
    "PoT programs run without bubblewrap inside their pod (pot.isolation: none): the pod (no "
    "credentials, no token, no network but the store) is the only operating-system boundary, "
    "the audit hook and rlimits the only layers inside it.")

Runner = Callable[[PotSettings, Sequence[str]], tuple[list[PotResult], tuple[str, ...]]]


def run_rows(settings: PotSettings, rows: list[dict[str, Any]], audit: Path, *,
             pod_runner: Runner | None = None) -> tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]], dict[str, Any]]:
    """Run every row's program; rows get the executed answer as `prediction`.

    Args:
        settings: the stage's `pot` section.
        rows: validated metric rows (`prediction` holds the model's response).
        audit: where to write predictions_pot.jsonl (response, program, executed answer).
        pod_runner: runs the programs in a pod (`mmjobs.eval.pot.pod.run_in_pod`); needed when
            the executor is pod.

    Returns:
        (rows with executed predictions, one record per row, the summary's `pot` section).

    Raises:
        mmjobs.eval.pot.SandboxError: the programs cannot be isolated as `settings` ask (the
            message names the fix), checked before any program runs.
    """
    executor = settings.resolved_executor()
    programs = [extract_program(row["prediction"]) for row in rows]
    warning = _warning(settings, executor)
    if warning:
        log.warning("evaluate: %s", warning)
    if executor == "pod":
        if pod_runner is None:
            raise ValueError("pot.executor is pod: pass pod_runner")
        results, protections = pod_runner(settings, programs)
    else:
        protections = check_isolation(settings.isolation_config())  # fail before any work
        results = _run_local(settings, programs)
    executed, records = [], []
    with open(audit, "w", encoding="utf-8") as f:
        for row, program, result in zip(rows, programs, results, strict=True):
            record = {"status": result.status, "detail": result.detail[:500],
                      "wall_s": round(result.wall_s, 3), "cpu_s": round(result.cpu_s, 3),
                      "answer": result.answer}
            executed.append({**row, "prediction": result.prediction})
            records.append(record)
            f.write(json.dumps({"id": row["id"], "response": row["prediction"],
                                "program": program, "prediction": result.prediction,
                                "pot": record}, ensure_ascii=False) + "\n")
    bad = Counter(r["status"] for r in records if r["status"] != "ok")
    if bad:
        log.warning("evaluate: %d of %d programs did not run to completion (%s); they score as "
                    "%r", sum(bad.values()), len(records),
                    ", ".join(f"{k} {v}" for k, v in bad.most_common()), ERROR_ANSWER)
    return executed, records, summary(settings, records, executor, protections)


def _warning(settings: PotSettings, executor: str) -> str | None:
    if settings.isolation != "none":
        return None
    return NO_ISOLATION_IN_POD_WARNING if executor == "pod" else NO_ISOLATION_WARNING


def _run_local(settings: PotSettings, programs: list[str]) -> list[PotResult]:
    results: list[PotResult] = []
    batches = range(0, len(programs), BATCH)
    for start in progress(batches, total=len(batches), desc="evaluate: PoT batches"):
        results += run_programs(programs[start:start + BATCH], limits=settings.limits(),
                                isolation=settings.isolation_config(),
                                workers=settings.workers, split_locals=settings.split_locals)
    return results


def summary(settings: PotSettings, records: list[dict[str, Any]], executor: str,
            protections: Sequence[str]) -> dict[str, Any]:
    """The summary's `pot` section: counts, limits and how the programs were isolated."""
    counts = Counter(r["status"] for r in records)
    out = {"programs": len(records), "status_counts": dict(counts.most_common()),
           "ok_rate": counts["ok"] / len(records) if records else None,
           "limits": {"wall_s": settings.wall_s, "cpu_s": settings.cpu_s,
                      "memory_mb": settings.memory_mb, "disk_mb": settings.disk_mb},
           "split_locals": settings.split_locals, "isolation": settings.isolation,
           "executor": executor, "protections": list(protections)}
    if warning := _warning(settings, executor):
        out["warning"] = warning
    return out
