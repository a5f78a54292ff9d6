"""Every shipped recipe validates and compiles to KFP IR with its Kubernetes settings (GPU
placement on GPU steps only), and the compiled pipeline never carries credential values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmjobs import pipeline_runner
from mmjobs.config import ConfigError

RECIPES = sorted(Path("pipelines/recipes").glob("*.yaml"))
FAKE_KEY_ID = "AKIAFAKEPIPELINETEST"
FAKE_SECRET = "fake/secret+value/must-never-appear"


def test_every_seed_recipe_ships() -> None:
    assert {p.stem for p in RECIPES} == {"chart-demo", "llava-dataengine", "chartwiz",
                                         "chartmoe", "lavin-sweep", "chameleon-interleaved"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_starts_with_the_command_that_runs_it(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# Run: mmjobs ") and str(path) in first


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_compiles_with_cluster_settings_and_no_credentials(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials in the compiling shell must not leak into the pipeline package.
    for name, value in {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                        "MLFLOW_TRACKING_PASSWORD": FAKE_SECRET}.items():
        monkeypatch.setenv(name, value)
    recipe = pipeline_runner.load(path)
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe(path, out)
    text = out.read_text(encoding="utf-8")
    assert FAKE_KEY_ID not in text and FAKE_SECRET not in text
    docs = list(yaml.safe_load_all(text))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert spec["pipelineInfo"]["name"] == recipe.recipe
    resources = [e["container"].get("resources", {})
                 for e in spec["deploymentSpec"]["executors"].values()]
    assert any(r.get("accelerator", {}).get("resourceType") == "nvidia.com/gpu"
               for r in resources)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert all(i.startswith("ghcr.io/mmjobs/mmjobs-") and i.endswith(":0.1.0") for i in images)
    for name, executor in platform.items():
        assert executor["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm",
             "sizeLimit": executor["emptyDirMounts"][0]["sizeLimit"]}]
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]}
                   for s in executor["secretAsEnv"]}
        secrets.pop("mmjobs-judge", None)  # the judge's key, where a recipe has a judge
        assert secrets == {"mmjobs-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           "mmjobs-mlflow": {"MLFLOW_TRACKING_USERNAME",
                                             "MLFLOW_TRACKING_PASSWORD"}}
        resources = spec["deploymentSpec"]["executors"][name]["container"].get("resources", {})
        cluster = recipe.cluster
        if "accelerator" in resources:  # a GPU step: placed on GPU nodes
            if cluster.tolerations:
                assert executor["tolerations"][0]["key"] == "nvidia.com/gpu", name
            if cluster.node_selector:
                assert executor["nodeSelector"]["labels"] == cluster.node_selector, name
        else:  # a CPU step: no GPU placement, cpu_steps' CPUs or what cluster.stages asks
            assert "tolerations" not in executor and "nodeSelector" not in executor, name
            asked = {float(c) for c in (cluster.cpu_steps.cpu,
                                        *(s.cpu for s in cluster.stages.values())) if c}
            assert resources.get("cpuLimit") in asked, name
    # Plain endpoints reach the pods as env vars; outputs go to the cluster's store.
    env = [v for e in spec["deploymentSpec"]["executors"].values()
           for v in e["container"].get("env", [])]
    assert {"name": "MMJOBS_STORE", "value": "s3://mmjobs/store"} in env
    assert "s3://mmjobs/store/" in text


def test_train_steps_get_gpus_and_retries_prepare_does_not(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/llava-dataengine.yaml", out)
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]["resources"]
    assert train["accelerator"] == {"count": "8", "resourceCount": "8",
                                    "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
    assert train["cpuLimit"] == 64.0 and train["memoryLimit"] == pytest.approx(549.755813888)
    assert "accelerator" not in executors["exec-prepare"]["container"].get("resources", {})
    infer = executors["exec-infer"]["container"]["resources"]["accelerator"]
    assert infer["resourceCount"] == "1"  # cluster.stages.infer.gpus
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in tasks["prepare"]
    assert {"mix", "merge", "infer-6", "evaluate-6"} <= set(tasks)


def test_sweep_fans_out_with_parallel_for(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/lavin-sweep.yaml", out)
    spec = next(yaml.safe_load_all(out.read_text()))
    loop = next(t for t in spec["root"]["dag"]["tasks"].values()
                if "parameterIterator" in t)
    items = loop["parameterIterator"]["items"]["raw"]
    assert len(yaml.safe_load(items)) == 8  # baseline, 3 LR schedules, 4 dropout schedules (V2)
    tasks = spec["root"]["dag"]["tasks"]
    assert "report" in tasks
    # One LaVIN built (Meta LLaMA + CLIP, conversions.lavin) before every other step.
    convert = next(t for t in tasks.values() if t["taskInfo"]["name"] == "convert-lavin")
    config = json.loads(convert["inputs"]["parameters"]["config_json"]["runtimeValue"]
                        ["constant"])
    assert (config["kind"], config["to"]) == ("lavin", "s3://mmjobs-models/lavin-7b")
    assert all("convert" in t.get("dependentTasks", []) for name, t in tasks.items()
               if name != "convert"), {n: t.get("dependentTasks") for n, t in tasks.items()}


def test_sweep_deploys_every_setting_behind_one_server_when_enabled(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/lavin-sweep.yaml", out,
                                   ["stages.deploy.enabled=true",
                                    "stages.deploy.name=lavin"], run_id="run-1")
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    loop_name, loop = next((n, t) for n, t in tasks.items() if "parameterIterator" in t)
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert "deploy" not in body  # not one server per setting
    deploy = tasks["deploy"]
    assert loop_name in deploy["dependentTasks"]  # after every setting is evaluated
    assert "model" not in deploy["inputs"]["parameters"]  # the settings are in its config
    config = json.loads(deploy["inputs"]["parameters"]["config_json"]["runtimeValue"]
                        ["constant"])
    merges = [json.loads(item["merge"])["output"]
              for item in yaml.safe_load(loop["parameterIterator"]["items"]["raw"])]
    rows = ("baseline", "cyclical-lr", "step-decay", "exp-decay", "inc-dropout", "dec-dropout",
            "inc-dropout-v2", "dec-dropout-v2")
    assert config["name"] == "lavin"
    assert config["models"] == [{"name": row, "model": merge}
                                for row, merge in zip(rows, merges, strict=True)]
    assert all(m.endswith(f"/run-1/merge-{row}") for row, m in zip(rows, merges, strict=True))
    assert config["serve"]["conversation_format"] == "lavin"
    # The step's config is a valid deploy config, and its Deployment a valid object.
    from mmjobs.serve import k8s
    from mmjobs.stages.deploy import DeployConfig
    from tests.k8s.validation import KUBE_VERSIONS, validate_manifest

    cfg = DeployConfig.model_validate(config)
    doc = k8s.deployment(cfg, name="lavin", namespace="team-a")
    assert all(validate_manifest(doc, v) == [] for v in KUBE_VERSIONS)
    # A recipe may not list the models itself: the pipeline does.
    with pytest.raises(ConfigError, match=r"stages\.deploy\.models"):
        pipeline_runner.compile_recipe("pipelines/recipes/lavin-sweep.yaml", out, [
            "stages.deploy.enabled=true", 'stages.deploy.models=[{name: a, model: s3://x}]'])
    # Without enabled: true, no deploy step (the section is still checked).
    pipeline_runner.compile_recipe("pipelines/recipes/lavin-sweep.yaml", out,
                                   ["stages.deploy.replicas=2"])
    spec = next(yaml.safe_load_all(out.read_text()))
    assert "deploy" not in spec["root"]["dag"]["tasks"]


def test_step_sections_are_checked_against_stage_configs() -> None:
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml", [
            "stages.sft.train.lrr=1", "stages.sfft.x=1", "stages.align.data=s3://x",
            "stages.infer.max_new_tokens=0", "stages.align.train.mode=sft",
            "cluster.stages.trian.gpus=1"])
    # In pipeline order, each once (the infer section configures two steps).
    assert e.value.errors == [
        "stages.align.data: set by the pipeline (wired from an upstream step); remove it",
        "stages.align.train.mode: the align step needs 'align' here; remove it",
        "stages.sft.train.lrr: unknown key; did you mean 'lr'?",
        "stages.infer.max_new_tokens: got 0 — Input should be greater than or equal to 1",
        "stages.sfft: not a step of pipeline chart-demo; did you mean 'sft'?",
        "cluster.stages.trian: neither a step of pipeline chart-demo nor a stage kind; did "
        "you mean 'train'?",
    ]


def test_a_make_model_section_with_a_real_base_model_says_what_it_is_for() -> None:
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml",
                             ["model.name_or_path=s3://models/llava"])
    assert e.value.errors == [
        "stages.make-model: the step that builds a tiny:<kind> base model, but "
        "model.name_or_path is 's3://models/llava'; drop the section (in a copy of the "
        "recipe) for a real base model"]


def test_recipe_train_defaults_reach_the_steps_whose_mode_has_them() -> None:
    # chart-demo's align step has no lora or layer_dropout: the sft step takes them; both take
    # eval_every_steps. The same settings in the align step's own section are errors.
    pipeline_runner.load("pipelines/recipes/chart-demo.yaml", [
        "train.lora.r=4", "train.layer_dropout={preset: inc}", "train.eval_every_steps=5"])
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml", [
            "stages.align.train.lora.r=4", "train.rl.kl_coef=0.1", "train.preference.beta=1",
            "stages.sft.train.rl.reward.kind=length"])
    assert e.value.errors == [
        "stages.align.train.lora: not a setting of mode align (it is for sft, dpo, rm, ppo, "
        "grpo); remove it",
        "stages.sft.train.rl: not a setting of mode sft (it is for ppo, grpo); remove it",
        "train.preference: a setting of mode dpo, rm only, and no train step here runs one "
        "(train steps: align (align), sft (sft)); remove it, or set it under "
        "stages.<step>.train",
        "train.rl: a setting of mode ppo, grpo only, and no train step here runs one (train "
        "steps: align (align), sft (sft)); remove it, or set it under stages.<step>.train",
    ]
    # The chameleon recipe's train defaults serve its sft, rm, dpo and ppo steps at once.
    build = pipeline_runner.build_pipeline(
        pipeline_runner.load_recipe("pipelines/recipes/chameleon-interleaved.yaml",
                                    ["train.rl.target_kl=6.0", "train.preference.beta=0.2"]),
        run_id="check", store_root="/check")[1]
    assert {step: section["train"]["mode"] for step, section in build.sections["train"].items()} \
        == {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo"}


def test_sweep_settings_are_checked_with_their_name() -> None:
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/lavin-sweep.yaml",
                             ["sweep.step-decay.train.lr_shedule=step"])
    assert "sweep.step-decay.train.lr_shedule: unknown key; did you mean 'lr_schedule'?" in \
        e.value.errors


def test_secret_looking_env_and_urls_with_passwords_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml", [
            "cluster.env.MLFLOW_TRACKING_URI=http://bob:hunter2@mlflow:5000"])
    assert "hunter2" not in str(e.value)
    assert "a URL with user:password@ holds a credential" in str(e.value)
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml",
                             ["cluster.env.AWS_SECRET_ACCESS_KEY=abc"])
    assert "credentials are never read from recipe files" in str(e.value)


def test_compile_needs_the_cluster_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.env\.MMJOBS_STORE: required"):
        pipeline_runner.compile_recipe("pipelines/recipes/chart-demo.yaml", tmp_path / "x",
                                       ["cluster.env={}"])


def test_unknown_pipeline_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="not a pipeline; choose one of "
                                          "chameleon-interleaved, chart-demo, chartmoe"):
        pipeline_runner.load("pipelines/recipes/chart-demo.yaml", ["pipeline=chart-demos"])


def test_step_resources_override_stage_kind_over_cluster() -> None:
    from mmjobs.config import ClusterConfig
    from pipelines.cluster import resources_for

    cluster = ClusterConfig(gpus=8, memory="64Gi", retries=3,
                            stages={"train": {"gpus": 4}, "align-table": {"gpus": 1}})
    assert resources_for(cluster, "train", "sft").gpus == 4
    assert resources_for(cluster, "train", "align-table").gpus == 1
    assert resources_for(cluster, "infer", "infer-pot").gpus == 8
    assert resources_for(cluster, "prepare", "prepare").gpus == 0  # not a GPU stage
    assert resources_for(cluster, "train", "sft").retries == 3  # resumable
    assert resources_for(cluster, "evaluate", "evaluate").retries == 0
    assert resources_for(cluster, "train", "sft").memory == "64Gi"


def test_multi_node_training_hands_the_train_component_its_node_count(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/chart-demo.yaml", out,
                                   ["cluster.nodes=2", "cluster.gpus=8"])
    tasks = next(yaml.safe_load_all(out.read_text()))["root"]["dag"]["tasks"]
    for name in ("train", "train-2"):  # align and sft
        params = tasks[name]["inputs"]["parameters"]
        assert params["nodes"]["runtimeValue"]["constant"] == 2
        assert params["gpus_per_node"]["runtimeValue"]["constant"] == 8
        assert params["image"]["runtimeValue"]["constant"] == "ghcr.io/mmjobs/mmjobs-train:0.1.0"
    assert "nodes" not in tasks["merge"]["inputs"]["parameters"]


def test_run_id_is_the_recipe_fingerprint_minus_cluster_and_deploy_settings() -> None:
    path = "pipelines/recipes/chart-demo.yaml"
    run_id = pipeline_runner.default_run_id(pipeline_runner.load_recipe(path))
    same = [["cluster.gpus=8"], ["stages.deploy.enabled=true"], ["description=another"]]
    for overrides in same:
        assert pipeline_runner.default_run_id(
            pipeline_runner.load_recipe(path, overrides)) == run_id, overrides
    assert pipeline_runner.default_run_id(
        pipeline_runner.load_recipe(path, ["train.lr=1e-4"])) != run_id


def test_recipe_imports_run_first_and_feed_the_steps_through_the_store(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    model_copy = "s3://models/llava-1.5-7b"
    pipeline_runner.compile_recipe(
        "pipelines/recipes/chartwiz.yaml", out,
        ["imports={base: {source: llava-hf/llava-1.5-7b-hf, revision: a272c74, "
         f"to: '{model_copy}'}}}}", f"model.name_or_path={model_copy}"])
    spec = next(yaml.safe_load_all(out.read_text(encoding="utf-8")))  # then platform spec
    tasks = spec["root"]["dag"]["tasks"]
    imports = [name for name, t in tasks.items() if t["taskInfo"]["name"] == "import-base"]
    assert len(imports) == 1
    config = json.loads(tasks[imports[0]]["inputs"]["parameters"]["config_json"]
                        ["runtimeValue"]["constant"])
    assert config["source"] == "llava-hf/llava-1.5-7b-hf" and config["to"] == model_copy
    # Every other step waits for the import (directly, or through its upstream steps).
    for name, task in tasks.items():
        if name != imports[0]:
            assert imports[0] in task.get("dependentTasks", []), name


def test_a_recipe_import_must_say_where_its_copy_goes() -> None:
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load(
            "pipelines/recipes/chartwiz.yaml", ["imports={base: {source: org/model}}"])
    assert "imports.base.to: required" in str(e.value)


def test_llava_dataengine_imports_then_composes_its_base_before_any_other_step(
        tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/llava-dataengine.yaml", out)
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    by_step = {t["taskInfo"]["name"]: key for key, t in tasks.items()}
    imports = {by_step[f"import-{name}"] for name in ("vicuna", "clip", "projector")}
    convert = tasks[by_step["convert-base"]]
    assert set(convert["dependentTasks"]) == imports  # reads what the imports committed
    for step in ("prepare-llava", "prepare-dataengine", "mix", "pretokenize", "sft"):
        assert by_step["convert-base"] in tasks[by_step[step]]["dependentTasks"], step
    config = json.loads(convert["inputs"]["parameters"]["config_json"]["runtimeValue"]
                        ["constant"])
    assert config["kind"] == "llava" and config["to"] == "s3://mmjobs-models/llava-v1.5-7b-pretrain"
    assert config["projector"].endswith("/mm_projector.bin")
    executor = spec["deploymentSpec"]["executors"][convert["componentRef"]["name"]
                                                   .replace("comp-", "exec-")]
    resources = executor["container"]["resources"]
    assert "accelerator" not in resources  # a conversion needs no GPU
    assert resources["cpuLimit"] == 8.0


def test_a_conversion_must_say_where_its_model_goes() -> None:
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/llava-dataengine.yaml", [
            "conversions.base.to=null", "conversions.Other={source: x}",
            "conversions.more={source: s3://a/b, kind: pickle, to: s3://a/c}"])
    assert e.value.errors[0].startswith("conversions: got {")
    assert e.value.errors[0].endswith("names must be kebab-case, got 'Other'")
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/llava-dataengine.yaml", [
            "conversions.base.to=null",
            "conversions.more={source: s3://a/b, kind: pickle, to: s3://a/c}"])
    assert any(err.startswith("conversions.base.to: required") for err in e.value.errors)
    assert any(err.startswith("conversions.more.kind: got 'pickle'") for err in e.value.errors)


def test_llava_dataengine_has_the_seeds_settings_baseline_and_upload_steps(
        tmp_path: Path) -> None:
    """finetune_lora_dataengine.sh's optimizer, the baseline row's own training, LLaVA's MME
    prompt, and VQAv2 test-dev as an upload only (no public answers to evaluate against)."""
    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/llava-dataengine.yaml", out)
    spec = next(yaml.safe_load_all(out.read_text()))
    configs = {t["taskInfo"]["name"]: json.loads(
        t["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])
        for t in spec["root"]["dag"]["tasks"].values()}
    for sft in ("sft", "sft-baseline"):
        train = configs[sft]["train"]
        assert train["lr"] == 1e-4 and train["deepspeed"] == "zero3"
        assert train["param_groups"] == [{"match": "multi_modal_projector", "lr": 2e-5}]
        assert (train["lora"]["r"], train["lora"]["alpha"]) == (128, 256)
        assert train["group_by_modality"] is True
    assert {"merge-baseline", "evaluate-mme-baseline", "infer-vqav2-baseline"} <= set(configs)
    assert "evaluate-vqav2" not in configs and "evaluate-vqav2-baseline" not in configs
    vqav2 = configs["infer-vqav2"]
    assert vqav2["benchmark_options"] == {"split": "test-dev2015"} and vqav2["submission"]
    assert configs["infer-mmbench"]["submission"] and configs["infer-seedbench"]["submission"]
    assert configs["infer-mme-baseline"]["benchmark_options"] == {"question_style": "llava"}
    assert configs["evaluate-gqa"]["label"] == "MLLM-DataEngine"
    assert configs["evaluate-gqa-baseline"]["label"] == "None (baseline)"
    with pytest.raises(ConfigError) as e:
        pipeline_runner.load("pipelines/recipes/chartwiz.yaml", ["eval.baseline=true"])
    assert any(err.startswith("eval.baseline: pipeline chartwiz has no baseline row")
               for err in e.value.errors)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_no_step_can_match_another_run_s_kfp_cache_even_with_a_baked_run_id(
        path: Path, tmp_path: Path) -> None:
    """Outputs are store paths that a changed upstream step rewrites in place, so KFP's cache
    (inputs equal) must never stand in for the stages' own fingerprint check across runs:
    every step, also under `--run-id`, takes its run's KFP job id as an input."""
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe(path, out, run_id="run-1")
    spec = next(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    steps = [t for dag in dags for t in dag["tasks"].values()
             if "config_json" in t.get("inputs", {}).get("parameters", {})]
    assert steps
    for task in steps:
        assert task["inputs"]["parameters"]["kfp_run_id"] == {
            "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}, task["taskInfo"]["name"]
