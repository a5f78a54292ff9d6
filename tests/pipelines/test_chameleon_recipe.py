"""The chameleon-interleaved recipe validates, compiles with its GPU and Secret settings (the
judge's key only by Secret name), and runs end to end locally, scaled down onto the replica of
its base model (PKU-Alignment/AA-chameleon-7b-base: 1,024 VQ tokens per 512 px image, the real
special ids, no chat template, so the recipe's anything_ti2ti format) and a fake
OpenAI-compatible judge on loopback. The run is made once (module fixture) for the tests that
read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmjobs import pipeline_runner, storage
from tests.integration.eval.test_judge import FakeJudgeServer
from tests.pipelines import fixtures
from tests.pipelines.replica_runs import (
    ReplicaRun,
    assert_counts_reconcile,
    assert_steps_committed,
    assert_trained,
    decoded_labels,
    evaluation,
    pretokenized,
    rows,
    run_recipe,
)

RECIPE = Path("pipelines/recipes/chameleon-interleaved.yaml")
BASE = "PKU-Alignment/AA-chameleon-7b-base"
IMAGE_TOKENS = 1024  # VQ codes per 512 px image (32 x 32)
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


@pytest.fixture(scope="module")
def chameleon_run(tmp_path_factory, replica_dir,
                  mlflow_db_template) -> tuple[ReplicaRun, list[Any]]:
    """The scaled-down run and the requests its judge received."""
    replica = replica_dir(BASE)
    server = FakeJudgeServer().start()
    try:
        run = run_recipe("chameleon-interleaved", tmp_path_factory.mktemp("chameleon"),
                         mlflow_db_template, lambda data: fixtures.make_chameleon_interleaved(
                             data, server.base_url, replica))
    finally:
        server.stop()
    return run, list(server.seen)


@pytest.mark.slow
def test_recipe_runs_scaled_down(chameleon_run: tuple[ReplicaRun, list[Any]]) -> None:
    run, seen = chameleon_run
    outcome = run.outcome
    assert_steps_committed(run, STEPS - {"pretokenize-sft", "pretokenize-preference",
                                         "pretokenize-prompts", "report"},
                           stage_count=len(STEPS))
    assert set(outcome.headlines) == {"sft", "dpo", "ppo"}
    assert all(name == "judge.mean_score" and value is not None
               for name, value in outcome.headlines.values()), outcome.headlines
    assert "## Headline per evaluation" in storage.read_text(outcome.results)
    for name in ("sft", "dpo", "ppo"):
        predictions = rows(run.run_dir / f"infer-{name}" / "predictions.jsonl")
        assert len(predictions) == 2
        assert all("parts" in r and "output_images" in r for r in predictions)
        for row in predictions:  # whatever the replica drew is a committed PNG
            for rel in row["output_images"]:
                assert (run.run_dir / f"infer-{name}" / rel).read_bytes().startswith(b"\x89PNG")
        assert evaluation(run, f"evaluate-{name}")["judge"]["judged"] == 2
    # Judged answers went over the wire with the prompt's image attached (identical answers
    # of the three models are judged once: replies are cached by request).
    assert 2 <= len(seen) <= 6
    for request in seen:
        parts = request.body["messages"][-1]["content"]
        assert any(p.get("type") == "image_url" for p in parts)
    assert outcome.report and storage.exists(outcome.report)


@pytest.mark.slow
def test_shards_hold_real_size_images_and_anything_ti2ti_labels(
        chameleon_run: tuple[ReplicaRun, list[Any]], replica_dir) -> None:
    run, _ = chameleon_run
    replica = replica_dir(BASE)  # built once per session: the run's base model
    for dataset in ("prepare-sft", "prepare-preference", "prepare-prompts"):
        card = assert_counts_reconcile(run, dataset)
        assert card["processor"]["conversation_format"]["name"] == "anything_ti2ti"
        if dataset != "prepare-sft":
            assert card["counts"]["rejected"] == 0, card["rejected_by_reason"]
    # The SFT row with four images is rejected by name with the reason; the others train.
    card = json.loads((pretokenized(run, "prepare-sft") / "card.json").read_text())
    assert card["counts"] == {"input": 5, "written": 4, "rejected": 1}
    assert card["rejected_by_reason"] == {"too_long": 1}
    (reject,) = rows(pretokenized(run, "prepare-sft") / "rejects.jsonl")
    assert reject["row"] == fixtures.TOO_MANY_IMAGES
    assert reject["reason"].startswith("too_long") and "4096" in reject["reason"], reject
    # SFT: each response is text, then the 512 px output image as <racm3:break> + 1,024 VQ
    # codes + <eoss>, then EOS and Chameleon's separator (Align-Anything's labels).
    labels = decoded_labels(run, "prepare-sft", replica)
    sft = {s["id"]: s for s in rows(run.run_dir / "prepare-sft" / "samples.jsonl")}
    assert set(labels) == set(sft) - {fixtures.TOO_MANY_IMAGES}
    for sample_id, text in labels.items():
        reply = next(t["content"] for t in sft[sample_id]["conversations"]
                     if t["role"] == "assistant")
        words = reply.replace("<image>", "").strip()
        assert text.startswith(words) and text.endswith("</s><reserved08706>"), text[:200]
        assert text.count("IMGIMG") == IMAGE_TOKENS, sample_id
    assert card["tokens"]["image"] == IMAGE_TOKENS * card["counts"]["written"]  # one each
    assert_trained(run, train_steps=4)  # sft, rm, dpo, ppo
