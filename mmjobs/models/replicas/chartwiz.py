"""Replicas of ChartWiz's two hub parts (allright2024/ChartWiz, scripts/finetune_lora.sh).

- `maywell/Synatra-7B-v0.3-dpo`: the Korean LLM of ChartWiz's LoRA script and its streamlit
  demo (`st_beta.py --model-base`). `MistralForCausalLM`; config.json as the hub's (commit
  405a4f1e: vocab 32002, bos 1, eos **32000**, 8 kv heads, sliding window 4096, rope 1e4,
  bf16), widths and depths shrunk. Tokenizer: Mistral's Llama-layout SentencePiece (`<unk>` 0,
  `<s>` 1, `</s>` 2) plus two added tokens at 32000 / 32001. The added tokens' strings are
  not stored here: ChatML's `<|im_end|>` (32000, the eos) and `<|im_start|>` (32001) are
  assumed. One safetensors file (the hub's shard layout is not stored).
- `ybelkada/pix2struct-base`: ChartWiz's `--vision_tower` (its `DeplotVisionTower` loads
  `Pix2StructForConditionalGeneration` and keeps `.encoder`). config.json as fine-tunes that
  name it as `_name_or_path` publish it (vision: patch 16, dropout 0.2, `layer_norm_bias`
  false; `is_vqa` false), widths shrunk; the input patch width stays 768 (3·16·16, fixed by
  the patch size). preprocessor_config: Pix2Struct's defaults (16x16 patches, 2048
  max_patches, per-image normalisation); ChartWiz overrides max_patches to 512 in its data
  code. ChartWiz then loads DePlot weights from an unpublished local file
  (`deplot_k.pt`); the replica, like a run from the hub, has the hub's (here random) weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mmjobs.models.replicas._common import (
    TEXT_SIZES,
    VISION_SIZES,
    write_json,
    write_record,
    write_weights,
)
from mmjobs.models.replicas.vocab import llama_sentencepiece

SYNATRA = "maywell/Synatra-7B-v0.3-dpo"
PIX2STRUCT = "ybelkada/pix2struct-base"
# config.json of maywell/Synatra-7B-v0.3-dpo at 405a4f1e6513cd1b8de5eb4e003bb49cc86d1f8a.
SYNATRA_CONFIG = {
    "_name_or_path": SYNATRA, "architectures": ["MistralForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.1", "use_cache": False, "vocab_size": 32002,
}
SYNATRA_ADDED = {"<|im_end|>": 32000, "<|im_start|>": 32001}  # assumed strings (see above)
PIX2STRUCT_CONFIG = {
    "_name_or_path": PIX2STRUCT, "architectures": ["Pix2StructForConditionalGeneration"],
    "decoder_start_token_id": 0, "eos_token_id": 1, "initializer_factor": 1.0,
    "initializer_range": 0.02, "is_encoder_decoder": True, "is_vqa": False,
    "model_type": "pix2struct", "pad_token_id": 0, "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "text_config": {"dropout_rate": 0.2, "encoder_hidden_size": 768, "initializer_range": 0.02,
                    "model_type": "pix2struct_text_model"},
    "vision_config": {"attention_dropout": 0.2, "dropout_rate": 0.2, "hidden_dropout_prob": 0.2,
                      "initializer_range": 0.02, "layer_norm_bias": False,
                      "model_type": "pix2struct_vision_model", "num_channels": 3,
                      "patch_size": 16, "projection_dim": 768},
}
# Pix2Struct vision sizes: `d_ff` / `d_kv` are its names for the MLP width and head width.
PIX2STRUCT_VISION_SIZES = {"hidden_size": VISION_SIZES["hidden_size"],
                           "d_ff": VISION_SIZES["intermediate_size"],
                           "num_hidden_layers": VISION_SIZES["num_hidden_layers"],
                           "num_attention_heads": VISION_SIZES["num_attention_heads"],
                           "d_kv": VISION_SIZES["hidden_size"] // VISION_SIZES[
                               "num_attention_heads"]}
PIX2STRUCT_TEXT_SIZES = {"hidden_size": 32, "d_ff": 64, "d_kv": 16, "num_layers": 2,
                         "num_heads": 2, "vocab_size": 1000, "encoder_hidden_size": 32}


def build_synatra(out: Path, *, seed: int = 0) -> None:
    """maywell/Synatra-7B-v0.3-dpo (see the module docstring)."""
    from transformers import AddedToken, AutoConfig, AutoTokenizer, MistralForCausalLM

    config = {**SYNATRA_CONFIG, **TEXT_SIZES, "num_key_value_heads": 1}  # the 4:1 GQA ratio
    write_json(out / "config.json", config)
    llama_sentencepiece(out / "tokenizer.model", seed=seed)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "legacy": True, "model_max_length": 1000000000000000019884624838656,
        "padding_side": "left", "clean_up_tokenization_spaces": False})
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SYNATRA_ADDED],
                         special_tokens=True)
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>",
                                                            *SYNATRA_ADDED)}
    if got != {"<unk>": 0, "<s>": 1, "</s>": 2, **SYNATRA_ADDED}:
        raise RuntimeError(f"Synatra replica tokenizer ids {got} differ from the published ones")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((Path(tmp) / name).read_bytes())
    write_json(out / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1,
                                                 "eos_token_id": 32000, "use_cache": False})
    torch.manual_seed(seed)
    model = MistralForCausalLM(AutoConfig.from_pretrained(out))
    write_weights({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, out,
                  lambda _: "model.safetensors", index_name=None)
    write_record(out, name=SYNATRA, published=[], generated=[
        "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
        "tokenizer_config.json", "model.safetensors"],
        shrunk={"config": sorted(TEXT_SIZES)}, notes=[
            "config.json: the hub's values (commit 405a4f1e, found by search; not vendored)",
            "num_key_value_heads 1: keeps the published 32:8 = 4:1 query:kv head ratio",
            "tokenizer: Llama-layout SentencePiece BPE on generated text (byte fallback, so "
            "Korean text tokenizes as bytes) + <|im_end|> 32000 / <|im_start|> 32001 "
            "(assumed strings; the ids and eos 32000 are the config's)",
            "weights: random bfloat16 in one model.safetensors"])


def build_pix2struct_base(out: Path, *, seed: int = 0) -> None:
    """ybelkada/pix2struct-base (see the module docstring)."""
    from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

    raw = {**PIX2STRUCT_CONFIG,
           "vision_config": {**PIX2STRUCT_CONFIG["vision_config"], **PIX2STRUCT_VISION_SIZES},
           "text_config": {**PIX2STRUCT_CONFIG["text_config"], **PIX2STRUCT_TEXT_SIZES}}
    write_json(out / "config.json", raw)
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "Pix2StructImageProcessor", "is_vqa": False,
        "do_normalize": True, "do_convert_rgb": True, "max_patches": 2048,
        "patch_size": {"height": 16, "width": 16}})
    torch.manual_seed(seed)
    model = Pix2StructForConditionalGeneration(Pix2StructConfig.from_pretrained(out))
    write_weights(model.state_dict(), out, lambda _: "model.safetensors", index_name=None)
    write_record(out, name=PIX2STRUCT, published=[], generated=[
        "config.json", "preprocessor_config.json", "model.safetensors"],
        shrunk={"vision_config": sorted(PIX2STRUCT_VISION_SIZES),
                "text_config": sorted(PIX2STRUCT_TEXT_SIZES)}, notes=[
            "config.json: as fine-tunes naming ybelkada/pix2struct-base publish it (the repo's "
            "own files are not stored here); patch_embed_hidden_size stays 768 = 3*16*16",
            "preprocessor_config.json: Pix2Struct's defaults (assumed; not stored)",
            "weights: random float32 in one model.safetensors; ChartWiz overwrites them with "
            "an unpublished DePlot checkpoint (deplot_k.pt)"])
