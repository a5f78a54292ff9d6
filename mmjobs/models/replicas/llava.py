"""Replicas of the LLaVA-1.5 family: llava-hf's transformers format and the original LLaVA parts.

- `llava-hf/llava-1.5-7b-hf`: `LlavaForConditionalGeneration`, 3 safetensors shards under the
  published index's names (the pre-v4.52 layout `language_model.model.*`,
  `multi_modal_projector.*`, `vision_tower.vision_model.*`), CLIP at 336 px / patch 14 so an
  image is 576 `<image>` tokens, the published processor, chat template and tokenizer configs.
- `lmsys/vicuna-7b-v1.5`: `LlamaForCausalLM` in two `.bin` pickles, no chat template, and the
  published generation_config that recent transformers rejects (temperature/top_p without
  do_sample).
- `openai/clip-vit-large-patch14-336`: a full `CLIPModel` (`pytorch_model.bin`) and the
  published old-style preprocessor config (`CLIPFeatureExtractor`, integer sizes).
- `liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5`: `mm_projector.bin`, a bf16 pickle
  of `model.mm_projector.{0,2}.{weight,bias}` mapping the CLIP replica's width to vicuna's.
- `liuhaotian/llava-v1.5-7b`: the original `llava_llama` layout: flat Llama names plus
  `model.mm_projector.*` and the `rotary_emb.inv_freq` buffers, in the published index's two
  `.bin` shards; the vision tower is not inside (it is the CLIP replica).

The five fit together like the real ones: the projector maps 32 (CLIP replica width) to 64
(vicuna / llava replica width), as the real one maps 1024 to 4096.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from mmjobs.models.convert.llava import llava_hf_name
from mmjobs.models.replicas._common import (
    TEXT_SIZES,
    VISION_SIZES,
    check_names,
    copy_published,
    read_published,
    rotary_inv_freq,
    scaled_shard_map,
    shrink,
    write_json,
    write_record,
    write_weights,
)
from mmjobs.models.replicas.vocab import LLAMA_VOCAB, llama_sentencepiece

LLAVA_HF = "llava-hf--llava-1.5-7b-hf"
VICUNA = "lmsys--vicuna-7b-v1.5"
CLIP = "openai--clip-vit-large-patch14-336"
LLAVA_ORIGINAL = "liuhaotian--llava-v1.5-7b"
_TOKENIZER_NOTE = ("tokenizer.model: a SentencePiece BPE trained on generated text, Llama-2 layout "
                   "(<unk> 0, <s> 1, </s> 2, bytes 3..258, 32000 pieces); the real vocabulary "
                   "is not reproduced")


def build_llava_hf(out: Path, *, seed: int = 0) -> None:
    """llava-hf/llava-1.5-7b-hf (see the module docstring)."""
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    config = read_published(LLAVA_HF, "config.json")
    shrunk = {"text_config": shrink(config["text_config"], TEXT_SIZES),
              "vision_config": shrink(config["vision_config"], VISION_SIZES)}
    write_json(out / "config.json", config)
    published = copy_published(LLAVA_HF, out, [
        "generation_config.json", "preprocessor_config.json", "processor_config.json",
        "chat_template.json", "chat_template.jinja", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json"])
    llama_sentencepiece(out / "tokenizer.model", seed=seed)
    # The hub ships tokenizer.json next to tokenizer.model: the same vocabulary, converted.
    tokenizer = AutoTokenizer.from_pretrained(out)
    _expect_ids(tokenizer, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001})
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (out / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(out))
    tensors = {llava_hf_name(k): v.to(torch.float16) for k, v in model.state_dict().items()}
    weight_map = read_published(LLAVA_HF, "model.safetensors.index.json")["weight_map"]
    check_names(tensors, weight_map, LLAVA_HF)
    write_weights(tensors, out, scaled_shard_map(weight_map, tensors),
                  index_name="model.safetensors.index.json")
    write_record(out, name="llava-hf/llava-1.5-7b-hf", published=published,
                 generated=["config.json", "tokenizer.model", "tokenizer.json",
                            "model.safetensors.index.json",
                            *sorted(set(weight_map.values()))],
                 shrunk=shrunk, notes=[
                     _TOKENIZER_NOTE, "weights: random, float16 like the published ones; "
                     "replica layer j of n is stored in the shard of published layer j*N//n"])


def build_vicuna(out: Path, *, seed: int = 0) -> None:
    """lmsys/vicuna-7b-v1.5 (see the module docstring)."""
    _build_original_llama(
        out, VICUNA, "lmsys/vicuna-7b-v1.5", TEXT_SIZES, with_projector=False, seed=seed,
        note="weights: random float16 in two .bin pickles; vicuna's own index is not stored "
        "here, so the shard split and the rotary_emb.inv_freq buffers follow "
        "liuhaotian/llava-v1.5-7b's index (same architecture, same transformers 4.31 save)")


def build_clip(out: Path, *, seed: int = 0) -> None:
    """openai/clip-vit-large-patch14-336 (see the module docstring)."""
    from transformers import CLIPConfig, CLIPModel

    vision = {**VISION_SIZES, "image_size": 336, "patch_size": 14, "projection_dim": 768,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
    text = {**VISION_SIZES, "max_position_embeddings": 77, "vocab_size": 49408,
            "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=768,
                        logit_scale_init_value=2.6592)
    config.architectures = ["CLIPModel"]
    config.save_pretrained(out)
    published = copy_published(CLIP, out, ["preprocessor_config.json"])
    torch.manual_seed(seed)
    state = CLIPModel(config).state_dict()
    # transformers < 4.31 saved the position-id buffers too; the 2022 hub file has them.
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    state["vision_model.embeddings.position_ids"] = torch.arange((336 // 14) ** 2 + 1)[None]
    write_weights(state, out, lambda _: "pytorch_model.bin", index_name=None)
    write_record(out, name="openai/clip-vit-large-patch14-336", published=published,
                 generated=["config.json", "pytorch_model.bin"],
                 shrunk=dict.fromkeys(("text_config", "vision_config"), sorted(VISION_SIZES)),
                 notes=["config.json: reconstructed from FACTS.md (the hub file was not found "
                        "byte-exact); vision tower 336 px / patch 14 -> 577 positions",
                        "weights: random float32 CLIPModel in one pickle; no tokenizer files "
                        "(LLaVA uses only the vision tower and the image processor)"])


def build_pretrain_projector(out: Path, *, seed: int = 0) -> None:
    """liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5's `mm_projector.bin`."""
    torch.manual_seed(seed)
    projector = _mlp2x(VISION_SIZES["hidden_size"], TEXT_SIZES["hidden_size"])
    state = {f"model.mm_projector.{k}": v.to(torch.bfloat16)
             for k, v in projector.state_dict().items()}
    write_weights(state, out, lambda _: "mm_projector.bin", index_name=None)
    write_record(out, name="liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
                 published=[], generated=["mm_projector.bin"], shrunk={}, notes=[
                     "mm_projector.bin: plain dict of model.mm_projector.{0,2}.{weight,bias}, "
                     "bfloat16, as LLaVA's trainer saves with tune_mm_mlp_adapter; maps the "
                     "CLIP replica's 32 features to vicuna's 64 (real: 1024 -> 4096)",
                     "config.json and trainer_state.json of the hub repo are not reproduced "
                     "(their content was not found; LLaVA reads only mm_projector.bin)"])


