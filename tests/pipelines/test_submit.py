"""`mmjobs submit` against a fake KFP API server on loopback.

No real Kubeflow Pipelines server can run here (it needs a Kubernetes cluster with Argo or
Tekton, MySQL and MinIO), so this server answers the four REST calls `kfp.Client` makes to
submit a run — health check, experiment lookup and creation, run creation — with the
v2beta1 API's JSON shapes, and records every request for the assertions.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from mmjobs.cli import main

FAKE_SECRET = "fake-secret-never-sent"


class FakeKfp(BaseHTTPRequestHandler):
    """Just enough of KFP's v2beta1 REST API for `create_run_from_pipeline_package`."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: Any = None) -> None:
        FakeKfp.requests.append({"method": self.command, "path": self.path, "body": body,
                                 "headers": dict(self.headers)})

    def do_GET(self) -> None:
        self._record()
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._reply({"multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiments": [], "total_size": 0})  # not there yet: create it
        else:
            self._reply({})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self._record(body)
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-42", "display_name": body.get("display_name"),
                         "experiment_id": body.get("experiment_id"), "state": "PENDING"})
        else:
            self._reply({})


@pytest.fixture
def kfp_server() -> Iterator[str]:
    FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_submit_posts_the_compiled_pipeline_and_prints_the_run_url(
        kfp_server: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", FAKE_SECRET)
    code = main(["submit", "pipelines/recipes/chartmoe.yaml", "--host", kfp_server,
                 "--experiment", "charts", "--no-cache"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"submitted: {kfp_server}/#/runs/details/run-42" in out

    posts = [r for r in FakeKfp.requests if r["method"] == "POST"]
    assert [p["path"] for p in posts] == ["/apis/v2beta1/experiments", "/apis/v2beta1/runs"]
    assert posts[0]["body"]["display_name"] == "charts"
    run = posts[1]["body"]
    assert run["experiment_id"] == "exp-1"
    # No --run-id: the run's folders are KFP's job id, the run is named by when it was sent.
    assert re.fullmatch(r"chartmoe \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", run["display_name"])
    # The whole pipeline travels inline; no parameter values: the recipe's are the defaults.
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "chartmoe"
    assert {"align-table", "build-moe", "evaluate-pot"} <= {
        t["taskInfo"]["name"] for t in spec["root"]["dag"]["tasks"].values()}
    assert not run.get("runtime_config", {}).get("parameters")
    # --no-cache switches off KFP's cache for every task.
    assert all(t.get("cachingOptions", {}).get("enableCache") is not True
               for t in spec["root"]["dag"]["tasks"].values())
    # Credentials: referenced by Secret name, never sent.
    sent = json.dumps(FakeKfp.requests)
    assert FAKE_SECRET not in sent
    assert "mmjobs-s3" in json.dumps(platform)


def test_submit_with_a_bad_recipe_sends_nothing(kfp_server: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    recipe = yaml.safe_load(Path("pipelines/recipes/chartmoe.yaml").read_text())
    recipe["stages"]["sft"]["train"]["lrr"] = 1
    bad.write_text(yaml.safe_dump(recipe))
    assert main(["submit", str(bad), "--host", kfp_server]) == 2
    assert "stages.sft.train.lrr: unknown key; did you mean 'lr'?" in capsys.readouterr().err
    assert FakeKfp.requests == []


class RefusingKfp(FakeKfp):
    """A KFP API that is up but refuses to create runs (wrong credentials, say)."""

    def do_POST(self) -> None:
        self._record()
        data = b'{"error": "user is not authorized to create runs", "code": 7}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_an_unreachable_or_refusing_kfp_api_is_one_message_not_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.servers import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["submit", "pipelines/recipes/chart-demo.yaml", "--host", nowhere]) == 1
    err = capsys.readouterr().err
    assert f"mmjobs submit: {nowhere}: cannot reach the KFP API" in err
    assert "check --host" in err and "Traceback" not in err

    FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingKfp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["submit", "pipelines/recipes/chart-demo.yaml", "--host", host]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert f"mmjobs submit: {host}: the KFP API answered 403" in err
    assert "not authorized to create runs" in err and "Traceback" not in err
