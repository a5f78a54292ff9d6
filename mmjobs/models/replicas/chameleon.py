"""Replicas of facebook/chameleon-7b and PKU-Alignment/AA-chameleon-7b-base.

Faithful geometry: 512 px images, a VQ encoder with Chameleon's five levels (channel
multipliers 1,1,2,2,4: 16x downsampling) and its 8,192-code codebook, so every image is a 32x32
grid = 1,024 image tokens, wrapped by the processor in `<racm3:break>` ... `<eoss>`, with the
sep token `<reserved08706>` appended per sample. Only channel widths and the number of residual
blocks per level shrink. Token ids: see `mmjobs.models.replicas.vocab.chameleon_tokenizer`.

Neither model's config.json is stored (it embeds the 65,536-entry `vocabulary_map`), so the
config below is written from the values FACTS.md records from AA-chameleon-7b-base's
config.json (architecture identical to chameleon-7b), with `vocabulary_map` from the replica's
tokenizer. AA-chameleon additionally carries the VQ *decoder* (`model.vqmodel.decoder.*`) in its
weights, which transformers does not load and mmjobs' interleaved inference reads by name.
The base chameleon-7b ships no chat template, and neither does the replica.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mmjobs.models.replicas._common import (
    TEXT_SIZES,
    copy_published,
    shrink,
    write_json,
    write_record,
    write_weights,
)
from mmjobs.models.replicas.vocab import CHAMELEON_VOCAB, chameleon_tokenizer

CHAMELEON = "facebook--chameleon-7b"
IMAGE_TOKENS = 1024  # (512 / 16) ** 2
# The published config's values (FACTS.md, from AA-chameleon-7b-base's config.json at 89ed0bd).
CONFIG = {
    "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
    "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None, "mlp_bias": False,
    "swin_norm": False, "model_parallel_size": 1, "tie_word_embeddings": False,
    "vocab_size": CHAMELEON_VOCAB, "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0.dev0",
    "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
    "boi_token_id": 8197, "eoi_token_id": 8196, "image_token_id": 8711,
    "vq_config": {
        "model_type": "chameleon_vqgan", "embed_dim": 256, "num_embeddings": 8192,
        "double_latent": False, "latent_channels": 256, "resolution": 512, "in_channels": 3,
        "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2,
        "attn_resolutions": [], "attn_type": "vanilla", "dropout": 0.0,
        "initializer_range": 0.02,
    },
}
# VQ widths shrink to the GroupNorm minimum (32 groups); levels, codebook and resolution stay.
VQ_SIZES = {"embed_dim": 32, "latent_channels": 32, "base_channels": 32, "num_res_blocks": 1}
# Shard files assumed (no index of the real models is stored): 3 shards, as transformers writes
# ~14 GB of bf16 with its 5 GB default; text layers spread over them, the rest in the last.
_SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]


def build_chameleon(out: Path, *, seed: int = 0) -> None:
    """facebook/chameleon-7b (see the module docstring)."""
    _build(out, name="facebook/chameleon-7b", with_decoder=False, seed=seed)


def build_aa_chameleon(out: Path, *, seed: int = 0) -> None:
    """PKU-Alignment/AA-chameleon-7b-base: chameleon-7b plus the VQ decoder weights."""
    _build(out, name="PKU-Alignment/AA-chameleon-7b-base", with_decoder=True, seed=seed)


def _build(out: Path, *, name: str, with_decoder: bool, seed: int) -> None:
    from transformers import AutoConfig, ChameleonForConditionalGeneration, GenerationConfig

    tokenizer = chameleon_tokenizer(seed=seed)
    config: dict[str, Any] = copy.deepcopy(CONFIG)
    if with_decoder:
        config["_name_or_path"] = "AA-chameleon-7b-base"
    shrunk = {"": shrink(config, TEXT_SIZES), "vq_config": shrink(config["vq_config"], VQ_SIZES)}
    config["vocabulary_map"] = tokenizer.get_vocab()
    write_json(out / "config.json", config)
    tokenizer.save_pretrained(out)  # tokenizer.json + tokenizer_config.json
    published = copy_published(CHAMELEON, out, [
        "preprocessor_config.json", "processor_config.json", "special_tokens_map.json"])

    model_config = AutoConfig.from_pretrained(out)
    vq = model_config.vq_config
    grid = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
    if grid * grid != IMAGE_TOKENS:
        raise RuntimeError(f"VQ grid {grid}x{grid} != the processor's {IMAGE_TOKENS} tokens")
    GenerationConfig.from_model_config(model_config).save_pretrained(out)
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(model_config)
    tensors = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if with_decoder:
        from mmjobs.eval.interleaved import VQ_PREFIX, VQDecoder

        decoder = VQDecoder(vq)
        tensors.update({f"{VQ_PREFIX}decoder.{k}": v.to(torch.bfloat16)
                        for k, v in decoder.state_dict().items()})
    layers = model_config.num_hidden_layers
    write_weights(tensors, out, lambda n: _shard_of(n, layers),
                  index_name="model.safetensors.index.json")
    write_record(out, name=name, published=published, generated=[
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors.index.json", *_SHARDS], shrunk=shrunk, notes=[
        "config.json: the published values recorded in FACTS.md (the file itself embeds the "
        "65,536-entry vocabulary_map and is not stored); vocabulary_map from the replica "
        "tokenizer, whose special and image-code ids are Chameleon's",
        "tokenizer: LlamaTokenizer (the class transformers' conversion writes) over a BPE "
        "trained on generated text; tokenizer_config.json and generation_config.json are "
        "what transformers writes for it (the real ones are not stored)",
        f"images: 512 px -> 32x32 VQ grid = {IMAGE_TOKENS} tokens, as the real model",
        "weights: random bfloat16; the shard split is assumed (no index file is stored)"
        + ("; VQ decoder under model.vqmodel.decoder.* like Align-Anything's checkpoint"
           if with_decoder else "")])


def _shard_of(name: str, layers: int) -> str:
    if name.startswith("model.embed_tokens."):
        return _SHARDS[0]
    if name.startswith("model.layers."):
        return _SHARDS[int(name.split(".")[2]) * len(_SHARDS) // (layers + 1)]
    return _SHARDS[-1]
