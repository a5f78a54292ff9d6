"""The hostile PoT programs of issue 12 (`pot_hostile.HOSTILE`) against the real sandbox.

The evaluator's environment holds a canary secret. Outside the sandbox the test starts a
sibling process (as uid 65534, the sandbox's own uid, so only the namespaces protect it), TCP,
UDP and abstract-unix listeners on loopback, a world-writable marker directory and a
world-readable file holding the canary. Every program runs four ways: as this test's user
(root here) and as uid 65534 (a driver script under `setpriv`), each with both layers
(`full`) and with the operating-system layer alone (`os-only`: no audit hook, forks allowed).
Each (program, run) is one test: the canary is nowhere in its result, nothing it reports as
ESCAPED happened, the evaluator and the sibling are alive, no listener heard from it, and the
files it aimed at do not exist. Afterwards: no orphan is left running and no file outside was
written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmjobs.eval.pot import run_program, run_programs
from tests.unit.eval.pot_hostile import DISK_BYTES, HOSTILE, suite_settings
from tests.unit.eval.pot_support import needs_pot_isolation

REPO = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).with_name("pot_hostile_driver.py")
REPO_FILE = REPO / "pyproject.toml"  # world-readable: only the mount namespace hides it
NOBODY = 65534
WORKERS = 6
# Statuses the `full` mode must end in (both layers; the rest only need to be contained).
FULL_STATUS = {
    "str-subclass-posixsubprocess": "forbidden", "str-subclass-hash-trick": "forbidden",
    # Not posixsubprocess-importlib: where _posixsubprocess is compiled into the interpreter
    # (Debian's Python), importlib loads it without an import audit event, so only the OS
    # layer stops its fork_exec (EPERM from seccomp).
    "ctypes-libc-system": "forbidden",
    "os-fork-exec": "forbidden", "posix-spawn": "forbidden", "subprocess-run": "forbidden",
    "fork-bomb": "forbidden", "memory-bomb": "memory", "infinite-loop": "timeout",
    "huge-output": "output_limit", "subinterpreter": "forbidden", "remove-the-hook": "forbidden",
}
OS_ONLY_STATUS = {"memory-bomb": "memory", "infinite-loop": "timeout",
                  "huge-output": "output_limit", "orphan-then-hang": "timeout"}

# One xdist worker runs every module that starts sandboxed programs: they all run as uid
# 65534, whose RLIMIT_NPROC counts the processes of both workers (fork fails with EAGAIN).
pytestmark = [needs_pot_isolation, pytest.mark.slow,  # the hostile suite runs twice: ~20 s
              pytest.mark.xdist_group("pot-sandbox")]


class Listeners:
    """TCP, UDP and abstract-unix servers on loopback that record whatever reaches them."""

    def __init__(self, token: str) -> None:
        self.heard: list[str] = []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.abstract = f"pot-hostile-{token}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.abstract)
        self.unix.listen()
        for sock in (self.tcp, self.udp, self.unix):
            sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for name, sock in (("tcp", self.tcp), ("unix", self.unix)):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(1)
                    try:
                        self.heard.append(f"{name}: {conn.recv(4096)!r}")
                    except OSError:
                        self.heard.append(f"{name}: connection")
            with contextlib.suppress(OSError):
                self.heard.append(f"udp: {self.udp.recv(4096)!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in (self.tcp, self.udp, self.unix):
            sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The outside world the programs attack, with the canary in the evaluator's environment."""
    canary = f"canary-{secrets.token_hex(8)}"
    token = f"7{secrets.randbelow(10**6):06d}.25"  # a unique `sleep` argument for orphans
    marker = Path(tempfile.mkdtemp(prefix="pot-hostile-marker-"))
    marker.chmod(0o1777)  # writable by the sandbox's uid: only the namespaces keep it out
    secret_dir = Path(tempfile.mkdtemp(prefix="pot-hostile-secret-"))
    secret_dir.chmod(0o755)
    secret_file = secret_dir / "credentials"
    secret_file.write_text(f"aws_secret_access_key = {canary}\n")
    secret_file.chmod(0o644)
    home = Path.home()
    targets = [f"/tmp/pot-escape-{token}", str(home / f"pot-escape-{token}"),
               str(REPO / f"pot-escape-{token}")]
    as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 \
        else {}
    sibling = subprocess.Popen(["sleep", "600"], **as_nobody)
    listeners = Listeners(token)
    saved = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN")}
    os.environ["AWS_SECRET_ACCESS_KEY"] = canary
    os.environ["MLFLOW_TRACKING_TOKEN"] = canary
    started = time.time()
    try:
        yield {"canary": canary, "token": token, "marker": str(marker),
               "secret_file": str(secret_file), "targets": targets, "sibling": sibling.pid,
               "tcp_port": listeners.tcp.getsockname()[1],
               "udp_port": listeners.udp.getsockname()[1], "abstract": listeners.abstract,
               "started": started, "listeners": listeners, "sibling_proc": sibling}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        listeners.close()
        sibling.kill()
        sibling.wait()
        shutil.rmtree(marker, ignore_errors=True)
        shutil.rmtree(secret_dir, ignore_errors=True)


