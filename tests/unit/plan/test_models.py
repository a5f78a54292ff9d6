"""Real-size models on the meta device from their published configs: parameter counts against
the published numbers, and how names that cannot be planned are told apart."""

from __future__ import annotations

import json

import pytest

from mmjobs.models.builder import trainable_parameter_summary
from mmjobs.plan.models import (
    PlanError,
    ResolveContext,
    ResolvedModel,
    build_meta_model,
    resolve_model,
)


def _meta(name: str):
    found = resolve_model(name)
    assert isinstance(found, ResolvedModel), found
    return build_meta_model(found.config)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def llava():
    return _meta("llava-hf/llava-1.5-7b-hf")


def test_llava_1_5_7b_has_its_published_size(llava):
    # The hub page of llava-hf/llava-1.5-7b-hf: "7.06B params" (safetensors metadata).
    summary = trainable_parameter_summary(llava)
    assert _params(llava) == 7_063_427_072
    assert _params(llava) == pytest.approx(7.06e9, rel=1e-3)
    assert next(p for p in llava.parameters()).device.type == "meta"
    # CLIP ViT-L/14-336's vision tower: ~0.30 B (303.5 M with the unused last layer kept).
    assert summary["vision_tower"]["total"] == 303_507_456
    assert summary["vision_tower"]["total"] == pytest.approx(0.30e9, rel=0.02)
    # mlp2x_gelu: 1024 -> 4096 -> 4096 with biases.
    assert summary["connector"]["total"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096


def test_vicuna_7b_v1_5_has_its_published_size():
    # lmsys/vicuna-7b-v1.5 (Llama-2-7B's shape): 6.74 B.
    vicuna = _meta("lmsys/vicuna-7b-v1.5")
    assert type(vicuna).__name__ == "LlamaForCausalLM"
    assert _params(vicuna) == 6_738_415_616
    assert _params(vicuna) == pytest.approx(6.74e9, rel=1e-3)


def test_original_llava_converts_to_llava_hf_shapes(llava):
    # liuhaotian/llava-v1.5-7b (llava_llama layout) as mmjobs' converter maps it: <image> and
    # <pad> added, vocabulary padded to 32064 -- llava-hf's model, tensor for tensor.
    original = _meta("liuhaotian/llava-v1.5-7b")
    assert {n: tuple(p.shape) for n, p in original.named_parameters()} == \
        {n: tuple(p.shape) for n, p in llava.named_parameters()}


@pytest.mark.parametrize("name", ["facebook/chameleon-7b", "PKU-Alignment/AA-chameleon-7b-base"])
def test_chameleon_7b_has_its_published_size(name):
    # facebook/chameleon-7b's hub page: 7.04B params (the VQ encoder included).
    chameleon = _meta(name)
    assert type(chameleon).__name__ == "ChameleonForConditionalGeneration"
    assert _params(chameleon) == 7_043_090_432
    assert _params(chameleon) == pytest.approx(7.0e9, rel=0.01)


@pytest.mark.parametrize("name", ["Coobiw/InternLM-XComposer2_Enhanced",
                                  "internlm/internlm-xcomposer2-7b"])
def test_xcomposer2_7b_is_internlm2_7b_with_partial_lora_plus_clip_l_at_490(name):
    """By hand: InternLM2-7B is 7,737,708,544 (2 x 92544 x 4096 embeddings/output, per layer
    wqkv 4096 x 6144 + wo 4096^2 + w1/w2/w3 3 x 4096 x 14336 + two norms, 32 layers, final
    norm); Partial-LoRA r 256 adds 256 x (in + out) per linear: 18,874,368 per layer. The ViT is
    CLIP ViT-L/14-336's 303,507,456 with 35x35+1 positions instead of 24x24+1 (649 x 1024
    more); vision_proj is 1024 -> 4096 -> 4096 with biases."""
    model = _meta(name)
    assert type(model).__name__ == "XComposer2ForCausalLM"
    assert model.config.image_tokens == 1225
    parts = trainable_parameter_summary(model)
    assert parts["language_model"]["total"] == 7_737_708_544 + 32 * 18_874_368
    assert parts["vision_tower"]["total"] == 303_507_456 + 649 * 1024
    assert parts["connector"]["total"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert _params(model) == pytest.approx(8.67e9, rel=1e-3)


def test_a_directory_config_is_read_and_custom_code_never_runs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "internlmxcomposer2", "auto_map": {"AutoModel": "x.Model"}}))
    (tmp_path / "modeling.py").write_text("raise SystemExit('must never be imported')\n")
    found = resolve_model(str(tmp_path))  # mmjobs' own XComposer2, not the auto_map's code
    assert isinstance(found, ResolvedModel)
    assert type(found.config).__module__ == "mmjobs.models.xcomposer2.configuration"
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "my_vlm", "auto_map": {"AutoModel": "modeling.Model"}}))
    with pytest.raises(PlanError, match=r"my_vlm.*auto_map.*never runs"):
        resolve_model(str(tmp_path))


def test_a_meta_llama_checkpoint_directory_says_to_convert_it(replica_dir):
    with pytest.raises(PlanError, match=r"Meta's original LLaMA layout.*mmjobs stage convert"):
        resolve_model(str(replica_dir("meta/llama-7b") / "7B"))


def test_lavin_7b_has_lavin_s_trainable_parameter_count():
    """LaVIN reports ~3.8M trainable parameters for 7B: per LLaMA block 81,930 (conv_A
    4096*8+8, conv_B / conv_D 4096*4+4096 each, router 4096*2+2) x 32, per CLIP block 20,490
    x 24, adapter_proj 659,584, modality embedding 8,192 = 3,781,296."""
    lavin = _meta("luogen1996/LaVIN")
    assert type(lavin).__name__ == "LavinForConditionalGeneration"
    assert lavin.train_adapters_only() == 3_781_296 == 81_930 * 32 + 20_490 * 24 + 659_584 + 8_192
    assert _params(lavin) == pytest.approx(7.0e9, rel=0.05)  # LLaMA-7B + CLIP-L vision tower


def test_unknown_hub_id_says_to_import_it_first(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(PlanError, match=r"no config for acme/vlm-7b.*mmjobs import acme/vlm-7b"):
        resolve_model("acme/vlm-7b")


def test_unreadable_store_uri_names_the_recipe_setting(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PlanError, match=r"s3://bucket/model.*plan\.config_from"):
        resolve_model("s3://bucket/model")


def test_a_store_uri_filled_by_the_recipes_imports_resolves_to_its_source():
    context = ResolveContext(imports={"s3://m/llava": "llava-hf/llava-1.5-7b-hf"})
    found = resolve_model("s3://m/llava/", context)
    assert isinstance(found, ResolvedModel)
    assert "imports: llava-hf/llava-1.5-7b-hf" in found.origin


def test_tiny_models_take_the_make_model_steps_sizes():
    found = resolve_model("tiny:llava", ResolveContext(make_model={"image_size": 112}))
    assert isinstance(found, ResolvedModel)
    assert found.config.vision_config.image_size == 112
    replica = resolve_model("tiny:llava", ResolveContext(
        make_model={"replica": "llava-hf/llava-1.5-7b-hf"}))
    assert replica.config.text_config.vocab_size == 32064  # the real model, not the replica
