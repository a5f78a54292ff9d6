"""Running PoT programs: limits, isolation choice, the per-program result, collection and kill.

See the package docstring (`mmjobs.eval.pot`) for the layers; `launch` starts the process,
this module feeds it, reads what it prints (never more than the caps), enforces the wall
clock and turns the outcome into a `PotResult`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

from mmjobs.eval.pot import launch as launching
from mmjobs.eval.pot.bwrap import HOW_TO_FIX
from mmjobs.eval.pot.launch import SandboxError
from mmjobs.logs import get_logger

log = get_logger(__name__)

PotStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "forbidden"]
IsolationKind = Literal["bubblewrap", "none"]

ERROR_ANSWER = "error running..."  # ChartMoE's prediction for a program that failed
VIOLATION_EXIT = 86  # keep in sync with _runner.VIOLATION_EXIT
SANDBOX_FAILED_EXIT = 87  # keep in sync with _runner.SANDBOX_FAILED_EXIT
_CHUNK = 64 * 1024
_STATUS_CAP = 16 * 1024
_KILL_GRACE_S = 5.0  # how long bwrap gets to report its namespace gone after the kill
_PYTHON_BLOCK = re.compile(r"```python(.*?)```", re.DOTALL)  # ChartMoE's pattern, verbatim
_ANY_BLOCK = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one program run.

    Attributes:
        wall_s: wall-clock limit; the parent kills the whole sandbox after it.
        cpu_s: CPU-seconds limit (RLIMIT_CPU; SIGXCPU, then SIGKILL a second later).
        memory_bytes: address-space limit (RLIMIT_AS); numpy imports within 128 MB of it.
        max_output_bytes: stdout (and, separately, stderr) cap; past it the run is killed.
        max_file_bytes: largest single file the program may write (RLIMIT_FSIZE).
        disk_bytes: bubblewrap: size of the tmpfs work dir, the total the program can write.
        max_open_files: RLIMIT_NOFILE.
        max_processes: processes and threads the program may start; 0 (the default) refuses
            fork and clone in the seccomp filter and sets RLIMIT_NPROC to 0. Above 0 only to
            test the namespace kill: the audit hook still refuses Python-level forks.
        site_packages: put this environment's site-packages on the program's path (numpy).
        drop_privileges: isolation none, as root: run the program as `nobody` when it can
            read the interpreter (bubblewrap always runs it as 65534).
        isolate_network: isolation none: an empty network namespace when the system permits.
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 64 << 10
    max_file_bytes: int = 16 << 20
    disk_bytes: int = 64 << 20
    max_open_files: int = 64
    max_processes: int = 0
    site_packages: bool = True
    drop_privileges: bool = True
    isolate_network: bool = True

    def __post_init__(self) -> None:
        errors = [f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}"
                  for name in ("wall_s", "cpu_s", "memory_bytes", "max_output_bytes",
                               "max_file_bytes", "disk_bytes", "max_open_files")
                  if not getattr(self, name) > 0]
        if self.max_open_files < 16:
            errors.append(f"SandboxLimits.max_open_files must be >= 16 (the interpreter needs "
                          f"a few), got {self.max_open_files}")
        if self.max_processes < 0:
            errors.append(f"SandboxLimits.max_processes must be >= 0, got "
                          f"{self.max_processes}")
        if errors:
            raise ValueError("; ".join(errors))


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated from the evaluator.

    Attributes:
        kind: bubblewrap (the default: namespaces, seccomp, tmpfs, unprivileged user; fails
            with `SandboxError` where it cannot isolate) or none (the audit hook and rlimits
            only: for machines without user namespaces, chosen explicitly).
        bwrap: the bubblewrap executable (a name on PATH or a path).
        audit_hook: install the Python-level audit hook in the program's interpreter (the
            second layer). False only to test that the first layer holds on its own.
    """

    kind: IsolationKind = "bubblewrap"
    bwrap: str = "bwrap"
    audit_hook: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("bubblewrap", "none"):
            raise ValueError(f"Isolation.kind must be bubblewrap or none, got {self.kind!r}")


DEFAULT_ISOLATION = Isolation()


