"""Meta's original LLaMA checkpoints (`consolidated.*.pth` + `params.json` + `tokenizer.model`)
-> transformers' `LlamaForCausalLM` in safetensors.

    convert_meta_llama("weights/7B", out)       # tokenizer.model here or one folder up
    convert_meta_llama("weights", out)          # the same: its only size folder
    mmjobs stage convert --set source=s3://raw/llama-7b --set to=s3://models/llama-7b

Input, as Meta released LLaMA-1 (and LaVIN reads it, `<weights>/7B/params.json`,
`<weights>/7B/consolidated.00.pth`, `<weights>/tokenizer.model`):
- `params.json`: `dim`, `n_layers`, `n_heads`, `norm_eps`, `multiple_of`, `vocab_size` (-1 =
  take it from the tokenizer), optionally `n_kv_heads`, `ffn_dim_multiplier`, `rope_theta`;
- `consolidated.00.pth` ... `consolidated.NN.pth`: one model-parallel shard each (13B: 2,
  65B: 8), read with `torch.load(weights_only=True)` only; keys `tok_embeddings.weight`,
  `norm.weight`, `output.weight`, `layers.{i}.attention.{wq,wk,wv,wo}.weight`,
  `layers.{i}.feed_forward.{w1,w2,w3}.weight`, `layers.{i}.{attention,ffn}_norm.weight`, and
  `rope.freqs` (the RoPE inverse frequencies, recomputed by transformers: checked, dropped);
- `tokenizer.model` (SentencePiece), next to the shards or in the folder above.

Decisions:
- **Shards** are merged as LaVIN (and Meta's fairscale layers) split them: column-parallel
  `wq/wk/wv/w1/w3` and `output` along dim 0, row-parallel `wo/w2` and `tok_embeddings` along
  dim 1, norms replicated (checked equal across shards).
- **Rotary layout.** Meta's RoPE rotates interleaved pairs (dims 2i, 2i+1 as a complex
  number); transformers' Llama rotates halves (dims i and i + head_dim/2). `wq` and `wk` rows
  are permuted per head so the two compute the same attention (the permutation of
  transformers' `convert_llama_weights_to_hf`); the tests compare logits against a Meta-layout
  forward written independently.
- **Sizes.** The FFN width is read off `w1` and checked against Meta's rule (4*dim, x2/3, x
  ffn_dim_multiplier, rounded up to `multiple_of`: 11008 for 7B). `vocab_size: -1` takes the
  tokenizer's piece count (32,000), which must equal the embedding rows.
- **Tokenizer.** `LlamaTokenizer` from `tokenizer.model` (BOS `<s>` 1, EOS `</s>` 2, `<unk>`
  0; BOS added, EOS not), `model_max_length` 2048 (LLaMA-1's context); no padding token and no
  chat template (LLaMA is not a chat model).
- **dtype.** Tensors keep their stored dtype (fp16) unless `dtype` casts them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mmjobs.logs import get_logger
from mmjobs.models.convert.checkpoints import ConversionError, load_tensors, save_sharded

log = get_logger(__name__)

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
MAX_POSITIONS = 2048  # LLaMA-1's training context
_REQUIRED = ("dim", "n_layers", "n_heads", "norm_eps")
_KNOWN = {*_REQUIRED, "multiple_of", "vocab_size", "n_kv_heads", "ffn_dim_multiplier",
          "rope_theta", "max_seq_len", "max_batch_size"}
# How fairscale's model-parallel layers split each weight (dim; -1 = replicated).
_SPLIT = {"tok_embeddings.weight": 1, "norm.weight": -1, "output.weight": 0,
          "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
          "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
          "feed_forward.w3.weight": 0, "attention_norm.weight": -1, "ffn_norm.weight": -1}
_HF_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight",
             "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight",
             "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight",
             "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}


def _is_size_folder(root: Path) -> bool:
    return (root / PARAMS).is_file() and any(SHARD.match(p.name) for p in root.iterdir())


def size_folder(path: str | Path) -> Path | None:
    """The folder with `params.json` + `consolidated.*.pth`: `path` itself, or its only size
    folder (`<weights>/7B` when `path` is Meta's/LaVIN's `<weights>` with `tokenizer.model`);
    None when `path` is not in Meta's layout."""
    root = Path(path)
    if not root.is_dir():
        return None
    if _is_size_folder(root):
        return root
    sizes = [p for p in root.iterdir() if p.is_dir() and _is_size_folder(p)]
    return sizes[0] if len(sizes) == 1 and (root / TOKENIZER).is_file() else None


def is_meta_llama(path: str | Path) -> bool:
    """True for Meta's layout: a size folder (`params.json` + `consolidated.*.pth`), or a
    `<weights>` folder holding `tokenizer.model` and exactly one size folder."""
    return size_folder(path) is not None


