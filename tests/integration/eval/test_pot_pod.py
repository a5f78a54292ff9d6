"""PoT in a credential-less pod (`pot.executor: pod`) against a Kubernetes API on loopback and a
real S3 server (moto), through the real kubernetes client.

When the evaluate step creates the Job, the fake API server runs the Job's pod command on
this machine the way the pod would: `python -m mmjobs.eval.pot.job` with exactly the
container's environment (the presigned URLs and the settings; no AWS variables, no token),
so the programs are fetched and the results written through the presigned URLs alone, and
run in bubblewrap inside. The evaluator's AWS secret is a canary that must appear nowhere.

- the evaluate stage end to end: Job created (schema-valid on the supported Kubernetes
  versions, restricted pod, no credentials), results read back, Job and store objects gone;
- a pod that cannot isolate reports why, and the step raises SandboxError with it;
- a failed Job and a Job that never finishes fail the step, and are deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmjobs import storage
from mmjobs.eval.pot import SandboxError
from mmjobs.eval.pot.pod import COMPONENT, PotPodError, run_in_pod
from mmjobs.eval.pot.settings import PotSettings
from mmjobs.stages.evaluate import EvaluateConfig, main
from tests.fake_kube import fake_kube_api, use_kubeconfig
from tests.k8s import policy
from tests.k8s.validation import KUBE_VERSIONS, validate_manifest
from tests.unit.eval.pot_support import needs_pot_isolation
from tests.unit.eval.test_evaluate_stage import chartqa_pot_rows, read_jsonl

pytestmark = [pytest.mark.integration, needs_pot_isolation,
              pytest.mark.xdist_group("pot-sandbox")]  # see test_pot_hostile

NAMESPACE = "team-a"
IMAGE = "ghcr.io/mmjobs/mmjobs-eval:0.1.0"
JOBS = re.compile(rf"^/apis/batch/v1/namespaces/{NAMESPACE}/jobs(?:/(?P<name>[^/?]+))?"
                  r"(?P<sub>/status)?")


class FakeJobs:
    """batch/v1 Jobs in memory; `mode` says what a created Job's pod does: run (the pod's
    command, here), fail (exit 1 without running anything) or hang (never finishes)."""

    def __init__(self, mode: str = "run") -> None:
        self.mode = mode
        self.jobs: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.pod_env: dict[str, str] = {}
        self.pod_output = ""
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, body: Any, _type: str) -> tuple[int, Any]:
        match = JOBS.match(path)
        if not match:
            return 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": path}
        with self.lock:
            if method == "POST":
                self.created.append(body)
                self.jobs[body["metadata"]["name"]] = {**body, "status": {}}
                if self.mode != "hang":
                    threading.Thread(target=self._run_pod, args=(body,), daemon=True).start()
                return 201, body
            job = self.jobs.get(match["name"])
            if job is None:
                return 404, {"kind": "Status", "code": 404, "reason": "NotFound",
                             "message": f"jobs {match['name']} not found"}
            if method == "DELETE":
                self.deleted.append(match["name"])
                del self.jobs[match["name"]]
                return 200, {"kind": "Status", "status": "Success", "code": 200}
            return 200, job

    def _run_pod(self, job: dict[str, Any]) -> None:
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        env["PATH"] = "/usr/bin:/bin"  # the image's PATH; nothing else comes from outside
        self.pod_env = env
        code = 1
        if self.mode == "run":
            command = [sys.executable if c == "python3" else c for c in container["command"]]
            proc = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=300, cwd="/")
            self.pod_output, code = proc.stdout + proc.stderr, proc.returncode
        with self.lock:
            name = job["metadata"]["name"]
            if name in self.jobs:
                self.jobs[name]["status"] = ({"succeeded": 1} if code == 0 else {
                    "failed": 1, "conditions": [{
                        "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit"}]})


@pytest.fixture
def store(s3_bucket, monkeypatch) -> str:
    """An S3 store and a canary as the evaluator's secret (moto accepts any)."""
    monkeypatch.setenv("MMJOBS_STORE", f"s3://{s3_bucket}/store")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"canary-{secrets.token_hex(8)}")
    return f"s3://{s3_bucket}/store"


@pytest.fixture
def kube(tmp_path, monkeypatch) -> Iterator[tuple[FakeJobs, Any]]:
    """The fake API; the kubernetes client finds it through a kubeconfig, as outside a pod."""
    fake = FakeJobs()
    with fake_kube_api(fake.handle) as (api, host):
        use_kubeconfig(monkeypatch, tmp_path, host)
        yield fake, api


def pot_settings(**pod: Any) -> dict[str, Any]:
    return {"enabled": True, "executor": "pod", "wall_s": 5.0, "cpu_s": 1,
            "pod": {"image": IMAGE, "namespace": NAMESPACE, "timeout_s": 120, **pod}}


