"""The evaluate stage's `pot:` section: whether and how PoT programs run.

    pot: true                     # shorthand for {enabled: true}
    pot: {enabled: true, isolation: bubblewrap, workers: 4, wall_s: 10, cpu_s: 5,
          memory_mb: 1024, disk_mb: 64, split_locals: false, executor: auto,
          pod: {image: ..., runtime_class_name: gvisor, timeout_s: 1800}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mmjobs.config import StrictModel
from mmjobs.eval.pot.sandbox import Isolation, SandboxLimits

# The old flat keys of the evaluate stage, and where they went.
RENAMED = {"pot_workers": "pot.workers", "pot_wall_s": "pot.wall_s", "pot_cpu_s": "pot.cpu_s",
           "pot_split_locals": "pot.split_locals"}
IN_CLUSTER_MARKER = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
POD_IMAGE_ENV = "MMJOBS_POT_IMAGE"


class PotPodSettings(StrictModel):
    """Where the programs run with `executor: pod` (see `mmjobs.eval.pot.pod`)."""

    image: str | None = Field(
        None, description=f"Image of the PoT pod (an eval image: mmjobs and bubblewrap). "
        f"Default: ${POD_IMAGE_ENV}, which the pipeline sets to the recipe's eval image.")
    namespace: str | None = Field(None, description="Namespace of the Job (default: the "
                                  "evaluate pod's own).")
    runtime_class_name: str | None = Field(
        None, description="RuntimeClass of the PoT pod, e.g. gvisor, for a kernel of its own.")
    seccomp_localhost_profile: str | None = Field(
        None, description="A node-local seccomp profile for the PoT pod (e.g. one that "
        "permits the user namespaces bubblewrap needs); default: RuntimeDefault.")
    timeout_s: float = Field(1800.0, gt=0, description="Give up on the Job (and delete it) "
                             "after this long.")
    cpu: str = Field("2", description="CPU request and limit of the PoT pod.")
    memory: str = Field("4Gi", description="Memory request and limit of the PoT pod.")
    node_selector: dict[str, str] = Field(default_factory=dict,
                                          description="nodeSelector of the PoT pod.")
    url_expiry_s: int = Field(3600, ge=60, le=7 * 86400, description="Lifetime of the "
                              "presigned store URLs the pod gets instead of credentials.")


class PotSettings(StrictModel):
    """ChartQA program of thought: run each prediction's program, score what it prints."""

    enabled: bool = Field(False, description="Run the programs (ChartMoE's PoT).")
    isolation: Literal["bubblewrap", "none"] = Field(
        "bubblewrap", description="bubblewrap: each program in its own namespaces under "
        "seccomp as an unprivileged user; the stage fails where that is impossible. none: the "
        "audit hook and rlimits only (warned about and recorded in summary.json); set it "
        "explicitly, only where user namespaces are unavailable and the model is trusted.")
    workers: int = Field(2, ge=1, description="Programs run in parallel.")
    wall_s: float = Field(10.0, gt=0, description="Wall-clock limit per program.")
    cpu_s: int = Field(5, ge=1, description="CPU-seconds limit per program.")
    memory_mb: int = Field(1024, ge=64, description="Address-space limit per program (MiB).")
    disk_mb: int = Field(64, ge=1, description="Work-dir size per program (MiB), all files "
                         "together (bubblewrap).")
    split_locals: bool = Field(False, description="Run programs with separate globals and "
                               "locals, as ChartMoE's exec inside a function does.")
    bwrap: str = Field("bwrap", description="The bubblewrap executable (name on PATH or "
                       "path).")
    executor: Literal["auto", "local", "pod"] = Field(
        "auto", description="local: in this process's machine; pod: in a Kubernetes Job of "
        "its own with no credentials (mmjobs.eval.pot.pod); auto: pod inside a cluster, "
        "local elsewhere.")
    pod: PotPodSettings = Field(default_factory=PotPodSettings,
                                description="The PoT pod (executor pod).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    def limits(self) -> SandboxLimits:
        """The per-program limits these settings describe."""
        return SandboxLimits(wall_s=self.wall_s, cpu_s=self.cpu_s,
                             memory_bytes=self.memory_mb << 20, disk_bytes=self.disk_mb << 20)

    def isolation_config(self) -> Isolation:
        """The isolation these settings ask for."""
        return Isolation(kind=self.isolation, bwrap=self.bwrap)

    def resolved_executor(self) -> Literal["local", "pod"]:
        """`executor`, with auto resolved (pod when this process runs in a Kubernetes pod)."""
        if self.executor != "auto":
            return self.executor
        return "pod" if IN_CLUSTER_MARKER.is_file() else "local"