def _program_world(world: dict[str, Any]) -> dict[str, Any]:
    keys = ("token", "marker", "secret_file", "targets", "sibling", "tcp_port", "udp_port",
            "abstract")
    return {**{k: world[k] for k in keys}, "repo_file": str(REPO_FILE)}


def _nobody_python() -> tuple[str | None, str]:
    """An interpreter of this Python version that uid 65534 can run, or (None, why not)."""
    if os.geteuid() != 0:
        return None, "not root: the whole suite already runs as a non-root user"
    if shutil.which("setpriv") is None:
        return None, "setpriv (util-linux) is missing"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if Path(candidate).exists() and _others_can_read(candidate):
            return candidate, ""
    return None, (f"no python{version} readable by uid 65534 (this venv's is "
                  f"{os.path.realpath(sys.executable)})")


def _others_can_read(path: str) -> bool:
    real = Path(os.path.realpath(path))
    dirs_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    return dirs_ok and bool(real.stat().st_mode & stat.S_IROTH)


RUNS = ("self-full", "self-os-only", "nobody-full", "nobody-os-only")


@pytest.fixture(scope="module")
def suite(world) -> dict[str, dict[str, Any]]:
    """Every run of the suite: {run: {"results": {case: result dict}, "parent": pid, ...}}."""
    runs: dict[str, dict[str, Any]] = {}
    timings = {}
    for mode in ("full", "os-only"):
        started = time.monotonic()
        limits, isolation = suite_settings(mode)
        programs = [case.render({**_program_world(world), "parent": os.getpid()})
                    for case in HOSTILE]
        results = run_programs(programs, limits=limits, isolation=isolation, workers=WORKERS)
        runs[f"self-{mode}"] = {"parent": os.getpid(), "uid": os.getuid(), "results": {
            case.name: r.to_dict() for case, r in zip(HOSTILE, results, strict=True)}}
        timings[f"self-{mode}"] = time.monotonic() - started
    python, why = _nobody_python()
    for mode in ("full", "os-only"):
        if python is None:
            runs[f"nobody-{mode}"] = {"skip": why}
            continue
        started = time.monotonic()
        request = json.dumps({"world": _program_world(world), "mode": mode,
                              "workers": WORKERS})
        proc = subprocess.run(
            ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
             python, "-I", str(DRIVER), str(REPO)], input=request, capture_output=True,
            text=True, timeout=300, cwd="/",
            env={"PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": world["canary"],
                 "MLFLOW_TRACKING_TOKEN": world["canary"]})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[f"nobody-{mode}"] = {**json.loads(proc.stdout), "stderr": proc.stderr}
        timings[f"nobody-{mode}"] = time.monotonic() - started
    print("hostile suite wall time per run:", {k: round(v, 1) for k, v in timings.items()})
    return runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_program_is_contained(case, run, suite, world) -> None:
    outcome = suite[run]
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    result = outcome["results"][case.name]
    as_text = json.dumps(result)
    assert world["canary"] not in as_text
    assert "ESCAPED" not in (result["answer"] or ""), result["answer"]
    assert {"bubblewrap", "seccomp", "disk-cap", "empty-env", "rlimits"} <= set(
        result["protections"]), result
    assert ("audit-hook" in result["protections"]) == run.endswith("-full")
    if outcome["uid"] == 0:
        assert "uid-drop" in result["protections"]
    else:
        assert "userns" in result["protections"]
    expected = (FULL_STATUS if run.endswith("-full") else OS_ONLY_STATUS).get(case.name)
    if expected is not None:
        assert result["status"] == expected, result
    # No process outside touched: the evaluator (for the non-root runs, the driver, which
    # returned its results) and the sibling still run.
    assert _alive(world["sibling"]) and world["sibling_proc"].poll() is None
    # No file outside written, no listener reached.
    assert not [p for p in os.listdir(world["marker"])], os.listdir(world["marker"])
    assert not [t for t in world["targets"] if os.path.lexists(t)]
    assert not [h for h in world["listeners"].heard if case.name in h or "connection" in h]
    # Nothing read from the host's files: the repository, /etc/shadow.
    answer = result["answer"] or ""
    assert "[build-system]" not in answer and "root:" not in answer
    if case.name == "disk-fill" and result["status"] == "ok":
        assert int(result["answer"].split()[-1]) <= DISK_BYTES


