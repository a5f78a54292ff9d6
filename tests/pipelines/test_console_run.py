"""`mmjobs run` as a person sees it: on a terminal (a pty, as `script` gives one) a live status
line of the running step; captured to a file, plain lines without colour codes; a user's
mistake in a step (here: every row rejected) ends in one message naming the step and the
cause, without a Python traceback; the full log is kept in the store.

Both runs fail at their first data step (the demo's prepare given LLaVA rows whose images are
missing), so they take seconds of steps, not a training run.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipelines import fixtures

pytestmark = pytest.mark.slow
ANSI = re.compile(r"\x1b\[")


def failing_run(tmp_path: Path) -> list[str]:
    """`mmjobs run chart-demo` (by name) whose prepare step rejects every row."""
    rows = [{"id": str(i), "image": f"coco/{i}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                               {"from": "gpt", "value": "A chart."}]} for i in range(3)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "images").mkdir()
    # The whole section replaced: the demo's chart-drawing options do not apply to llava.
    overrides = [*fixtures.chart_demo(),
                 f"stages.prepare={{source_format: llava, input: '{tmp_path / 'rows.json'}', "
                 f"image_root: '{tmp_path / 'images'}'}}"]
    return [sys.executable, "-m", "mmjobs.cli", "run", "chart-demo",
            *(arg for o in overrides for arg in ("--set", o))]


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMJOBS_", "MLFLOW_"))}
    return {**env, "MMJOBS_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
            "COLUMNS": "160"}


def test_a_captured_run_is_plain_and_a_rejected_rows_failure_has_no_traceback(tmp_path):
    proc = subprocess.run(failing_run(tmp_path), env=environment(tmp_path), cwd=Path.cwd(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not ANSI.search(proc.stdout), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    started = [line for line in proc.stdout.splitlines() if line.endswith("started")]
    assert any("prepare started" in line for line in started), proc.stdout
    assert re.search(r"\[\d+/\d+\] prepare FAILED \(failure\) in \d+s", proc.stdout)
    # One message: the step, the cause from the stage, and where the full log is.
    assert proc.stderr.count("mmjobs run: step 'prepare' (stage prepare) failed.") == 1
    assert "all 3 rows rejected; top reasons: image_missing 3" in proc.stderr
    log_uri = re.search(r"The full log: (\S+)", proc.stderr).group(1)
    full = Path(log_uri).read_text()
    assert "[prepare] " in full and "image_missing" in full and not ANSI.search(full)


def test_on_a_terminal_the_running_step_shows_live(tmp_path):
    main, child = pty.openpty()
    proc = subprocess.Popen(failing_run(tmp_path), env=environment(tmp_path), cwd=Path.cwd(),
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    seen = b""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child side closed: the run is over
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(main)
    text = seen.decode("utf-8", "replace")
    assert proc.returncode == 1, text
    # The status line: redrawn in place ("\r" + erase line), naming a running step and time.
    status = re.findall(r"\r\x1b\[K  \.\.\. ([^\r\n]*)", text)
    assert any(re.match(r"[\w-]+ \d+s", s) for s in status), text[-3000:]
    assert re.search(r"\[\d+/\d+\] prepare (?:\(prepare\) )?started", text)
    assert "Traceback" not in text