def test_evaluate_runs_pot_in_a_credential_less_pod(store, kube, tmp_path):
    fake, _ = kube
    canary = os.environ["AWS_SECRET_ACCESS_KEY"]
    outside = tmp_path / "outside.txt"
    rows = [*chartqa_pot_rows(outside), {
        "id": "augmented-3", "answers": ["Yes"], "split": "augmented",
        "prediction": "```python\nimport os\nprint(sorted(os.environ))\n"
                      f"print(open('/proc/{os.getpid()}/environ').read())\n```"}]
    preds = f"{store}/inputs/predictions.jsonl"
    storage.write_text(preds, "".join(json.dumps(r) + "\n" for r in rows))
    out = f"{store}/exp/run-1/evaluate-pot"
    result = main(EvaluateConfig(experiment="pot-pod", predictions=preds, metric="chartqa",
                                 pot=pot_settings(runtime_class_name="gvisor"), output=out,
                                 label="w/ PoT"))

    summary = result.summary["pot"]
    assert (summary["executor"], summary["isolation"]) == ("pod", "bubblewrap")
    assert {"bubblewrap", "seccomp", "audit-hook"} <= set(summary["protections"])
    assert summary["status_counts"] == {"ok": 2, "forbidden": 2, "timeout": 1, "error": 1}
    local = tmp_path / "committed"
    storage.get_dir(out, local)
    scores = {s["id"]: s for s in read_jsonl(local / "scores.jsonl")}
    assert scores["human-0"]["pot"]["answer"] == "13"
    for name in ("scores.jsonl", "predictions_pot.jsonl", "summary.json", "summary.md"):
        assert canary not in (local / name).read_text()
    assert not outside.exists()

    # The Job: one, deleted afterwards, with the store objects it used.
    (job,) = fake.created
    name = job["metadata"]["name"]
    assert fake.deleted == [name] and not fake.jobs
    assert list(storage.list_objects(f"{store}/tmp/pot")) == []
    # Only the presigned URLs and the settings reached the pod: no credentials.
    assert set(fake.pod_env) == {"POT_PROGRAMS_URL", "POT_RESULTS_URL", "POT_CONFIG", "HOME",
                                 "TMPDIR", "PATH"}
    assert canary not in json.dumps(job) and canary not in fake.pod_output
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["runtimeClassName"] == "gvisor"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == \
        COMPONENT
    container = pod["containers"][0]
    assert "envFrom" not in container and not any("valueFrom" in e for e in container["env"])
    assert container["image"] == IMAGE
    for version in KUBE_VERSIONS:
        assert validate_manifest(job, version) == []
    assert policy.pod_security_violations(job) == []


def test_a_pod_that_cannot_isolate_says_why(store, kube):
    fake, api = kube
    settings = PotSettings.model_validate(
        {**pot_settings(), "bwrap": "/nonexistent/bwrap"})
    with pytest.raises(SandboxError, match=r"bubblewrap not found.*pot.isolation: none"):
        run_in_pod(settings, ["print(1)"], step=f"{store}/exp/run-1/evaluate-pot", api=api,
                   poll_s=0.05)
    assert len(fake.deleted) == 1 and not fake.jobs
    assert list(storage.list_objects(f"{store}/tmp/pot")) == []


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failed_or_stuck_jobs_fail_the_step_and_are_deleted(store, kube, mode):
    fake, api = kube
    fake.mode = mode
    settings = PotSettings.model_validate(pot_settings(timeout_s=1))
    with pytest.raises(PotPodError, match="failed" if mode == "fail" else "did not finish"):
        run_in_pod(settings, ["print(1)"], step=f"{store}/exp/run-1/evaluate-pot", api=api,
                   poll_s=0.05)
    assert len(fake.deleted) == 1 and not fake.jobs
    assert list(storage.list_objects(f"{store}/tmp/pot")) == []


def test_pot_job_without_its_environment_says_what_it_is(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmjobs.eval.pot.job"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert proc.returncode == 2
    assert "POT_PROGRAMS_URL, POT_RESULTS_URL, POT_CONFIG not set" in proc.stderr


def test_job_manifest_uses_a_localhost_seccomp_profile_when_given(store, kube):
    fake, api = kube
    settings = PotSettings.model_validate(pot_settings(
        seccomp_localhost_profile="profiles/pot-bwrap.json", node_selector={"pool": "cpu"}))
    run_in_pod(settings, ["print(6 * 7)"], step=f"{store}/exp/run-1/evaluate-pot", api=api,
               poll_s=0.05)
    pod = fake.created[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {
        "type": "Localhost", "localhostProfile": "profiles/pot-bwrap.json"}
    assert pod["nodeSelector"] == {"pool": "cpu"}
    for version in KUBE_VERSIONS:
        assert validate_manifest(fake.created[0], version) == []
    assert policy.pod_security_violations(fake.created[0]) == []


def test_store_must_be_s3(tmp_path, monkeypatch):
    monkeypatch.setenv("MMJOBS_STORE", str(tmp_path / "store"))
    with pytest.raises(ValueError, match="must be S3"):
        run_in_pod(PotSettings.model_validate(pot_settings()), ["print(1)"],
                   step=str(Path(tmp_path) / "out"))