def test_listeners_heard_nothing_and_no_orphan_survives(suite, world) -> None:
    assert world["listeners"].heard == []
    # Orphans in new sessions (programs orphan-*) were started with `sleep <token>`.
    survivors = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and world["token"].encode() in _cmdline(pid)]
    assert survivors == []


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_no_file_outside_holds_the_canary_or_the_token(suite, world) -> None:
    """Files changed since the suite started, in the places a program could aim for."""
    roots = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path.home(), REPO]
    skip = {REPO / ".venv", REPO / ".git", Path.home() / ".pyenv", Path.home() / ".cache"}
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in skip]
            for name in filenames:
                path = here / name
                if world["token"] in name:
                    found.append(str(path))
                    continue
                try:
                    info = path.lstat()
                    if (not stat.S_ISREG(info.st_mode) or info.st_mtime < world["started"]
                            or info.st_size > 4 << 20 or path == Path(world["secret_file"])):
                        continue
                    if world["canary"].encode() in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
    assert found == []


def test_devices_are_untouched(suite) -> None:
    for dev in ("/dev/null", "/dev/zero"):
        assert stat.S_IMODE(os.stat(dev).st_mode) == 0o666, dev


@pytest.mark.parametrize("hang", [False, True], ids=["parent-exits", "parent-hangs"])
def test_orphans_in_new_sessions_die_with_the_namespace(hang: bool) -> None:
    """An orphan really starts (the program waits until it runs), and nothing of it is left
    when run_program returns: on a normal exit and on the wall-clock kill."""
    token = f"8{secrets.randbelow(10**6):06d}.5"
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["sleep", "{token}"])
    os._exit(0)
for _ in range(200):
    if any(b"{token}" in open(f"/proc/{{p}}/cmdline", "rb").read()
           for p in os.listdir("/proc") if p.isdigit()):
        break
    time.sleep(0.01)
print("spawned")
while {hang}:
    time.sleep(1)
"""
    limits, isolation = suite_settings("os-only")
    result = run_program(program, limits=limits, isolation=isolation)
    if hang:
        assert result.status == "timeout", result
    else:
        assert (result.status, result.answer) == ("ok", "spawned"), result
    assert [pid for pid in os.listdir("/proc") if pid.isdigit()
            and token.encode() in _cmdline(pid)] == []
