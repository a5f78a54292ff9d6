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
STEPS = {"import-base", "import-baseline", "prepare-sft", "prepare-preference",
         "prepare-prompts", "prepare-test", "pretokenize-sft", "pretokenize-preference",
         "pretokenize-prompts", "sft", "rm", "dpo", "ppo", "infer-sft", "infer-dpo", "infer-ppo",
         "infer-baseline", "evaluate-sft", "evaluate-dpo", "evaluate-ppo", "report"}
BASE_SHA = "89ed0bdbcba394cd25911bba6e69e6297d8b007c"  # FACTS.md: the config.json read there


def test_recipe_validates_with_align_anythings_settings() -> None:
    recipe = pipeline_runner.load(RECIPE)
    assert RECIPE.read_text().splitlines()[0].startswith(f"# Run: mmjobs submit {RECIPE}")
    assert recipe.pipeline == recipe.recipe == "chameleon-interleaved"
    # Public inputs pinned: the base at the commit whose config FACTS.md read; the model
    # trains from the imported copy.
    base = recipe.imports["base"]
    assert (base["source"], base["revision"]) == ("hf://PKU-Alignment/AA-chameleon-7b-base",
                                                  BASE_SHA)
    assert recipe.model.name_or_path == base["to"]
    assert recipe.stages["infer-baseline"]["model"] == recipe.imports["baseline"]["to"]
    assert "revision: UNKNOWN" in RECIPE.read_text()  # Anole's commit: said, not invented
    assert (recipe.train.finetune, recipe.train.deepspeed) == ("full", "zero3")
    assert tuple(recipe.train.adam_betas) == (0.9, 0.95)  # every t-i-to-t-i config
    # DPO's frozen reference needs ZeRO-2; PPO runs ZeRO-3 as ppo.yaml (actor and critic
    # sharded, reference and reward model whole).
    assert recipe.stages["dpo"]["train"]["deepspeed"] == "zero2"
    assert "deepspeed" not in recipe.stages["ppo"]["train"]
    assert recipe.stages["rm"]["train"]["preference"] == {"rm_regularization": 0.001}
    rl = recipe.stages["ppo"]["train"]["rl"]
    assert (rl["critic"], rl["critic_lr"], rl["critic_lr_schedule"]) == (
        "reward_model", 5e-6, "constant")
    judge = recipe.stages["evaluate"]["judge"]
    assert (judge["mode"], judge["swap"]) == ("interleaved-compare", False)
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
    # ppo waits for the reward model it reads (reward and critic).
    ppo = next(t for t in tasks.values() if t["taskInfo"]["name"] == "ppo")
    rm_task = next(k for k, t in tasks.items() if t["taskInfo"]["name"] == "rm")
    assert rm_task in ppo["dependentTasks"]
    # Align-Anything's topology: rm, dpo and ppo's actor start from the base model, not sft.
    named = {t["taskInfo"]["name"]: t for t in tasks.values()}
    for step in ("sft", "rm", "dpo", "ppo"):
        model = named[step]["inputs"]["parameters"]["model"]
        assert model == {"componentInputParameter": "base_model"}, (step, model)
    # ... the pipeline parameter whose default is the recipe's base (the KFP UI's run form).
    assert spec["root"]["inputDefinitions"]["parameters"]["base_model"]["defaultValue"] == \
        "s3://mmjobs/models/AA-chameleon-7b-base"
    # Every trained model is judged against the baseline's answers.
    baseline = next(k for k, t in tasks.items() if t["taskInfo"]["name"] == "infer-baseline")
    assert named["infer-baseline"]["inputs"]["parameters"]["model"] == {
        "runtimeValue": {"constant": "s3://mmjobs/models/Anole-7b-v0.1-hf"}}
    for step in ("evaluate-sft", "evaluate-dpo", "evaluate-ppo"):
        assert baseline in named[step]["dependentTasks"]
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
    assert_steps_committed(run, STEPS - {"import-base", "import-baseline", "pretokenize-sft",
                                         "pretokenize-preference", "pretokenize-prompts",
                                         "report"},
                           stage_count=len(STEPS))
    assert set(outcome.headlines) == {"sft", "dpo", "ppo"}
    assert all(name == "judge.win_rate_a_excluding_ties"
               for name, _ in outcome.headlines.values()), outcome.headlines
    for name in ("sft", "dpo", "ppo", "baseline"):
        predictions = rows(run.run_dir / f"infer-{name}" / "predictions.jsonl")
        assert len(predictions) == 2
        assert all("parts" in r and "output_images" in r for r in predictions)
        for row in predictions:  # whatever the replica drew is a committed PNG
            for rel in row["output_images"]:
                assert (run.run_dir / f"infer-{name}" / rel).read_bytes().startswith(b"\x89PNG")
    # The seed's table: each trained model's win / lose / equal against the baseline's
    # answers, and the win rate not counting equal.
    results = storage.read_text(outcome.results)
    table = results.split("## Judged against the baseline: win / lose / equal")[1]
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["model", "win", "lose", "equal", "win rate (not counting equal)"]
    assert [c[0] for c in cells[2:5]] == ["sft", "dpo", "ppo"]
    for name, *counts in cells[2:5]:
        judge = evaluation(run, f"evaluate-{name}")["judge"]
        assert judge["mode"] == "interleaved-compare" and judge["judged"] == 2
        assert counts[:3] == [str(judge[k]) for k in ("wins_a", "wins_b", "ties")]
        assert sum(map(int, counts[:3])) == 2
        rate = judge["win_rate_a_excluding_ties"]
        assert counts[3] == ("-" if rate is None else f"{100 * rate:.1f}%")
    assert "## Headline per evaluation" in results
    # Judged answers went over the wire as gpt4_eval's interleaved comparison, the prompt's
    # image attached (identical comparisons are judged once: replies are cached by request).
    assert 2 <= len(seen) <= 6
    for request in seen:
        parts = request.body["messages"][-1]["content"]
        assert any(p.get("type") == "image_url" for p in parts)
        assert "<output-2>:" in "".join(p.get("text", "") for p in parts)
    # PPO trained Align-Anything's critic, a model of its own, exported as a reward model.
    ppo_final = run.run_dir / "ppo" / "final"
    assert (ppo_final / "critic" / "reward_model" / "reward_model.json").is_file()
    assert not (ppo_final / "value_head.safetensors").exists()
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
