"""What a local pipeline run prints: one line per step, and a failure that names the step.

KFP's local runner prints each task's subprocess output and its own progress on stdout, in
the thread running the task. `step_logs` puts a `StepLogs` there for the run: it names the
step each task runs, keeps each task's last lines, and drops KFP's executor chatter unless
`--verbose`; `step_error` turns KFP's "Inner task failed: 'train-2'" into a `PipelineError`
with the step's name, its stage and those last lines.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FAILED_TASK = re.compile(r"Inner task failed: '([^']+)'")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
TAIL_LINES = 40
_JSON_LINE = re.compile(r'^(?:[{}\[\]],?|"[^"]+": .*)$')


class PipelineError(RuntimeError):
    """A step failed; the message names it and ends with its log tail."""


class StepLogs(io.TextIOBase):
    """Stdout during a local run. KFP's local runner prints every task's subprocess output
    and its own progress lines (through a logging handler on stdout) here, in the thread
    running the task: this keeps each task's recent lines for error messages, names the step
    a task runs, and drops KFP's executor chatter unless verbose."""

    def __init__(self, out: Any, verbose: bool, steps: dict[str, str]) -> None:
        self.out, self.verbose, self.steps = out, verbose, steps
        self.tails: dict[str, collections.deque[str]] = {}
        self._task: dict[int, str] = {}
        self._partial: dict[int, str] = {}
        self._lock = threading.Lock()

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

    def _line(self, ident: int, line: str) -> None:
        plain = _ANSI.sub("", line)
        started = _EXECUTING.search(plain)
        if started:
            task = started.group(1)
            self._task[ident] = task
            self.tails[task] = collections.deque(maxlen=TAIL_LINES)
            if task in self.steps:
                line += f" (step {self.steps[task]})"
        elif (task := self._task.get(ident)) is not None and not _is_executor_dump(plain):
            self.tails[task].append(plain.rstrip())
        if self.verbose or not _is_chatter(plain):
            self.out.write(line + "\n")
            self.out.flush()  # progress shows as it happens, also when piped to a file

    def flush(self) -> None:
        self.out.flush()


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
    return (_is_executor_dump(line) or stripped == "Streamed logs:" or set(stripped) == {"-"}
            or "real_accelerator.py" in stripped)


@contextlib.contextmanager
def step_logs(verbose: bool, build: Any) -> Iterator[StepLogs]:
    """Stdout (and KFP's print) redirected to a `StepLogs` while a local run runs."""
    logs = StepLogs(sys.stdout, verbose, {s.task: s.name for s in build.steps})
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
        sys.stdout = previous
        # KFP's local runner indents each task's output by swapping builtins.print in and out
        # (kfp.local.logging_utils.indented_print); tasks running in parallel threads can leave
        # an indenting print behind for the rest of the process. Put the original back.
        builtins.print = previous_print


def step_error(error: RuntimeError, build: Any, logs: StepLogs) -> Exception:
    """KFP's "Inner task failed: 'train-2' ..." as the step name, stage and log tail."""
    message = _ANSI.sub("", str(error))
    match = _FAILED_TASK.search(message)
    if match is None:
        return error
    task = match.group(1)
    step = next((s for s in build.steps if s.task == task), None)
    name = f"step '{step.name}' (stage {step.stage})" if step else f"task '{task}'"
    tail = "\n".join(f"    {line}" for line in logs.tails.get(task, [])) or "    (no output)"
    return PipelineError(
        f"{name} failed. Last lines of its log:\n{tail}\n"
        "Fix the cause and run the same command again: finished steps are reused and "
        "training resumes from its last checkpoint.")
