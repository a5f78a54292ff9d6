"""A seccomp filter for PoT programs, compiled to the classic-BPF bytes bubblewrap loads.

`bwrap --seccomp FD` takes the raw `struct sock_filter` array that libseccomp's
`seccomp_export_bpf` would write. Rather than depend on libseccomp bindings, this module
assembles the (short) program itself: allow by default, deny a fixed list of system calls that
a chart-arithmetic program never needs and that reach outside the sandbox or the kernel's
attack surface. The list is second to the namespaces (a denied call mostly fails there anyway):

- other processes: ptrace, process_vm_readv/writev, pidfd_open/send_signal/getfd, kcmp;
- new namespaces and mounts: unshare, setns, clone/clone3 with namespace flags, mount and the
  new mount API, pivot_root, chroot;
- kernel state: keyctl/add_key/request_key, bpf, perf_event_open, userfaultfd, io_uring,
  kexec, modules, reboot, swap, clocks, acct, quotactl, syslog, personality, fanotify,
  file handles;
- files: mknod/mknodat, ioctl FS_IOC_SETFLAGS/FSSETXATTR (immutable and append-only flags) and
  TIOCSTI/TIOCLINUX (terminal input injection);
- scheduling: sched_setscheduler/setattr/setparam, setpriority to a negative nice value;
- network: sockets of any family but AF_UNIX;
- processes (unless the caller allows some): fork, vfork, clone, clone3.

Denied calls fail with EPERM (clone3 with ENOSYS, so C libraries fall back to clone, which
the filter can inspect). Another architecture's system calls (x32, i386 compat) kill the
process: their numbers differ and the list above would not match them.
"""

from __future__ import annotations

import platform
import struct
from dataclasses import dataclass

# Classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS, _JEQ, _JGE, _JSET, _JA, _RET = 0x20, 0x15, 0x35, 0x45, 0x05, 0x06
RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64 each).
_NR, _ARCH, _ARGS = 0, 4, 16
_X32_BIT = 0x40000000

_CLONE_NAMESPACES = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_IOCTLS = (0x40086602, 0x40046602, 0x401C5820, 0x5412, 0x541C)  # SETFLAGS (64/32), FSSETXATTR,
#                                                                # TIOCSTI, TIOCLINUX
AF_UNIX = 1


@dataclass(frozen=True)
class Arch:
    """System call numbers of one architecture (only the ones the filter names)."""

    audit_arch: int
    numbers: dict[str, int]


# x86_64 from asm/unistd_64.h; aarch64 uses the generic table (asm-generic/unistd.h), which
# has no fork, vfork, mknod, iopl or ioperm (C libraries use clone and mknodat there).
ARCHES = {
    "x86_64": Arch(0xC000003E, {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_open": 434,
        "pidfd_send_signal": 424, "pidfd_getfd": 438, "kcmp": 312, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "keyctl": 250, "add_key": 248,
        "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168,
        "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
        "acct": 163, "quotactl": 179, "quotactl_fd": 443, "syslog": 103, "personality": 135,
        "fanotify_init": 300, "open_by_handle_at": 304, "name_to_handle_at": 303,
        "lookup_dcookie": 212, "vhangup": 153, "iopl": 172, "ioperm": 173, "uselib": 134,
        "mknod": 133, "mknodat": 259, "sched_setscheduler": 144, "sched_setattr": 314,
        "sched_setparam": 142, "ioctl": 16, "setpriority": 141, "socket": 41, "clone": 56,
        "clone3": 435, "fork": 57, "vfork": 58,
    }),
    "aarch64": Arch(0xC00000B7, {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_open": 434,
        "pidfd_send_signal": 424, "pidfd_getfd": 438, "kcmp": 272, "unshare": 97,
        "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "keyctl": 219, "add_key": 217,
        "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225,
        "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
        "acct": 89, "quotactl": 60, "quotactl_fd": 443, "syslog": 116, "personality": 92,
        "fanotify_init": 262, "open_by_handle_at": 265, "name_to_handle_at": 264,
        "lookup_dcookie": 18, "vhangup": 58, "mknodat": 33, "sched_setscheduler": 119,
        "sched_setattr": 274, "sched_setparam": 118, "ioctl": 29, "setpriority": 140,
        "socket": 198, "clone": 220, "clone3": 435,
    }),
}

# Denied whatever their arguments.
ALWAYS_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "kcmp", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct", "quotactl",
    "quotactl_fd", "syslog", "personality", "fanotify_init", "open_by_handle_at",
    "name_to_handle_at", "lookup_dcookie", "vhangup", "iopl", "ioperm", "uselib", "mknod",
    "mknodat", "sched_setscheduler", "sched_setattr", "sched_setparam",
)
PROCESS_CALLS = ("fork", "vfork", "clone")


