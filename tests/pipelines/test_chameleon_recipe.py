"""The chameleon-interleaved recipe validates, compiles with its GPU and Secret settings (the
judge's key only by Secret name), and runs end to end locally, scaled down onto a tiny
Chameleon (built by the make-model step) and a fake OpenAI-compatible judge on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmjobs import pipeline_runner, storage
from tests.pipelines.runs import RecipeRuns, uses_run

RECIPE = Path("pipelines/recipes/chameleon-interleaved.yaml")
FAKE_KEY_ID = "AKIAFAKEPIPELINETEST"
FAKE_SECRET = "fake/secret+value/must-never-appear"
FAKE_JUDGE_KEY = "sk-fake-judge-key-must-never-appear"
STEPS = {"prepare-sft", "prepare-preference", "prepare-prompts", "prepare-test",
         "pretokenize-sft", "pretokenize-preference", "pretokenize-prompts", "sft", "rm",
         "dpo", "ppo", "infer-sft", "infer-dpo", "infer-ppo", "evaluate-sft", "evaluate-dpo",
         "evaluate-ppo", "report"}


def test_recipe_validates_with_the_7b_base_and_deepspeed() -> None:
    recipe = pipeline_runner.load(RECIPE)
    assert RECIPE.read_text().splitlines()[0].startswith(f"# Run: mmjobs submit {RECIPE}")
    assert recipe.pipeline == recipe.recipe == "chameleon-interleaved"
    assert recipe.model.name_or_path == "PKU-Alignment/AA-chameleon-7b-base"
    assert (recipe.train.finetune, recipe.train.deepspeed) == ("full", "zero3")
    # The frozen reference copies of DPO and PPO need ZeRO-2.
    assert recipe.stages["dpo"]["train"]["deepspeed"] == "zero2"
    assert recipe.stages["ppo"]["train"]["deepspeed"] == "zero2"
    judge = recipe.stages["evaluate"]["judge"]
    assert judge["base_url"].startswith("https://") and judge["key_env"] == "OPENAI_API_KEY"
    assert not {k for k in judge if "key" in k} - {"key_env"}  # a variable name, no value


def test_recipe_compiles_with_gpus_and_the_judge_secret(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                        "OPENAI_API_KEY": FAKE_JUDGE_KEY}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "pipeline.yaml"
    pipeline_runner.compile_recipe(RECIPE, out)
    text = out.read_text(encoding="utf-8")
    for value in (FAKE_KEY_ID, FAKE_SECRET, FAKE_JUDGE_KEY):
        assert value not in text
    spec, platform = yaml.safe_load_all(text)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in tasks.values()} == STEPS
    by_step = {t["taskInfo"]["name"]: t["componentRef"]["name"].replace("comp-", "exec-")
               for t in tasks.values()}
    resources = {step: spec["deploymentSpec"]["executors"][ex]["container"].get("resources", {})
                 for step, ex in by_step.items()}
    for step in ("sft", "rm", "dpo", "ppo"):
        assert resources[step]["accelerator"]["resourceCount"] == "8"
    assert resources["infer-dpo"]["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in resources["evaluate-ppo"]
    # ppo waits for the reward model it reads.
    ppo = next(t for t in tasks.values() if t["taskInfo"]["name"] == "ppo")
    rm_task = next(k for k, t in tasks.items() if t["taskInfo"]["name"] == "rm")
    assert rm_task in ppo["dependentTasks"]
    # ...and mixes in the SFT shards' loss (Align-Anything's ptx).
    sft_shards = next(k for k, t in tasks.items() if t["taskInfo"]["name"] == "pretokenize-sft")
    ptx = ppo["inputs"]["parameters"]["ptx_data"]["taskOutputParameter"]
    assert ptx["producerTask"] == sft_shards
    for step, executor in by_step.items():
        secrets = {s["secretName"]: s for s in executors[executor]["secretAsEnv"]}
        if step.startswith("evaluate-"):
            judge = secrets["mmjobs-judge"]
            assert judge["keyToEnv"] == [{"envVar": "OPENAI_API_KEY",
                                          "secretKey": "OPENAI_API_KEY"}]
            assert judge["optional"] is True
        else:
            assert "mmjobs-judge" not in secrets
        assert {"mmjobs-s3", "mmjobs-mlflow"} <= set(secrets)


@pytest.mark.slow
@uses_run("chameleon-interleaved")
def test_recipe_runs_scaled_down(recipe_runs: RecipeRuns) -> None:
    run = recipe_runs.get("chameleon-interleaved")  # judged by a fake server (runs.py)
    outcome = run.outcome
    assert set(outcome.headlines) == {"sft", "dpo", "ppo"}
    assert all(name == "judge.mean_score" and value is not None
               for name, value in outcome.headlines.values()), outcome.headlines
    assert "## Headline per evaluation" in storage.read_text(outcome.results)
    assert not any(outcome.stages_cached.values())
    run_dir = Path(outcome.run_dir)
    for name in ("sft", "dpo", "ppo"):
        rows = [json.loads(line) for line in
                (run_dir / f"infer-{name}" / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all("parts" in r and "output_images" in r for r in rows)
        for row in rows:  # whatever the tiny model drew is a committed 32x32 PNG
            for rel in row["output_images"]:
                assert (run_dir / f"infer-{name}" / rel).read_bytes().startswith(b"\x89PNG")
        summary = json.loads((run_dir / f"evaluate-{name}" / "summary.json").read_text())
        assert summary["judge"]["judged"] == 2
    # Judged answers went over the wire with the prompt's image attached (identical answers
    # of the three models are judged once: replies are cached by request).
    assert 2 <= len(run.judge_requests) <= 6
    for seen in run.judge_requests:
        parts = seen.body["messages"][-1]["content"]
        assert any(p.get("type") == "image_url" for p in parts)
    if outcome.report:
        assert storage.exists(outcome.report)
