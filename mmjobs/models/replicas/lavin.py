"""Replicas of LaVIN's base models: Meta's original LLaMA-7B and OpenAI's CLIP ViT-L/14 (224 px).

- `meta/llama-7b`: Meta's release layout as LaVIN reads it (`<weights>/tokenizer.model`,
  `<weights>/7B/params.json`, `<weights>/7B/consolidated.00.pth`): `params.json` is the
  published file with `dim`, `n_heads` and `n_layers` shrunk (same single-line layout,
  `vocab_size: -1`, `multiple_of: 256`, `norm_eps: 1e-06`); the shard is a plain-dict pickle
  (`torch.save`) of float16 tensors under Meta's names, `rope.freqs` included, in Meta's
  interleaved-pair rotary layout; `shards=2` splits it model-parallel like the 13B release
  (column-parallel weights along dim 0, row-parallel ones and the embeddings along dim 1,
  norms and `rope.freqs` replicated).
- `openai/clip-vit-large-patch14`: the 224 px ViT-L/14 LaVIN uses, as a transformers
  `CLIPModel` in `pytorch_model.bin` (the hub's older weight file); 24 vision layers are kept
  (width 32), so the CLS token after every 4th block still gives LaVIN's 6 visual tokens and the
  depth-wise dropout schedule spans CLIP's real depth. No published file of this repo is
  vendored (its values: image 224, patch 14, quick_gelu, projection 768).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mmjobs.models.replicas._common import (
    TEXT_SIZES,
    VISION_SIZES,
    published_dir,
    rotary_inv_freq,
    write_record,
)
from mmjobs.models.replicas.vocab import llama_sentencepiece

META_LLAMA = "meta--llama-7b"
# Meta's tensor names per layer, and how fairscale splits them across model-parallel shards.
_LAYER_SPLIT = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
                "attention.wo.weight": 1, "feed_forward.w1.weight": 0,
                "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0,
                "attention_norm.weight": -1, "ffn_norm.weight": -1}
_TOP_SPLIT = {"tok_embeddings.weight": 1, "norm.weight": -1, "output.weight": 0,
              "rope.freqs": -1}
CLIP_VISION_LAYERS = 24


def meta_params(*, size_folder: str = "7B") -> dict:
    """The published params.json with the replica's sizes (key order kept)."""
    params = json.loads((published_dir(META_LLAMA) / "params.json").read_text())
    params.update(dim=TEXT_SIZES["hidden_size"], n_heads=TEXT_SIZES["num_attention_heads"],
                  n_layers=TEXT_SIZES["num_hidden_layers"])
    return params


def meta_llama_tensors(params: dict, vocab: int, *, seed: int) -> dict[str, torch.Tensor]:
    """Random float16 weights under Meta's names for `params` (Meta's FFN width rule)."""
    dim, layers = params["dim"], params["n_layers"]
    multiple = params["multiple_of"]
    hidden = multiple * math.ceil(int(2 * 4 * dim / 3) / multiple)
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.05).to(torch.float16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(dim, generator=generator)).to(torch.float16)

    tensors = {"tok_embeddings.weight": rand(vocab, dim), "norm.weight": norm(),
               "output.weight": rand(vocab, dim),
               "rope.freqs": rotary_inv_freq(dim // params["n_heads"]).to(torch.float16)}
    for i in range(layers):
        p = f"layers.{i}."
        tensors.update({p + "attention.wq.weight": rand(dim, dim),
                        p + "attention.wk.weight": rand(dim, dim),
                        p + "attention.wv.weight": rand(dim, dim),
                        p + "attention.wo.weight": rand(dim, dim),
                        p + "feed_forward.w1.weight": rand(hidden, dim),
                        p + "feed_forward.w2.weight": rand(dim, hidden),
                        p + "feed_forward.w3.weight": rand(hidden, dim),
                        p + "attention_norm.weight": norm(), p + "ffn_norm.weight": norm()})
    return tensors


def split_model_parallel(tensors: dict[str, torch.Tensor], shards: int
                         ) -> list[dict[str, torch.Tensor]]:
    """`tensors` cut into `shards` model-parallel pieces the way Meta's release is."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in tensors.items():
        dim = _TOP_SPLIT.get(name)
        if dim is None:
            dim = _LAYER_SPLIT[name.split(".", 2)[2]]
        pieces = [tensor] * shards if dim < 0 else list(torch.chunk(tensor, shards, dim=dim))
        for shard, piece in zip(out, pieces, strict=True):
            shard[name] = piece.clone()
    return out


def build_meta_llama(out: Path, *, seed: int = 0, shards: int = 1) -> None:
    """meta/llama-7b in Meta's layout (see the module docstring)."""
    tokenizer = llama_sentencepiece(out / "tokenizer.model", seed=seed)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    folder = out / "7B"
    folder.mkdir()
    params = meta_params()
    # The published file is one line without a trailing newline; so is the replica's.
    (folder / "params.json").write_text(json.dumps(params))
    tensors = meta_llama_tensors(params, vocab, seed=seed)
    names = []
    for index, shard in enumerate(split_model_parallel(tensors, shards)):
        name = f"consolidated.{index:02d}.pth"
        torch.save(shard, folder / name)
        names.append(f"7B/{name}")
    write_record(out, name="meta/llama-7b", published=[], generated=[
        "tokenizer.model", "7B/params.json", *names], shrunk={"7B/params.json": [
            "dim", "n_heads", "n_layers"]}, notes=[
        "7B/params.json: the published file (vendored in published/meta--llama-7b) with dim, "
        "n_heads and n_layers shrunk; vocab_size -1 (from the tokenizer) kept",
        "tokenizer.model: a SentencePiece BPE trained on generated text in LLaMA's layout "
        "(<unk> 0, <s> 1, </s> 2, bytes 3..258, 32000 pieces); the real vocabulary is not "
        "reproduced",
        f"weights: random float16 in Meta's interleaved rotary layout, {shards} model-parallel "
        "shard(s) (plain-dict pickles, as Meta's consolidated.*.pth), rope.freqs included"])


def build_clip_vit_l14(out: Path, *, seed: int = 0) -> None:
    """openai/clip-vit-large-patch14 (224 px) as a `CLIPModel` (see the module docstring)."""
    from mmjobs.models.replicas.llava import write_clip

    write_clip(out, image_size=224, seed=seed, num_hidden_layers=CLIP_VISION_LAYERS)
    write_record(out, name="openai/clip-vit-large-patch14", published=[],
                 generated=["config.json", "pytorch_model.bin"],
                 shrunk={"vision_config": sorted(k for k in VISION_SIZES
                                                 if k != "num_hidden_layers"),
                         "text_config": sorted(VISION_SIZES)},
                 notes=["config.json: OpenAI CLIP ViT-L/14 at 224 px (what LaVIN's "
                        "clip.load('ViT-L/14') loads): patch 14, quick_gelu, projection 768; "
                        "vision width 32 but all 24 layers (LaVIN taps every 4th block)",
                        "weights: random float32 CLIPModel in one pickle with the position_ids "
                        "buffers older transformers saved; no preprocessor (LaVIN normalises "
                        "with ImageNet statistics itself)"])
