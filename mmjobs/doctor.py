"""`mmjobs doctor`: what mmjobs will use here, whether it is reachable, and what can run.

Each check returns a `Check`; only the store and tracking checks decide the exit code (the
rest describe optional capabilities such as GPUs, PoT isolation, podman or Helm).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass

from mmjobs import __version__, settings, storage

PACKAGES = ("torch", "transformers", "peft", "accelerate", "kfp", "kfp-kubernetes", "mlflow",
            "boto3", "pydantic", "deepspeed", "trl", "flash-attn")


@dataclass
class Check:
    """One line of the report: `ok` None means informational."""

    name: str
    detail: str
    ok: bool | None = None

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "    "}[self.ok]
        return f"[{mark}] {self.name:<12} {self.detail}"


def check_store() -> Check:
    """Is the store root writable (local) or its bucket reachable (S3)?"""
    root = settings.store_root()
    loc = storage.parse(root)
    if loc.scheme == "file":
        try:
            os.makedirs(loc.key, exist_ok=True)
            probe = storage.join(root, ".doctor-probe")
            storage.write_text(probe, "ok")
            storage.delete(probe)
            return Check("store", f"{root} (local, writable)", True)
        except OSError as e:
            return Check("store", f"{root} (local): not writable: {e}", False)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    try:
        storage.exists(root)
        return Check("store", f"{root} (S3 via {endpoint}, reachable)", True)
    except storage.StoreError as e:
        return Check("store", f"{root} (S3 via {endpoint}): {e}", False)


def check_tracking() -> Check:
    """Is the MLflow tracking URI usable (embedded sqlite) or the server healthy?"""
    uri = settings.tracking_uri()
    if uri.startswith("sqlite:"):
        return Check("tracking", f"{uri} (embedded, no server needed)", True)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                return Check("tracking", f"{uri} (server, /health {resp.status})", True)
        except OSError as e:
            return Check("tracking", f"{uri}: unreachable ({e}); runs will spool locally", False)
    return Check("tracking", f"{uri} (not checked)", None)


def check_packages() -> Check:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return Check("packages", ", ".join(found))


def check_device() -> Check:
    """CPU count and, when torch sees them, GPUs with their bf16 support."""
    cpus = os.cpu_count() or 1
    try:
        import torch
    except ImportError:
        return Check("device", f"{cpus} CPUs; torch not installed")
    if not torch.cuda.is_available():
        return Check("device", f"{cpus} CPUs, no GPU (training runs in fp32 on CPU)")
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16 only"
    return Check("device", f"{cpus} CPUs, {torch.cuda.device_count()} GPU(s): "
                           f"{', '.join(sorted(names))} ({bf16})")


def check_podman() -> Check:
    """Can container tests build and run images here?"""
    podman = shutil.which("podman")
    if not podman:
        return Check("podman", "not installed: container tests will be skipped")
    try:
        out = subprocess.run([podman, "--runtime", "runc", "info", "--format",
                              "{{.Version.Version}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("podman", f"{podman}: not working ({e})")
    if out.returncode != 0:
        return Check("podman", f"{podman}: not working: {out.stderr.strip()[:200]}")
    return Check("podman", f"{out.stdout.strip()} with runc: container tests can run")


def check_helm() -> Check:
    """Are the Helm SDK and hadolint available for chart and Dockerfile checks?"""
    parts = []
    try:
        parts.append(f"helm-python-sdk {importlib.metadata.version('helm-python-sdk')}")
    except importlib.metadata.PackageNotFoundError:
        parts.append("helm-python-sdk missing (chart tests skipped)")
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    parts.append("hadolint ok" if os.path.exists(hadolint) else "hadolint missing")
    return Check("helm", ", ".join(parts))


def check_pot(bwrap: str = "bwrap") -> Check:
    """Can program-of-thought programs be isolated here (bubblewrap, user namespaces)?"""
    from mmjobs.eval.pot import Isolation, SandboxError, check_isolation

    try:
        layers = check_isolation(Isolation(bwrap=bwrap))
    except SandboxError as e:
        return Check("pot", f"isolation unavailable: {e}")
    version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
        version = out.stdout.strip()
    return Check("pot", f"{version or 'bubblewrap'} isolates programs: {' '.join(layers)}", True)


def check_image_backend() -> Check:
    """Which image processors load: torchvision's, PIL's, or none (a broken torchvision)."""
    from mmjobs.image_backend import ImageBackendError, image_backend, torchvision_problem

    try:
        chosen = image_backend()
    except ImageBackendError as e:
        return Check("images", e.errors[0], False)
    if chosen == "torchvision":
        return Check("images", "torchvision image processors", True)
    why = torchvision_problem() or "MMJOBS_IMAGE_BACKEND=pil"
    return Check("images", f"PIL image processors ({why}; torchvision's are ~2.4x faster)", True)


def run_doctor() -> int:
    """Print the report; exit code 1 if the store, tracking or image processing is unusable."""
    print(f"mmjobs {__version__} on Python {platform.python_version()} ({sys.executable})")
    print(f"MMJOBS_HOME  {settings.home()}")
    checks = [check_store(), check_tracking(), check_packages(), check_device(),
              check_image_backend(), check_pot(), check_podman(), check_helm()]
    for check in checks:
        print(check.line())
    return 0 if all(c.ok is not False for c in checks) else 1
