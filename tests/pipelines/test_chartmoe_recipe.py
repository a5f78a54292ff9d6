"""chartmoe end to end (KFP's local runner) on the InternLM-XComposer2 replica in the hub's
layout (remote-code config, one `.bin`): import -> conversions.base (the native XComposer2,
safetensors + its 490 px processor) -> ChartMoE-Data mixes -> pretokenize -> three align runs
-> MoE build -> LoRA SFT -> merge -> ChartQA direct and PoT -> report, with trust_remote_code
off throughout. One run per module; the tests read what a user would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmjobs import storage
from tests.pipelines import fixtures
from tests.pipelines.replica_runs import ReplicaRun, run_recipe

# Its PoT evaluation runs sandboxed programs as uid 65534: on the worker of the other modules
# that do (tests/unit/eval/test_pot_hostile.py says why).
pytestmark = pytest.mark.xdist_group("pot-sandbox")


@pytest.fixture(scope="module")
def chartmoe_run(tmp_path_factory, replica_dir, mlflow_db_template) -> ReplicaRun:
    model = replica_dir("internlm/internlm-xcomposer2-7b")
    clip = replica_dir("openai/clip-vit-large-patch14-336")
    return run_recipe("chartmoe", tmp_path_factory.mktemp("chartmoe"), mlflow_db_template,
                      lambda data: fixtures.make_chartmoe(data, model, clip))


@pytest.mark.slow
def test_chartmoe_reports_the_seed_s_ap_tables(chartmoe_run: ReplicaRun) -> None:
    outcome = chartmoe_run.outcome
    assert set(outcome.headlines) == {"w/o PoT", "w/ PoT"}
    assert all(value is not None for _, value in outcome.headlines.values())
    assert not any(outcome.stages_cached.values())  # a first run computes everything
    results = storage.read_text(outcome.results)
    assert "## ChartQA relaxed accuracy (@AP)" in results
    # The seed's layout: one table per mode, rows Human / Augmented / Averaged.
    for mode in ("w/o PoT", "w/ PoT"):
        table = results.split(f"**{mode}**", 1)[1].split("**", 1)[0].split("\n## ", 1)[0]
        assert re.search(r"\| @AP\s+\|\s+0\.05 \|\s+0\.1 \|\s+0\.2 \|", table), table
        assert [line.split("|")[1].strip() for line in table.splitlines()
                if line.startswith("| ") and "@AP" not in line] == ["Human", "Augmented",
                                                                     "Averaged"]


@pytest.mark.slow
def test_chartmoe_trains_chartmoe_s_parts_of_the_native_xcomposer2(
        chartmoe_run: ReplicaRun) -> None:
    run = chartmoe_run.run_dir
    merged = json.loads((run / "merge" / "config.json").read_text())
    assert merged["architectures"] == ["XComposer2ForCausalLM"] and "auto_map" not in merged
    moe = merged["mmjobs_connector"]  # the original vision_proj first, then table, json, code
    assert (moe["kind"], moe["expert_names"], moe["top_k"], moe["router_init"]) == (
        "moe", ["original", "table", "json", "code"], 2, "linear")
    adapter = json.loads((run / "sft" / "final" / "adapter" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[1] for name in adapter["target_modules"]} == {
        "wqkv", "wo", "w1", "w2", "w3"}
    assert adapter["modules_to_save"] == ["vision_proj"]  # the MoE connector trains in full
    for target in ("table", "json", "code"):  # align: only vision_proj, saved as a connector
        info = json.loads((run / f"align-{target}" / "final" / "train_info.json").read_text())
        assert info["outputs"] == {"connector": "connector"}
        assert info["base_model"]["trust_remote_code"] is False
    converted = Path(json.loads((run / "align-table" / "final" / "train_info.json").read_text())
                     ["base_model"]["name_or_path"])
    assert json.loads((converted / "config.json").read_text())["img_size"] == 490
