"""The PoT seccomp filter, for each architecture it supports, without running it.

The compiled classic-BPF program is executed here by a small interpreter of the instructions
it uses, on `struct seccomp_data` records built for each case, so the decisions for aarch64
are checked on this x86_64 machine too. The system call numbers are compared with the kernel
headers where they are installed (linux-libc-dev). The x86_64 filter also runs for real in
every sandboxed test (test_pot.py, test_pot_hostile.py).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from mmjobs.eval.pot import seccomp

ALLOW, KILL = seccomp.RET_ALLOW, seccomp.RET_KILL_PROCESS
EPERM = seccomp.RET_ERRNO | seccomp.EPERM
HEADERS = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
           "aarch64": Path("/usr/include/asm-generic/unistd.h")}


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """What the filter returns for one system call (seccomp_data: nr, arch, ip, args[6])."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in args],
                       *([0] * (6 - len(args))))
    code = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # LD W ABS
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op == 0x06:  # RET K
            return k
        elif op == 0x05:  # JA
            pc += 1 + k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHES))
def test_decisions(machine: str) -> None:
    arch = seccomp.ARCHES[machine]
    nr = arch.numbers
    strict = seccomp.filter_bytes(machine=machine)
    forks = seccomp.filter_bytes(machine=machine, allow_processes=True)

    def decide(program: bytes, name: str, *args: int) -> int:
        return run_filter(program, nr[name], arch.audit_arch, args)

    for name in ("ptrace", "pidfd_open", "pidfd_send_signal", "process_vm_readv", "keyctl",
                 "unshare", "mount", "mknodat", "sched_setscheduler", "bpf", "io_uring_setup"):
        assert decide(strict, name) == EPERM, name
    assert decide(strict, "clone3") == seccomp.RET_ERRNO | seccomp.ENOSYS
    # Arguments: immutable-flag ioctls and TIOCSTI, negative nice, sockets but AF_UNIX.
    assert decide(strict, "ioctl", 3, 0x40086602) == EPERM
    assert decide(strict, "ioctl", 0, 0x5412) == EPERM
    assert decide(strict, "ioctl", 3, 0x5401) == ALLOW  # TCGETS
    assert decide(strict, "setpriority", 0, 0, -20) == EPERM
    assert decide(strict, "setpriority", 0, 0, 5) == ALLOW
    assert decide(strict, "socket", 2, 1, 0) == seccomp.RET_ERRNO | seccomp.EAFNOSUPPORT
    assert decide(strict, "socket", 1, 1, 0) == ALLOW
    # Processes: none at all, or any but with new namespaces.
    assert decide(strict, "clone", 0x11) == EPERM
    assert decide(forks, "clone", 0x11) == ALLOW
    assert decide(forks, "clone", 0x11 | 0x10000000) == EPERM  # CLONE_NEWUSER
    assert decide(forks, "clone", 0x11 | 0x20000000) == EPERM  # CLONE_NEWPID
    # Everything else passes; another architecture's calls kill the process.
    assert run_filter(strict, 0, arch.audit_arch) == ALLOW  # read / io_setup
    assert run_filter(strict, nr["ptrace"], 0x40000003) == KILL  # i386
    if machine == "x86_64":
        assert run_filter(strict, 0x40000000 | 1, arch.audit_arch) == KILL  # x32 write
        assert decide(strict, "fork") == EPERM and decide(forks, "fork") == ALLOW


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHES))
def test_numbers_match_the_kernel_headers(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    text = header.read_text()
    defined = {m[1]: int(m[2]) for m in re.finditer(
        r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}
    assert {name: defined.get(name) for name in seccomp.ARCHES[machine].numbers} == \
        seccomp.ARCHES[machine].numbers


def test_other_architectures_are_refused() -> None:
    with pytest.raises(seccomp.SeccompUnsupported, match="riscv64"):
        seccomp.filter_bytes(machine="riscv64")
