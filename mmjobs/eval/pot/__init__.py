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

Model output is hostile input: every program runs in a sandbox, and whatever it does is
reported per sample as a `PotResult`. The layers, outermost first:

1. Operating system — the boundary (`Isolation(kind="bubblewrap")`, the default; see
   `mmjobs.eval.pot.bwrap` and `mmjobs.eval.pot.seccomp`): one `bwrap` per program with its own
   PID, mount, network, IPC and UTS namespaces (a user namespace too when not root), a root file
   system of read-only binds (/usr, the interpreter, optionally site-packages) and a
   `disk_bytes` tmpfs work dir, its own /proc and a minimal /dev, an empty environment, no
   capabilities, no_new_privs, a seccomp filter (no ptrace, pidfd, process_vm, mknod,
   immutable-flag ioctls, real-time scheduling, negative nice, keyrings, bpf, perf, mounts,
   new namespaces, sockets other than AF_UNIX, fork/clone), and uid/gid 65534 — never root.
   On timeout the parent SIGKILLs the namespace's pid 1, so the kernel kills every process
   left in it, orphans in new sessions included. Where bubblewrap cannot run (not installed,
   user namespaces disabled) `run_program` raises `SandboxError` naming the fix: the run
   fails closed instead of running programs with less isolation.
2. Interpreter bootstrap (`_runner.py`, before the program gets control): `python -I -S -B`
   (no site, no user configuration, no bytecode writes), rlimits with soft == hard (CPU with
   SIGXCPU then SIGKILL, address space, file size, open files, processes, core dumps), and as
   root the switch to 65534 (required under bubblewrap).
3. Audit hook (`_runner._make_hook`) — a second layer, not a boundary: a Python-level policy
   that refuses process control, sockets, ctypes/cffi, `_posixsubprocess`, subinterpreters,
   tracing, gc walking, file access outside the work dir and the interpreter's files, and
   import names that are not exactly `str`. C code that makes system calls without audit
   events bypasses it; the layers above still hold then.
4. Parent (`sandbox.py`): caps on stdout and stderr (it never buffers more than
   `max_output_bytes`), the wall clock, and the status protocol (nothing the program writes
   can turn into a sandbox failure that would stop the evaluation).

`Isolation(kind="none")` (the recipe's `pot.isolation: none`, chosen explicitly) runs only
layers 2-4 in a host temp dir, plus a network namespace (`unshare --net`) and the switch to
`nobody` where the system permits them: the audit hook is then the only file barrier. The
evaluate stage logs a warning and records it in summary.json.

On a Kubernetes cluster the evaluate stage can also run the programs in their own pod
(`mmjobs.eval.pot.pod`): no Secrets, no service-account token, a deny-all NetworkPolicy,
non-root, read-only root file system, fed and read through presigned store URLs.
"""

from mmjobs.eval.pot.launch import SandboxError
from mmjobs.eval.pot.sandbox import (
    DEFAULT_ISOLATION,
    DEFAULT_LIMITS,
    ERROR_ANSWER,
    Isolation,
    PotResult,
    PotStatus,
    SandboxLimits,
    chartmoe_answer,
    check_isolation,
    extract_program,
    run_program,
    run_programs,
)

__all__ = [
    "DEFAULT_ISOLATION",
    "DEFAULT_LIMITS",
    "ERROR_ANSWER",
    "Isolation",
    "PotResult",
    "PotStatus",
    "SandboxError",
    "SandboxLimits",
    "chartmoe_answer",
    "check_isolation",
    "extract_program",
    "run_program",
    "run_programs",
]
