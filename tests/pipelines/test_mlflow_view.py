"""The demo's run as a user finds it in MLflow: read through MlflowClient (step-named runs, the
parent's metrics, the registered model and its source, dataset inputs) and looked at in
headless Chromium (the run page, the report with its plots). Both use the session's shared
chart-demo run (tests/pipelines/runs.py); nothing is run again here."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from mmjobs.stage_contract import input_fingerprint
from tests.integration.serve.cdp import Chromium, chromium_path
from tests.pipelines.runs import RecipeRuns, uses_run
from tests.servers import LOOPBACK, _bin, _stop, _wait_http, free_port

STEPS = {"make-model", "prepare", "prepare-test", "pretokenize", "align", "apply-connector", "sft",
         "merge", "infer-untrained", "infer-trained", "evaluate-untrained", "evaluate-trained",
         "report"}


def _demo(recipe_runs: RecipeRuns) -> tuple[Any, MlflowClient, Any, dict[str, Any]]:
    demo = recipe_runs.get("chart-demo")
    client = MlflowClient(f"sqlite:///{demo.home / 'mlflow.db'}")
    parent = client.get_run(demo.outcome.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return demo, client, parent, {r.info.run_name: r for r in children}


@pytest.mark.slow
@uses_run("chart-demo")
def test_demo_reads_in_mlflow_as_steps_scores_models_and_datasets(recipe_runs):
    demo, client, parent, runs = _demo(recipe_runs)
    run_dir = Path(demo.outcome.run_dir)
    assert set(runs) == STEPS  # named by step: align and sft, untrained and trained apart
    assert {runs[s].data.tags["mmjobs.stage"] for s in ("align", "sft")} == {"train"}
    assert runs["infer-trained"].data.tags["mmjobs.step"] == "infer-trained"

    # The parent carries each evaluation's headline, and the final model's without a label.
    evaluation = runs["evaluate-trained"]
    metric = evaluation.data.tags["headline_metric"]
    score = evaluation.data.metrics[metric]
    assert parent.data.metrics[f"trained.{metric}"] == score
    assert parent.data.metrics[metric] == score
    assert f"untrained.{metric}" in parent.data.metrics
    merged = str(run_dir / "merge")
    assert parent.data.tags["mmjobs.final_model.uri"] == merged
    assert parent.data.tags["mmjobs.final_model.version"] == "chart-demo/1"

    # The merged model is registered under the recipe's name, its source the store folder.
    (version,) = client.search_model_versions("name = 'chart-demo'")
    assert version.source == merged and version.run_id == runs["merge"].info.run_id
    assert float(version.tags[metric]) == pytest.approx(score)
    assert version.tags["evaluation"] == "trained"

    # Trained models are logged models pointing at the store (no weights uploaded).
    models = {m.name: m for m in client.search_logged_models([parent.info.experiment_id])}
    assert {"align", "apply-connector", "sft", "merge"} <= set(models)
    assert models["sft"].tags["mmjobs.uri"] == str(run_dir / "sft" / "final")
    assert models["sft"].model_type == "adapter" and models["align"].model_type == "connector"
    assert models["sft"].params["lora.r"] == "64" and "lora.r" not in models["align"].params
    assert [o.model_id for o in parent.outputs.model_outputs] == [models["merge"].model_id]
    assert json.loads(models["merge"].tags["mlflow.modelVersions"]) == [
        {"name": "chart-demo", "version": "1"}]

    # Datasets are the runs' inputs, with their fingerprints as digests.
    def inputs(step: str) -> dict[str, Any]:
        return {d.dataset.name: d for d in runs[step].inputs.dataset_inputs}

    (shards,) = inputs("sft").values()  # pretokenize's shards, in the content-addressed cache
    assert shards.dataset.name == "pretokenized"
    assert shards.dataset.digest == input_fingerprint(json.loads(shards.dataset.source)["uri"])
    assert {t.value for t in shards.tags} == {"training"}
    held_out = inputs("infer-trained")["prepare-test"]
    assert {t.value for t in held_out.tags} == {"evaluation"}
    assert set(inputs("pretokenize")) == {"prepare"}

    # MLflow 3 opens the experiment on its model-training pages.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


# --------------------------------------------------------------------------- the UI


class _MLflowUI:
    """`mlflow server` on the demo's database (its artifacts are local folders it serves)."""

    def __init__(self, db: Path, workdir: Path) -> None:
        self.port, self.log = free_port(), workdir / "mlflow-ui.log"
        import subprocess

        self.proc = subprocess.Popen(
            [_bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=workdir)
        self.url = f"http://{LOOPBACK}:{self.port}"
        try:
            _wait_http(f"{self.url}/health", 120, self.proc, self.log)
        except BaseException:
            _stop(self.proc)
            raise


def _show(browser: Chromium, url: str, text: str, shot: Path, timeout: float = 120) -> Path:
    """Open `url` (the MLflow single-page app), wait until the page shows `text`, capture it."""
    browser.send("Page.navigate", url=url)
    browser.wait_for(f"!!(document.body && document.body.innerText.includes({json.dumps(text)}))",
                     timeout)
    time.sleep(1)  # let late images and charts paint
    return browser.screenshot(shot)


_LOADED_IMAGES = ("[...document.querySelectorAll('img')].filter(i => i.complete && "
                  "i.naturalWidth > 0).map(i => [i.dataset.file || i.alt, i.naturalWidth])")


def _images(browser: Chromium, sessions: dict[str, str]) -> dict[str, int]:
    """File name (report.html's `data-file`, else alt) -> natural width of every loaded
    image in the page and its frames. MLflow's artifact viewer shows HTML in a sandboxed
    iframe of its own process (a DevTools target of type iframe): attached to once
    (`sessions`: target id -> session id) and evaluated in through its session."""
    found = dict(browser.evaluate(_LOADED_IMAGES))
    for target in browser.send("Target.getTargets")["targetInfos"]:
        if target["type"] == "iframe" and target["targetId"] not in sessions:
            sessions[target["targetId"]] = browser.send(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
    for session in sessions.values():
        message_id = next(browser._ids)
        browser.ws.send(json.dumps({"id": message_id, "sessionId": session,
                                    "method": "Runtime.evaluate",
                                    "params": {"expression": _LOADED_IMAGES,
                                               "returnByValue": True}}))
        while (reply := json.loads(browser.ws.recv())).get("id") != message_id:
            pass  # events of the page and the frame
        found.update(dict(reply.get("result", {}).get("result", {}).get("value") or []))
    return found


def _wait_images(browser: Chromium, names: set[str], timeout: float = 60) -> dict[str, int]:
    deadline, sessions = time.monotonic() + timeout, {}
    while not names <= set(found := _images(browser, sessions)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


@pytest.mark.slow
@uses_run("chart-demo")
@pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (Debian: "
                    "apt-get install -y chromium; .ci/run installs it)")
def test_run_page_and_report_render_in_mlflow_ui(recipe_runs, tmp_path):
    demo, client, parent, runs = _demo(recipe_runs)
    experiment = parent.info.experiment_id
    report = runs["report"].info.run_id
    ui = _MLflowUI(demo.home / "mlflow.db", tmp_path)
    shots = {}
    try:
        with Chromium.launch(tmp_path / "profile") as browser:
            # The parent run's page: its headline metrics and its model.
            shots["run"] = _show(browser, f"{ui.url}/#/experiments/{experiment}/runs/"
                                 f"{parent.info.run_id}", "trained.chartqa", tmp_path / "run.png")
            # report.html in the artifact viewer (an iframe): every plot drawn.
            shots["report"] = _show(browser, f"{ui.url}/#/experiments/{experiment}/runs/"
                                    f"{report}/artifacts/report.html", "report.html",
                                    tmp_path / "report-mlflow.png")
            # The report run's own report.json (the store's folder holds the newest report:
            # a re-run of the demo, reusing its training, writes one without loss curves).
            logged = client.download_artifacts(report, "report.json", str(tmp_path))
            plots = set(json.loads(Path(logged).read_text())["plots"])
            assert {"loss.png", "lr.png", "categories_chartqa.png"} <= plots
            shown = _wait_images(browser, plots)
            assert plots <= set(shown) and min(shown.values()) > 100, shown
            # The store's report.html opened on its own (a browser, a mail attachment).
            page = Path(demo.outcome.report).with_name("report.html")
            stored = set(json.loads(page.with_name("report.json").read_text())["plots"])
            shots["store"] = _show(browser, page.as_uri(), "chartqa", tmp_path / "report.png")
            assert "categories_chartqa.png" in stored
            assert stored <= set(_wait_images(browser, stored))
    finally:
        _stop(ui.proc)
    print("\n" + "\n".join(f"MLflow UI screenshot ({k}): {v}" for k, v in shots.items()))
    assert all(shot.stat().st_size > 20_000 for shot in shots.values())

