"""The engine of a local run: `mmjobs serve` on 127.0.0.1 standing in for vLLM & co.

`mmjobs run` has no Kubernetes, so a recipe with `eval.engine` gets the same pipeline shape
(engine-up → infer steps through the endpoint → engine-down) with `mmjobs serve` as the
engine: engine-up starts it in its own session (it outlives the step's process), waits until
/readyz answers and returns its /v1 URL; engine-down stops it. Each started server is
recorded as `<name>.json` (pid, port, log) in the run's engine folder, `$MMJOBS_LOCAL_ENGINES`,
which the local runner creates and, when the run ends however it ends (a failed step, Ctrl-C),
empties by stopping every server still recorded (`session`): no server outlives its run.

A record is only acted on if its pid still runs `mmjobs serve` (a reused pid is left alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mmjobs import settings
from mmjobs.logs import get_logger

log = get_logger(__name__)
ENV = "MMJOBS_LOCAL_ENGINES"  # the run's engine folder (set by the local runner)
LOG_TAIL = 20  # lines of a server's log quoted when it fails to start
_MARK = b"mmjobs.cli\0serve"  # what a recorded pid's command line must contain


class LocalEngineError(RuntimeError):
    """The local stand-in server did not start (the message quotes its log)."""


def engines_dir() -> Path:
    """The run's engine folder (`$MMJOBS_LOCAL_ENGINES`, else `$MMJOBS_HOME/engines`)."""
    folder = Path(os.environ.get(ENV) or settings.home() / "engines")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start(name: str, model: str, *, served_name: str, serve: dict[str, Any],
          timeout_s: float, run: str) -> str:
    """Start `mmjobs serve MODEL` on a free loopback port as engine `name` of run `run`
    and wait until it is ready; its /v1 URL. A server of that name already running (a
    re-run step) is stopped first.

    Raises:
        LocalEngineError: it exited or was not ready within `timeout_s` (it is stopped; the
            message quotes its log).
    """
    folder = engines_dir()
    stop(name)
    port = _free_port()
    log_path = folder / f"{name}.log"
    args = [sys.executable, "-m", "mmjobs.cli", "serve", model, "--host", "127.0.0.1",
            "--port", str(port)]
    for key, value in {**serve, "served_model_name": served_name}.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
        args += ["--set", f"{key}={text.removesuffix('...').strip()}"]
    with open(log_path, "wb") as out:
        # Its own session: it outlives this step's process, and stop() ends its whole group.
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    record = {"pid": proc.pid, "port": port, "name": name, "run": run, "model": model,
              "log": str(log_path)}
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / f"{name}.json")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            stop(name)
            raise LocalEngineError(f"engine {name}: `mmjobs serve` exited with "
                                   f"{proc.returncode} before it was ready: {_tail(log_path)}")
        if _ready(f"{base}/readyz"):
            log.info("engine %s: mmjobs serve %s ready at %s/v1 (pid %d, log %s)", name,
                     model, base, proc.pid, log_path)
            return f"{base}/v1"
        if time.monotonic() >= deadline:
            stop(name)
            raise LocalEngineError(f"engine {name}: not ready after {timeout_s:g} s: "
                                   f"{_tail(log_path)}")
        time.sleep(0.2)


def stop(name: str, folder: Path | None = None) -> bool:
    """Stop engine `name` (its whole process group) and forget it; False if it was not
    running (already stopped: nothing to do)."""
    path = (folder or engines_dir()) / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except ValueError:  # a torn record: nothing to trust in it
        path.unlink(missing_ok=True)
        return False
    pid = int(record["pid"])
    stopped = _terminate(pid)
    path.unlink(missing_ok=True)
    if stopped:
        log.info("engine %s: stopped mmjobs serve (pid %d)", name, pid)
    return stopped


def stop_all(folder: Path | None = None, run: str | None = None) -> list[str]:
    """Stop every engine recorded in `folder` (of run `run`, if given); their names."""
    folder = folder or engines_dir()
    names = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        if (run is None or record.get("run") == run) and stop(path.stem, folder):
            names.append(path.stem)
    return names


@contextlib.contextmanager
def session() -> Iterator[Path]:
    """A local run's engine folder (`$MMJOBS_LOCAL_ENGINES` for its steps); on exit, however
    the run ends, every engine still recorded there is stopped and the folder removed."""
    previous = os.environ.get(ENV)
    folder = Path(tempfile.mkdtemp(prefix="mmjobs-engines-"))
    os.environ[ENV] = str(folder)
    try:
        yield folder
    finally:
        left = stop_all(folder)
        if left:
            log.warning("stopped engines the pipeline left running: %s", ", ".join(left))
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def _terminate(pid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM the process group of `pid` (SIGKILL after `grace_s`) if `pid` runs
    `mmjobs serve`; True if it was running."""
    if not _is_server(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # our own child (a test's direct start): reap it
    return True


def _is_server(pid: int) -> bool:
    try:
        return _MARK in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(ln.strip() for ln in lines[-LOG_TAIL:] if ln.strip()) or "(empty log)"
