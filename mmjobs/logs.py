"""One logging helper for the whole package.

Only rank 0 logs (under torchrun/DeepSpeed every rank imports the same code); progress is a
tqdm bar on a terminal and a periodic log line otherwise (pods, CI), so logs stay readable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_CONFIGURED = False


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank() == 0 or record.levelno >= logging.ERROR


class _StderrHandler(logging.StreamHandler):
    """`sys.stderr` as it was when logging was configured, or the current `sys.stderr` once
    that stream is closed (a test's capture, a tool's swapped stream): a handler left on a
    closed stream prints '--- Logging error ---' tracebacks instead of the message."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._configured_stream = self.stream

    @property  # type: ignore[override]
    def stream(self) -> Any:
        configured = self.__dict__.get("_configured_stream")
        if configured is None or getattr(configured, "closed", False):
            return sys.stderr
        return configured

    @stream.setter
    def stream(self, value: Any) -> None:
        self.__dict__["_configured_stream"] = value


def get_logger(name: str) -> logging.Logger:
    """Return the package logger `name`; configures the `mmjobs` root once (stderr, rank 0)."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("mmjobs")
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("MMJOBS_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("mmjobs") else f"mmjobs.{name}")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "",
             every_seconds: float = 30.0) -> Iterator[T]:
    """Iterate `items` with a progress bar on a terminal, or a log line every `every_seconds`."""
    if rank() != 0:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    log = get_logger("mmjobs.progress")
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_seconds:
            last = now
            rate = done / (now - start)
            of = f"/{total}" if total else ""
            log.info("%s: %d%s done (%.1f/s)", desc or "progress", done, of, rate)
    if done:
        log.info("%s: %d done in %.1fs", desc or "progress", done, time.monotonic() - start)
