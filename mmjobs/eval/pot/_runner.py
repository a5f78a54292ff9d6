"""Child side of the program-of-thought sandbox (the parent is `mmjobs.eval.pot`).

Started as `python -I -S -B -X utf8 _runner.py CONFIG_JSON` with an empty environment, its work
directory as cwd: under bubblewrap (`mmjobs.eval.pot.bwrap`) a tmpfs at /work with the program
bound read-only at /mmjobs-pot/program.py; with `isolation: none` a host temp dir holding
program.py. A standalone script: the isolated interpreter has no site-packages and no mmjobs on
its path, so it imports only the standard library. Everything below happens before the
untrusted program gets control:

1. read the program; import common stdlib modules while every file is still readable;
2. as root: hand the work dir to the sandbox user and drop to it, so the kernel applies
   RLIMIT_NPROC (root is exempt) and file permissions to the program. Under bubblewrap the drop
   is required: if it cannot happen the runner reports `sandbox` and exits with
   SANDBOX_FAILED_EXIT before the program runs;
3. set soft == hard rlimits (CPU, address space, file size, open files, processes, core);
4. install the audit hook (`_make_hook`): the Python-level policy for files, processes, network
   and interpreter introspection (a second layer under bubblewrap; the only one with
   `isolation: none`);
5. write "ready" (with the protections in force), run the program with its own globals,
   write the final status, `_exit`.

Status protocol on the inherited status fd, one line each, `<status>\\t<detail>`: `ready`, then
one of `ok`, `error`, `memory`, `forbidden`; or `sandbox` before `ready`. The hook writes
`forbidden` itself and exits with `VIOLATION_EXIT` at once, so a refused fork or socket never
returns to the program.
"""

from __future__ import annotations

import _stat
import builtins
import json
import os
import posix
import resource
import signal
import sys
import types

VIOLATION_EXIT = 86
SANDBOX_FAILED_EXIT = 87

# Imported before the uid drop and the hook: what PoT programs commonly use, plus what this
# runner needs to report errors (traceback).
_PRELOAD = ("math", "cmath", "statistics", "json", "re", "decimal", "fractions", "datetime",
            "collections", "itertools", "functools", "operator", "string", "random", "heapq",
            "bisect", "numbers", "traceback")

# Modules whose import is refused (ImportError, so `try: import ctypes` in numpy still works):
# they reach C-level process, memory or interpreter state that no audit event covers.
_DENIED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_xxsubinterpreters",
    "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues", "_testcapi",
    "_testinternalcapi", "_testmultiphase", "_testsinglephase", "_testbuffer", "_testclinic",
    "_testimportmultiple", "_dbm", "_gdbm", "readline", "_tkinter", "_xxtestfuzz",
})

# Audit events refused whatever their arguments.
_DENIED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
    # Tracing sees (and in 3.11 can rewrite) the hook's own frame; gc and frame walking reach
    # objects the hook depends on; subinterpreters run without this hook.
    "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New",
    "resource.setrlimit", "resource.prlimit",
    # cwd stays the work dir: relative paths are resolved against it.
    "os.chdir",
    "os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.link", "os.symlink", "os.utime",
    "os.setxattr", "os.removexattr", "os.getxattr", "os.listxattr", "os.add_dll_directory",
})
_DENIED_PREFIXES = ("socket.", "ctypes.", "syslog.", "sqlite3.", "_winapi.", "winreg.")
# Events that modify the file system: (event, positions of path args, positions of dir_fd args).
_WRITE_EVENTS = (
    ("os.mkdir", (0,), (2,)),
    ("os.rmdir", (0,), (1,)),
    ("os.remove", (0,), (1,)),
    ("os.rename", (0, 1), (2, 3)),
    ("os.truncate", (0,), ()),
)

_WRITE_FLAGS = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                | getattr(os, "O_TMPFILE", 0))


class SandboxImportError(ImportError):
    """A module the sandbox does not provide."""


