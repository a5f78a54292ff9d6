"""The `convert` stage: pickled replicas in, committed safetensors models out; `load_model`
takes a `.bin` checkpoint only through it; a hostile pickle fails the stage and commits nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.models import builder
from mmjobs.stages import convert as stage
from tests.unit.models.convert.test_checkpoints import _WritesMarker

CLIP = "openai/clip-vit-large-patch14-336"


def test_vicuna_pickles_become_committed_safetensors_with_the_same_names(replica_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    vicuna = replica_dir("lmsys/vicuna-7b-v1.5")
    out = tmp_path / "store" / "vicuna"
    cfg = stage.ConvertConfig(source=str(vicuna), to=str(out), max_shard_size="3MB")
    result = stage.main(cfg)
    assert (result.kind, result.cached) == ("safetensors", False)
    manifest = storage.read_manifest(out)  # committed
    assert manifest.meta["conversion"]["generation_config_repairs"] == [
        "temperature 0.9 -> None", "top_p 0.6 -> None"]
    original = json.loads((vicuna / "pytorch_model.bin.index.json").read_text())["weight_map"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(original) and len(set(index.values())) > 1
    with safe_open(str(out / index["lm_head.weight"]), framework="pt") as f:
        lm_head = f.get_tensor("lm_head.weight")
    assert torch.equal(lm_head, torch.load(vicuna / original["lm_head.weight"],
                                           weights_only=True)["lm_head.weight"])
    assert (out / "tokenizer.model").read_bytes() == (vicuna / "tokenizer.model").read_bytes()
    assert not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.generation_config.temperature is None
    assert stage.main(cfg).cached  # same inputs: reused


def test_load_model_takes_original_llava_only_through_the_converter(replica_dir, tmp_path):
    llava = replica_dir("liuhaotian/llava-v1.5-7b")
    with pytest.raises(builder.ModelLoadError, match=r"safetensors only.*mmjobs stage convert"):
        builder.load_model(ModelConfig(name_or_path=str(llava)))
    with pytest.raises(ValueError, match="needs vision_tower"):
        stage.main(stage.ConvertConfig(source=str(llava), to=str(tmp_path / "no-clip")))
    assert not storage.is_committed(str(tmp_path / "no-clip"))

    out = tmp_path / "llava"
    result = stage.main(stage.ConvertConfig(source=str(llava), vision_tower=str(
        replica_dir(CLIP)), to=str(out)))
    assert result.kind == "llava"
    loaded = builder.load_model(ModelConfig(name_or_path=str(out)), for_training=False)
    assert (loaded.kind, type(loaded.model).__name__) == ("llava", "LlavaForConditionalGeneration")
    assert loaded.processor.tokenizer.convert_tokens_to_ids("<image>") == 32000


def test_a_hostile_pickle_fails_the_stage_in_one_line_and_commits_nothing(
        replica_dir, tmp_path, capsys):
    source = tmp_path / "hostile"
    shutil.copytree(replica_dir("lmsys/vicuna-7b-v1.5"), source)
    marker = tmp_path / "MARKER"
    shard = source / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "x": _WritesMarker(marker)}, shard)
    out = tmp_path / "out"
    code = stage.cli(["--set", f"source={source}", "--set", f"to={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"convert: {shard}: refused: loading it would run code")
    assert not marker.exists() and not storage.is_committed(str(out))


def test_a_missing_source_is_one_line(tmp_path, capsys):
    code = stage.cli(["--set", f"source={tmp_path / 'nowhere'}", "--set", f"to={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "nowhere" in err[0] and "not found" in err[0]


@pytest.mark.integration
def test_conversion_commits_to_s3(s3_bucket, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    source = tmp_path / "llama"
    source.mkdir()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
    config.save_pretrained(source)
    torch.save(LlamaForCausalLM(config).state_dict(), source / "pytorch_model.bin")
    to = f"s3://{s3_bucket}/models/llama"
    result = stage.main(stage.ConvertConfig(source=str(source), to=to))
    assert result.output == to and storage.is_committed(to)
    names = {f.path for f in storage.read_manifest(to).files}
    assert names == {"config.json", "model.safetensors"}
    local = builder.fetch_dir(to)  # verified download
    assert (local / "model.safetensors").is_file()