@dataclass(frozen=True)
class PotResult:
    """Outcome of one program.

    Attributes:
        answer: the printed output after ChartMoE's post-processing; None unless status is ok.
        status: ok | error | timeout | memory | output_limit | forbidden.
        detail: why, for anything but ok (exception, refused operation, limit hit).
        stdout_bytes: bytes the program wrote to stdout (read up to the cap plus one chunk).
        wall_s: wall-clock seconds including interpreter start-up.
        cpu_s: CPU seconds the child used.
        protections: the layers that were in force (bubblewrap, seccomp, disk-cap, userns or
            uid-drop, empty-env, rlimits, audit-hook; netns for isolation none); empty if the
            program never started.
    """

    answer: str | None
    status: PotStatus
    detail: str
    stdout_bytes: int
    wall_s: float
    cpu_s: float = 0.0
    protections: tuple[str, ...] = ()

    @property
    def prediction(self) -> str:
        """What ChartMoE scores: the answer, or `ERROR_ANSWER` for any failed run."""
        return self.answer if self.answer is not None else ERROR_ANSWER

    def to_dict(self) -> dict:
        return asdict(self)


def extract_program(response: str) -> str:
    """The program in a model response.

    The first ```` ```python ```` block (ChartMoE's regex, so the text right after the tag is
    kept as is), else the first fenced block with any or no language tag, else the whole
    response (which is what ChartMoE runs when there is no python block).
    """
    for pattern in (_PYTHON_BLOCK, _ANY_BLOCK):
        match = pattern.search(response)
        if match:
            return match.group(1)
    return response


def chartmoe_answer(stdout: str) -> str:
    """ChartMoE's post-processing of printed output (substring replacement, then strip)."""
    return stdout.replace("True", "Yes").replace("False", "No").strip()


def run_program(code: str, *, limits: SandboxLimits = DEFAULT_LIMITS,
                isolation: Isolation = DEFAULT_ISOLATION,
                split_locals: bool = False) -> PotResult:
    """Run one program in the sandbox and turn what it printed into an answer.

    Args:
        code: Python source (see `extract_program`).
        limits: resource limits.
        isolation: bubblewrap (default) or none.
        split_locals: run with separate globals and locals, as ChartMoE's `exec(code)` inside
            a function does (for score parity with ChartMoE's reported numbers).

    Returns:
        A `PotResult`; every failure of the program (exception, limit, refused operation) is
        reported in it, never raised.

    Raises:
        SandboxError: the sandbox could not start (bubblewrap missing or unable to create its
            namespaces, missing interpreter, runner crashed before the program ran); such a
            failure says nothing about the program.
    """
    started = time.monotonic()
    status_r, status_w = os.pipe()
    try:
        with launching.prepare(code, limits=limits, isolation=isolation,
                               split_locals=split_locals, status_fd=status_w) as launch:
            try:
                proc = subprocess.Popen(
                    launch.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, cwd=launch.cwd, env=launch.env,
                    start_new_session=True, pass_fds=launch.pass_fds, **launch.popen)
            except OSError as e:
                raise SandboxError(f"could not start the PoT sandbox ({launch.argv[0]}): {e}; "
                                   f"{HOW_TO_FIX}") from e
            os.close(status_w)
            status_w = -1
            launch.close_child_fds()
            try:
                run = _collect(proc, status_r, launch.info_fd, limits, started)
            finally:
                if proc.returncode is None:  # _collect raised: do not leave the child behind
                    _kill(proc, None)
                proc.stdout.close()
                proc.stderr.close()
            return _result(run, limits, isolation, time.monotonic() - started,
                           launch.protections)
    finally:
        os.close(status_r)
        if status_w != -1:
            os.close(status_w)