def build_llava_original(out: Path, *, seed: int = 0) -> None:
    """liuhaotian/llava-v1.5-7b in the original `llava_llama` layout (module docstring)."""
    _build_original_llama(
        out, LLAVA_ORIGINAL, "liuhaotian/llava-v1.5-7b",
        {**TEXT_SIZES, "mm_hidden_size": VISION_SIZES["hidden_size"]}, with_projector=True,
        seed=seed, note="weights: random float16 (inv_freq float32) in the published index's two "
        ".bin shards; the vision tower is the separate CLIP replica (mm_vision_tower names the "
        "hub repo, as in the real config)")


def _build_original_llama(out: Path, folder: str, name: str, sizes: dict[str, int], *,
                          with_projector: bool, seed: int, note: str) -> None:
    """A Llama checkpoint as transformers 4.31 saved it (vicuna; LLaVA's llava_llama with its
    projector): published configs, `tokenizer.model`, `.bin` shards under the index's names."""
    config = read_published(folder, "config.json")
    shrunk = {"": shrink(config, sizes)}
    write_json(out / "config.json", config)
    published = copy_published(folder, out, ["generation_config.json", "special_tokens_map.json",
                                             "tokenizer_config.json"])
    llama_sentencepiece(out / "tokenizer.model", seed=seed)
    tensors = _llama_tensors(config, seed=seed)
    weight_map = read_published(LLAVA_ORIGINAL, "pytorch_model.bin.index.json")["weight_map"]
    if with_projector:
        projector = _mlp2x(config["mm_hidden_size"], config["hidden_size"])
        tensors.update({f"model.mm_projector.{k}": v.to(torch.float16)
                        for k, v in projector.state_dict().items()})
    else:
        weight_map = {k: v for k, v in weight_map.items() if "mm_projector" not in k}
    check_names(tensors, weight_map, folder)
    write_weights(tensors, out, scaled_shard_map(weight_map, tensors),
                  index_name="pytorch_model.bin.index.json")
    write_record(out, name=name, published=published,
                 generated=["config.json", "tokenizer.model", "pytorch_model.bin.index.json",
                            *sorted(set(weight_map.values()))],
                 shrunk=shrunk, notes=[_TOKENIZER_NOTE, note])


# --------------------------------------------------------------------------- helpers


def _llama_tensors(config: dict, *, seed: int) -> dict[str, torch.Tensor]:
    """Random float16 Llama weights for `config` plus the float32 `inv_freq` buffers that
    transformers 4.31 saved in every layer (the checkpoints these replicas stand for have them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {k: config[k] for k in (*TEXT_SIZES, "vocab_size", "rms_norm_eps",
                                    "max_position_embeddings")}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
    tensors = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for i in range(config["num_hidden_layers"]):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = rotary_inv_freq(head_dim)
    return tensors


def _mlp2x(vision_dim: int, text_dim: int) -> nn.Sequential:
    """LLaVA's `mlp2x_gelu` projector: Linear, GELU, Linear (parameters `0.*` and `2.*`)."""
    return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))


def _expect_ids(tokenizer, expected: dict[str, int]) -> None:
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
    if got != expected or len(tokenizer) < LLAMA_VOCAB:
        raise RuntimeError(f"replica tokenizer ids {got} differ from the published {expected}")
