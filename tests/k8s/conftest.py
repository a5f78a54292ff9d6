"""Fixtures for the manifest and chart tests.

Overrides the suite-wide autouse `isolated_env`: these tests need no MLflow database, so they
skip building the session's migrated template (~5-20 s), but still run without the shell's
credentials or service URLs.
"""

from __future__ import annotations

import pytest

from tests.conftest import _LEAKY_ENV


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch) -> None:
    for name in _LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "mmjobs-home"
    home.mkdir()
    monkeypatch.setenv("MMJOBS_HOME", str(home))
