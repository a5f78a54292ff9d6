"""`launch_multinode` against a Kubernetes API server on loopback, through the real client.

The fake server implements the custom-objects endpoints the launcher uses (create, get,
delete), records every request, and serves a scripted sequence of job conditions. The
"training" is a committed `final/` that the script writes when the job completes, as rank 0
would; the launcher returns the stage result it reads from there.

- success: created once, followed until Complete, result read from the store;
- failure: a Failed condition fails the step, naming the job and the condition's message;
- retry of the step: 409 on create adopts the running job; a failed one is replaced;
- PyTorchJob (training-operator v1): Succeeded ends it; a transient API error is retried;
- a result already committed for these inputs launches nothing; a timeout deletes the job.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmjobs import storage
from mmjobs.stages import train as train_stage
from mmjobs.stages.train import TrainStageConfig, train_fingerprint
from mmjobs.train import multinode
from tests.fake_kube import fake_kube_api

NAMESPACE = "team-a"
IMAGE = "ghcr.io/mmjobs/mmjobs-train:0.1.0"
PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/"
                  r"(?P<plural>[^/?]+)(?:/(?P<name>[^/?]+))?")
FAST = {"poll_s": 0.01}


def condition(kind: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


class FakeKube:
    """Custom objects in memory; `script(name, states)` sets the conditions successive GETs
    of a job report (the last state stays); a state may be the string "500" (a failed read).
    `on_done(name)` runs when a job's last scripted state is first served."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.scripts: dict[str, list[Any]] = {}
        self.on_done: dict[str, Callable[[], None]] = {}
        self.lock = threading.Lock()

    def script(self, name: str, states: list[Any],
               on_done: Callable[[], None] | None = None) -> None:
        self.scripts[name] = list(states)
        if on_done:
            self.on_done[name] = on_done

    def add(self, plural: str, obj: dict[str, Any]) -> None:
        self.objects[(plural, obj["metadata"]["name"])] = obj

    def calls(self, method: str, *, query: bool = False) -> list[str]:
        """The paths `method` requested (without their query strings unless `query`)."""
        return [path if query else path.split("?")[0] for m, path in self.requests
                if m == method]

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        match = PATH.match(path)
        if not match or match["ns"] != NAMESPACE:
            return 404, _status(404, "NotFound", path)
        plural, name = match["plural"], match["name"]
        with self.lock:
            self.requests.append((method, path))
            if method == "POST":
                name = body["metadata"]["name"]
                if (plural, name) in self.objects:
                    return 409, _status(409, "AlreadyExists", f"{plural} {name} already exists")
                self.objects[(plural, name)] = body
                return 201, body
            obj = self.objects.get((plural, name))
            if obj is None:
                return 404, _status(404, "NotFound", f"{plural} {name} not found")
            if method == "DELETE":
                del self.objects[(plural, name)]
                return 200, _status(200, "Success", "deleted")
            states = self.scripts.get(name)
            if states:
                last = len(states) == 1
                state = states[0] if last else states.pop(0)
                if state == "500":
                    return 500, _status(500, "InternalError", "etcd leader changed")
                if last and name in self.on_done:
                    self.on_done.pop(name)()
                obj["status"] = {"conditions": state}
            return 200, obj


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure" if code >= 400 else
            "Success", "reason": reason, "message": message, "code": code}


@pytest.fixture
def kube() -> Iterator[tuple[FakeKube, Any]]:
    """The fake API server and a kubernetes ApiClient pointed at it."""
    fake = FakeKube()
    with fake_kube_api(lambda method, path, body, _type: fake.handle(method, path, body)) as (
            api, _):
        yield fake, api


@pytest.fixture
def cfg(tmp_path: Path) -> TrainStageConfig:
    """A train step whose input shards are committed in a local store."""
    data = tmp_path / "store" / "cache" / "pretokenized" / "abc"
    data.mkdir(parents=True)
    (data / "shard-00000.parquet").write_bytes(b"not really parquet")
    storage.commit_dir(data)
    return TrainStageConfig.model_validate({
        "experiment": "exp", "pipeline_run_id": "run-1", "recipe": "chart-demo",
        "output": str(tmp_path / "store" / "exp" / "run-1" / "sft"),
        "model": {"name_or_path": "example/tiny-llava"}, "data": str(data),
        "train": {"mode": "sft", "finetune": "lora", "max_steps": 7}})