def _make_hook(workdir: str, read_roots: tuple[str, ...], status_fd: int):
    """Build the audit hook.

    Everything the hook and its helpers call is bound as a default argument (builtin functions,
    immutable tuples): the program can patch `os`, `builtins` or this module, but cannot change
    what the hook sees. The hook object itself is referenced by nothing reachable from Python
    (gc introspection is refused), and function `__code__`/`__defaults__` cannot be replaced.
    It fails closed: if a check raises, the audited operation is aborted.
    """

    def resolve(path, _base=workdir, _lstat=posix.lstat, _readlink=posix.readlink,
                _islnk=_stat.S_ISLNK, _type=type, _str=str, _bytes=bytes, _OSError=OSError):
        """Absolute, symlink-free form of `path` (like os.path.realpath), or None."""
        if _type(path) is _bytes:
            path = path.decode("utf-8", "surrogateescape")
        if _type(path) is not _str:
            return None
        if not path.startswith("/"):
            path = _base + "/" + path
        pending = path.split("/")
        pending.reverse()
        resolved, hops = "", 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                resolved = resolved.rpartition("/")[0]
                continue
            candidate = resolved + "/" + part
            try:
                mode = _lstat(candidate)[0]
            except _OSError:
                resolved = candidate  # does not exist (yet): nothing to follow
                continue
            if not _islnk(mode):
                resolved = candidate
                continue
            hops += 1
            if hops > 40:
                return None
            target = _readlink(candidate)
            if target.startswith("/"):
                resolved = ""
            more = target.split("/")
            more.reverse()
            pending.extend(more)
        return resolved or "/"

    def within(path, roots):
        # A plain loop, not any(): builtins can be patched by the program.
        for root in roots:  # noqa: SIM110
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def refuse(detail, _write=posix.write, _exit=posix._exit, _fd=status_fd,
               _code=VIOLATION_EXIT, _BaseException=BaseException):
        # try/except, not contextlib.suppress: modules can be patched by the program.
        try:  # noqa: SIM105
            _write(_fd, b"forbidden\t" + detail.encode("utf-8", "replace")[:500] + b"\n")
        except _BaseException:  # the status fd may be closed: exit regardless
            pass
        _exit(_code)

    def describe(args, _type=type, _repr=repr, _simple=(str, bytes, int, types.NoneType)):
        # Only repr() exact builtin types: a user object's __repr__ would run inside the hook.
        return ", ".join(_repr(a) if _type(a) in _simple else "<object>" for a in args)

    def hook(event, args, _resolve=resolve, _within=within, _refuse=refuse, _describe=describe,
             _work=(workdir,), _read=(workdir, *read_roots), _dev_rw=("/dev/null",),
             _dev_r=("/dev/null", "/dev/urandom"), _stat_fn=posix.stat, _isdir=_stat.S_ISDIR,
             _type=type, _str=str, _int=int, _OSError=OSError, _ImportError=SandboxImportError,
             _function=types.FunctionType, _self_file=_make_hook.__code__.co_filename,
             _denied_imports=_DENIED_IMPORTS,
             _denied=_DENIED_EVENTS, _prefixes=_DENIED_PREFIXES, _writes=_WRITE_EVENTS,
             _wflags=_WRITE_FLAGS):
        if event == "import":
            name = args[0]
            # Exactly str: a subclass can make the name it shows here differ from the one the
            # import system resolves (it once loaded _posixsubprocess past this check).
            if _type(name) is not _str:
                raise _ImportError("module names must be str in the PoT sandbox")
            if _str.partition(name, ".")[0] in _denied_imports:
                raise _ImportError(f"module {name!r} is not available in the PoT sandbox")
            return
        if event in _denied or event.startswith(_prefixes):
            _refuse(f"{event}({_describe(args)})")
        if event in ("object.__setattr__", "object.__delattr__"):
            # Libraries (numpy) rewrite their own functions' defaults; only this file's
            # functions, which the hook is built from, are off limits.
            target = args[0]
            if (_type(target) is _function and args[1] in ("__code__", "__defaults__",
                                                           "__kwdefaults__")
                    and target.__code__.co_filename == _self_file):
                _refuse(f"{event}(<sandbox function>, {args[1]!r})")
            return
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is _int:
                return  # an fd the program already holds
            writing = (_type(flags) is _int and flags & _wflags) or (
                _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode
                                         or "+" in mode))
            real = _resolve(path)
            if real is None:
                _refuse(f"open({_describe(args)})")
            if writing:
                allowed = real in _dev_rw or _within(real, _work)
            else:
                allowed = real in _dev_r or _within(real, _read)
            if not allowed:
                _refuse(f"open({_describe(args)}): outside the sandbox work dir")
            # A directory fd plus dir_fd= would resolve paths the hook never sees. Only os.open
            # (mode None) can return one, and only for reading: open() refuses directories
            # itself, the kernel refuses writes to them (O_TMPFILE yields an unnamed file).
            if mode is None and not writing:
                try:
                    is_dir = _isdir(_stat_fn(real)[0])
                except _OSError:
                    is_dir = False
                if is_dir:
                    _refuse(f"open({_describe(args)}): opening directories is not allowed")
            return
        if event in ("os.listdir", "os.scandir"):
            path = args[0]
            if path is None:
                return
            real = _resolve(path)
            if real is None or not _within(real, _read):
                _refuse(f"{event}({_describe(args)})")
            return
        for name, path_at, dir_fd_at in _writes:
            if name != event:
                continue
            for i in dir_fd_at:  # paths relative to a directory fd are not checkable here
                if args[i] is not None and args[i] != -1:
                    _refuse(f"{event}({_describe(args)}): dir_fd is not allowed")
            for i in path_at:
                if _type(args[i]) is _int:
                    continue  # os.truncate on an fd the program already holds
                real = _resolve(args[i])
                if real is None or not _within(real, _work):
                    _refuse(f"{event}({_describe(args)}): outside the sandbox work dir")

    return hook