def run_programs(codes: Sequence[str], *, limits: SandboxLimits = DEFAULT_LIMITS,
                 isolation: Isolation = DEFAULT_ISOLATION, workers: int = 2,
                 split_locals: bool = False) -> list[PotResult]:
    """`run_program` over a batch, `workers` at a time; results come back in input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pot") as pool:
        return list(pool.map(functools.partial(run_program, limits=limits, isolation=isolation,
                                               split_locals=split_locals), codes))


def check_isolation(isolation: Isolation = DEFAULT_ISOLATION) -> tuple[str, ...]:
    """Run a trivial program under `isolation`; return the protections that were in force.

    Raises:
        SandboxError: the sandbox cannot run here (the message says what is missing and how
            to fix it), or it ran but did not isolate as it should.
    """
    result = run_program("print(6 * 7)", isolation=isolation,
                         limits=SandboxLimits(wall_s=30, cpu_s=10, site_packages=False))
    if (result.status, result.answer) != ("ok", "42"):
        raise SandboxError(f"PoT isolation {isolation.kind}: a trivial program ended "
                           f"{result.status} ({result.detail}); {HOW_TO_FIX}")
    if isolation.kind == "bubblewrap" and not {"bubblewrap", "seccomp"} <= set(
            result.protections):
        raise SandboxError(f"PoT isolation bubblewrap: layers missing from "
                           f"{result.protections}; {HOW_TO_FIX}")
    return result.protections


# --- collecting --------------------------------------------------------------------------------

@dataclass
class _Run:
    stdout: bytearray
    stderr: bytearray
    status: bytearray
    info: bytearray
    stdout_bytes: int
    killed_for: str | None  # "timeout" | "output_limit" | None
    exit_code: int | None
    cpu_s: float


def _collect(proc: subprocess.Popen, status_fd: int, info_fd: int | None,
             limits: SandboxLimits, started: float) -> _Run:
    """Read the child's pipes until EOF or a limit, then reap it (with its CPU time)."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    caps = {out_fd: limits.max_output_bytes, err_fd: limits.max_output_bytes,
            status_fd: _STATUS_CAP}
    if info_fd is not None:
        bufs[info_fd], caps[info_fd] = bytearray(), _STATUS_CAP
    deadline = started + limits.wall_s
    stdout_bytes, killed_for = 0, None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and killed_for is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = "timeout"
                break
            for key, _ in sel.select(remaining):
                try:
                    chunk = os.read(key.fd, _CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                if key.fd == out_fd:
                    stdout_bytes += len(chunk)
                buf = bufs[key.fd]
                room = caps[key.fd] - len(buf)
                buf += chunk[:max(room, 0)]
                if len(chunk) > room and key.fd in (out_fd, err_fd):
                    killed_for = "output_limit"  # never buffer more than the cap
                    break
    info = bufs.get(info_fd, bytearray()) if info_fd is not None else bytearray()
    if killed_for is None:
        # All pipes closed; the child may still be running (it can close its own stdout).
        while time.monotonic() < deadline:
            pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(wait_status)
                return _Run(bufs[out_fd], bufs[err_fd], bufs[status_fd], info, stdout_bytes,
                            None, proc.returncode, usage.ru_utime + usage.ru_stime)
            time.sleep(0.005)
        killed_for = "timeout"
    cpu_s = _kill(proc, _namespace_pid(info))
    return _Run(bufs[out_fd], bufs[err_fd], bufs[status_fd], info, stdout_bytes, killed_for,
                proc.returncode, cpu_s)


def _namespace_pid(info: bytes) -> int | None:
    """The host pid of the sandbox's PID-namespace init, from bwrap's --info-fd JSON."""
    try:
        pid = json.loads(bytes(info).decode("utf-8"))["child-pid"]
    except (ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) and pid > 1 else None


def _kill(proc: subprocess.Popen, namespace_pid: int | None) -> float:
    """End the child and everything it started; reap it; return its CPU seconds.

    Under bubblewrap, SIGKILL the PID namespace's init: the kernel then kills every process
    left in the namespace (orphans in new sessions included) before bwrap, its parent, sees
    it exit, so once bwrap is reaped nothing of the run is left. Otherwise (or if bwrap does
    not exit in time), SIGKILL the child's process group and the child; bwrap's
    --die-with-parent takes its namespace down with it.
    """
    if proc.returncode is not None:
        return 0.0
    if namespace_pid is not None and _is_child_of(namespace_pid, proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(namespace_pid, signal.SIGKILL)
        grace = time.monotonic() + _KILL_GRACE_S
        while time.monotonic() < grace:
            pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(wait_status)
                return usage.ru_utime + usage.ru_stime
            time.sleep(0.005)
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(proc.pid, signal.SIGKILL)
    _, wait_status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return usage.ru_utime + usage.ru_stime


def _is_child_of(pid: int, parent: int) -> bool:
    """Whether `pid` is still `parent`'s (unreaped) child, so the pid cannot have been reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last.
    fields = stat[stat.rfind(b")") + 2:].split()
    return len(fields) > 1 and fields[1] == str(parent).encode()


def _status_lines(raw: bytes) -> tuple[tuple[str, ...] | None, str | None, str, str | None,
                                       float]:
    """(protections from the ready line or None, final status or None, its detail, why the
    runner could not isolate the program or None, CPU seconds the runner reported or 0).

    Only lines before `ready` come from the runner alone: the program inherits the status fd
    (the audit hook reports through it), so it could write anything after that, and nothing
    it writes may turn into a sandbox failure that would stop the whole evaluation.
    """
    ready, final, detail, broken, cpu = None, None, "", None, 0.0
    for line in raw.decode("utf-8", "replace").splitlines():
        status, _, text = line.partition("\t")
        if ready is None and status == "sandbox":
            broken = text
        elif status == "ready" and ready is None:
            ready = tuple(text.split())
        elif status in ("ok", "error", "memory", "forbidden"):
            final, detail = status, text
        elif status == "cpu":
            with contextlib.suppress(ValueError):
                cpu = float(text)
    return ready, final, detail, broken, cpu if math.isfinite(cpu) else 0.0


def _result(run: _Run, limits: SandboxLimits, isolation: Isolation, wall_s: float,
            parent_layers: tuple[str, ...]) -> PotResult:
    ready, final, detail, broken, reported_cpu = _status_lines(bytes(run.status))
    # bwrap's init does not pass its child's CPU time on: the runner reports its own.
    cpu_s = max(run.cpu_s, reported_cpu)
    stderr_tail = run.stderr[-500:].decode("utf-8", "replace").strip()
    protections = (*parent_layers, *ready) if ready is not None else ()
    code = run.exit_code
    if isolation.kind == "bubblewrap" and code is not None and code > 128:
        code = -(code - 128)  # bwrap reports a child killed by signal N as 128 + N

    def failed(status: PotStatus, why: str) -> PotResult:
        return PotResult(None, status, why, run.stdout_bytes, wall_s, cpu_s, protections)

    if ready is None and (broken is not None or code == SANDBOX_FAILED_EXIT):
        raise SandboxError(f"PoT sandbox could not isolate the program: "
                           f"{broken or stderr_tail or '(no detail)'}; {HOW_TO_FIX}")
    if run.killed_for == "output_limit":
        return failed("output_limit", f"printed more than {limits.max_output_bytes} bytes")
    if run.killed_for == "timeout":
        why = f"wall-clock limit of {limits.wall_s}s exceeded"
        return failed("timeout", why if ready is not None else why + " before the program started")
    if code == VIOLATION_EXIT:
        return failed("forbidden", detail if final == "forbidden" else "refused operation")
    if ready is None:
        raise SandboxError(f"PoT sandbox ({isolation.kind}) exited with {code} before running "
                           f"the program: {stderr_tail or '(no stderr)'}; {HOW_TO_FIX}")
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        # SIGKILL after SIGXCPU was ignored: the CPU limit (a single-threaded program's CPU
        # time is at most its wall time, and bwrap's rusage does not include it).
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and max(cpu_s, wall_s)
                                     >= limits.cpu_s and limits.max_processes == 0):
            return failed("timeout", f"CPU limit of {limits.cpu_s}s exceeded ({sig.name})")
        return failed("error", f"killed by {sig.name}")
    if final == "ok" and code == 0:
        text = bytes(run.stdout).decode("utf-8", "replace")
        return PotResult(chartmoe_answer(text), "ok", "", run.stdout_bytes, wall_s, cpu_s,
                         protections)
    if final in ("error", "memory", "forbidden"):
        return failed(final, detail or stderr_tail)
    return failed("error", f"exited with {code}: {stderr_tail or '(no stderr)'}")
