"""Several models behind one server, as configured: `models`, `--model NAME=URI`, `run` (the
committed merge-<setting> folders of a finished run), the deploy manifests of such a server,
and the chat page's selector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mmjobs import storage
from mmjobs.serve import k8s
from mmjobs.serve.config import ServeConfig, ServedModel, parse_model_flag
from mmjobs.serve.page import render_page
from mmjobs.serve.runs import RunModelsError, swept_models
from mmjobs.stages.serve import ServeError, served_models
from tests.k8s import policy
from tests.k8s.validation import KUBE_VERSIONS, validate_manifest


def test_one_of_model_models_or_run():
    with pytest.raises(ValidationError, match="set one of model"):
        ServeConfig.model_validate({})
    with pytest.raises(ValidationError, match="got model and models"):
        ServeConfig.model_validate({"model": "a", "models": [{"name": "x", "model": "b"}]})
    with pytest.raises(ValidationError, match=r"\['x'\] appear more than once"):
        ServeConfig.model_validate({"models": [{"name": "x", "model": "a"},
                                               {"name": "x", "model": "b"}]})
    with pytest.raises(ValidationError, match="adapter and served_model_name go with model"):
        ServeConfig.model_validate({"run": "/r", "adapter": "/a"})
    with pytest.raises(ValidationError, match="name"):
        ServeConfig.model_validate({"models": [{"name": "<script>", "model": "a"}]})


def test_model_flags():
    assert parse_model_flag("dec=s3://b/run/merge-dec") == ServedModel(
        name="dec", model="s3://b/run/merge-dec")
    assert parse_model_flag("a=/base,adapter=/run/sft-a") == ServedModel(
        name="a", model="/base", adapter="/run/sft-a")
    with pytest.raises(ValueError, match="expected NAME=MODEL_URI"):
        parse_model_flag("/just/a/path")


def test_a_single_model_is_a_list_of_one_named_as_before():
    cfg = ServeConfig.model_validate({"model": "s3://runs/x/merge", "adapter": "/a"})
    assert served_models(cfg) == [ServedModel(name="merge", model="s3://runs/x/merge",
                                              adapter="/a")]


def _committed(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    storage.commit_dir(str(path))


def test_a_run_serves_its_committed_settings_and_names_unfinished_ones(tmp_path, caplog):
    run = tmp_path / "lavin-sweep" / "run-1"
    for setting in ("dec-dropout", "baseline"):
        _committed(run / f"merge-{setting}")
    (run / "merge-exp-decay").mkdir(parents=True)  # still merging: no manifest
    (run / "merge-exp-decay" / "model.safetensors").write_bytes(b"partial")
    _committed(run / "sft-baseline")  # not a model to serve
    cfg = ServeConfig.model_validate({"run": str(run)})
    assert served_models(cfg) == [
        ServedModel(name="baseline", model=str(run / "merge-baseline")),
        ServedModel(name="dec-dropout", model=str(run / "merge-dec-dropout"))]
    assert "merge-exp-decay" in caplog.text and "not committed" in caplog.text


def test_a_run_without_a_finished_model_says_what_it_has(tmp_path):
    (tmp_path / "merge-a").mkdir()
    (tmp_path / "merge-a" / "config.json").write_text("{}")  # written, never committed
    with pytest.raises(RunModelsError, match="only unfinished merge-a"):
        swept_models(str(tmp_path))
    with pytest.raises(ServeError, match="nothing to serve"):
        served_models(ServeConfig.model_validate({"run": str(tmp_path / "nowhere")}))


@pytest.mark.integration
def test_a_run_on_s3_is_listed_through_the_store(s3_bucket, tmp_path):
    run = f"s3://{s3_bucket}/lavin-sweep/run-2"
    for setting in ("baseline", "inc-dropout"):
        _committed(tmp_path / setting)
        storage.put_dir(tmp_path / setting, f"{run}/merge-{setting}")
    storage.write_text(f"{run}/merge-step-decay/config.json", "{}")  # not committed
    assert [(m.name, m.model) for m in swept_models(run)] == [
        ("baseline", f"{run}/merge-baseline"), ("inc-dropout", f"{run}/merge-inc-dropout")]


def test_one_deployment_serves_every_setting():
    models = [{"name": s, "model": f"s3://mmjobs/store/lavin/run-1/merge-{s}"}
              for s in ("baseline", "dec-dropout")]
    spec = k8s.ServerSpec.model_validate({
        "models": models, "image": "ghcr.io/mmjobs/mmjobs-eval:0.1.0", "gpus": 1,
        "serve": {"max_loaded_models": 1}, "secrets": {"bearer": "review-key"}})
    doc = k8s.deployment(spec, name="mmjobs-serve-lavin", namespace="team-a")
    for version in KUBE_VERSIONS:
        assert validate_manifest(doc, version) == []
    assert policy.policy_violations([doc]) == []
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:3] == ["--host=0.0.0.0", f"--port={k8s.PORT}", f"--api-key-env={k8s.KEY_ENV}"]
    settings = dict(a.split("=", 1) for a in args[args.index("--set") + 1::2])
    assert yaml.safe_load(settings["models"]) == models  # read back exactly
    assert settings["max_loaded_models"] == "1"
    # What the pod runs parses: `mmjobs serve` with those settings is a valid server config.
    cfg = ServeConfig.model_validate({k: yaml.safe_load(v) for k, v in settings.items()})
    assert [m.name for m in cfg.models] == ["baseline", "dec-dropout"]
    with pytest.raises(ValidationError, match=r"either model \(one model\) or models .*, not both"):
        k8s.ServerSpec.model_validate({"models": models, "model": "s3://x/merge"})
    with pytest.raises(ValidationError, match="either model"):
        k8s.ServerSpec.model_validate({})


def test_the_page_lists_the_settings_and_escapes_names():
    html = render_page(["baseline", "dec-dropout"], auth_required=False,
                       max_image_bytes=1 << 20, nonce="n")
    assert '<option value="baseline">baseline</option>' in html
    assert '<option value="dec-dropout">dec-dropout</option>' in html
    config = json.loads(html.split('<script id="config" type="application/json">')[1]
                        .split("</script>")[0])
    assert config["models"] == ["baseline", "dec-dropout"] and config["model"] == "baseline"
    single = render_page("tiny", auth_required=False, max_image_bytes=1, nonce="n")
    assert 'id="model-row" hidden' in single  # one model: no selector shown
    hostile = render_page(['a"><script>x</script>'], auth_required=False, max_image_bytes=1,
                          nonce="n")
    assert "<script>x" not in hostile
