"""Pipeline runs: one intra-op thread per step process (see mmjobs.demo for why)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_thread_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
