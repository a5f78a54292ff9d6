"""Each replica against its published files: config keys and values, templates, token ids,
weight names and shard files, image geometry; and each loads with the Auto classes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmjobs.models.convert import load_tensors
from mmjobs.models.replicas import PUBLISHED_ROOT, REPLICAS

TEXT_SHRUNK = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads"}
VISION_SHRUNK = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def published(folder: str, name: str) -> Any:
    return json.loads((PUBLISHED_ROOT / folder / name).read_text())


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def assert_kept(replica: dict, real: dict, shrunk: set[str], where: str) -> None:
    """Every published key keeps its value unless it is one of `shrunk`; nothing else added."""
    for key, value in real.items():
        if key not in shrunk:
            assert replica.get(key, "<missing>") == value, f"{where}.{key}"
    assert set(replica) - set(real) <= shrunk, f"{where}: keys added {set(replica) - set(real)}"


def kept_names(weight_map: dict[str, str], layers: int = 2) -> set[str]:
    """The published tensor names of the layers a replica keeps (the first `layers`)."""
    return {n for n in weight_map
            if not (m := _LAYER.search(n)) or int(m.group(1)) < layers}


def bin_names(model_dir: Path) -> dict[str, str]:
    index = read(model_dir / "pytorch_model.bin.index.json")["weight_map"]
    for file in set(index.values()):  # the index tells the truth about every shard
        assert {k for k, v in index.items() if v == file} == set(load_tensors(model_dir / file))
    return index


def safetensors_names(model_dir: Path) -> dict[str, str]:
    from safetensors import safe_open

    index = read(model_dir / "model.safetensors.index.json")["weight_map"]
    for file in set(index.values()):
        with safe_open(str(model_dir / file), framework="pt") as f:
            assert {k for k, v in index.items() if v == file} == set(f.keys())
    return index


def test_every_listed_model_has_a_replica():
    assert set(REPLICAS) == {
        "llava-hf/llava-1.5-7b-hf", "lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336",
        "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5", "liuhaotian/llava-v1.5-7b",
        "facebook/chameleon-7b", "PKU-Alignment/AA-chameleon-7b-base",
        "internlm/internlm-xcomposer2-7b", "meta/llama-7b", "openai/clip-vit-large-patch14",
        "maywell/Synatra-7B-v0.3-dpo", "ybelkada/pix2struct-base"}


def test_published_files_are_copied_byte_for_byte(replica_dir):
    for name in REPLICAS:
        model_dir = replica_dir(name)
        record = read(model_dir / "replica.json")
        folder = name.replace("/", "--")
        for file in record["published_files"]:
            source = PUBLISHED_ROOT / ("facebook--chameleon-7b" if "chameleon" in name
                                       else folder) / file
            assert (model_dir / file).read_bytes() == source.read_bytes(), f"{name}: {file}"
        listed = set(record["published_files"]) | set(record["generated_files"])
        on_disk = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                   if p.is_file()}
        assert listed | {"replica.json"} == on_disk, name


# --------------------------------------------------------------------------- llava-hf


def test_llava_hf_replica_matches_its_published_files(replica_dir):
    from transformers import AutoProcessor

    folder, model_dir = "llava-hf--llava-1.5-7b-hf", replica_dir("llava-hf/llava-1.5-7b-hf")
    config, real = read(model_dir / "config.json"), published(folder, "config.json")
    assert_kept({k: v for k, v in config.items() if not k.endswith("_config")},
                {k: v for k, v in real.items() if not k.endswith("_config")}, set(), "config")
    assert_kept(config["text_config"], real["text_config"], TEXT_SHRUNK, "text_config")
    assert_kept(config["vision_config"], real["vision_config"], VISION_SHRUNK, "vision_config")
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"]) == \
        (336, 14)
    assert config["text_config"]["vocab_size"] == config["vocab_size"] == 32064

    # Weights: the published names of the kept layers, in the published shard files.
    real_map = published(folder, "model.safetensors.index.json")["weight_map"]
    names = safetensors_names(model_dir)
    assert set(names) == kept_names(real_map)
    assert set(names.values()) == set(real_map.values())  # all three shards used
    for name in ("language_model.model.embed_tokens.weight", "multi_modal_projector.linear_1.bias",
                 "vision_tower.vision_model.pre_layrnorm.weight"):
        assert names[name] == real_map[name]

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")} \
        == {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
    assert (tok.pad_token, tok.padding_side, tok("hi").input_ids[0]) == ("<pad>", "left", 1)
    assert processor.chat_template == \
        (PUBLISHED_ROOT / folder / "chat_template.jinja").read_text()
    # The real template renders content parts only: a plain-string turn renders empty.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert processor.apply_chat_template(parts, add_generation_prompt=True) == \
        "USER: <image>\nHi? ASSISTANT:"
    assert processor.apply_chat_template([{"role": "user", "content": "Hi?"}]) == "USER: "
    batch = processor(images=Image.new("RGB", (500, 375)), text="USER: <image>\nHi? ASSISTANT:",
                      return_tensors="pt")
    assert int((batch["input_ids"] == 32000).sum()) == 576  # (336 / 14) ** 2
    assert tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)


def test_llava_hf_replica_loads_and_gives_logits(replica_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = replica_dir("llava-hf/llava-1.5-7b-hf")
    model, info = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    processor = AutoProcessor.from_pretrained(model_dir)
    batch = processor(images=Image.new("RGB", (64, 48), "red"), text="USER: <image>\nHi?",
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 32064)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- original LLaVA


def test_vicuna_replica_matches_its_published_files(replica_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model_dir = "lmsys--vicuna-7b-v1.5", replica_dir("lmsys/vicuna-7b-v1.5")
    assert_kept(read(model_dir / "config.json"), published(folder, "config.json"), TEXT_SHRUNK,
                "config")
    generation = read(model_dir / "generation_config.json")
    assert (generation["temperature"], generation["top_p"], "do_sample" in generation) == \
        (0.9, 0.6, False)  # the config recent transformers refuses to save, kept as published
    names = bin_names(model_dir)
    original = published("liuhaotian--llava-v1.5-7b", "pytorch_model.bin.index.json")
    assert set(names) == {n for n in kept_names(original["weight_map"]) if "mm_projector" not in n}
    assert set(names.values()) == {"pytorch_model-00001-of-00002.bin",
                                   "pytorch_model-00002-of-00002.bin"}
    assert not list(model_dir.glob("*.safetensors")) and (model_dir / "tokenizer.model").is_file()

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (len(tok), tok.pad_token, tok.pad_token_id, tok.padding_side) == \
        (32000, "<unk>", 0, "right")
    assert tok.chat_template is None and tok.model_max_length == 4096
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 use_safetensors=False)
    with torch.no_grad():
        assert model(**tok("USER: hi ASSISTANT:", return_tensors="pt")).logits.shape[-1] == 32000


def test_clip_replica_keeps_the_old_preprocessor_and_336px_geometry(replica_dir):
    from transformers import AutoImageProcessor, CLIPModel

    model_dir = replica_dir("openai/clip-vit-large-patch14-336")
    assert read(model_dir / "preprocessor_config.json")["size"] == 336  # old integer style
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = processor(Image.new("RGB", (400, 300)), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 336, 336)
    tensors = load_tensors(model_dir / "pytorch_model.bin")
    assert {"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids",
            "visual_projection.weight", "logit_scale"} <= set(tensors)
    model = CLIPModel.from_pretrained(model_dir, use_safetensors=False)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert tuple(hidden[-2].shape) == (1, 577, 32)  # 576 patches + CLS


def test_pretrain_projector_replica_is_a_bf16_dict_of_the_projector(replica_dir):
    model_dir = replica_dir("liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5")
    state = load_tensors(model_dir / "mm_projector.bin")
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        "model.mm_projector.0.weight": ((64, 32), torch.bfloat16),
        "model.mm_projector.0.bias": ((64,), torch.bfloat16),
        "model.mm_projector.2.weight": ((64, 64), torch.bfloat16),
        "model.mm_projector.2.bias": ((64,), torch.bfloat16)}


def test_original_llava_replica_has_the_published_layout(replica_dir):
    folder, model_dir = "liuhaotian--llava-v1.5-7b", replica_dir("liuhaotian/llava-v1.5-7b")
    config = read(model_dir / "config.json")
    assert_kept(config, published(folder, "config.json"), TEXT_SHRUNK | {"mm_hidden_size"},
                "config")
    assert config["mm_hidden_size"] == 32  # the CLIP replica's width, as 1024 is CLIP-L's
    real = published(folder, "pytorch_model.bin.index.json")["weight_map"]
    names = bin_names(model_dir)
    assert set(names) == kept_names(real)
    assert set(names.values()) == set(real.values())
    assert names["model.mm_projector.0.weight"] == real["model.mm_projector.0.weight"]
    inv_freq = load_tensors(model_dir / names["model.layers.0.self_attn.rotary_emb.inv_freq"])
    assert inv_freq["model.layers.0.self_attn.rotary_emb.inv_freq"].dtype == torch.float32


def test_original_llava_replica_is_misread_by_autoconfig_like_the_real_one(replica_dir):
    # model_type "llava" with flat Llama keys: transformers builds its own LlavaConfig and
    # ignores the flat sizes (FACTS.md), so only the converter can load this layout.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(replica_dir("liuhaotian/llava-v1.5-7b"))
    assert type(config).__name__ == "LlavaConfig"
    assert config.text_config.hidden_size != 64


# --------------------------------------------------------------------------- Chameleon


@pytest.mark.parametrize("name", ["facebook/chameleon-7b", "PKU-Alignment/AA-chameleon-7b-base"])
def test_chameleon_replica_ids_geometry_and_loading(replica_dir, name):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmjobs.models.replicas.chameleon import CONFIG

    model_dir = replica_dir(name)
    config = read(model_dir / "config.json")
    shrunk = TEXT_SHRUNK | {"vq_config", "vocabulary_map", "_name_or_path"}
    assert_kept(config, CONFIG, shrunk, "config")
    assert_kept(config["vq_config"], CONFIG["vq_config"],
                {"embed_dim", "latent_channels", "base_channels", "num_res_blocks"}, "vq_config")
    vocab = config["vocabulary_map"]
    assert len(vocab) == config["vocab_size"] == 65536
    assert {t: vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>",
                                  "<reserved08706>", "<image>")} == {
        "<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196, "<racm3:break>": 8197,
        "<reserved08706>": 8710, "<image>": 8711}
    codes = {v - 4 for k, v in vocab.items() if k.startswith("IMGIMG")}
    assert codes == set(range(8192)) and vocab["IMGIMGBCZ"] == 4 + 12
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert not (model_dir / "chat_template.jinja").exists()

    processor = AutoProcessor.from_pretrained(model_dir)
    assert processor.chat_template is None and processor.tokenizer.sep_token_id == 8710
    batch = processor(images=Image.new("RGB", (600, 512), "blue"), text="Describe<image>",
                      return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == 0 and ids.count(8711) == 1024 and ids[-3:] == [8711, 8196, 8710]
    assert ids.count(8197) == 1 and tuple(batch["pixel_values"].shape) == (1, 3, 512, 512)

    model, info = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    decoder_keys = {k for k in safetensors_names(model_dir) if ".vqmodel.decoder." in k}
    assert set(info["unexpected_keys"]) == decoder_keys  # transformers has no VQ decoder
    assert bool(decoder_keys) == ("AA-" in name)
    with torch.no_grad():
        codes = model.model.get_image_tokens(batch["pixel_values"])
        logits = model(input_ids=batch["input_ids"][:, :8]).logits
    assert tuple(codes.shape) == (1, 1024) and int(codes.min()) >= 4 and int(codes.max()) <= 8195
    assert logits.shape == (1, 8, 65536)


def test_aa_chameleon_decoder_is_found_by_interleaved_inference(replica_dir):
    from transformers import AutoConfig

    from mmjobs.models.vq_decoder import VQDecoder, find_decoder_weights

    model_dir = replica_dir("PKU-Alignment/AA-chameleon-7b-base")
    state = find_decoder_weights(model_dir)
    decoder = VQDecoder(AutoConfig.from_pretrained(model_dir).vq_config)
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items()
                             if k.startswith("decoder.")})  # strict: every tensor fits


# --------------------------------------------------------------------------- LaVIN's bases


def test_meta_llama_replica_has_meta_s_layout(replica_dir):
    """LaVIN's `<weights>`: tokenizer.model + 7B/params.json (the published single line, only
    dim / n_heads / n_layers shrunk) + 7B/consolidated.00.pth (fp16 under Meta's names)."""
    import sentencepiece as spm

    model_dir = replica_dir("meta/llama-7b")
    real = (PUBLISHED_ROOT / "meta--llama-7b" / "params.json").read_text()
    text = (model_dir / "7B" / "params.json").read_text()
    assert "\n" not in text and list(json.loads(text)) == list(json.loads(real))
    assert_kept(json.loads(text), json.loads(real), {"dim", "n_heads", "n_layers"}, "params")
    assert json.loads(text)["vocab_size"] == -1
    tensors = load_tensors(model_dir / "7B" / "consolidated.00.pth")  # weights_only reads it
    assert "rope.freqs" in tensors and "layers.1.feed_forward.w3.weight" in tensors
    assert {t.dtype for n, t in tensors.items()} == {torch.float16}
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert (sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (32000, 0, 1, 2)


def test_clip_l14_replica_keeps_224px_and_24_blocks(replica_dir):
    """LaVIN's CLIP: 224 px / patch 14 (256 patches + CLS), 24 blocks to tap every 4th."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(replica_dir("openai/clip-vit-large-patch14"))
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers,
            vision.hidden_act) == (224, 14, 24, "quick_gelu")
    out = model.vision_model(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 257, vision.hidden_size)


# --------------------------------------------------------------------------- ChartWiz


def test_synatra_replica_keeps_the_hub_config_and_token_ids(replica_dir):
    """Synatra-7B-v0.3-dpo: Mistral, vocab 32002 with eos 32000, 4:1 grouped-query heads."""
    from transformers import AutoConfig, AutoTokenizer, MistralForCausalLM

    model_dir = replica_dir("maywell/Synatra-7B-v0.3-dpo")
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.model_type, config.vocab_size, config.eos_token_id, config.sliding_window,
            config.rope_parameters["rope_theta"]) == ("mistral", 32002, 32000, 4096, 10000.0)
    assert config.num_attention_heads // config.num_key_value_heads == 32 // 8
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 32002 and tokenizer.eos_token_id == 32000
    assert tokenizer("부산").input_ids[0] == 1  # BOS, then Korean as bytes
    model = MistralForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 32002)


def test_pix2struct_replica_is_a_full_model_whose_encoder_chartwiz_keeps(replica_dir):
    from transformers import AutoImageProcessor, Pix2StructForConditionalGeneration

    model_dir = replica_dir("ybelkada/pix2struct-base")
    model = Pix2StructForConditionalGeneration.from_pretrained(model_dir)
    vision = model.config.vision_config
    assert (vision.patch_size, vision.patch_embed_hidden_size, model.config.is_vqa) == (
        16, 768, False)  # the input patch width is 3 x 16 x 16, not shrunk
    processor = AutoImageProcessor.from_pretrained(model_dir)
    patches = processor(Image.new("RGB", (40, 30)), return_tensors="pt", max_patches=512)
    out = model.encoder(flattened_patches=patches["flattened_patches"])
    assert out.last_hidden_state.shape == (1, 512, vision.hidden_size)
