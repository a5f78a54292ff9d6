"""Replica of internlm/internlm-xcomposer2-7b (the base of ChartMoE), as the hub ships it.

- config.json: the published one (`model_type internlmxcomposer2`, remote-code `auto_map`,
  `img_size 224` last, `attn_implementation eager`, `max_length 4096`, dynamic RoPE, theta 1e6,
  vocab 92544, pad = eos = 2) with the text sizes shrunk; the query : key/value head ratio is
  kept (32 : 8 -> 4 : 1), so `wqkv` has the real grouping (per kv head: 4 query heads, 1 key,
  1 value).
- `pytorch_model.bin`: ONE unsharded pickle, bfloat16, no index (as on the hub), under the
  official names: `model.*` (InternLM2 with `Plora_A`/`Plora_B` of rank 256 on every wqkv, wo,
  w1, w2, w3), `output.weight`, `vit.vision_tower.vision_model.*` (CLIP at the CLIP replica's
  width, 32), `vision_proj.{0,2}.*` (32 -> 64 -> 64; real 1024 -> 4096 -> 4096).
- `tokenizer.model`: SentencePiece BPE with InternLM2's layout: `<unk>` 0, `<s>` 1, `</s>` 2,
  byte fallback, learnt merges (chart text and the chat turns, so `assistant` and `user` are
  single pieces), fillers, and the user-defined turn markers `[UNUSED_TOKEN_145]` 92542 (end)
  and `[UNUSED_TOKEN_146]` 92543 (start) at their real ids; 92544 pieces.
- tokenizer_config.json, special_tokens_map.json: published (slow remote-code tokenizer class).

Not reproduced: the remote-code `*.py` files (mmjobs never runs them; `mmjobs.models.xcomposer2`
is the native implementation) and generation_config.json (its content is not stored; the
converter writes one from config.json's ids).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmjobs.models.replicas._common import (
    TEXT_SIZES,
    VISION_SIZES,
    copy_published,
    read_published,
    shrink,
    write_record,
    write_weights,
)
from mmjobs.models.replicas.vocab import replica_corpus, train_bpe

XCOMPOSER2 = "internlm--internlm-xcomposer2-7b"
XCOMPOSER2_VOCAB = 92544
TURN_TOKENS = {"[UNUSED_TOKEN_145]": 92542, "[UNUSED_TOKEN_146]": 92543}
PLORA_R = 256  # hard-coded in the hub's modeling_internlm2.py (lora_r = lora_alpha = 256)
# The published 32 query heads : 8 key/value heads, at the replica's 4 heads.
SIZES = {**TEXT_SIZES, "num_key_value_heads": 1}
_TURNS = ("[UNUSED_TOKEN_146]user\n<ImageHere>Answer the question using a single word or "
          "phrase.What is the value of 2019?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
          "42[UNUSED_TOKEN_145]\n</s>")


def build_xcomposer2(out: Path, *, seed: int = 0) -> None:
    """internlm/internlm-xcomposer2-7b (see the module docstring)."""
    config = read_published(XCOMPOSER2, "config.json")
    shrunk = {"": shrink(config, SIZES)}
    # Not sorted: the published file has img_size appended after the sorted keys.
    (out / "config.json").write_text(_json_keeping_order(config))
    published = copy_published(XCOMPOSER2, out, ["tokenizer_config.json",
                                                 "special_tokens_map.json"])
    internlm2_sentencepiece(out / "tokenizer.model", seed=seed)
    tensors = xcomposer2_tensors(config, seed=seed)
    write_weights(tensors, out, lambda _: "pytorch_model.bin", index_name=None)
    write_record(out, name="internlm/internlm-xcomposer2-7b", published=published,
                 generated=["config.json", "tokenizer.model", "pytorch_model.bin"],
                 shrunk=shrunk, notes=[
                     "tokenizer.model: SentencePiece BPE trained on generated text with "
                     "InternLM2's layout (<unk> 0, <s> 1, </s> 2, [UNUSED_TOKEN_145] 92542, "
                     "[UNUSED_TOKEN_146] 92543, 92544 pieces); the real vocabulary is not "
                     "reproduced",
                     "num_key_value_heads 1 keeps the published 4:1 query:kv head ratio",
                     f"pytorch_model.bin: one bfloat16 pickle, official names; Partial-LoRA "
                     f"rank {PLORA_R}; ViT at the CLIP replica's width (32) with 35x35+1 = 1226 "
                     "position embeddings, as the remote code saves them (its vision tower "
                     "calls resize_pos() when built, before the checkpoint loads) - assumed",
                     "remote-code .py files and generation_config.json are not reproduced"])


def xcomposer2_tensors(config: dict, *, seed: int) -> dict[str, torch.Tensor]:
    """Random bfloat16 weights of the native model built for the replica's `config`."""
    from mmjobs.models.xcomposer2.configuration import XComposer2Config
    from mmjobs.models.xcomposer2.modeling import XComposer2ForCausalLM

    vision = {**VISION_SIZES, "image_size": 336, "patch_size": 14, "projection_dim": 768,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    native = XComposer2Config(**{**config, "img_size": 490}, vision_config=vision,
                              plora_r=PLORA_R, plora_alpha=PLORA_R)
    torch.manual_seed(seed)
    model = XComposer2ForCausalLM(native)
    for name, param in model.named_parameters():  # upstream never zeroes Plora_B either
        if "Plora_" in name:
            torch.nn.init.normal_(param, std=0.02)
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def internlm2_sentencepiece(path: Path, *, seed: int = 0) -> Path:
    """Write an InternLM2-layout SentencePiece BPE model (92,544 pieces) to `path`."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    def corpus():
        for i, line in enumerate(replica_corpus(seed=seed)):
            yield line
            if i % 4 == 0:
                yield _TURNS.replace("[UNUSED_TOKEN_145]", "\n").replace("[UNUSED_TOKEN_146]",
                                                                         "")

    proto = train_bpe(corpus())
    unused = model_pb2.ModelProto.SentencePiece.UNUSED
    user_defined = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    first_turn = min(TURN_TOKENS.values())
    while len(proto.pieces) < first_turn:
        piece = proto.pieces.add()
        piece.piece, piece.type, piece.score = f"<unused{len(proto.pieces) - 1}>", unused, 0.0
    for token, token_id in sorted(TURN_TOKENS.items(), key=lambda kv: kv[1]):
        piece = proto.pieces.add()
        piece.piece, piece.type, piece.score = token, user_defined, 0.0
        assert len(proto.pieces) - 1 == token_id
    proto.trainer_spec.vocab_size = XCOMPOSER2_VOCAB
    path.write_bytes(proto.SerializeToString())
    return path


def _json_keeping_order(data: dict) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"