class SeccompUnsupported(RuntimeError):
    """No filter for this machine's architecture."""


def filter_bytes(*, allow_processes: bool = False, machine: str | None = None) -> bytes:
    """The compiled filter for `machine` (default: this one), as `bwrap --seccomp` reads it.

    Args:
        allow_processes: let the program fork and start threads (namespace flags are still
            refused); False denies fork, vfork and clone altogether.
        machine: `platform.machine()` name; x86_64 and aarch64 are supported.

    Raises:
        SeccompUnsupported: another architecture.
    """
    machine = machine or platform.machine()
    arch = ARCHES.get(machine)
    if arch is None:
        raise SeccompUnsupported(f"no PoT seccomp filter for the {machine} architecture "
                                 f"(supported: {', '.join(ARCHES)})")
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ, arch.audit_arch, None, "kill")
    asm.load(_NR)
    if machine == "x86_64":  # x32 system calls: same entry point, other numbers
        asm.jump(_JGE, _X32_BIT, "kill", None)
    nr = arch.numbers
    for name in ALWAYS_DENIED:
        if name in nr:
            asm.deny_if(nr[name], EPERM)
    asm.deny_if(nr["clone3"], ENOSYS)
    if allow_processes:
        asm.deny_arg_if(nr["clone"], 0, [(_JSET, _CLONE_NAMESPACES)], EPERM)
    else:
        for name in PROCESS_CALLS:
            if name in nr:
                asm.deny_if(nr[name], EPERM)
    asm.deny_arg_if(nr["ioctl"], 1, [(_JEQ, cmd) for cmd in _IOCTLS], EPERM)
    # nice is an int: a negative value has the top bit of the low word set.
    asm.deny_arg_if(nr["setpriority"], 2, [(_JGE, 0x80000000)], EPERM)
    asm.deny_arg_unless(nr["socket"], 0, AF_UNIX, EAFNOSUPPORT)
    asm.ret(RET_ALLOW)
    asm.label("kill")
    asm.ret(RET_KILL_PROCESS)
    return asm.assemble()


class _Assembler:
    """Classic BPF with symbolic jump targets (resolved to the 8-bit relative offsets)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str | None, int | str | None, int]] = []
        self.labels: dict[str, int] = {}
        self._fresh = 0

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((_LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | None, false: str | None) -> None:
        """`op` on A and k; None as a target means the next instruction."""
        self.code.append((op, true, false, k))

    def ret(self, value: int) -> None:
        self.code.append((_RET, 0, 0, value))

    def deny_if(self, nr: int, errno: int) -> None:
        skip = self._new_label()
        self.jump(_JEQ, nr, None, skip)
        self.ret(RET_ERRNO | errno)
        self.label(skip)

    def deny_arg_if(self, nr: int, arg: int, tests: list[tuple[int, int]], errno: int) -> None:
        """Deny `nr` when any (op, k) test on the low word of argument `arg` is true."""
        deny, done = self._new_label(), self._new_label()
        self.jump(_JEQ, nr, None, done)
        self.load(_ARGS + 8 * arg)  # little-endian: the low word comes first
        for op, k in tests:
            self.jump(op, k, deny, None)
        self.code.append((_JA, 0, 0, done))  # type: ignore[arg-type]  # k is the label
        self.label(deny)
        self.ret(RET_ERRNO | errno)
        self.label(done)
        self.load(_NR)  # A held the argument: reload the number for the checks that follow

    def deny_arg_unless(self, nr: int, arg: int, value: int, errno: int) -> None:
        """Deny `nr` unless the low word of argument `arg` equals `value`."""
        done = self._new_label()
        self.jump(_JEQ, nr, None, done)
        self.load(_ARGS + 8 * arg)
        self.jump(_JEQ, value, done, None)
        self.ret(RET_ERRNO | errno)
        self.label(done)
        self.load(_NR)

    def _new_label(self) -> str:
        self._fresh += 1
        return f".L{self._fresh}"

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (op, jt, jf, k) in enumerate(self.code):
            if op == _JA:
                k, jt, jf = self._offset(pc, k), 0, 0
            else:
                jt, jf = self._offset(pc, jt), self._offset(pc, jf)
            if op != _JA and (jt > 255 or jf > 255):
                raise ValueError(f"BPF jump at {pc} is too long")
            out += struct.pack("<HBBI", op, jt, jf, k)
        return bytes(out)

    def _offset(self, pc: int, target: int | str | None) -> int:
        if target is None or isinstance(target, int):
            return target or 0
        return self.labels[target] - pc - 1