def commit_result(cfg: TrainStageConfig, fingerprint: str | None = None) -> Callable[[], None]:
    """What rank 0 leaves behind: `final/` with an adapter and train_info.json, committed."""
    def write() -> None:
        final = Path(cfg.output) / "final"
        (final / "adapter").mkdir(parents=True)
        (final / "adapter" / "adapter_config.json").write_text("{}")
        (final / "train_info.json").write_text(json.dumps({
            "steps": 7, "final_loss": 0.25, "outputs": {"adapter": "adapter"},
            "eval_metrics": {"eval_accuracy": 0.5}}))
        storage.commit_dir(final, meta={"fingerprint": fingerprint or train_fingerprint(cfg)})
    return write


def job_name(cfg: TrainStageConfig) -> str:
    return train_stage.job_manifest(cfg, nodes=2, gpus_per_node=8, image=IMAGE,
                                    namespace=NAMESPACE,
                                    settings=multinode.JobSettings())["metadata"]["name"]


def launch(cfg: TrainStageConfig, api: Any, **kwargs: Any) -> Any:
    return train_stage.launch(cfg, nodes=2, gpus_per_node=8, image=IMAGE,
                                      namespace=NAMESPACE, api=api, **{**FAST, **kwargs})


TRAINJOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
PYTORCHJOBS = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs"


def test_success_creates_once_follows_to_complete_and_returns_the_stored_result(kube, cfg):
    fake, api = kube
    name = job_name(cfg)
    fake.script(name, [[], [condition("Created")], [condition("Created")],
                       [condition("Created"), condition("Complete", "JobsCompleted")]],
                on_done=commit_result(cfg))
    result = launch(cfg, api, settings={"secrets": {"s3": "team-s3"}})

    assert fake.calls("POST") == [TRAINJOBS]
    assert fake.calls("GET") == [f"{TRAINJOBS}/{name}"] * 4  # until Complete, then stop
    assert fake.calls("DELETE") == []
    created = fake.objects[("trainjobs", name)]
    assert created["kind"] == "TrainJob" and created["spec"]["trainer"]["numNodes"] == 2
    final = str(Path(cfg.output) / "final")
    assert result.output == cfg.output and result.final == final and not result.cached
    assert result.adapter == str(Path(final) / "adapter")
    assert (result.steps, result.final_loss, result.eval_metrics) == (
        7, 0.25, {"eval_accuracy": 0.5})
    assert result.model or result.output == cfg.output  # what the train component returns


def test_failed_condition_fails_the_step_naming_job_and_message(kube, cfg):
    fake, api = kube
    name = job_name(cfg)
    fake.script(name, [[condition("Created")],
                       [condition("Created"), condition(
                           "Failed", "BackoffLimitExceeded",
                           "pod node-1 exited with code 2: stages.sft.train.lr: bad value")]])
    with pytest.raises(RuntimeError) as err:
        launch(cfg, api)
    message = str(err.value)
    assert f"TrainJob {NAMESPACE}/{name} failed" in message
    assert "BackoffLimitExceeded" in message and "exited with code 2" in message
    assert len(fake.calls("POST")) == 1


def test_retry_adopts_the_running_job_of_its_earlier_attempt(kube, cfg):
    fake, api = kube
    earlier = train_stage.job_manifest(cfg, nodes=2, gpus_per_node=8, image=IMAGE,
                                       namespace=NAMESPACE, settings=multinode.JobSettings())
    fake.add("trainjobs", earlier)
    name = earlier["metadata"]["name"]
    fake.script(name, [[condition("Created")],
                       [condition("Created"), condition("Complete")]],
                on_done=commit_result(cfg))
    result = launch(cfg, api)

    assert fake.calls("POST") == [TRAINJOBS]  # answered 409: it exists
    assert fake.calls("DELETE") == []
    assert fake.objects[("trainjobs", name)] is earlier  # followed, not replaced
    assert result.adapter and result.steps == 7


