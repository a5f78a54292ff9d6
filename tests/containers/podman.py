"""Podman for the container tests: find out whether it can build and run images here.

This workplace's recipe (shared ENVIRONMENT.md): the runc runtime (crun fails on hybrid
cgroups), a containers.conf without default ulimits, no registry pulls (a base image made by
`docker/local-base.sh` with debootstrap), `--network=host` for builds and for reaching test
servers on loopback, and the host CA bundle as the build secret `ca`. Whatever is missing is
a pytest skip that says what, never a failure: a failure means the image itself is wrong.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/mmjobs-base:py311"
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Podman:
    """The podman command with its global flags, and the environment to run it in."""

    argv: list[str]
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True,
                 **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.argv, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"`podman {' '.join(args)}` exited {proc.returncode}:\n"
                                 f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
        return proc


def _last_lines(text: str, n: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:]) or "(no output)"


def podman_or_skip(workdir: Path) -> Podman:
    """A working podman (can run a container from the local base image), else pytest.skip."""
    exe = shutil.which("podman")
    if exe is None:
        pytest.skip("podman not installed (.ci/run installs podman, runc and debootstrap "
                    "with apt-get when it runs as root)")
    if shutil.which("runc") is None:
        pytest.skip("runc not installed: podman's default crun fails on this machine's "
                    "cgroups (apt-get install runc)")
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    podman = Podman([exe, "--runtime", "runc"], {**os.environ, "CONTAINERS_CONF": str(conf)})
    info = podman("info", check=False, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {_last_lines(info.stderr)}")
    base = subprocess.run(["sh", str(REPO / "docker" / "local-base.sh"), BASE_IMAGE],
                          env={**podman.env, "PODMAN": " ".join(podman.argv)},
                          capture_output=True, text=True, timeout=900)
    if base.returncode != 0:
        pytest.skip(f"cannot make the local base image {BASE_IMAGE} (no registry pulls "
                    f"here): {_last_lines(base.stderr)}")
    probe = podman("run", "--rm", "--network=host", BASE_IMAGE, "python3", "-c", "pass",
                   check=False, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {_last_lines(probe.stderr)}")
    return podman


def torch_cpu_wheels_dir(version: str) -> Path | None:
    """A pip find-links directory (PIP_FIND_LINKS or pip config) holding the CPU torch wheel.

    The data image installs `torch==<version>+cpu`; PyPI has only CUDA builds, so without a
    local wheel (or an index serving +cpu builds) the image cannot be built here.
    """
    sources = [os.environ.get("PIP_FIND_LINKS", "")]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=False).stdout
    sources += re.findall(r"find-links='([^']*)'", listed)
    for source in sources:
        for entry in source.split():
            path = Path(entry.removeprefix("file://"))
            if path.is_dir() and any(path.glob(f"torch-{version}+cpu-*.whl")):
                return path
    return None


# What `.dockerignore` lets into the build context: the images are made of these and nothing else.
BUILD_CONTEXT = ("pyproject.toml", "README.md", "mmjobs", "pipelines", "docker")


def build_context_key(podman: Podman, build_args: Iterable[str]) -> str:
    """A digest of everything an image build reads: the files of the build context (as
    `.dockerignore` filters it: no __pycache__ or .pyc), the build arguments, and the id of
    the local base image. The same key means the same image, so a test run reuses the image
    a previous run (or another worktree) built from identical inputs instead of rebuilding.
    """
    digest = hashlib.sha256()
    for top in BUILD_CONTEXT:
        root = REPO / top
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.suffix != ".pyc")
        for path in files:
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for arg in build_args:
        digest.update(arg.encode() + b"\0")
    base = podman("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE, check=False)
    digest.update(base.stdout.strip().encode())
    return digest.hexdigest()[:16]
