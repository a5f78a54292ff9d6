"""Every recipe runs end to end locally (KFP's local runner), scaled down onto a tiny model
and generated fixtures in each recipe's published layout; failures name the step."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mmjobs import pipeline_runner, storage
from tests.pipelines import fixtures

RUNS: dict[str, Callable[[Path, Path], list[str]]] = {
    "chartwiz": fixtures.make_chartwiz,
    "llava-dataengine": fixtures.make_llava_dataengine,
    "lavin-sweep": fixtures.make_lavin_sweep,
}
# Which evaluations each run reports (results.md rows), and the table it draws.
EXPECTED = {
    "chartwiz": ({"chartwiz"}, "## Headline per evaluation"),
    "chartmoe": ({"w/o PoT", "w/ PoT"}, "## ChartQA relaxed accuracy (@AP)"),
    "llava-dataengine": ({"mme", "gqa", "scienceqa"}, "## Main results"),
    "lavin-sweep": ({"baseline", "dec-dropout"}, "## ScienceQA accuracy (%)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_recipe_runs_scaled_down(recipe: str, tmp_path: Path, tiny_llava_dir: Path) -> None:
    overrides = RUNS[recipe](tmp_path / "data", tiny_llava_dir)
    imported = tmp_path / "store-copy" / "base-model"
    if recipe == "chartwiz":  # starts from a recipe import, as a cluster run from the hub would
        overrides += [f"imports={{base: {{source: '{tiny_llava_dir}', to: '{imported}'}}}}",
                      f"model.name_or_path={imported}"]
    outcome = pipeline_runner.run_local(f"pipelines/recipes/{recipe}.yaml", overrides)
    if recipe == "chartwiz":
        assert storage.is_committed(str(imported))
        assert any(name.startswith("import ") for name in outcome.stages_cached)
    labels, table = EXPECTED[recipe]
    assert set(outcome.headlines) == labels
    assert all(value is not None for _, value in outcome.headlines.values())
    results = storage.read_text(outcome.results)
    assert table in results
    assert outcome.mlflow_run_id and outcome.stages_cached
    assert not any(outcome.stages_cached.values())  # a first run computes everything
    if outcome.report:  # the report stage (once it exists) wrote its page
        assert storage.exists(outcome.report)


@pytest.mark.slow
def test_chartmoe_runs_on_the_xcomposer2_replica(tmp_path: Path, replica_dir) -> None:
    """The hub-layout InternLM-XComposer2 replica (remote-code config, one `.bin`) through
    import -> convert -> pretokenize -> three align runs -> MoE build -> LoRA SFT -> merge ->
    ChartQA direct and PoT -> report, with trust_remote_code off throughout."""
    overrides = fixtures.make_chartmoe(tmp_path / "data",
                                       replica_dir("internlm/internlm-xcomposer2-7b"),
                                       replica_dir("openai/clip-vit-large-patch14-336"))
    outcome = pipeline_runner.run_local("pipelines/recipes/chartmoe.yaml", overrides)
    assert set(outcome.headlines) == {"w/o PoT", "w/ PoT"}
    assert all(value is not None for _, value in outcome.headlines.values())
    results = storage.read_text(outcome.results)
    # The seed's @AP layout: one table per mode, rows Human / Augmented / Averaged.
    for mode in ("w/o PoT", "w/ PoT"):
        table = results.split(f"**{mode}**", 1)[1].split("**", 1)[0].split("\n## ", 1)[0]
        assert re.search(r"\| @AP\s+\|\s+0\.05 \|\s+0\.1 \|\s+0\.2 \|", table), table
        assert [line.split("|")[1].strip() for line in table.splitlines()
                if line.startswith("| ") and "@AP" not in line] == ["Human", "Augmented",
                                                                     "Averaged"]
    assert not any(outcome.stages_cached.values())
    run = Path(outcome.results).parent
    merged = json.loads((run / "merge" / "config.json").read_text())
    assert merged["architectures"] == ["XComposer2ForCausalLM"] and "auto_map" not in merged
    moe = merged["mmjobs_connector"]  # the original vision_proj first, then table, json, code
    assert (moe["kind"], moe["expert_names"], moe["top_k"]) == (
        "moe", ["original", "table", "json", "code"], 2)
    adapter = json.loads((run / "sft" / "final" / "adapter" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[1] for name in adapter["target_modules"]} == {
        "wqkv", "wo", "w1", "w2", "w3"}
    assert adapter["modules_to_save"] == ["vision_proj"]  # the MoE connector trains in full
    info = json.loads((run / "align-table" / "final" / "train_info.json").read_text())
    assert info["outputs"] == {"connector": "connector"}
    assert info["base_model"]["trust_remote_code"] is False
