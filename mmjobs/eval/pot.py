"""Program-of-thought (PoT) answers: run model-written Python in a sandbox, score what it prints.

ChartMoE evaluates ChartQA "with PoT" by prompting for a Python program that prints the answer
and executing it (IDEA-FinAI/ChartMoE, `chartmoe/eval_ChartQA.py`): `extract_python_content`
takes the first ```` ```python ```` block (else the whole response is run), `execute_python_code`
`exec`s it and keeps everything it printed, a failed run becomes the answer
`"error running..."`, and the printed text then goes through
`.replace("True", "Yes").replace("False", "No").strip()`. `chartmoe_answer` and `ERROR_ANSWER`
reproduce that post-processing exactly (note the substring replacement: "Trueness" becomes
"Yesness", as in ChartMoE). Two deliberate differences: `extract_program` also accepts a
plain ```` ``` ```` block before falling back to the whole response, and the program runs in
a fresh interpreter with its own globals instead of inside the evaluator's function
(`split_locals=True` restores ChartMoE's separate-locals scoping, where functions and
comprehensions cannot see top-level names).

ChartMoE runs model output in its own process; here every program runs in a sandboxed child
(`_pot_runner.py`), and whatever it does is reported per sample as a `PotResult`:

- no credentials — parent: the child's environment is only PATH, LANG, HOME and TMPDIR (the
  work dir) and BLAS thread counts; nothing is inherited.
- no site or user configuration — parent: `python -I -S -B` (isolated mode, no site, no
  bytecode writes); the program gets the stdlib and, optionally, site-packages on its path.
- scratch space — parent: a fresh temp work dir as cwd, deleted afterwards.
- wall clock — parent: SIGKILLs the child's process group (`start_new_session`) at `wall_s`.
- output volume — parent: reads stdout and stderr incrementally and kills the child past
  `max_output_bytes`; it never buffers more than the cap.
- network — kernel: an empty network namespace (`unshare --net`, as root, or with a user
  namespace otherwise) when the system permits; hook: every `socket.*` event.
- processes — hook: fork, exec, spawn, system, Popen, kill, `_posixsubprocess`; kernel:
  RLIMIT_NPROC=0, which Linux ignores for root (so it holds only for non-root or after the uid
  drop).
- uid — child, as root: switches to `nobody` before the program runs, if `nobody` can read the
  stdlib and site-packages (else it stays root and says so in `PotResult.protections`).
- CPU, memory, file size, open files, core dumps — kernel: rlimits (soft == hard, except CPU:
  SIGXCPU, then SIGKILL a second later) set by the child's trusted bootstrap before the program
  starts. Not in a `preexec_fn`: that is unsafe in a threaded parent, and `run_programs` is one.
- files — hook: writes only inside the work dir; reads only there, in the stdlib, in
  site-packages; no directory fds, chdir, chmod, links.
- interpreter — hook: no tracing, gc walking, subinterpreters, ctypes, rlimit changes, or
  swapping the code of the hook's own functions.

The audit hook is a Python-level policy, not a security boundary: C code that opens files or
sockets without raising audit events bypasses it. The kernel layers (uid drop, netns, rlimits,
empty environment, process-group kill) are what still hold then; where they are unavailable
(not root and no user namespaces) the hook is the only file/network barrier.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from mmjobs.logs import get_logger

log = get_logger(__name__)

PotStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "forbidden"]

ERROR_ANSWER = "error running..."  # ChartMoE's prediction for a program that failed
VIOLATION_EXIT = 86  # keep in sync with _pot_runner.VIOLATION_EXIT
_RUNNER = Path(__file__).with_name("_pot_runner.py")
_CHUNK = 64 * 1024
_STATUS_CAP = 16 * 1024
_PYTHON_BLOCK = re.compile(r"```python(.*?)```", re.DOTALL)  # ChartMoE's pattern, verbatim
_ANY_BLOCK = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the program)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one program run.

    Attributes:
        wall_s: wall-clock limit; the parent kills the process group after it.
        cpu_s: CPU-seconds limit (RLIMIT_CPU; SIGXCPU, then SIGKILL a second later).
        memory_bytes: address-space limit (RLIMIT_AS); numpy imports within 128 MB of it.
        max_output_bytes: stdout (and, separately, stderr) cap; past it the run is killed.
        max_file_bytes: largest file the program may write in its work dir (RLIMIT_FSIZE).
        max_open_files: RLIMIT_NOFILE.
        site_packages: put this environment's site-packages on the program's path (numpy).
        drop_privileges: when running as root, run the program as `nobody`.
        isolate_network: run in an empty network namespace when the system permits it.
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 64 << 10
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    site_packages: bool = True
    drop_privileges: bool = True
    isolate_network: bool = True

    def __post_init__(self) -> None:
        errors = [f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}"
                  for name in ("wall_s", "cpu_s", "memory_bytes", "max_output_bytes",
                               "max_file_bytes", "max_open_files")
                  if not getattr(self, name) > 0]
        if self.max_open_files < 16:
            errors.append(f"SandboxLimits.max_open_files must be >= 16 (the interpreter needs "
                          f"a few), got {self.max_open_files}")
        if errors:
            raise ValueError("; ".join(errors))


DEFAULT_LIMITS = SandboxLimits()


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
        protections: the layers that were in force (empty-env, rlimits, audit-hook, uid-drop,
            netns); empty if the program never started.
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
                split_locals: bool = False) -> PotResult:
    """Run one program in the sandbox and turn what it printed into an answer.

    Args:
        code: Python source (see `extract_program`).
        limits: resource limits.
        split_locals: run with separate globals and locals, as ChartMoE's `exec(code)` inside
            a function does (for score parity with ChartMoE's reported numbers).

    Returns:
        A `PotResult`; every failure of the program (exception, limit, refused operation) is
        reported in it, never raised.

    Raises:
        SandboxError: the sandbox could not start (missing interpreter, runner crashed before
            the program ran); such a failure says nothing about the program.
    """
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="mmjobs-pot-")
    status_r, status_w = os.pipe()
    try:
        # errors="replace": a lone surrogate in model output must not crash the batch.
        Path(workdir, "program.py").write_text(code, encoding="utf-8", errors="replace")
        command, netns = _command(limits, split_locals, status_w)
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                env=_child_env(workdir), start_new_session=True, pass_fds=(status_w,))
        except OSError as e:
            raise SandboxError(f"could not start the PoT sandbox: {e}") from e
        os.close(status_w)
        status_w = -1
        try:
            run = _collect(proc, status_r, limits, started)
        finally:
            if proc.returncode is None:  # _collect raised: do not leave the child behind
                _kill(proc)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return _result(run, limits, time.monotonic() - started, netns)
    finally:
        os.close(status_r)
        if status_w != -1:
            os.close(status_w)
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(codes: Sequence[str], *, limits: SandboxLimits = DEFAULT_LIMITS,
                 workers: int = 2, split_locals: bool = False) -> list[PotResult]:
    """`run_program` over a batch, `workers` at a time; results come back in input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pot") as pool:
        return list(pool.map(
            functools.partial(run_program, limits=limits, split_locals=split_locals), codes))


# --- launching ---------------------------------------------------------------------------------

def _command(limits: SandboxLimits, split_locals: bool,
             status_fd: int) -> tuple[list[str], bool]:
    """The child's argv, and whether it runs in its own network namespace."""
    uid = gid = None
    if limits.drop_privileges and os.geteuid() == 0:
        uid, gid = _sandbox_user()
    site_paths = []
    if limits.site_packages:
        paths = sysconfig.get_paths()
        site_paths = sorted({paths["purelib"], paths["platlib"]})
    cfg = {
        "status_fd": status_fd, "site_paths": site_paths, "drop_uid": uid, "drop_gid": gid,
        "split_locals": split_locals,
        # rlimits are whole numbers; round CPU seconds up rather than cut a program short.
        "limits": {"cpu_s": math.ceil(limits.cpu_s), "memory_bytes": int(limits.memory_bytes),
                   "max_file_bytes": int(limits.max_file_bytes),
                   "max_open_files": int(limits.max_open_files)},
    }
    prefix = list(_netns_prefix()) if limits.isolate_network else []
    argv = [*prefix, sys.executable, "-I", "-S", "-B", "-X", "utf8", str(_RUNNER),
            json.dumps(cfg)]
    return argv, bool(prefix)


def _child_env(workdir: str) -> dict[str, str]:
    # Nothing inherited: the parent may hold cloud and tracking credentials.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            # One BLAS thread: RLIMIT_NPROC=0 forbids threads as well as processes.
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.cache
def _sandbox_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare --net --` when a new network namespace works here (probed once), else ()."""
    unshare = shutil.which("unshare")
    if unshare is None:
        log.info("PoT sandbox: `unshare` not found; network is blocked by the audit hook only")
        return ()
    # Without root, a user namespace (mapping us to root inside it) is needed for a netns.
    prefix = (unshare, "--net") if os.geteuid() == 0 else (unshare, "--net", "--map-root-user")
    try:
        probe = subprocess.run([*prefix, "--", sys.executable, "-I", "-S", "-c", ""],
                               env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30)
        ok = probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        log.info("PoT sandbox: network namespaces unavailable; network is blocked by the "
                 "audit hook only")
        return ()
    return (*prefix, "--")


# --- collecting --------------------------------------------------------------------------------

@dataclass
class _Run:
    stdout: bytearray
    stderr: bytearray
    status: bytearray
    stdout_bytes: int
    killed_for: str | None  # "timeout" | "output_limit" | None
    exit_code: int | None
    cpu_s: float


def _collect(proc: subprocess.Popen, status_fd: int, limits: SandboxLimits,
             started: float) -> _Run:
    """Read the child's pipes until EOF or a limit, then reap it (with its CPU time)."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    caps = {out_fd: limits.max_output_bytes, err_fd: limits.max_output_bytes,
            status_fd: _STATUS_CAP}
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
                if len(chunk) > room and key.fd != status_fd:
                    killed_for = "output_limit"  # never buffer more than the cap
                    break
    if killed_for is None:
        # All pipes closed; the child may still be running (it can close its own stdout).
        while time.monotonic() < deadline:
            pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(wait_status)
                return _Run(bufs[out_fd], bufs[err_fd], bufs[status_fd], stdout_bytes, None,
                            proc.returncode, usage.ru_utime + usage.ru_stime)
            time.sleep(0.005)
        killed_for = "timeout"
    _kill(proc)
    _, wait_status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return _Run(bufs[out_fd], bufs[err_fd], bufs[status_fd], stdout_bytes, killed_for,
                proc.returncode, usage.ru_utime + usage.ru_stime)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group and the child (it may have left the group)."""
    if proc.returncode is not None:
        return
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(proc.pid, signal.SIGKILL)


def _status_lines(raw: bytes) -> tuple[tuple[str, ...] | None, str | None, str]:
    """(protections from the ready line or None, final status or None, its detail)."""
    ready, final, detail = None, None, ""
    for line in raw.decode("utf-8", "replace").splitlines():
        status, _, text = line.partition("\t")
        if status == "ready" and ready is None:
            ready = tuple(text.split())
        elif status in ("ok", "error", "memory", "forbidden"):
            final, detail = status, text
    return ready, final, detail


def _result(run: _Run, limits: SandboxLimits, wall_s: float, netns: bool) -> PotResult:
    ready, final, detail = _status_lines(bytes(run.status))
    stderr_tail = run.stderr[-500:].decode("utf-8", "replace").strip()
    protections = (*ready, *(("netns",) if netns else ())) if ready is not None else ()

    def failed(status: PotStatus, why: str) -> PotResult:
        return PotResult(None, status, why, run.stdout_bytes, wall_s, run.cpu_s, protections)

    if run.killed_for == "output_limit":
        return failed("output_limit", f"printed more than {limits.max_output_bytes} bytes")
    if run.killed_for == "timeout":
        why = f"wall-clock limit of {limits.wall_s}s exceeded"
        return failed("timeout", why if ready is not None else why + " before the program started")
    code = run.exit_code
    if code == VIOLATION_EXIT:
        return failed("forbidden", detail if final == "forbidden" else "refused operation")
    if ready is None:
        raise SandboxError(f"PoT sandbox exited with {code} before running the program: "
                           f"{stderr_tail or '(no stderr)'}")
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and run.cpu_s >= limits.cpu_s):
            return failed("timeout", f"CPU limit of {limits.cpu_s}s exceeded ({sig.name})")
        return failed("error", f"killed by {sig.name}")
    if final == "ok" and code == 0:
        text = bytes(run.stdout).decode("utf-8", "replace")
        return PotResult(chartmoe_answer(text), "ok", "", run.stdout_bytes, wall_s, run.cpu_s,
                         protections)
    if final in ("error", "memory", "forbidden"):
        return failed(final, detail or stderr_tail)
    return failed("error", f"exited with {code}: {stderr_tail or '(no stderr)'}")
