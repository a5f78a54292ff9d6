"""InternLM2's SentencePiece `tokenizer.model` -> a fast (`tokenizers`) tokenizer, no remote code.

The hub's `InternLMXComposer2Tokenizer` is a slow SentencePiece tokenizer shipped as remote
code. mmjobs needs character offsets (labels come from character spans), which only fast
tokenizers give, so the converter builds one from the same `tokenizer.model` with
transformers' SentencePiece reader (`SpmConverter.build_tokenizer_from_spm_proto`: it follows
the model's own normaliser settings, BPE merges ranked by piece score, byte fallback, and emits
user-defined pieces such as `[UNUSED_TOKEN_145]` whole, as SentencePiece does). Like the slow
tokenizer: BOS `<s>` is added in front, no EOS; `<s>`, `</s>`, `<unk>` written in text are
those special tokens (the slow tokenizer splits text at its special tokens); pad is `</s>`;
padding on the right. `legacy=True`: a dummy prefix (when the model has one) starts every
chunk between special tokens, as the slow tokenizer encodes each chunk on its own.

`check_against_sentencepiece` encodes sample texts with both and reports any difference, so a
conversion never silently changes token ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmjobs.models.xcomposer2.configuration import IMAGE_TOKEN

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
TURN_START, TURN_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
# The hub's mask_human_targets masks a user turn's end marker and the 5 tokens after it, which
# must be exactly "\n[UNUSED_TOKEN_146]assistant\n".
ASSISTANT_HEADER = f"\n{TURN_START}assistant\n"
ASSISTANT_HEADER_TOKENS = 5
_BPE = 2  # sentencepiece TrainerSpec.ModelType.BPE


class TokenizerConversionError(ValueError):
    """The SentencePiece model cannot be converted faithfully; the message says why."""


def read_spm(path: str | Path) -> Any:
    """The parsed SentencePiece `ModelProto` of `path`."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf's DecodeError has no common base we can name
        raise TokenizerConversionError(f"{path}: not a SentencePiece model ({e})") from e
    return proto


def fast_tokenizer(spm_path: str | Path, *, image_token: str = IMAGE_TOKEN,
                   model_max_length: int = 4096) -> Any:
    """A `TokenizersBackend` equivalent to the slow tokenizer of `spm_path`, with
    `image_token` added as a special token after the vocabulary.

    Raises:
        TokenizerConversionError: not a BPE model, or special pieces at unexpected ids.
    """
    from tokenizers import AddedToken, processors
    from transformers import TokenizersBackend
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_spm(spm_path)
    if proto.trainer_spec.model_type != _BPE:
        raise TokenizerConversionError(f"{spm_path}: a SentencePiece model of type "
                                       f"{proto.trainer_spec.model_type}; InternLM2's is BPE")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2}
    wrong = {p: vocab.get(p) for p, i in expected.items() if vocab.get(p) != i}
    if wrong:
        raise TokenizerConversionError(f"{spm_path}: special pieces at {wrong}; InternLM2 has "
                                       f"{expected}")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tokenizer = TokenizersBackend(tokenizer_object=backend, padding_side="right",
                                  clean_up_tokenization_spaces=False,
                                  model_max_length=model_max_length, **SPECIALS)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(image_token, special=True, normalized=False)]})
    return tokenizer


def check_against_sentencepiece(tokenizer: Any, spm_path: str | Path,
                                texts: Iterable[str]) -> list[str]:
    """Texts whose ids differ between `tokenizer` and SentencePiece itself (BOS + pieces), as
    messages; empty when they agree everywhere. Texts must not contain special tokens."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(spm_path))
    problems = []
    for text in texts:
        ours = tokenizer(text)["input_ids"]
        theirs = [processor.bos_id(), *processor.encode(text)]
        if ours != theirs:
            problems.append(f"{text[:60]!r}: {ours[:12]} != sentencepiece {theirs[:12]}")
    return problems


def assistant_header_problem(tokenizer: Any) -> str | None:
    """Why the hub's label masking would not line up with this tokenizer, or None."""
    ids = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(TURN_END)
    start = tokenizer.convert_tokens_to_ids(TURN_START)
    if len(ids) != ASSISTANT_HEADER_TOKENS or start not in ids:
        return (f"{ASSISTANT_HEADER!r} is {len(ids)} tokens {ids}; InternLM-XComposer2's "
                f"mask_human_targets assumes {ASSISTANT_HEADER_TOKENS}")
    if end is None or end == tokenizer.unk_token_id:
        return f"{TURN_END} is not a token"
    return None
