"""vicuna's generation config (temperature/top_p without do_sample) no longer fails saving: it is
repaired with one warning on mmjobs' load and export paths, and generation stays greedy."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from mmjobs.config import ModelConfig
from mmjobs.models import builder
from mmjobs.models.convert import (
    GenerationConfigError,
    convert_original_llava,
    repair_generation_config,
    repair_generation_config_file,
    repair_model_generation_config,
)

LOGGER = "mmjobs.models.convert.generation_config"
VICUNA = "lmsys/vicuna-7b-v1.5"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def test_vicuna_replica_saves_through_export_model_dir(replica_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    vicuna = replica_dir(VICUNA)
    model = AutoModelForCausalLM.from_pretrained(vicuna, use_safetensors=False)
    model.generation_config.pad_token_id = 2  # any change makes transformers validate strictly
    with pytest.raises(ValueError, match="GenerationConfig is invalid"):
        model.save_pretrained(tmp_path / "plain")  # the failure LLaVA#1144 reports

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        builder.export_model_dir(model, tmp_path / "exported", source_dir=vicuna)
        builder.export_model_dir(model, tmp_path / "again", source_dir=vicuna)
    [warning] = _warnings(caplog)  # once: the second export finds it repaired
    assert str(vicuna / "generation_config.json") in warning
    assert "temperature 0.9 -> None" in warning and "top_p 0.6 -> None" in warning
    saved = json.loads((tmp_path / "exported" / "generation_config.json").read_text())
    assert "temperature" not in saved and "top_p" not in saved and saved["max_length"] == 4096
    assert (tmp_path / "exported" / "tokenizer.model").is_file()  # source files copied


def test_load_model_repairs_on_load_and_generation_is_unchanged(replica_dir, tmp_path, caplog):
    model_dir = tmp_path / "llava"
    convert_original_llava(replica_dir(VICUNA), replica_dir("openai/clip-vit-large-patch14-336"),
                           model_dir, projector=replica_dir(
                               "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"))
    # As a model directory would arrive with vicuna's file copied in unrepaired:
    shutil.copyfile(replica_dir(VICUNA) / "generation_config.json",
                    model_dir / "generation_config.json")
    spec = ModelConfig(name_or_path=str(model_dir))
    caplog.clear()  # the conversion repaired its own copy (and said so)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = builder.load_model(spec, for_training=False)
        loaded.model.generation_config.pad_token_id = 32001
        builder.export_model_dir(loaded.model, tmp_path / "out", source_dir=model_dir)
    [warning] = _warnings(caplog)
    assert str(model_dir / "generation_config.json") in warning
    assert loaded.model.generation_config.temperature is None

    # Greedy before and after: the ignored flags were all that changed.
    from transformers import GenerationConfig

    ids = torch.tensor([[1, 319, 13563, 1546]])
    original = GenerationConfig.from_pretrained(replica_dir(VICUNA))
    kwargs = {"max_new_tokens": 5, "pad_token_id": 32001}
    with torch.no_grad():
        before = loaded.model.generate(input_ids=ids, generation_config=original, **kwargs)
        after = loaded.model.generate(input_ids=ids, **kwargs)
    assert torch.equal(before, after)


def test_valid_configs_are_left_alone_and_unrepairable_ones_fail(tmp_path, caplog):
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert repair_generation_config(config, "ok.json") == []
    assert not _warnings(caplog) and config.temperature == 0.7
    config.save_pretrained(tmp_path)
    before = (tmp_path / "generation_config.json").read_bytes()
    assert repair_generation_config_file(tmp_path / "generation_config.json") == []
    assert (tmp_path / "generation_config.json").read_bytes() == before

    broken = GenerationConfig()
    broken.max_new_tokens = 0
    with pytest.raises(GenerationConfigError, match=r"bad\.json: .*max_new_tokens"):
        repair_generation_config(broken, "bad.json")


def test_loading_never_fails_on_a_config_the_repair_cannot_fix(caplog):
    from types import SimpleNamespace

    from transformers import GenerationConfig

    broken = GenerationConfig()
    broken.max_new_tokens = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert repair_model_generation_config(SimpleNamespace(generation_config=broken),
                                              "/models/x") == []
    [warning] = _warnings(caplog)
    assert "/models/x/generation_config.json" in warning and "max_new_tokens" in warning
