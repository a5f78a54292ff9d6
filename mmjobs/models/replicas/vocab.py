"""Locally trained vocabularies laid out like the real ones (the only trained part of a replica).

- `llama_sentencepiece`: a SentencePiece BPE model (`tokenizer.model`) with Llama-2's layout:
  `<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte-fallback pieces `<0x00>`..`<0xFF>` at 3..258,
  then merges learnt from generated text, padded with UNUSED pieces to exactly 32,000 pieces,
  so tokens the published configs add (`<image>` 32000, `<pad>` 32001) land on their real ids.
  Same normaliser settings as Llama-2 (identity, dummy prefix, digits split, byte fallback).
- `chameleon_tokenizer`: Chameleon's 65,536-entry layout: `<s>` 0, `<pad>` 1, `</s>` 2,
  `<unk>` 3, the 8,192 VQ codes `IMGIMG<code in letters>Z` at 4..8195 (code = id - 4),
  `<eoss>` 8196 (end of image), `<racm3:break>` 8197 (begin of image), `<reservedNNNNN>` at
  id NNNNN + 4 up to `<reserved08706>` 8710 (end of turn, the processor's sep token) and
  `<image>` 8711 (transformers' conversion renames `<reserved08707>`), then bytes, learnt
  merges and unused fillers. Those ids are from transformers' Chameleon conversion script and
  Chameleon's own vocabulary code; which ids hold which text pieces is not (no tokenizer file
  of the real model is stored here).

Fillers are never produced: BPE only emits pieces that merges build.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mmjobs.models.tiny import chameleon_code_token, chart_corpus

if TYPE_CHECKING:
    from transformers import LlamaTokenizer

LLAMA_VOCAB = 32000
CHAMELEON_VOCAB = 65536
CHAMELEON_CODES = 8192
CHAMELEON_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196,
                 "<racm3:break>": 8197, "<reserved08706>": 8710, "<image>": 8711}
_TRAINED_PIECES = 1000  # learnt vocabulary; enough for English/Korean chart text and prompts

_PROMPTS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.",
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "Answer the question using a single word or phrase.",
    "Describe the image in detail.", "What color is the car?", "How many people are there?",
    "The picture shows a dog sitting on a red sofa next to a window.",
)


def replica_corpus(n: int = 3000, seed: int = 0) -> Iterator[str]:
    """Generated text for the vocabularies: chart sentences plus chat-style prompts."""
    rng = random.Random(seed)
    for i, line in enumerate(chart_corpus(n, seed)):
        yield line
        if i % 3 == 0:
            yield rng.choice(_PROMPTS)


def llama_sentencepiece(path: Path, *, seed: int = 0) -> Path:
    """Write a Llama-2-layout SentencePiece BPE model (32,000 pieces) to `path`.

    Needs the `sentencepiece` package (as loading the real `tokenizer.model` files does).
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=replica_corpus(seed=seed), model_writer=buffer, model_type="bpe",
        vocab_size=_TRAINED_PIECES, hard_vocab_limit=False, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    unused = model_pb2.ModelProto.SentencePiece.UNUSED
    while len(proto.pieces) < LLAMA_VOCAB:
        piece = proto.pieces.add()
        piece.piece, piece.type, piece.score = f"<unused{len(proto.pieces) - 1}>", unused, 0.0
    proto.trainer_spec.vocab_size = LLAMA_VOCAB
    path.write_bytes(proto.SerializeToString())
    return path


def chameleon_tokenizer(*, seed: int = 0) -> LlamaTokenizer:
    """A `LlamaTokenizer` (the class transformers' Chameleon conversion writes) with Chameleon's
    65,536-id layout (see the module docstring), its special tokens and `sep_token`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    fixed = dict(CHAMELEON_IDS)
    for code in range(CHAMELEON_CODES):
        fixed[chameleon_code_token(code)] = 4 + code
    for token_id in range(8198, 8711):
        fixed.setdefault(f"<reserved{token_id - 4:05d}>", token_id)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    bpe.train_from_iterator(replica_corpus(seed=seed), trainers.BpeTrainer(
        vocab_size=len(bytes_) + _TRAINED_PIECES, special_tokens=bytes_, show_progress=False))
    learnt = json.loads(bpe.to_str())["model"]
    vocab = dict(fixed)
    next_id = max(fixed.values()) + 1
    for piece in sorted(learnt["vocab"], key=learnt["vocab"].get):
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    while next_id < CHAMELEON_VOCAB:
        vocab[f"<unused{next_id}>"] = next_id
        next_id += 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True,
                               add_eos_token=False, bos_token="<s>",
                               eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                               sep_token="<reserved08706>")
    specials = sorted((t for t in fixed if t not in {"<s>", "</s>", "<unk>", "<pad>"}),
                      key=fixed.get)
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.sep_token = "<reserved08706>"
    return tokenizer
