"""Tiny vision-language models built from configs, with a locally trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on generated chart text
(English + Korean + digits), the weights are random, and the result is saved as a normal
Hugging Face directory (`save_pretrained`, safetensors) that later stages load with
`AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` like any model.

- `build_tiny_llava`: CLIP vision tower (width 64, 2 layers) + `mlp2x_gelu` projector + Llama
  (width 128, 2 layers). A 56x56 image becomes (56/14)^2 = 16 image tokens: the processor's
  `patch_size`, `num_additional_image_tokens` (CLS) and `vision_feature_select_strategy`
  ("default" drops CLS) are set so its `<image>` expansion equals what the model consumes.
- `build_tiny_chameleon`: Chameleon (width 64, 2 layers) + a VQ-VAE encoder turning a 32x32
  image into (32/8)^2 = 16 discrete codes; the tokenizer holds one token per code, named
  `IMGIMG<code in letters A-J>Z` as Chameleon's `vocabulary_map` requires. The matching VQ
  decoder (codes -> 32x32 image, for interleaved generation) is saved next to the weights as
  `vq_decoder.safetensors`: transformers' Chameleon class has no decoder module, so
  `save_pretrained` could not write it and `from_pretrained` would drop it; it is loaded by
  `mmjobs.models.vq_decoder` (see there). Its weights are random like the rest, so decoded
  images are deterministic but not pictures of anything.

CLI: `python -m mmjobs.models.tiny llava|chameleon OUT_DIR`.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmjobs import storage
from mmjobs.logs import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = get_logger(__name__)

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END_OF_TURN = "<|end|>"
# Fixed order, so ids are stable: <pad>=0, <s>=1, </s>=2, <image>=3.
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE_TOKEN, *ROLE_TOKENS, END_OF_TURN)
# Chameleon's processor hardcodes these names for begin/end of image and the chat separator.
CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_SEP = "<racm3:break>", "<eoss>", "<reserved08706>"
CHAMELEON_MULTIPLIERS = [1, 1, 2, 2]  # the tiny VQ encoder's levels: 8x downsampling

# Renders system/user turns as `<|role|>\n{text}<|end|>\n` and assistant turns as
# `<|assistant|>\n{text}</s>\n`. The `{% generation %}` block covers exactly the assistant text
# and its `</s>`: that is what the model must learn to produce (and stop on), so the label mask
# (`return_assistant_tokens_mask` or mmjobs' pretokenizer) covers those tokens and nothing else.
# Content may be a string with `<image>` markers (mmjobs' canonical format) or a list of
# `{"type": "image"}` / `{"type": "text", "text": ...}` parts (HF processors' chat format).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}{%- generation -%}{{- text + eos_token -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}{{- '<|' + message['role'] + '|>\n' + text + '<|end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

_EN_CHARTS = ("bar chart", "line chart", "pie chart", "stacked bar chart", "table")
_EN_METRICS = ("sales", "population", "revenue", "exports", "growth rate", "share", "price")
_EN_LABELS = ("Seoul", "Busan", "Korea", "Japan", "USA", "Q1", "Q2", "Q3", "Q4", "total")
_EN_UNITS = ("%", " million", " won", " tons", " people", " units")
_KO_CHARTS = ("막대 그래프", "꺾은선 그래프", "원 그래프", "누적 막대 그래프", "표")
_KO_METRICS = ("매출", "인구", "수출", "증가율", "점유율", "가격", "생산량")
_KO_LABELS = ("서울", "부산", "한국", "일본", "미국", "1분기", "2분기", "합계")
_KO_UNITS = ("%", "억 원", "명", "톤", "개")


def chart_corpus(n: int = 3000, seed: int = 0) -> Iterator[str]:
    """Generated chart sentences (English, Korean, numbers) to train a tiny tokenizer on."""
    rng = random.Random(seed)
    for i in range(n):
        year = rng.randint(1990, 2025)
        value = rng.choice([str(rng.randint(0, 9999)), f"{rng.uniform(0, 100):.1f}"])
        if i % 2 == 0:
            yield rng.choice((
                f"The {rng.choice(_EN_CHARTS)} shows {rng.choice(_EN_METRICS)} from {year} to "
                f"{year + rng.randint(1, 10)}.",
                f"{rng.choice(_EN_LABELS)} is {value}{rng.choice(_EN_UNITS)} in {year}.",
                f"Question: What is the {rng.choice(_EN_METRICS)} of {rng.choice(_EN_LABELS)}? "
                f"Answer: {value}",
                f"Convert the chart to a table. | year | {rng.choice(_EN_METRICS)} |\n"
                f"| {year} | {value} |",
            ))
        else:
            yield rng.choice((
                f"{rng.choice(_KO_CHARTS)}는 {year}년부터 {year + rng.randint(1, 10)}년까지의 "
                f"{rng.choice(_KO_METRICS)}을 보여줍니다.",
                f"{rng.choice(_KO_LABELS)}의 {rng.choice(_KO_METRICS)}은 {value}"
                f"{rng.choice(_KO_UNITS)}입니다.",
                f"질문: {year}년 {rng.choice(_KO_LABELS)}의 {rng.choice(_KO_METRICS)}은 "
                f"얼마입니까? 답: {value}",
                f"차트를 표로 변환하세요. | 연도 | {rng.choice(_KO_METRICS)} |\n"
                f"| {year} | {value} |",
            ))


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1000, *,
                         extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    Byte-level means any text encodes (no unknown tokens), including Korean the corpus never
    showed. Special tokens get the first ids in `SPECIAL_TOKENS` order, then
    `extra_special_tokens`; the tokenizer carries `CHAT_TEMPLATE` and `image_token`.

    Args:
        texts: training text (e.g. `chart_corpus()`).
        vocab_size: total vocabulary size including special tokens.
        extra_special_tokens: more never-split tokens (Chameleon's image-code tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    if vocab_size <= len(specials) + 256:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges: it must exceed "
                         f"{len(specials) + 256} (special tokens + 256 byte tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chameleon_code_token(code: int) -> str:
    """Name of the token for VQ code `code` (`12` -> `IMGIMGBCZ`), as Chameleon expects."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def default_token_ids() -> dict[str, int]:
    """The special-token ids every tiny tokenizer gets (`SPECIAL_TOKENS` order)."""
    return {"pad_token_id": SPECIAL_TOKENS.index(PAD), "bos_token_id": SPECIAL_TOKENS.index(BOS),
            "eos_token_id": SPECIAL_TOKENS.index(EOS)}


