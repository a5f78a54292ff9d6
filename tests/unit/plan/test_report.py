"""`mmjobs plan` on every shipped recipe, offline, and its failures as messages."""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import pytest

from mmjobs import cli
from mmjobs.plan.steps import training_steps
from mmjobs.recipe import load_recipe

RECIPES = sorted(Path(__file__).parents[3].joinpath("pipelines", "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def offline():
    """No network (every connection attempt is refused and recorded) and no S3 credentials
    (nor the EC2 metadata service boto would ask for them)."""
    patch = pytest.MonkeyPatch()
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise ConnectionRefusedError("no network in this test")

    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "MMJOBS_STORE"):
        patch.delenv(var, raising=False)
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    patch.setenv("HF_HUB_OFFLINE", "1")
    yield attempts
    patch.undo()


def _plan(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["plan", *args])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def every_recipe(offline) -> tuple[int, str, str]:
    result = _plan(*map(str, RECIPES))
    assert offline == [], "mmjobs plan of the shipped recipes tried the network"
    return result


def _rows(output: str, recipe: str) -> dict[str, list[str]]:
    """The table rows of `recipe`'s block: step -> cells (split on runs of 2+ spaces)."""
    import re

    block = output.split(f"\n{recipe} (")[1] if not output.startswith(recipe) else \
        output.split(f"{recipe} (", 1)[1]
    block = block.split("\n\n")[0]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("----"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.startswith("   "):
            break
        cells = re.split(r"\s{2,}", line.strip())
        if ":" in cells[0]:
            break
        rows[cells[0]] = cells
    return rows


def test_plan_prints_a_table_for_every_shipped_recipe(every_recipe):
    status, out, err = every_recipe
    assert status == 0, err
    assert len(RECIPES) == 6
    for path in RECIPES:
        recipe = load_recipe(path)
        steps = [s.name for s in training_steps(recipe, str(path)).train]
        assert steps, path
        rows = _rows(out, recipe.recipe)
        assert list(rows) == steps, (recipe.recipe, rows)


def test_llava_dataengine_is_llava_1_5_7b_lora_r128_on_8_a100_80gb(every_recipe):
    _, out, _ = every_recipe
    row = _rows(out, "llava-dataengine")["sft"]
    assert row[1:8] == ["sft", "LoRA r128 + connector", "7.06B", "340.80M", "zero3",
                        "8 x 80G", "16 x 2048 (576 img)"]
    assert row[11] == "yes"
    assert "plan.config_from = liuhaotian/llava-v1.5-7b" in out


def test_chameleon_steps_are_all_planned_with_their_zero_stages(every_recipe):
    _, out, _ = every_recipe
    rows = _rows(out, "chameleon-interleaved")
    assert {step: row[5] for step, row in rows.items()} == {
        "sft": "zero3", "rm": "zero3", "dpo": "zero2", "ppo": "zero3"}
    assert rows["ppo"][7].startswith("2 x 5632")  # 4096-token prompts + 1536 new tokens
    assert all(row[11] == "yes" for row in rows.values())


def test_chartmoe_plans_the_real_xcomposer2_on_its_four_gpus(every_recipe):
    _, out, _ = every_recipe
    chartmoe = _rows(out, "chartmoe")
    assert list(chartmoe) == ["align-table", "align-json", "align-code", "sft"]
    assert {row[2] for row in chartmoe.values()} == {"connector", "LoRA r64 + connector"}
    assert all(row[3] == "8.67B" and row[6] == "4 x 80G" and row[11] == "yes"
               for row in chartmoe.values())
    assert chartmoe["align-table"][7] == "4 x 4096 (1225 img), accum 16"
    assert "published config.json of internlm/internlm-xcomposer2-7b" in out


def test_the_gpu_memory_assumption_is_said(every_recipe):
    _, out, _ = every_recipe
    assert "GPU memory: 40 GiB (cluster.gpu_memory_gib)" in out  # chartwiz
    assert "nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB" in out  # llava-dataengine
    assert "80 GiB (assumed: no cluster.gpu_memory_gib" in out  # chart-demo


def test_a_step_that_does_not_fit_exits_1(offline):
    chartwiz = next(p for p in RECIPES if p.name == "chartwiz.yaml")
    status, out, _ = _plan(str(chartwiz), "--set", "cluster.gpu_memory_gib=16")
    assert status == 1
    assert " NO " in out


def test_a_missing_lora_target_fails_naming_step_and_module(offline):
    recipe = next(p for p in RECIPES if p.name == "chart-demo.yaml")
    status, _, err = _plan(str(recipe), "--set",
                           "stages.sft.train.lora.target_modules=[q_proj, wqkv]")
    assert status == 2
    assert "step sft: train.lora.target_modules: 'wqkv' is not a module" in err
    assert "Traceback" not in err


def test_a_base_model_plan_cannot_read_is_refused_with_the_fix(offline):
    recipe = next(p for p in RECIPES if p.name == "llava-dataengine.yaml")
    status, _, err = _plan(str(recipe), "--set", "plan.config_from=null")
    assert status == 2
    assert "cannot plan: no config for s3://mmjobs-models/llava-v1.5-7b-pretrain" in err
    assert "plan.config_from" in err


def test_an_invalid_recipe_is_reported_like_validate(offline):
    status, _, err = _plan(str(RECIPES[0]), "--set", "cluster.gpu_memory_gib=lots")
    assert status == 2
    assert "cluster.gpu_memory_gib" in err


def test_lavin_sweep_plans_eight_rows_with_lavin_s_trainable_count(every_recipe):
    """LaVIN reports about 3.8M trainable parameters for 7B; mmjobs' LaVIN has 3,781,296."""
    _, out, _ = every_recipe
    lavin = _rows(out, "lavin-sweep")
    assert list(lavin) == ["sft-baseline", "sft-cyclical-lr", "sft-step-decay", "sft-exp-decay",
                           "sft-inc-dropout", "sft-dec-dropout", "sft-inc-dropout-v2",
                           "sft-dec-dropout-v2"]
    assert all("LaVIN MMA adapters" in row[2] for row in lavin.values())
    assert "3,781,296" in out or "3.78M" in out
