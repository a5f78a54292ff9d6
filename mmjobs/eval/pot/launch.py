"""How a PoT program's process is started: under bubblewrap, or (`isolation: none`) directly.

`prepare` builds a `Launch` (argv, environment, inherited fds, what to clean up) for one
program; `mmjobs.eval.pot.sandbox.run_program` starts it, collects its output and kills it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmjobs.eval.pot import bwrap, seccomp
from mmjobs.logs import get_logger

if TYPE_CHECKING:
    from mmjobs.eval.pot.sandbox import Isolation, SandboxLimits

log = get_logger(__name__)
RUNNER = Path(__file__).with_name("_runner.py")


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the program)."""


@dataclass
class Launch:
    """One child process to start (see `subprocess.Popen` for the fields it takes)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...]
    protections: tuple[str, ...]  # the parent-side layers; the runner reports its own
    info_fd: int | None = None  # read end of bwrap's --info-fd (the namespace's pid 1)
    popen: dict = field(default_factory=dict)  # extra Popen arguments (user, groups)
    child_fds: list[int] = field(default_factory=list)  # closed in the parent once started

    def close_child_fds(self) -> None:
        """Close the parent's copies of the child's fds (idempotent)."""
        while self.child_fds:
            os.close(self.child_fds.pop())


@contextlib.contextmanager
def prepare(code: str, *, limits: SandboxLimits, isolation: Isolation, split_locals: bool,
            status_fd: int) -> Iterator[Launch]:
    """The `Launch` for `code`; everything it created is closed or deleted on exit.

    Raises:
        SandboxError: bubblewrap is missing, or no seccomp filter exists for this machine.
    """
    with contextlib.ExitStack() as stack:
        if isolation.kind == "bubblewrap":
            launch = _bubblewrap(code, limits, isolation, split_locals, status_fd, stack)
        else:
            launch = _direct(code, limits, isolation, split_locals, status_fd, stack)
        yield launch


def runner_config(limits: SandboxLimits, isolation: Isolation, split_locals: bool, *,
                  status_fd: int, program: str, site_paths: list[str],
                  drop: tuple[int, int] | None, require_drop: bool) -> str:
    """The JSON argument of `_runner.py`."""
    return json.dumps({
        "status_fd": status_fd, "program": program, "site_paths": site_paths,
        "drop_uid": drop[0] if drop else None, "drop_gid": drop[1] if drop else None,
        "require_drop": require_drop, "split_locals": split_locals,
        "audit_hook": isolation.audit_hook,
        # rlimits are whole numbers; round CPU seconds up rather than cut a program short.
        "limits": {"cpu_s": math.ceil(limits.cpu_s), "memory_bytes": int(limits.memory_bytes),
                   "max_file_bytes": int(limits.max_file_bytes),
                   "max_open_files": int(limits.max_open_files),
                   "max_processes": int(limits.max_processes)},
    })


def sandbox_env(workdir: str) -> dict[str, str]:
    """The program's whole environment: nothing is inherited from the evaluator."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            # One BLAS thread: the sandbox refuses threads as well as processes.
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- bubblewrap --------------------------------------------------------------------------------

def _bubblewrap(code: str, limits: SandboxLimits, isolation: Isolation, split_locals: bool,
                status_fd: int, stack: contextlib.ExitStack) -> Launch:
    exe = bwrap.find_bwrap(isolation.bwrap)
    if exe is None:
        raise SandboxError(f"PoT isolation: bubblewrap not found (bwrap path "
                           f"{isolation.bwrap!r}); {bwrap.HOW_TO_FIX}")
    try:
        bpf = seccomp.filter_bytes(allow_processes=limits.max_processes > 0)
    except seccomp.SeccompUnsupported as e:
        raise SandboxError(f"PoT isolation: {e}; {bwrap.HOW_TO_FIX}") from e
    as_root = os.geteuid() == 0
    python, prefix = bwrap.interpreter()
    sites = bwrap.site_paths() if limits.site_packages else []
    # errors="replace": a lone surrogate in model output must not crash the batch.
    program_fd = _memfd(stack, "pot-program", code.encode("utf-8", "replace"))
    seccomp_fd = _memfd(stack, "pot-seccomp", bpf)
    info_r, info_w = os.pipe()
    stack.callback(os.close, info_r)
    config = runner_config(
        limits, isolation, split_locals, status_fd=status_fd, program=bwrap.PROGRAM_PATH,
        site_paths=sites, require_drop=as_root,
        drop=(bwrap.SANDBOX_UID, bwrap.SANDBOX_GID) if as_root else None)
    argv = bwrap.command(
        exe, python=python, ro_paths=bwrap.read_only_paths(prefix, sites), runner=str(RUNNER),
        program_fd=program_fd, seccomp_fd=seccomp_fd, info_fd=info_w,
        disk_bytes=limits.disk_bytes, env=sandbox_env(bwrap.WORKDIR), runner_args=[config],
        as_root=as_root)
    launch = Launch(
        argv=argv,
        # bwrap's own environment, which its pid 1 keeps (readable as /proc/1/environ).
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
        pass_fds=(status_fd, program_fd, seccomp_fd, info_w),
        protections=("bubblewrap", "seccomp", "disk-cap", *(() if as_root else ("userns",))),
        info_fd=info_r, child_fds=[info_w],
        # As root, start bwrap with no supplementary groups (root's would reach the runner).
        popen={"extra_groups": []} if as_root else {})
    stack.callback(launch.close_child_fds)
    return launch


def _memfd(stack: contextlib.ExitStack, name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    stack.callback(os.close, fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# --- isolation: none ---------------------------------------------------------------------------

def _direct(code: str, limits: SandboxLimits, isolation: Isolation, split_locals: bool,
            status_fd: int, stack: contextlib.ExitStack) -> Launch:
    """The old path: a host temp dir, the audit hook, rlimits, a uid drop and netns if any."""
    workdir = tempfile.mkdtemp(prefix="mmjobs-pot-")
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    program = os.path.join(workdir, "program.py")
    Path(program).write_text(code, encoding="utf-8", errors="replace")
    drop = _sandbox_user() if limits.drop_privileges and os.geteuid() == 0 else None
    sites = bwrap.site_paths() if limits.site_packages else []
    config = runner_config(limits, isolation, split_locals, status_fd=status_fd,
                           program=program, site_paths=sites, drop=drop, require_drop=False)
    prefix = list(_netns_prefix()) if limits.isolate_network else []
    argv = [*prefix, sys.executable, "-I", "-S", "-B", "-X", "utf8", str(RUNNER), config]
    return Launch(argv=argv, env=sandbox_env(workdir), cwd=workdir, pass_fds=(status_fd,),
                  protections=("netns",) if prefix else ())


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
