"""The layer contracts of pyproject.toml ([tool.importlinter]) hold: core knows no component
(nor the recipe), components never import the recipe or stages, data and eval do not import
train, models does not import eval, stages do not import each other, pipelines reach stages
only through the registry.
`make lint` runs the same check; this puts it in `make test` (and so in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_layer_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "0 broken" in report and "stages do not import each other KEPT" in report


def test_every_core_module_is_under_the_core_contract():
    """A module added to mmjobs/ is core unless it is the command line, drives pipelines or
    is the recipe (which combines component configs); the contract lists the core by name, so
    a new one must be added there."""
    import tomllib

    app = {"__init__", "cli", "cli_serve", "demo", "doctor", "pipeline_runner", "pipeline_logs",
           "run_results", "recipe"}
    modules = {f"mmjobs.{p.stem}" for p in (ROOT / "mmjobs").glob("*.py") if p.stem not in app}
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in contracts["contracts"] if c["name"].startswith("core knows"))
    assert set(core["source_modules"]) == modules
