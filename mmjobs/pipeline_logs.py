"""What a local pipeline run prints: a calm console, a full log, a failure that names the step.

KFP's local runner prints each task's subprocess output and its own progress on stdout, in
the thread running the task. `step_logs` puts a `StepLogs` there for the run. By default it
prints one line when a step starts and one when it finishes (done, reused or failed, with its
time); on a terminal a status line below them shows the running steps' latest log line
(training's step/loss lines, a converter's progress), redrawn in place; elsewhere (a pod, CI,
a file) that line is printed every `every_seconds` instead. Everything the steps print goes,
without colour codes, to the full log (the runner keeps it in the store); `--verbose` prints
it too. `step_error` turns KFP's "Inner task failed: 'train-2'" into a `PipelineError` with
the step's name, its stage and its last lines.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FAILED_TASK = re.compile(r"Inner task failed: '([^']+)'")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_REUSED = re.compile(r"output already committed for these inputs")
# The stage's own log prefix ("12:00:01 INFO mmjobs.train.metrics: "), and KFP's.
_LOG_PREFIX = re.compile(r"^\s*(?:\d\d:\d\d:\d\d(?:\.\d+)? (?:- )?\w+ (?:- )?(?:[\w.]+: )?)")
_NOT_STATUS = re.compile(r"Warning\b|^\s*(?:warnings\.warn|Traceback|File \")")
TAIL_LINES = 40
_JSON_LINE = re.compile(r'^(?:[{}\[\]],?|"[^"]+": .*)$')


class PipelineError(RuntimeError):
    """A step failed; the message names it and ends with its log tail."""


@dataclass
class _Step:
    """A running step as the console shows it."""

    name: str
    number: int
    started: float = field(default_factory=time.monotonic)
    latest: str = ""
    reused: bool = False
    shown_at: float = field(default_factory=time.monotonic)
    shown: str = ""


class StepLogs(io.TextIOBase):
    """Stdout during a local run (see the module docstring).

    Args:
        out: where the console lines go (the real stdout).
        verbose: print every line of every step as well.
        steps: KFP task name -> step name (and `stages` -> its stage), for the lines.
        full_log: where every line goes, colour codes removed (None: nowhere).
        live: redraw a status line in place; default: when `out` is a terminal.
        every_seconds: without `live`, how often a running step's latest line is printed.
    """

    def __init__(self, out: Any, verbose: bool, steps: dict[str, str],
                 stages: dict[str, str] | None = None, *, full_log: TextIO | None = None,
                 live: bool | None = None, every_seconds: float = 30.0) -> None:
        self.out, self.verbose, self.steps = out, verbose, steps
        self.stages = stages or {}
        self.full_log = full_log
        self.live = _is_terminal(out) if live is None else live
        self.every_seconds = every_seconds
        self.tails: dict[str, collections.deque[str]] = {}
        self.running: dict[str, _Step] = {}
        self.finished = 0
        self._task: dict[int, str] = {}
        self._partial: dict[int, str] = {}
        self._status_shown, self._status_text = False, ""
        self._lock = threading.Lock()

    # -- the stream

    def write(self, text: str) -> int:
        ident = threading.get_ident()
        with self._lock:
            buffered = self._partial.pop(ident, "") + text
            *lines, rest = buffered.split("\n")
            if rest:
                self._partial[ident] = rest
            for line in lines:
                self._line(ident, line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def close_status(self) -> None:
        """Clear the status line (the run is over)."""
        with self._lock:
            self._clear_status()

    # -- one line

    def _line(self, ident: int, line: str) -> None:
        plain = _ANSI.sub("", line).rstrip()
        if self.full_log is not None and not _is_executor_dump(plain):
            task = self._task.get(ident)
            self.full_log.write(f"[{self.steps.get(task, task)}] {plain}\n" if task else
                                plain + "\n")
        if started := _EXECUTING.search(plain):
            self._started(ident, started.group(1))
        elif finished := _FINISHED.search(plain):
            self._finished(finished.group(1), finished.group(2))
        elif (task := self._task.get(ident)) is not None and not _is_chatter(plain):
            self.tails[task].append(plain)
            if (step := self.running.get(task)) is not None:
                self._progress(step, plain)
        if self.verbose and not _is_chatter(plain):
            if started and (name := self.steps.get(started.group(1))):
                line, plain = f"{line} (step {name})", f"{plain} (step {name})"
            self._print(line if self.live else plain)
        elif self.live:
            self._draw_status()

    def _started(self, ident: int, task: str) -> None:
        self._task[ident] = task
        self.tails[task] = collections.deque(maxlen=TAIL_LINES)
        self.running[task] = step = _Step(self.steps.get(task, task),
                                          self.finished + len(self.running) + 1)
        if not self.verbose:
            self._print(f"{_clock()}  {self._counter(step)} {self._label(task)} started")

    def _finished(self, task: str, status: str) -> None:
        step = self.running.pop(task, None)
        if step is None:
            return
        self.finished += 1
        took = _duration(time.monotonic() - step.started)
        outcome = ("reused its committed output" if step.reused and status == "SUCCESS" else
                   "done" if status == "SUCCESS" else f"FAILED ({status.lower()})")
        if not self.verbose:
            self._print(f"{_clock()}  {self._counter(step)} {self._label(task)} {outcome} "
                        f"in {took}")

    def _progress(self, step: _Step, plain: str) -> None:
        if _REUSED.search(plain):
            step.reused = True
        message = _LOG_PREFIX.sub("", plain).strip()
        if not message or _NOT_STATUS.search(plain) or _is_chatter(plain):
            return
        step.latest = message
        now = time.monotonic()
        if (not self.live and not self.verbose and message != step.shown
                and now - step.shown_at >= self.every_seconds):
            step.shown, step.shown_at = message, now
            self._print(f"{_clock()}        {step.name}: {message}")

    # -- output

    def _counter(self, step: _Step) -> str:
        total = len(self.steps)
        return f"[{step.number}/{total}]" if total else f"[{step.number}]"

    def _label(self, task: str) -> str:
        name, stage = self.steps.get(task, task), self.stages.get(task)
        return f"{name} ({stage})" if stage and stage != name else name

    def _print(self, line: str) -> None:
        self._clear_status()
        self.out.write(line + "\n")
        if self.live:
            self._draw_status()
        self.out.flush()  # progress shows as it happens, also when piped to a file

    def _draw_status(self) -> None:
        if not self.running:
            return self._clear_status()
        now = time.monotonic()
        parts = [f"{s.name} {_duration(now - s.started)}{': ' + s.latest if s.latest else ''}"
                 for s in self.running.values()]
        width = shutil.get_terminal_size((100, 20)).columns - 1
        text = ("  ... " + " | ".join(parts))[:width]
        if self._status_shown and text == self._status_text:
            return  # unchanged: no redraw (lines can arrive thousands a second)
        self.out.write("\r\x1b[K" + text)
        self._status_shown, self._status_text = True, text
        self.out.flush()

    def _clear_status(self) -> None:
        if self._status_shown:
            self.out.write("\r\x1b[K")
            self._status_shown, self._status_text = False, ""


def _is_terminal(out: Any) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):
        return False


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _is_executor_dump(line: str) -> bool:
    """Lines of the executor input/output JSON KFP prints around each task (not the stage's
    own log lines, which start with a time, nor tracebacks)."""
    stripped = line.strip()
    return (not stripped or stripped.startswith("[KFP Executor")
            or _JSON_LINE.match(stripped) is not None)


def _is_chatter(line: str) -> bool:
    """Lines a person following a run does not need: KFP's executor input/output JSON,
    separators, and DeepSpeed's "Setting accelerator to CPU" on import."""
    stripped = line.strip()
    return (_is_executor_dump(line) or stripped.endswith("Streamed logs:")
            or set(stripped) == {"-"} or "real_accelerator.py" in stripped)


