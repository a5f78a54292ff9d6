"""The real `serve` entrypoint as a subprocess on loopback, with its memory observable.

    with ServerProcess(model_dir, {"max_prompt_tokens": 512}, log) as server:
        Client(server.url).chat(...)
        with server.peak_rss() as peak:           # sampled every 10 ms
            ...                                   # the attack
        print(peak.growth_mb)

A subprocess, so the RSS measured is the server's own (the test's clients and payloads are
not in it) and clients and server do not share a GIL. Used by the hostile-input tests and
`tests/bench/bench_serve.py`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.integration.serve.client import Client
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[3]


def rss_kib(pid: int) -> int:
    """The process's resident set size (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Peak:
    """RSS before a block and the highest RSS sampled during it, in KiB."""

    before: int
    peak: int = 0

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024


class ServerProcess:
    """`python -m mmjobs.stages.serve` on a free loopback port.

    Args:
        model_dir: the model to serve.
        settings: more `--set` fields (e.g. limits).
        log: where the server's stderr goes.
        name: the served model name.
        python, cwd: the interpreter and checkout to run (default: this one), e.g. another
            worktree's, to compare versions in a bench.
    """

    def __init__(self, model_dir: Path, settings: dict[str, Any], log: Path,
                 name: str = "tiny-llava", *, python: str = sys.executable,
                 cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        sets = {"model": model_dir, "port": self.port, "served_model_name": name,
                "log_level": "warning", **settings}
        args = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
        self.proc = subprocess.Popen([python, "-m", "mmjobs.stages.serve", *args],
                                     cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=log.open("wb"), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        try:
            Client(self.url).wait_ready(timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"the server did not get ready: "
                               f"{self.log.read_text()[-2000:]}") from None
        return self

    def rss_mb(self) -> float:
        return rss_kib(self.pid) / 1024

    @contextlib.contextmanager
    def peak_rss(self, interval_s: float = 0.01) -> Iterator[Peak]:
        """Samples the server's RSS while the block runs; the `Peak` is filled in at exit."""
        peak = Peak(rss_kib(self.pid))
        done = threading.Event()

        def sample() -> None:
            while not done.wait(interval_s):
                peak.peak = max(peak.peak, rss_kib(self.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield peak
        finally:
            done.set()
            sampler.join()
            peak.peak = max(peak.peak, rss_kib(self.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