def read_params(path: Path) -> dict[str, Any]:
    """`params.json`, checked: the required keys, numbers, no unknown keys.

    Raises:
        ConversionError: naming the file and the key.
    """
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: missing; a Meta LLaMA folder holds params.json next "
                              "to consolidated.*.pth") from e
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(params, dict):
        raise ConversionError(f"{path}: holds a JSON {type(params).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in params]
    unknown = sorted(set(params) - _KNOWN)
    if missing or unknown:
        raise ConversionError(f"{path}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unknown keys {unknown} (not a LLaMA-1/2 params.json?)"] if unknown else [])))
    bad = [k for k, v in params.items() if v is not None and not isinstance(v, int | float)]
    if bad:
        raise ConversionError(f"{path}: {', '.join(bad)} must be numbers")
    return params


def find_tokenizer(src: Path, tokenizer: str | Path | None = None) -> Path:
    """`tokenizer`, or `tokenizer.model` in `src` or its parent (LaVIN's `<weights>/`).

    Raises:
        ConversionError: none found.
    """
    candidates = [Path(tokenizer)] if tokenizer else [src / TOKENIZER, src.parent / TOKENIZER]
    for path in candidates:
        if path.is_file():
            return path
    raise ConversionError(f"{src}: no {TOKENIZER} here or in {src.parent} (Meta ships one "
                          "tokenizer.model for all sizes, beside the size folders); pass its "
                          "path as tokenizer")


def shard_files(src: Path) -> list[Path]:
    """`consolidated.00.pth`, `.01`, ... in order; the numbers must run 0..N-1.

    Raises:
        ConversionError: no shards, or a gap in the numbering.
    """
    found = sorted((int(m.group(1)), p) for p in src.iterdir() if (m := SHARD.match(p.name)))
    if not found:
        raise ConversionError(f"{src}: no consolidated.*.pth files")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise ConversionError(f"{src}: shard numbers {numbers}; expected 00..{len(found) - 1:02d}"
                              " (an incomplete download?)")
    return [p for _, p in found]