def _report(fd: int, status: str, detail: str = "") -> None:
    line = f"{status}\t{' '.join(detail.split())[:500]}\n"
    try:  # noqa: SIM105 - kept free of imports
        os.write(fd, line.encode("utf-8", "replace"))
    except OSError:
        pass


def _drop_privileges(workdir: str, uid: int | None, gid: int | None,
                     needed: tuple[str, ...]) -> bool:
    """As root, become `uid`/`gid` (no supplementary groups) for good; True if done.

    Skipped when that user could not read `needed` (the stdlib and site-packages): e.g. a
    Python installed under a 0700 /root would leave the program unable to import anything.
    The check runs with only the effective ids switched, which root can switch back.
    """
    if uid is None or gid is None or os.geteuid() != 0:
        return False
    try:
        os.setgroups([])
        os.setegid(gid)
        os.seteuid(uid)
    except OSError:
        return False  # e.g. a user namespace that maps only root: nothing to drop to
    try:
        readable = all(os.access(p, os.R_OK | os.X_OK if os.path.isdir(p) else os.R_OK,
                                 effective_ids=True) and _listable(p) for p in needed)
    finally:
        os.seteuid(0)
        os.setegid(0)
    if not readable:
        return False
    os.chown(workdir, uid, gid)
    os.setgid(gid)
    os.setuid(uid)  # real, effective and saved ids: there is no way back
    return True


def _listable(path: str) -> bool:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        return True
    except OSError:
        return False


def _set_limits(limits: dict[str, int]) -> None:
    """soft == hard for every limit, never above the inherited hard limit."""
    table = {
        resource.RLIMIT_CPU: limits["cpu_s"],
        resource.RLIMIT_AS: limits["memory_bytes"],
        resource.RLIMIT_FSIZE: limits["max_file_bytes"],
        resource.RLIMIT_NOFILE: limits["max_open_files"],
        # Counts threads too: the program runs single-threaded unless a test allows more
        # (the +2: bubblewrap's init and this process, counted in the sandbox's user namespace).
        resource.RLIMIT_NPROC: limits["max_processes"] + 2 if limits["max_processes"] else 0,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in table.items():
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
        top = value + 1 if which == resource.RLIMIT_CPU and (
            hard == resource.RLIM_INFINITY or value + 1 <= hard) else value
        resource.setrlimit(which, (value, top))
    # A write past RLIMIT_FSIZE then fails with EFBIG (a normal error) instead of a signal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _run(source: str, status_fd: int, split_locals: bool, protections: str) -> tuple[str, str]:
    """Run the program; return (status, detail). Runs after the hook is installed."""
    namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
    # ChartMoE `exec`s inside a function: top-level names then live in a separate locals dict.
    local_ns = {} if split_locals else namespace
    _report(status_fd, "ready", protections)
    try:
        exec(compile(source, "<program>", "exec"), namespace, local_ns)
    except SystemExit as e:
        code = e.code
        if code is None or code == 0:
            return "ok", ""
        return "error", f"SystemExit({code!r})"
    except MemoryError:
        return "memory", "MemoryError (address-space limit)"
    except SandboxImportError as e:
        return "forbidden", str(e)
    except BaseException as e:  # any failure of the program is its result
        import traceback

        traceback.print_exc()
        try:
            return "error", f"{type(e).__name__}: {e}"
        except BaseException:  # a hostile __str__
            return "error", type(e).__name__
    return "ok", ""


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = int(cfg["status_fd"])
    workdir = os.path.realpath(os.getcwd())
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    for name in _PRELOAD:
        __import__(name)
    import linecache

    # Tracebacks then show the program's lines (linecache skips "<...>" names otherwise).
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    sys.path.extend(cfg["site_paths"])
    # This file is readable too: tracebacks through _run read its source.
    read_roots = tuple(sorted({os.path.realpath(p) for p in [*sys.path, __file__] if p}))

    protections = ["empty-env", "rlimits"]
    if _drop_privileges(workdir, cfg["drop_uid"], cfg["drop_gid"],
                        tuple(p for p in read_roots if os.path.exists(p))):
        protections.append("uid-drop")
    elif cfg["require_drop"]:
        _report(status_fd, "sandbox", f"could not switch from uid {os.getuid()} to "
                f"{cfg['drop_uid']}:{cfg['drop_gid']} (is the interpreter readable by that "
                "user?); refusing to run the program as root")
        os._exit(SANDBOX_FAILED_EXIT)
    _set_limits(cfg["limits"])
    if cfg["audit_hook"]:
        sys.addaudithook(_make_hook(workdir, read_roots, status_fd))
        protections.append("audit-hook")

    status, detail = _run(source, status_fd, bool(cfg["split_locals"]), " ".join(protections))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # e.g. the program replaced or closed sys.stdout
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _report(status_fd, "cpu", f"{usage.ru_utime + usage.ru_stime:.3f}")
    _report(status_fd, status, detail)
    codes = {"ok": 0, "forbidden": VIOLATION_EXIT}
    # _exit: no atexit handlers or finalizers of the program run after the status is written.
    os._exit(codes.get(status, 1))


if __name__ == "__main__":
    main()