def tiny_llava_config(*, image_size: int = 56, patch_size: int = 14, vocab_size: int = 1000,
                      token_ids: dict[str, int] | None = None,
                      image_token_id: int = SPECIAL_TOKENS.index(IMAGE_TOKEN)):
    """The `LlavaConfig` of `build_tiny_llava` (CLIP width 64 + mlp2x_gelu + Llama width 128,
    2 layers each) for a tokenizer of `vocab_size` tokens with these special ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, projection_dim=64)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab_size,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       **(token_ids or default_token_ids()))
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        projector_hidden_act="gelu",  # Linear-GELU-Linear: LLaVA-1.5's mlp2x_gelu
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        # The patches per image ("default" drops CLS); LlavaConfig's default 576 is LLaVA-1.5's.
        image_seq_length=(image_size // patch_size) ** 2,
    )


def tiny_chameleon_config(*, image_size: int = 32, num_codes: int = 64, vocab_size: int = 1000,
                          token_ids: dict[str, int] | None = None,
                          vocabulary_map: dict[str, int] | None = None):
    """The `ChameleonConfig` of `build_tiny_chameleon` (width 64, 2 layers; VQ encoder with
    channel multipliers 1,1,2,2). `vocabulary_map` defaults to the `<image>` id alone, enough
    to build the model's modules (the image-token lookups are computed when first used)."""
    from transformers import ChameleonConfig, ChameleonVQVAEConfig

    vq = ChameleonVQVAEConfig(embed_dim=32, num_embeddings=num_codes, latent_channels=32,
                              resolution=image_size, base_channels=32,
                              channel_multiplier=CHAMELEON_MULTIPLIERS, num_res_blocks=1,
                              attn_resolutions=[])
    return ChameleonConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        vq_config=vq.to_dict(),
        vocabulary_map=vocabulary_map or {IMAGE_TOKEN: SPECIAL_TOKENS.index(IMAGE_TOKEN)},
        **(token_ids or default_token_ids()))