@contextlib.contextmanager
def step_logs(verbose: bool, build: Any, *, full_log: TextIO | None = None,
              live: bool | None = None) -> Iterator[StepLogs]:
    """Stdout (and KFP's print) redirected to a `StepLogs` while a local run runs."""
    logs = StepLogs(sys.stdout, verbose, {s.task: s.name for s in build.steps},
                    {s.task: s.stage for s in build.steps}, full_log=full_log, live=live)
    previous, previous_print = sys.stdout, builtins.print
    sys.stdout = logs  # type: ignore[assignment]  # KFP prints the subprocess output here
    try:
        with warnings.catch_warnings():
            # The local runner ignores display names and runs our stage images' code in this
            # environment, by design; its warnings about both would repeat for every task.
            warnings.filterwarnings("ignore", message=".*have no effect in the current local")
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image")
            yield logs
    finally:
        logs.close_status()
        sys.stdout = previous
        # KFP's local runner indents each task's output by swapping builtins.print in and out
        # (kfp.local.logging_utils.indented_print); tasks running in parallel threads can leave
        # an indenting print behind for the rest of the process. Put the original back.
        builtins.print = previous_print


def step_error(error: RuntimeError, build: Any, logs: StepLogs,
               full_log: str | None = None) -> Exception:
    """KFP's "Inner task failed: 'train-2' ..." as the step name, stage and log tail."""
    message = _ANSI.sub("", str(error))
    match = _FAILED_TASK.search(message)
    if match is None:
        return error
    task = match.group(1)
    step = next((s for s in build.steps if s.task == task), None)
    name = f"step '{step.name}' (stage {step.stage})" if step else f"task '{task}'"
    tail = "\n".join(f"    {line}" for line in logs.tails.get(task, [])) or "    (no output)"
    where = f"\nThe full log: {full_log}" if full_log else ""
    return PipelineError(
        f"{name} failed. Last lines of its log:\n{tail}{where}\n"
        "Fix the cause and run the same command again: finished steps are reused and "
        "training resumes from its last checkpoint.")
