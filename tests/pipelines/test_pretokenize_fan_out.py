"""Pretokenize fanned out over pods (`fan_out: N`): N part tasks in a `dsl.ParallelFor` write
disjoint shards into the step's content-addressed cache entry, then the step's own task
commits it. Run here through KFP's local runner; the committed entry must equal, byte for
byte, the one a single pod writes."""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest

import pipelines
from mmjobs import pipeline_runner, settings, storage
from mmjobs.config import ConfigError
from mmjobs.stages.pretokenize import PretokenizeConfig, main
from tests.integration.data.test_prepare_stage import make_raw, row

pytestmark = pytest.mark.integration

SECTION = {"fan_out": 2, "shard_size": 2, "max_length": 256}


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def undated(manifest: Path) -> dict:
    """A manifest without its `created` time."""
    data = json.loads(manifest.read_text(encoding="utf-8"))
    assert data.pop("created")
    return data


def one_pretokenize_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           model: Path) -> Path:
    """prepare -> pretokenize (fanned out) over 7 rows, one of them a reject (too long), in
    shards of 2: 4 shards, parts 0 (shards 0, 2) and 1 (shards 1, 3)."""
    rows = [row(i, f"charts/c{i % 5}.png") for i in range(7)]
    rows[3]["conversations"][1]["content"] = "Long answer. " * 300  # too_long at 256 tokens
    raw = make_raw(tmp_path / "raw", rows)
    module = types.ModuleType("one_pretokenize")
    module.NAME = "one-pretokenize"
    module.wire = lambda b: b.step("pretokenize", "pretokenize",
                                   dataset=b.step("prepare", "prepare").output,
                                   model=b.base_model())
    monkeypatch.setitem(pipelines.PIPELINES, module.NAME, module)
    recipe = tmp_path / "one-pretokenize.yaml"
    recipe.write_text("recipe: one-pretokenize\npipeline: one-pretokenize\n"
                      f"model: {{name_or_path: '{model}'}}\n"
                      f"data: {{source_format: canonical, input: '{raw}'}}\n"
                      f"stages: {{pretokenize: {json.dumps(SECTION)}}}\n", encoding="utf-8")
    return recipe


def test_fanned_out_entry_equals_the_single_pod_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llava_dir: Path) -> None:
    recipe = one_pretokenize_recipe(tmp_path, monkeypatch, tiny_llava_dir)

    outcome = pipeline_runner.run_local(recipe, run_id="fan")

    # Both parts ran, each its own shards, and the step's task committed what they wrote.
    steps_log = storage.read_text(outcome.log)
    assert "pretokenize part 0/2: 2 shards (0 reused), 4 rows in" in steps_log
    assert "pretokenize part 1/2: 2 shards (0 reused), 3 rows in" in steps_log
    assert "resuming; 4 shards already done" in steps_log
    cache = Path(settings.store_root()) / "cache" / "pretokenized"
    (fanned,) = [p for p in cache.iterdir() if p.is_dir()]
    assert storage.is_committed(str(fanned))
    card = json.loads((fanned / "card.json").read_text(encoding="utf-8"))
    assert card["counts"] == {"input": 7, "written": 6, "rejected": 1}
    assert len(card["shards"]) == 4
    # One typed Dataset in KFP's lineage, from the committing task, at the committed entry:
    # the parts (which ran before the commit) expose none.
    written = [json.loads(f.read_text(encoding="utf-8"))
               for f in settings.kfp_root().rglob("executor_output.json")]
    typed = [a for out in written
             for a in out.get("artifacts", {}).get("shards", {}).get("artifacts", [])]
    assert [a["uri"] for a in typed] == [str(fanned)]

    # The same step in one pod, into another cache root: the same entry, byte for byte.
    single_root = tmp_path / "single"
    single = main(PretokenizeConfig(dataset=storage.join(outcome.run_dir, "prepare"),
                                    model=str(tiny_llava_dir), cache_root=str(single_root),
                                    **{**SECTION, "fan_out": 1}))
    assert Path(single.output).name == fanned.name  # same fingerprint
    assert single.shards_reused == 0
    files, manifest = digests(fanned), storage.MANIFEST_NAME
    assert len(files) == 4 + 4 + 4  # shards, markers, card/rejects/README/manifest
    # Every file byte for byte, the manifest too but for when it was written (two single-pod
    # runs differ there as well).
    assert {k: v for k, v in digests(Path(single.output)).items() if k != manifest} == {
        k: v for k, v in files.items() if k != manifest}
    assert undated(Path(single.output) / manifest) == undated(fanned / manifest)


def test_part_must_be_below_fan_out() -> None:
    with pytest.raises(ValueError, match="part: 2 is not below fan_out"):
        PretokenizeConfig(dataset="d", model="m", fan_out=2, part=2)


def test_compiled_fan_out_runs_parts_in_a_parallel_for_before_the_committing_task(
        tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "p.yaml"
    pipeline_runner.compile_recipe("pipelines/recipes/chart-demo.yaml", out,
                                   ["stages.pretokenize.fan_out=3"])
    spec = next(yaml.safe_load_all(out.read_text(encoding="utf-8")))
    tasks = spec["root"]["dag"]["tasks"]
    (loop,) = [t for t in tasks.values() if "parameterIterator" in t]
    parts = [json.loads(item) for item in yaml.safe_load(
        loop["parameterIterator"]["items"]["raw"])]
    assert [(p["part"], p["fan_out"]) for p in parts] == [(0, 3), (1, 3), (2, 3)]
    committing = next(t for t in tasks.values() if t["taskInfo"]["name"] == "pretokenize")
    assert loop["taskInfo"]["name"] in committing["dependentTasks"]
    config = json.loads(committing["inputs"]["parameters"]["config_json"]["runtimeValue"]
                        ["constant"])
    assert (config["fan_out"], config.get("part"), config["force"]) == (3, None, False)
    # Only the committing task exposes the typed Dataset (the committed entry); the parts
    # declare no output artifact, since the entry is incomplete until that task commits it.
    components = spec["components"]
    part_task = loop["componentRef"]["name"]
    part_spec = components[part_task]["dag"]["tasks"]
    (part_ref,) = [t["componentRef"]["name"] for t in part_spec.values()]
    assert "artifacts" not in components[part_ref].get("outputDefinitions", {})
    committing_outputs = components[committing["componentRef"]["name"]]["outputDefinitions"]
    assert committing_outputs["artifacts"]["shards"]["artifactType"]["schemaTitle"] == \
        "system.Dataset"
    # The part tasks are CPU pods like the step itself (no accelerator).
    executors = spec["deploymentSpec"]["executors"]
    assert not any("accelerator" in e["container"].get("resources", {})
                   for name, e in executors.items() if "pretokenize" in name)


def test_a_recipe_cannot_set_the_part() -> None:
    with pytest.raises(ConfigError, match=r"stages\.pretokenize\.part: set by the pipeline"):
        pipeline_runner.compile_recipe("pipelines/recipes/chart-demo.yaml", "/dev/null",
                                       ["stages.pretokenize.fan_out=2",
                                        "stages.pretokenize.part=1"])
