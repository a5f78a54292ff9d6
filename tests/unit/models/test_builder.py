"""Model builder: resolving, loading (safety checks, dtype/attention choice), LLaVA composition
with each connector (save/load round trip), freezing and parameter summaries.

Hub ids are never contacted: every test runs with HF_HUB_OFFLINE=1 and an empty HF_HOME, and
`snapshot_download` is replaced by a stub that fails on any non-local call.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.models import builder, compose, model_dirs
from mmjobs.models.connectors import LinearConnector, MLP2xGeluConnector, MoEConnector
from tests.fixtures_models import build_once


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """No test may reach a model hub: offline mode, an empty hub cache, a tripwire."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    real = huggingface_hub.snapshot_download

    def local_only(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise AssertionError("a test tried to download from the hub")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)


# --------------------------------------------------------------------------- tiny sources


def _build_clip(out: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=56, patch_size=14)
    CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 56},
                          crop_size={"height": 56, "width": 56}).save_pretrained(out)
    return out


def _build_siglip(out: Path) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(2)
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, image_size=32, patch_size=8)
    SiglipVisionModel(cfg).save_pretrained(out)  # no image processor: compose builds one
    return out


def _build_llama(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmjobs.models.tiny import chart_corpus, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(chart_corpus(n=400), vocab_size=400)
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                      max_position_embeddings=512, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return build_once(tmp_path_factory.getbasetemp(), "builder-clip", _build_clip)


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    return build_once(tmp_path_factory.getbasetemp(), "builder-siglip", _build_siglip)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_once(tmp_path_factory.getbasetemp(), "builder-llama", _build_llama)


def _image(size=(60, 48), colour=(20, 160, 90)) -> Image.Image:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


def _batch(processor) -> dict:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "매출은?"}]}],
        add_generation_prompt=True)
    return processor(text=[text, text], images=[_image(), _image((30, 70), (200, 10, 10))],
                     return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- resolving


def test_local_dirs_resolve_in_place_and_missing_paths_say_so(tiny_llava_dir, tmp_path):
    assert builder.resolve_model_dir(str(tiny_llava_dir)) == tiny_llava_dir
    assert builder.resolve_model_dir(f"file://{tiny_llava_dir}") == tiny_llava_dir
    with pytest.raises(builder.ModelNotFoundError, match="no such directory"):
        builder.resolve_model_dir(str(tmp_path / "nope"))


def test_hub_ids_are_refused_offline_without_contacting_the_hub():
    with pytest.raises(builder.ModelNotFoundError,
                       match="not found locally and hub access is disabled"):
        builder.resolve_model_dir("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(builder.ModelNotFoundError, match="hub access is disabled"):
        builder.load_model(ModelConfig(name_or_path="some-org/model@v1"))


def test_fetch_dir_refuses_uncommitted_and_reuses_a_verified_cache(tmp_path, monkeypatch,
                                                                   tiny_llava_dir):
    # The S3 code path on a local "bucket": fetch_dir treats file paths in place, so exercise
    # committed_root / cache validation directly; the real S3 path is in the integration test.
    src = tmp_path / "train-out"
    shutil.copytree(tiny_llava_dir, src / "final" / "model")
    with pytest.raises(storage.IncompleteDirectoryError, match="not a complete"):
        builder.committed_root(str(src / "final" / "model"))
    storage.commit_dir(src)
    root, rel, manifest = builder.committed_root(str(src / "final" / "model"))
    assert (root, rel) == (str(src), "final/model") and manifest.files
    fp = builder.dir_fingerprint(str(src / "final" / "model"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llava_dir, copy)
    assert builder.dir_fingerprint(str(copy)) == fp  # same content, hashed: same fingerprint


def test_cache_record_detects_changed_files(tmp_path):
    d = tmp_path / "cached"
    d.mkdir()
    (d / "a.json").write_text("{}")
    entry = storage.FileEntry("a.json", 2, storage.sha256_file(d / "a.json"))
    model_dirs._write_cache_record(d, "s3://b/m", [entry])
    assert model_dirs._cache_is_valid(d)
    (d / "a.json").write_text("[]")  # same size, new content and mtime: re-hashed
    assert not model_dirs._cache_is_valid(d)


# --------------------------------------------------------------------------- loading


def test_load_model_returns_model_processor_and_info(tiny_llava_dir):
    loaded = builder.load_model(ModelConfig(name_or_path=str(tiny_llava_dir)))
    assert loaded.kind == "llava" and loaded.model_dir == tiny_llava_dir
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert type(loaded.processor).__name__ == "LlavaProcessor"
    assert loaded.model.training
    assert loaded.model.config.get_text_config().use_cache is False
    assert loaded.info["dtype"] == "float32" and loaded.info["attn_implementation"] == "sdpa"
    assert loaded.info["connector"] == "native" and loaded.info["num_parameters"] > 0
    out = loaded.model(**_batch(loaded.processor))
    assert torch.isfinite(out.logits).all()

    frozen = builder.load_model(ModelConfig(name_or_path=str(tiny_llava_dir), dtype="bfloat16",
                                            attn_implementation="eager"), for_training=False)
    assert not frozen.model.training and frozen.model.dtype == torch.bfloat16
    assert frozen.info["attn_implementation"] == "eager"
    assert not any(p.requires_grad for p in frozen.model.parameters())


def test_load_model_chameleon(tiny_chameleon_dir):
    loaded = builder.load_model(ModelConfig(name_or_path=str(tiny_chameleon_dir)),
                                for_training=False)
    assert loaded.kind == "chameleon" and loaded.info["connector"] is None
    summary = builder.trainable_parameter_summary(loaded.model)
    assert summary["vision_tower"]["total"] > 0 and summary["connector"]["total"] == 0


def test_pickle_only_checkpoints_are_refused(tiny_llava_dir, tmp_path):
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_llava_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(builder.ModelLoadError, match="safetensors only"):
        builder.load_model(ModelConfig(name_or_path=str(model_dir)))


def test_custom_code_needs_trust_remote_code(tiny_llava_dir, tmp_path):
    model_dir = tmp_path / "remote"
    shutil.copytree(tiny_llava_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_evil.py").write_text("raise SystemExit('ran remote code')\n")
    with pytest.raises(builder.ModelLoadError, match="trust_remote_code=true"):
        builder.load_model(ModelConfig(name_or_path=str(model_dir)))


def test_dtype_and_attention_selection():
    # flash-attn cannot be installed here, so availability is monkeypatched through arguments.
    class NoSdpa:
        _supports_sdpa = False
        _supports_flash_attn = False

    pick = builder.select_attn_implementation
    assert pick("auto", cuda_available=True, flash_attn_available=True) == "flash_attention_2"
    assert pick("auto", cuda_available=False, flash_attn_available=True) == "sdpa"
    assert pick("auto", cuda_available=True, flash_attn_available=False) == "sdpa"
    assert pick("auto", NoSdpa, cuda_available=True, flash_attn_available=True) == "eager"
    assert pick("eager", cuda_available=True, flash_attn_available=True) == "eager"
    assert builder.select_dtype("auto", "cpu") == torch.float32
    assert builder.select_dtype("bfloat16", "cpu") == torch.bfloat16


def test_auto_choices_follow_monkeypatched_availability(monkeypatch):
    monkeypatch.setattr(builder, "_cuda_available", lambda: True)
    monkeypatch.setattr(builder, "_flash_attn_available", lambda: True)
    assert builder.select_attn_implementation("auto") == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert builder.select_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert builder.select_dtype("auto", "cuda") == torch.float32


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "linear", "moe"])
def test_composed_llava_round_trips_through_save_and_load_model(connector, clip_dir, llama_dir,
                                                                tmp_path):
    options = {"num_experts": 3, "top_k": 2, "aux_loss_coef": 0.01} if connector == "moe" else {}
    out = compose.save_composed_llava(tmp_path / "llava", clip_dir, llama_dir,
                                      connector=connector, connector_options=options, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    expected = {"mlp2x_gelu": None, "linear": "linear", "moe": "moe"}[connector]
    assert (config.get("mmjobs_connector") or {}).get("kind") == expected

    loaded = builder.load_model(ModelConfig(name_or_path=str(out)), for_training=False)
    assert loaded.info["connector"] == (expected or "native")
    kind = {"mlp2x_gelu": "LlavaMultiModalProjector", "linear": "LinearConnector",
            "moe": "MoEConnector"}[connector]
    assert type(builder.connector_module(loaded.model)).__name__ == kind
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"

    fresh = compose.compose_llava(clip_dir, llama_dir, connector=connector,
                                  connector_options=options, seed=0).eval()
    batch = _batch(loaded.processor)
    assert (batch["input_ids"] == loaded.model.config.image_token_id).sum() == 2 * 16
    assert torch.equal(_logits(fresh, batch), _logits(loaded.model, batch))


def test_composition_copies_both_models_weights(clip_dir, llama_dir):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    model = compose.compose_llava(clip_dir, llama_dir, connector="linear", seed=0)
    clip = CLIPVisionModel.from_pretrained(clip_dir)
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    for ours, theirs in ((model.model.vision_tower, clip), (model.model.language_model,
                                                           llama.model),
                         (model.lm_head, llama.lm_head)):
        theirs_sd = theirs.state_dict()
        assert all(torch.equal(v, theirs_sd[k]) for k, v in ours.state_dict().items())
    assert isinstance(builder.connector_module(model), LinearConnector)


def test_siglip_composition_keeps_every_patch(siglip_dir, llama_dir, tmp_path):
    out = compose.save_composed_llava(tmp_path / "siglip-llava", siglip_dir, llama_dir, seed=0)
    loaded = builder.load_model(ModelConfig(name_or_path=str(out)), for_training=False)
    assert loaded.model.config.vision_feature_select_strategy == "full"
    batch = _batch(loaded.processor)
    # SigLIP has no CLS: (32 / 8)^2 = 16 tokens per image, all kept.
    assert (batch["input_ids"][0] == loaded.model.config.image_token_id).sum() == 16
    assert torch.isfinite(_logits(loaded.model, batch)).all()


def test_composition_from_configs_and_bad_arguments(llama_dir):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
    model = compose.compose_llava(vision, text, image_token_id=99,
                                  connector="moe", connector_options={"num_experts": 2})
    assert model.config.mmjobs_connector["num_experts"] == 2
    with pytest.raises(ValueError, match="image_token_id is required"):
        compose.compose_llava(vision, text)
    with pytest.raises(ValueError, match="use mlp2x_gelu, linear or moe"):
        compose.compose_llava(vision, llama_dir, connector="qformer")
    with pytest.raises(ValueError, match="apply only to connector='moe'"):
        compose.compose_llava(vision, llama_dir, connector_options={"top_k": 1})


def test_missing_image_token_is_added_and_embeddings_resized(clip_dir, llama_dir):
    model = compose.compose_llava(clip_dir, llama_dir, image_token="<img>")
    processor = compose.compose_llava_processor(clip_dir, llama_dir, model.config,
                                                image_token="<img>")
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    assert processor.tokenizer.convert_tokens_to_ids("<img>") == model.config.image_token_id


def test_set_connector_checks_dims_and_records_the_spec(clip_dir, llama_dir):
    model = compose.compose_llava(clip_dir, llama_dir, seed=0)
    assert getattr(model.config, "mmjobs_connector", None) is None  # native projector
    with pytest.raises(ValueError, match="needs 64 -> 64"):
        builder.set_connector(model, LinearConnector(32, 64))
    builder.set_connector(model, MLP2xGeluConnector(64, 64))
    assert model.config.mmjobs_connector["kind"] == "mlp2x_gelu"
    with pytest.raises(ValueError, match="version"):
        compose.connector_from_spec({"kind": "qformer", "version": 1})


# --------------------------------------------------------------------------- freezing


def test_freeze_and_summary(clip_dir, llama_dir):
    model = compose.compose_llava(clip_dir, llama_dir, connector="moe",
                                  connector_options={"num_experts": 2})
    summary = builder.freeze(model, vision_tower=True, connector=False, language_model=True)
    moe = builder.connector_module(model)
    assert isinstance(moe, MoEConnector)
    assert summary["connector"] == {"trainable": sum(p.numel() for p in moe.parameters()),
                                    "total": sum(p.numel() for p in moe.parameters())}
    assert summary["vision_tower"]["trainable"] == summary["language_model"]["trainable"] == 0
    assert summary["all"]["total"] == sum(p.numel() for p in model.parameters())
    assert sum(summary[c]["total"] for c in builder.COMPONENTS) == summary["all"]["total"]
    summary = builder.freeze(model, vision_tower=True, connector=False, language_model=False)
    assert summary["language_model"]["trainable"] == summary["language_model"]["total"] > 0
    assert compose.component_of("base_model.model.model.multi_modal_projector."
                                "modules_to_save.default.router.weight") == "connector"
    assert compose.component_of("model.vqmodel.encoder.conv_in.weight") == "vision_tower"
    assert compose.component_of("lm_head.weight") == "language_model"
