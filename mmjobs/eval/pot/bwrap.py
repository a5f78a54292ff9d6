"""Bubblewrap command lines for the PoT sandbox: the operating-system boundary.

Each program runs under its own `bwrap` with:

- new PID, mount, network, IPC, UTS (and, where possible, cgroup) namespaces: it sees only
  its own processes in its own /proc, has no network but an unconfigured loopback, and ends
  with its PID namespace (`--die-with-parent`; the parent SIGKILLs the namespace's pid 1,
  which makes the kernel kill everything left in it, orphans in new sessions included);
- a root file system made of read-only binds of /usr (and the /bin, /lib symlinks or
  directories of this host), /etc/ld.so.cache, the interpreter's prefix, optionally
  site-packages (numpy), the runner script and the program; a fresh tmpfs work dir of
  `disk_bytes` (the only writable place: the total the program can write, across all its
  files); a new /dev with null, zero, full, random, urandom, tty, then the root and /dev
  remounted read-only;
- no inherited environment (`--clearenv`, and `bwrap` itself starts with an empty one, so
  not even its pid 1 holds the evaluator's variables), a new session (no terminal), no
  capabilities, no_new_privs, and the seccomp filter of `mmjobs.eval.pot.seccomp`;
- an unprivileged user, never root:
  - not root: a new user namespace mapping the caller's uid to 65534 inside
    (`--unshare-user --uid 65534 --gid 65534 --disable-userns`);
  - root: no user namespace (root's would map the sandbox to uid 0 outside, which owns host
    files and /proc/sys entries); `bwrap` mounts as root and keeps only CAP_SETUID,
    CAP_SETGID and CAP_CHOWN for the runner, which hands the work dir to 65534:65534 and
    switches to it, with no supplementary groups, before the program gets control (or fails
    the run). The interpreter therefore need not be reachable by `nobody` through its path
    (a venv under a 0700 /root works); only its files must be world-readable.

Nothing of the run is on the host file system: the work dir vanishes with the mount namespace.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SANDBOX_UID = SANDBOX_GID = 65534
# Everything of the sandbox's own under one top-level name no host path it binds may use.
SANDBOX_DIR = "/mmjobs-pot"
WORKDIR = f"{SANDBOX_DIR}/work"
RUNNER_PATH = f"{SANDBOX_DIR}/runner.py"
PROGRAM_PATH = f"{SANDBOX_DIR}/program.py"
HOST_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The one message every "cannot isolate" error ends with: what to do about it.
HOW_TO_FIX = ("install bubblewrap (`apt-get install bubblewrap`; it is in the eval image), "
              "allow unprivileged user namespaces when not running as root (sysctl "
              "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0; in a "
              "container, a seccomp and AppArmor profile that permit them), or set "
              "`pot.isolation: none` in the recipe to run programs under the audit hook and "
              "rlimits only")


def find_bwrap(path: str) -> str | None:
    """The bwrap executable `path` names (absolute, or looked up on PATH), or None."""
    if os.sep in path:
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which(path)


def interpreter() -> tuple[str, str]:
    """(real path of the interpreter, its installation prefix) for the sandboxed programs.

    The prefix is what the interpreter derives its stdlib from (`<prefix>/bin/python3.X` →
    `<prefix>/lib/python3.X`), so it follows `sys.executable` (a venv's python resolves to
    its base installation).
    """
    import sys

    real = os.path.realpath(sys.executable)
    return real, str(Path(real).parent.parent)


def site_paths() -> list[str]:
    """This environment's site-packages (real paths), for programs that import numpy."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])})


def read_only_paths(prefix: str, sites: Iterable[str]) -> list[str]:
    """Host paths bound read-only at the same place, minus those inside /usr or another.

    Raises:
        ValueError: one of them lies under `SANDBOX_DIR`, where the sandbox's own files go.
    """
    paths = sorted({os.path.realpath(p) for p in (prefix, *sites) if os.path.exists(p)})
    kept: list[str] = []
    for p in paths:
        if p == SANDBOX_DIR or p.startswith(SANDBOX_DIR + "/"):
            raise ValueError(f"{p}: the PoT sandbox cannot bind a path under {SANDBOX_DIR}")
        if p == "/usr" or p.startswith("/usr/"):
            continue
        if any(p == k or p.startswith(k + "/") for k in kept):
            continue
        kept.append(p)
    return kept


def command(bwrap: str, *, python: str, ro_paths: Sequence[str], runner: str,
            program_fd: int, seccomp_fd: int, info_fd: int, disk_bytes: int,
            env: Mapping[str, str], runner_args: Sequence[str], as_root: bool) -> list[str]:
    """The full `bwrap ... python runner.py CONFIG` argv (see the module docstring).

    Args:
        python: the interpreter, bound with its prefix among `ro_paths`.
        program_fd, seccomp_fd, info_fd: inherited fds: the program source (read into a
            read-only file), the compiled seccomp filter, where bwrap reports the pid of the
            namespace's pid 1.
        as_root: the caller is root (no user namespace; the runner drops to 65534).
    """
    if as_root:
        # Privileged bwrap: --unshare-all would add a user namespace mapping 0 to 0.
        users = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                 "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                 "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN"]
    else:
        users = ["--unshare-all", "--unshare-user", "--disable-userns",
                 "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--cap-drop", "ALL"]
    argv = [bwrap, *users, "--die-with-parent", "--new-session", "--clearenv",
            "--hostname", "pot", "--info-fd", str(info_fd)]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in HOST_TOP_LEVEL:
        host = f"/{name}"
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    if os.path.exists("/etc/ld.so.cache"):  # where the loader finds multiarch libraries
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # bwrap would create the binds' parents with the host's modes (a 0700 /root would hide
    # the interpreter from the sandbox user): create them world-readable first.
    for parent in _parents(ro_paths):
        argv += ["--perms", "0755", "--dir", parent]
    for path in ro_paths:
        argv += ["--ro-bind", path, path]
    argv += ["--perms", "0755", "--dir", SANDBOX_DIR,
             "--ro-bind", runner, RUNNER_PATH,
             "--ro-bind-data", str(program_fd), PROGRAM_PATH,
             "--proc", "/proc", "--dev", "/dev",
             "--perms", "0700", "--size", str(int(disk_bytes)), "--tmpfs", WORKDIR,
             # After the mounts inside them exist: nothing else is writable. (/dev/shm is a
             # directory of /dev, so it is read-only too: the work dir is the only disk.)
             "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", WORKDIR]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--seccomp", str(seccomp_fd), "--", python, "-I", "-S", "-B", "-X", "utf8",
             RUNNER_PATH, *runner_args]
    return argv


def _parents(paths: Iterable[str]) -> list[str]:
    """Every ancestor directory of `paths` below /, parents before children."""
    parents = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            parents.add(parent)
            parent = os.path.dirname(parent)
    return sorted(parents, key=lambda p: (p.count("/"), p))