def build_tiny_llava(out_dir: str | Path, *, image_size: int = 56, patch_size: int = 14,
                     vocab_size: int = 1000, seed: int = 0) -> Path:
    """Build a tiny LLaVA (CLIP + mlp2x_gelu + Llama), save model + processor to `out_dir`.

    Each image becomes `(image_size // patch_size) ** 2` image tokens (16 by default).

    Returns:
        `out_dir`, loadable with `AutoModelForImageTextToText` and `AutoProcessor`.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    tokenizer = train_tiny_tokenizer(chart_corpus(seed=seed), vocab_size)
    config = tiny_llava_config(image_size=image_size, patch_size=patch_size,
                               vocab_size=len(tokenizer), token_ids=_token_ids(tokenizer),
                               image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=_image_processor("clip", image_size), tokenizer=tokenizer,
        patch_size=patch_size, vision_feature_select_strategy="default",
        # CLIP prepends a CLS embedding (+1) that the "default" strategy drops again (-1).
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return _save(out_dir, model, processor)


def build_tiny_chameleon(out_dir: str | Path, *, image_size: int = 32, num_codes: int = 64,
                         vocab_size: int = 1000, seed: int = 0) -> Path:
    """Build a tiny Chameleon with a VQ-VAE image tokenizer, save model + processor.

    The VQ encoder downsamples 8x (channel multipliers (1, 1, 2, 2), all channel counts
    multiples of 32 for GroupNorm), so an image is `(image_size // 8) ** 2` codes (16 by
    default) from a codebook of `num_codes`. `model.model.get_image_tokens(pixel_values)`
    returns their token ids, shape `(batch, codes_per_image)`.
    """
    import torch
    from transformers import ChameleonForConditionalGeneration, ChameleonProcessor

    downsample = 2 ** (len(CHAMELEON_MULTIPLIERS) - 1)
    if image_size % downsample:
        raise ValueError(f"image_size={image_size} must be a multiple of {downsample}")
    code_tokens = [chameleon_code_token(i) for i in range(num_codes)]
    tokenizer = train_tiny_tokenizer(
        chart_corpus(seed=seed), vocab_size,
        extra_special_tokens=[CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_SEP, *code_tokens])
    tokenizer.add_special_tokens({"sep_token": CHAMELEON_SEP})
    config = tiny_chameleon_config(image_size=image_size, num_codes=num_codes,
                                   vocab_size=len(tokenizer), token_ids=_token_ids(tokenizer),
                                   vocabulary_map=tokenizer.get_vocab())
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config)
    processor = ChameleonProcessor(image_processor=_image_processor("chameleon", image_size),
                                   tokenizer=tokenizer,
                                   image_seq_length=(image_size // downsample) ** 2)
    processor.chat_template = CHAT_TEMPLATE
    out = _save(out_dir, model, processor)
    save_vq_decoder(out, model.config.vq_config, seed=seed)
    return out


def save_vq_decoder(out_dir: str | Path, vq_config, *, seed: int = 0) -> Path:
    """Write a randomly initialised VQ decoder for `vq_config` to `out_dir/vq_decoder.safetensors`.

    Tensors are named `model.vqmodel.decoder.*`, as in Anole / Align-Anything checkpoints, so
    `mmjobs.models.vq_decoder.find_decoder_weights` reads this file and those the same way. The
    global RNG is left untouched (the decoder draws from its own seed).
    """
    import torch
    from safetensors.torch import save_file

    from mmjobs.models.vq_decoder import DECODER_FILE, VQ_PREFIX, VQDecoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        decoder = VQDecoder(vq_config)
    path = Path(out_dir) / DECODER_FILE
    save_file({f"{VQ_PREFIX}decoder.{k}": v.contiguous() for k, v in
               decoder.state_dict().items()}, str(path), metadata={"format": "pt"})
    return path


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def _image_processor(kind: str, size: int):
    """The PIL-backed image processor (the torchvision one needs torchvision, absent on CPU)."""
    if kind == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size},
                                     crop_size={"height": size, "width": size})
    from transformers.models.chameleon.image_processing_pil_chameleon import (
        ChameleonImageProcessorPil,
    )

    return ChameleonImageProcessorPil(size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})


def _save(out_dir: str | Path, model, processor) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)  # safetensors is the default
    processor.save_pretrained(out)  # also writes the tokenizer and the chat template
    storage.private_to_shared(out, tree=True)  # transformers saves weights 0600 (mkstemp)
    log.info("saved tiny %s (%d parameters) to %s", model.config.model_type,
             sum(p.numel() for p in model.parameters()), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mmjobs.models.tiny llava|chameleon OUT_DIR`."""
    parser = argparse.ArgumentParser(prog="python -m mmjobs.models.tiny",
                                     description="Build a tiny model from configs (no downloads).")
    parser.add_argument("kind", choices=["llava", "chameleon"])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build = build_tiny_llava if args.kind == "llava" else build_tiny_chameleon
    print(build(args.out_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