def merge_shards(shards: list[dict[str, torch.Tensor]], n_layers: int,
                 files: list[Path]) -> dict[str, torch.Tensor]:
    """One state dict from model-parallel shards (see the module docstring).

    Raises:
        ConversionError: a key missing from a shard, an unknown key, or replicated weights
            that differ between shards.
    """
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(n_layers):
        expected |= {f"layers.{i}.{name}" for name in _SPLIT if "." in name
                     and name.split(".")[0] in ("attention", "feed_forward")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    for shard, path in zip(shards, files, strict=True):
        names = set(shard) - {"rope.freqs"}
        missing, extra = sorted(expected - names), sorted(names - expected)
        if missing or extra:
            raise ConversionError(f"{path}: does not match params.json's {n_layers} layers "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(expected):
        dim = _SPLIT[name.split(".", 2)[2] if name.startswith("layers.") else name]
        parts = [shard[name] for shard in shards]
        if dim < 0:
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise ConversionError(f"{name}: replicated in every shard but the copies differ "
                                      f"({', '.join(p.name for p in files)})")
            merged[name] = parts[0]
        else:
            merged[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    return merged


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a `wq`/`wk` weight `[heads * head_dim, dim]` reordered per head from Meta's
    interleaved RoPE pairs to transformers' rotate-half layout."""
    rows, cols = weight.shape
    return (weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2)
            .reshape(rows, cols))


def ffn_width(params: dict[str, Any]) -> int:
    """Meta's FFN width rule (11008 for dim 4096, multiple_of 256)."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple = int(params.get("multiple_of") or 256)
    return multiple * math.ceil(hidden / multiple)


def sentencepiece_vocab(path: Path) -> int:
    """Pieces in a SentencePiece model (needs the `sentencepiece` package)."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"{path}: not a SentencePiece model ({e})") from e


def convert_meta_llama(src_dir: str | Path, out_dir: str | Path, *,
                       tokenizer: str | Path | None = None, dtype: str | None = None,
                       max_shard_size: int | str = "5GB") -> dict[str, Any]:
    """Convert a Meta LLaMA folder (see the module docstring) into `out_dir`.

    Returns:
        A JSON-able summary (sizes, shards merged, files).

    Raises:
        ConversionError (UnsafeCheckpointError for a pickle that needs code).
    """
    from transformers import LlamaConfig

    src, out = size_folder(src_dir) or Path(src_dir), Path(out_dir)
    params = read_params(src / PARAMS)
    files = shard_files(src)
    tokenizer_path = find_tokenizer(src, tokenizer)
    n_layers, n_heads, dim = int(params["n_layers"]), int(params["n_heads"]), int(params["dim"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise ConversionError(f"{src / PARAMS}: dim {dim} must divide by n_heads {n_heads}, and "
                              f"n_heads by n_kv_heads {n_kv}")
    shards = [load_tensors(path) for path in files]
    theta = float(params.get("rope_theta") or 10000.0)
    _check_rope(shards, files, dim // n_heads, theta)
    meta = merge_shards(shards, n_layers, files)
    del shards
    vocab = int(params.get("vocab_size") or -1)
    pieces = sentencepiece_vocab(tokenizer_path)
    if vocab <= 0:
        vocab = pieces
    rows = meta["tok_embeddings.weight"].shape[0]
    if rows != vocab or meta["output.weight"].shape[0] != vocab:
        raise ConversionError(f"{src}: embeddings have {rows} rows but the vocabulary is {vocab} "
                              f"({'params.json' if params.get('vocab_size', -1) > 0 else TOKENIZER}"
                              "); tokenizer and weights do not belong together")
    width = meta["layers.0.feed_forward.w1.weight"].shape[0]
    if width != ffn_width(params):
        raise ConversionError(f"{src}: w1 has {width} rows, but params.json's dim/multiple_of/"
                              f"ffn_dim_multiplier give {ffn_width(params)}")
    tensors = _hf_tensors(meta, n_layers, n_heads, n_kv)
    if dtype is not None:
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    config = LlamaConfig(
        hidden_size=dim, intermediate_size=width, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=vocab,
        rms_norm_eps=float(params["norm_eps"]), max_position_embeddings=MAX_POSITIONS,
        rope_theta=theta, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _check_layout(tensors, config)
    out.mkdir(parents=True, exist_ok=True)
    weight_files = save_sharded(tensors, out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    _save_tokenizer(tokenizer_path, out, pieces)
    _save_generation_config(out)
    log.info("converted Meta LLaMA %s (%d shard(s), %d layers, vocabulary %d) -> %s", src,
             len(files), n_layers, vocab, out)
    return {"kind": "meta_llama", "source": str(src), "tokenizer": str(tokenizer_path),
            "shards": [p.name for p in files], "layers": n_layers, "hidden_size": dim,
            "intermediate_size": width, "vocab_size": vocab, "tensors": len(tensors),
            "weight_files": weight_files, "dropped": ["rope.freqs"]}


def _check_rope(shards: list[dict[str, torch.Tensor]], files: list[Path], head_dim: int,
                theta: float) -> None:
    """Meta's stored `rope.freqs` must be the inverse frequencies transformers recomputes."""
    expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for shard, path in zip(shards, files, strict=True):
        freqs = shard.get("rope.freqs")
        if freqs is None:
            continue
        if freqs.shape != expected.shape or not torch.allclose(freqs.float(), expected,
                                                                rtol=1e-3, atol=1e-6):
            raise ConversionError(f"{path}: rope.freqs is not 1/theta^(2i/head_dim) with "
                                  f"theta {theta:g}, head_dim {head_dim}; set rope_theta in "
                                  "params.json to the value it was trained with")


def _hf_tensors(meta: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                n_kv: int) -> dict[str, torch.Tensor]:
    tensors = {"model.embed_tokens.weight": meta["tok_embeddings.weight"],
               "model.norm.weight": meta["norm.weight"],
               "lm_head.weight": meta["output.weight"]}
    for i in range(n_layers):
        for name, hf in _HF_NAMES.items():
            weight = meta[f"layers.{i}.{name}"]
            if name == "attention.wq.weight":
                weight = permute_rotary(weight, n_heads)
            elif name == "attention.wk.weight":
                weight = permute_rotary(weight, n_kv)
            tensors[f"model.layers.{i}.{hf}"] = weight.contiguous()
    return tensors


def _check_layout(tensors: dict[str, torch.Tensor], config: Any) -> None:
    """The tensors must be exactly transformers' Llama's, with its shapes."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k])
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra or wrong:
        raise ConversionError(f"converted tensors do not fit LlamaForCausalLM: missing "
                              f"{missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]}")


def _save_tokenizer(path: Path, out: Path, pieces: int) -> None:
    """`tokenizer.model` copied, a `LlamaTokenizer` config and its `tokenizer.json`."""
    from transformers import AutoTokenizer

    shutil.copyfile(path, out / TOKENIZER)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "model_max_length": MAX_POSITIONS, "legacy": False,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    try:
        tokenizer = AutoTokenizer.from_pretrained(out)
    except (OSError, ValueError, ImportError) as e:
        raise ConversionError(f"{path}: transformers cannot read it as a LLaMA tokenizer ({e})"
                              ) from e
    if len(tokenizer) != pieces or tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) \
            != [0, 1, 2]:
        raise ConversionError(f"{path}: expected LLaMA's layout (<unk> 0, <s> 1, </s> 2, "
                              f"{pieces} pieces); got {len(tokenizer)} tokens")
    tokenizer.save_pretrained(out)


def _save_generation_config(out: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