def test_retry_replaces_a_job_that_failed_in_its_earlier_attempt(kube, cfg):
    fake, api = kube
    earlier = train_stage.job_manifest(cfg, nodes=2, gpus_per_node=8, image=IMAGE,
                                       namespace=NAMESPACE, settings=multinode.JobSettings())
    earlier["status"] = {"conditions": [condition("Failed", "PodFailed", "node lost")]}
    fake.add("trainjobs", earlier)
    name = earlier["metadata"]["name"]

    def after_delete() -> None:  # the replacement runs to completion
        fake.script(name, [[condition("Created")], [condition("Complete")]],
                    on_done=commit_result(cfg))

    original_handle = fake.handle

    def handle(method, path, body):
        code, payload = original_handle(method, path, body)
        if method == "DELETE" and code == 200:
            after_delete()
        return code, payload

    fake.handle = handle
    result = launch(cfg, api)

    assert fake.calls("DELETE") == [f"{TRAINJOBS}/{name}"]
    assert fake.calls("POST") == [TRAINJOBS, TRAINJOBS]  # 409, then the replacement
    assert fake.objects[("trainjobs", name)] is not earlier
    assert result.steps == 7


def test_pytorchjob_succeeds_through_a_transient_api_error(kube, cfg):
    fake, api = kube
    name = job_name(cfg)
    fake.script(name, [[condition("Created")], "500",
                       [condition("Created"), condition("Running")],
                       [condition("Running", ""), condition("Succeeded", "PyTorchJobSucceeded")]],
                on_done=commit_result(cfg))
    result = launch(cfg, api, kind="pytorchjob")

    assert fake.calls("POST") == [PYTORCHJOBS]
    assert len(fake.calls("GET")) == 4
    created = fake.objects[("pytorchjobs", name)]
    assert created["kind"] == "PyTorchJob"
    assert set(created["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    assert result.adapter and not result.cached


def test_pytorchjob_failure(kube, cfg):
    fake, api = kube
    name = job_name(cfg)
    fake.script(name, [[condition("Failed", "PyTorchJobFailed", "master-0 OOMKilled")]])
    with pytest.raises(RuntimeError, match=f"PyTorchJob {NAMESPACE}/{name} failed.*OOMKilled"):
        launch(cfg, api, settings={"kind": "pytorchjob"})


def test_result_already_committed_for_these_inputs_launches_nothing(kube, cfg):
    fake, api = kube
    commit_result(cfg)()
    result = launch(cfg, api)
    assert fake.requests == []
    assert result.cached and result.steps == 7


def test_completed_job_without_a_matching_result_fails_the_step(kube, cfg):
    fake, api = kube
    name = job_name(cfg)
    fake.script(name, [[condition("Complete")]],
                on_done=commit_result(cfg, fingerprint="from-other-inputs"))
    with pytest.raises(RuntimeError, match="made from other inputs"):
        launch(cfg, api)


def test_timeout_deletes_the_job(kube, cfg):
    fake, api = kube
    name = job_name(cfg)
    fake.script(name, [[condition("Created")]])  # never ends
    with pytest.raises(RuntimeError, match=f"TrainJob {NAMESPACE}/{name}: timed out"):
        launch(cfg, api, timeout_s=0.05)
    # Foreground: the job object goes only after its pods (a recreated job of the same name
    # never meets the old pods).
    assert fake.calls("DELETE", query=True) == [
        f"{TRAINJOBS}/{name}?propagationPolicy=Foreground"]
    assert ("trainjobs", name) not in fake.objects


def test_namespace_comes_from_the_service_account_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multinode, "NAMESPACE_FILE", tmp_path / "missing")
    monkeypatch.delenv("MMJOBS_NAMESPACE", raising=False)
    with pytest.raises(RuntimeError, match="no namespace"):
        multinode.current_namespace()
    monkeypatch.setenv("MMJOBS_NAMESPACE", "from-env")
    assert multinode.current_namespace() == "from-env"
    sa_file = tmp_path / "namespace"
    sa_file.write_text("team-b\n")
    monkeypatch.setattr(multinode, "NAMESPACE_FILE", sa_file)
    assert multinode.current_namespace() == "team-b"
