"""Interleaved text-and-image answers from image-token models (Chameleon): generate, decode, save.

Align-Anything trains Chameleon-7B to answer with text *and* images, then generates with a
separate repository (mmsg_chameleon) because upstream transformers cannot: its
`ChameleonForConditionalGeneration.forward` sets the logits of every image-code token to the
dtype's minimum ("Disallow image tokens"), and its `ChameleonVQVAE` has an encoder but no
decoder. This module supplies both missing halves:

- `enable_image_generation(model)` lets the model score its image-code tokens again (the
  forward's mask list is emptied; the code <-> token mapping is kept). Training needs it too:
  with the mask, a response whose image tokens are in the labels has an infinite loss and no
  gradient towards those tokens.
- `VQDecoder` is Chameleon's VQ-GAN decoder in the taming-transformers layout that Anole and
  Align-Anything checkpoints store under `model.vqmodel.decoder.*`; `ImageDecoder` loads it
  and turns a span of image-code tokens back into a picture.
- `ImageSpanLogitsProcessor` makes batched `generate` emit well-formed image spans:
  begin-image, exactly `image_seq_length` code tokens (the VQ grid, 16 for the tiny model,
  1024 for Chameleon-7B), end-image; outside a span, code tokens are never sampled.
- `InterleavedGenerator` is `mmjobs.eval.generate.Generator` with those constraints; each answer
  comes back as ordered parts (`TextPart`, `ImagePart` with a PIL image).

**Where the decoder weights come from** (`find_decoder_weights`): transformers' Chameleon
class has no decoder module, so `save_pretrained` never writes one and `from_pretrained`
ignores one. Decoder tensors are therefore read by this module straight from safetensors:
`vq_decoder.safetensors` in the model directory (what `mmjobs.models.tiny` writes), else the
`model.vqmodel.decoder.*` tensors of the model's own weights (Anole / Align-Anything
checkpoints). The codebook (`quantize.embedding`) and `post_quant_conv` come from the same file
when it has them, else from the loaded model. A fully fine-tuned or merged model is saved by
transformers without the decoder; point `vq_decoder` at the base model then (the image
tokenizer is frozen in every mmjobs training mode, so the base's decoder fits).

**Predictions schema** (`output_fields`, used by the infer stage with `modalities: [text,
image]`): besides `id`, `prompt` and `prediction` (the answer text with one `<image>` where
each generated image is), a row holds

- `parts`: the answer in order, `{"type": "text", "text": ...}` and
  `{"type": "image", "path": "images/<id>-<k>.png"}`;
- `output_images`: the generated images' paths, relative to the folder of
  `predictions.jsonl` (the PNGs are written there, under `images/`, and committed with it);
- `images`: the prompt's image URIs followed by `output_images`, in the order of the
  `<image>` markers of prompt and answer (what the judge attaches; give the evaluate stage
  `judge.image_root` = the infer output so it finds the relative ones);
- `incomplete_images`: image spans cut off before their end (not decoded; normally 0, since
  an image is only started when `max_new_tokens` leaves room for all of it).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmjobs import storage
from mmjobs.data.records import IMAGE_TOKEN
from mmjobs.eval.generate import BatchOutput, Generator, trim_at_stop
from mmjobs.logs import get_logger
from mmjobs.models.image_tokens import (
    enable_image_generation,
    image_code_tokens,
    vocabulary_owner,
)

if TYPE_CHECKING:
    from PIL import Image

    from mmjobs.models.builder import LoadedModel

__all__ = ["ImageDecoder", "ImagePart", "ImageSpanLogitsProcessor", "InterleavedBatchOutput",
           "InterleavedGenerator", "TextPart", "VQDecoder", "copy_output_images",
           "enable_image_generation", "find_decoder_weights", "output_fields"]

log = get_logger(__name__)

DECODER_FILE = "vq_decoder.safetensors"
VQ_PREFIX = "model.vqmodel."
IMAGES_DIR = "images"


# --------------------------------------------------------------------------- VQ decoder


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(hidden, scale_factor=2.0,
                                                         mode="nearest"))


class VQDecoder(nn.Module):
    """Chameleon's VQ-GAN decoder: quantized latents `[B, latent, h, w]` -> pixels `[B, 3, H, W]`.

    The mirror of transformers' `ChameleonVQVAEEncoder` (taming-transformers' `Decoder`), built
    from the same `ChameleonVQVAEConfig`, with the parameter names Anole / Align-Anything
    checkpoints use under `model.vqmodel.decoder.`: `conv_in`, `mid.{block_1,attn_1,block_2}`,
    `up.<level>.{block,attn,upsample}`, `norm_out`, `conv_out`. Output pixels are in the image
    processor's normalised range ([-1, 1] for Chameleon).
    """

    def __init__(self, config: Any, out_channels: int = 3) -> None:
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderAttnBlock as AttnBlock,
        )
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderResnetBlock as ResnetBlock,
        )

        super().__init__()
        multipliers = list(config.channel_multiplier)
        self.num_resolutions = len(multipliers)
        self.num_res_blocks = config.num_res_blocks
        block_in = config.base_channels * multipliers[-1]
        resolution = config.resolution // 2 ** (self.num_resolutions - 1)
        vanilla = config.attn_type == "vanilla"
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(config=config, in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = AttnBlock(block_in) if vanilla else nn.Identity()
        self.mid.block_2 = ResnetBlock(config=config, in_channels=block_in, out_channels=block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = config.base_channels * multipliers[level]
            for _ in range(self.num_res_blocks + 1):
                blocks.append(ResnetBlock(config=config, in_channels=block_in,
                                          out_channels=block_out))
                block_in = block_out
                if config.attn_resolutions and resolution in config.attn_resolutions and vanilla:
                    attns.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level != 0:
                up.upsample = _Upsample(block_in)
                resolution *= 2
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(hidden)
        hidden = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hidden)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                hidden = block(hidden)
                if len(up.attn):
                    hidden = up.attn[i](hidden)
            if level != 0:
                hidden = up.upsample(hidden)
        hidden = self.norm_out(hidden)
        hidden = hidden * torch.sigmoid(hidden)
        return self.conv_out(hidden)


def find_decoder_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The VQ tensors of `source` under `model.vqmodel.`, prefix removed (`decoder.*`, and
    `quantize.embedding.weight` / `post_quant_conv.*` when present).

    `source`: a `.safetensors` file, or a model directory (local, `s3://` or a hub id) holding
    `vq_decoder.safetensors` or weights with `model.vqmodel.decoder.*` tensors. From S3 only
    the files holding decoder tensors are downloaded (verified against the manifest).

    Raises:
        FileNotFoundError: `source` has no decoder tensors (say where they are with the infer
            stage's `vq_decoder`).
    """
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in _decoder_files(str(source)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                name = key[len(VQ_PREFIX):] if key.startswith(VQ_PREFIX) else key
                if name.startswith(("decoder.", "quantize.", "post_quant_conv.")):
                    state.setdefault(name, f.get_tensor(key))
        if any(k.startswith("decoder.") for k in state):
            return state
    raise FileNotFoundError(
        f"{source}: no VQ decoder weights (looked for {DECODER_FILE} and {VQ_PREFIX}decoder.* "
        "tensors). transformers' Chameleon checkpoints (e.g. facebook/chameleon-7b) ship "
        "the VQ encoder only; use a checkpoint with the decoder (Anole, Align-Anything's "
        "AA-chameleon-7b-base) or set vq_decoder to a safetensors file holding it")


def _decoder_files(source: str) -> list[Path]:
    """Local safetensors files that may hold decoder tensors, most specific first."""
    if source.endswith(".safetensors"):
        if storage.is_s3(source):
            return [_fetch(source)]
        return [Path(storage.parse(source).key)]
    if storage.is_s3(source):
        return _s3_decoder_files(source)
    from mmjobs.models.builder import resolve_model_dir

    root = resolve_model_dir(source)
    files = [root / DECODER_FILE] if (root / DECODER_FILE).is_file() else []
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files += [root / n for n in sorted({f for k, f in weight_map.items()
                                            if k.startswith(VQ_PREFIX + "decoder.")})]
    elif (root / "model.safetensors").is_file():
        files.append(root / "model.safetensors")
    return files


def _s3_decoder_files(source: str) -> list[Path]:
    names = []
    if storage.exists(storage.join(source, DECODER_FILE)):
        names.append(DECODER_FILE)
    index = storage.join(source, "model.safetensors.index.json")
    if storage.exists(index):
        weight_map = json.loads(storage.read_text(index))["weight_map"]
        names += sorted({f for k, f in weight_map.items()
                         if k.startswith(VQ_PREFIX + "decoder.")})
    elif storage.exists(storage.join(source, "model.safetensors")):
        names.append("model.safetensors")
    return [_fetch(storage.join(source, n)) for n in names]


def _fetch(uri: str) -> Path:
    """A verified local copy of one S3 file, cached by its manifest sha256 when committed."""
    from mmjobs import settings
    from mmjobs.models.builder import committed_root

    sha = None
    try:
        _, rel, manifest = committed_root(uri.rsplit("/", 1)[0])
        name = "/".join(p for p in (rel, uri.rsplit("/", 1)[1]) if p)
        sha = next((e.sha256 for e in manifest.files if e.path == name), None)
    except storage.StoreError:
        pass
    key = sha or hashlib.sha256(uri.encode()).hexdigest()
    target = settings.home() / "cache" / "vq-decoders" / key / uri.rsplit("/", 1)[1]
    if target.is_file() and (sha is None or storage.sha256_file(target) == sha):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    storage.get_file(uri, target)
    if sha is not None and storage.sha256_file(target) != sha:
        target.unlink()
        raise storage.IntegrityError(f"{uri}: sha256 differs from its manifest")
    return target


class ImageDecoder:
    """Image-code tokens -> PIL images, with a model's VQ codebook and decoder.

    Args:
        model: the loaded Chameleon (its `vqmodel` gives the codebook and `post_quant_conv`
            unless the decoder file has its own).
        processor: its processor (`image_seq_length`, and the image processor's
            normalisation, inverted to get pixels back).
        source: where the decoder weights are (see `find_decoder_weights`).
    """

    def __init__(self, model: nn.Module, processor: Any, source: str | Path) -> None:
        owner = vocabulary_owner(model)
        vq = owner.vqmodel
        config = vq.config
        state = find_decoder_weights(source)
        self.decoder = VQDecoder(config, out_channels=getattr(config, "out_channels", 3))
        missing, unexpected = self.decoder.load_state_dict(
            {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")},
            strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: VQ decoder weights do not match the model's vq_config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.embedding = nn.Embedding.from_pretrained(
            state.get("quantize.embedding.weight", vq.quantize.embedding.weight.detach()))
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.post_quant_conv.load_state_dict({
            "weight": state.get("post_quant_conv.weight", vq.post_quant_conv.weight.detach()),
            "bias": state.get("post_quant_conv.bias", vq.post_quant_conv.bias.detach())})
        # On the model's device (a 512x512 decode is slow on CPU), in float32.
        self.device = next(model.parameters()).device
        for module in (self.decoder, self.embedding, self.post_quant_conv):
            module.float().eval().requires_grad_(False).to(self.device)
        self.grid = config.resolution // 2 ** (len(config.channel_multiplier) - 1)
        self.codes_per_image = self.grid * self.grid
        seq = getattr(processor, "image_seq_length", self.codes_per_image)
        if seq != self.codes_per_image:
            raise ValueError(f"the processor puts {seq} tokens in an image but the VQ grid is "
                             f"{self.grid}x{self.grid}; they must match")
        mapping = owner.vocabulary_mapping
        table = torch.full((max(mapping.bpe2img) + 1,), -1, dtype=torch.long)
        for token, code in mapping.bpe2img.items():
            table[token] = code
        self.token_to_code = table
        ip = getattr(processor, "image_processor", None)
        self.mean = torch.tensor(_triple(getattr(ip, "image_mean", None), 1.0)).view(1, 3, 1, 1)
        self.std = torch.tensor(_triple(getattr(ip, "image_std", None), 1.0)).view(1, 3, 1, 1)
        self.scale = float(getattr(ip, "rescale_factor", None) or 1 / 127.5)

    @property
    def image_size(self) -> int:
        """Side of a decoded image in pixels (the VQ config's resolution)."""
        return self.grid * 2 ** (self.decoder.num_resolutions - 1)

    @torch.inference_mode()
    def pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, codes_per_image]` token ids -> `[N, 3, H, W]` pixel values (processor range)."""
        tokens = tokens.cpu().long()
        if (tokens >= len(self.token_to_code)).any() or (tokens < 0).any():
            raise ValueError("an image span holds tokens that are not image codes")
        codes = self.token_to_code[tokens]
        if (codes < 0).any():
            raise ValueError("an image span holds tokens that are not image codes")
        latents = self.embedding(codes.to(self.device)).view(codes.shape[0], self.grid,
                                                             self.grid, -1)
        pixels = self.decoder(self.post_quant_conv(latents.permute(0, 3, 1, 2).contiguous()))
        return pixels.float().cpu()

    def images(self, tokens: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """`[N, codes_per_image]` token ids -> N RGB images."""
        from PIL import Image

        out = []
        for start in range(0, tokens.shape[0], batch_size):
            values = self.pixels(tokens[start:start + batch_size])
            rgb = ((values * self.std + self.mean) / self.scale).round().clamp(0, 255)
            for array in rgb.to(torch.uint8).permute(0, 2, 3, 1).numpy():
                out.append(Image.fromarray(array, mode="RGB"))
        return out


def _triple(value: Any, default: float) -> list[float]:
    if value is None:
        return [default] * 3
    if isinstance(value, int | float):
        return [float(value)] * 3
    return [float(v) for v in value]


# --------------------------------------------------------------------------- generation


class ImageSpanLogitsProcessor:
    """Keeps generated image spans well formed (a `transformers` logits processor).

    Per row, from the tokens generated so far (after `prompt_length`):
    - inside a span (begin-image seen, fewer than `codes_per_image` codes since): only code
      tokens; after the last code: only end-image;
    - outside: no code, end-image or `<image>` placeholder tokens; begin-image only while the
      row has made fewer than `max_images` images and `max_new_tokens` leaves room for a whole
      span (so an image is never cut off by the length limit).
    """

    def __init__(self, *, prompt_length: int, boi: int, eoi: int, code_tokens: Sequence[int],
                 codes_per_image: int, max_new_tokens: int, max_images: int,
                 banned: Sequence[int] = ()) -> None:
        self.prompt_length = prompt_length
        self.boi, self.eoi = boi, eoi
        self.codes = torch.tensor(sorted(code_tokens), dtype=torch.long)
        self.n = codes_per_image
        self.max_new_tokens = max_new_tokens
        self.max_images = max_images
        self.banned = torch.tensor(sorted(set(banned)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        steps = generated.shape[1]
        rows = scores.shape[0]
        device = scores.device
        is_boi = generated == self.boi
        if steps:
            last = torch.where(is_boi.any(dim=1),
                               steps - 1 - is_boi.flip(dims=[1]).int().argmax(dim=1),
                               torch.full((rows,), -1, device=device))
        else:
            last = torch.full((rows,), -1, device=device)
        since = steps - 1 - last  # tokens generated after the last begin-image
        in_codes = (last >= 0) & (since < self.n)
        at_end = (last >= 0) & (since == self.n)
        text = ~(in_codes | at_end)
        neg = torch.finfo(scores.dtype).min
        out = scores.clone()
        codes, banned = self.codes.to(device), self.banned.to(device)
        # Outside a span: no codes, no end-image, no input placeholders.
        text_rows = text.nonzero(as_tuple=True)[0]
        if len(text_rows):
            out[text_rows.unsqueeze(1), codes.unsqueeze(0)] = neg
            out[text_rows, self.eoi] = neg
            if len(banned):
                out[text_rows.unsqueeze(1), banned.unsqueeze(0)] = neg
            no_room = self.max_new_tokens - steps < self.n + 2
            full = is_boi.sum(dim=1) >= self.max_images
            closed = text & (full | no_room)
            out[closed, self.boi] = neg
        # Inside: codes only, then end-image only.
        forced = in_codes | at_end
        if forced.any():
            allowed = torch.zeros_like(out, dtype=torch.bool)
            allowed[in_codes.nonzero(as_tuple=True)[0].unsqueeze(1), codes.unsqueeze(0)] = True
            allowed[at_end, self.eoi] = True
            out = torch.where(forced.unsqueeze(1) & ~allowed, torch.full_like(out, neg), out)
        return out


@dataclass
class TextPart:
    text: str

    def to_json(self) -> dict[str, str]:
        return {"type": "text", "text": self.text}


@dataclass
class ImagePart:
    image: Image.Image
    path: str | None = None  # relative to the predictions folder, once saved

    def to_json(self) -> dict[str, str | None]:
        return {"type": "image", "path": self.path}


Part = TextPart | ImagePart


@dataclass
class InterleavedBatchOutput(BatchOutput):
    """`BatchOutput` plus each answer's parts and its count of cut-off image spans.

    `texts` are the answers with `<image>` where each image is.
    """

    parts: list[list[Part]] = field(default_factory=list)
    incomplete_images: list[int] = field(default_factory=list)


class InterleavedGenerator(Generator):
    """Batched generation whose answers may contain images (image-token models).

    Args:
        loaded: a Chameleon-style model and its processor; its image-code logits are enabled
            (`enable_image_generation`).
        vq_decoder: where the VQ decoder weights are (default: the model's directory; see
            `find_decoder_weights`).
        max_images: images one answer may contain.
        **kwargs: `Generator`'s settings (batch size, max_new_tokens, sampling, stops, seed).

    Raises:
        ValueError: not an image-token model, or settings out of range.
        FileNotFoundError: no decoder weights where `vq_decoder` points.
    """

    def __init__(self, loaded: LoadedModel, *, vq_decoder: str | None = None,
                 max_images: int = 1, **kwargs: Any) -> None:
        if max_images < 1:
            raise ValueError(f"max_images={max_images} must be >= 1")
        super().__init__(loaded, **kwargs)
        enable_image_generation(self.model)
        self.max_images = max_images
        self.boi = int(self.processor.image_start_token_id)
        self.eoi = int(self.processor.image_end_token_id)
        self.placeholder = int(self.processor.image_token_id)
        self.code_tokens = image_code_tokens(self.model)
        self.decoder = ImageDecoder(self.model, self.processor,
                                    vq_decoder or str(loaded.model_dir))
        self.codes_per_image = self.decoder.codes_per_image
        self.max_new_tokens = int(self.generation_config.max_new_tokens)
        if self.max_new_tokens < self.codes_per_image + 2:
            log.warning("max_new_tokens=%d leaves no room for an image (%d codes + begin/end "
                        "tokens): answers will be text only", self.max_new_tokens,
                        self.codes_per_image)

    @torch.inference_mode()
    def _batch(self, indices: list[int], texts: list[str],
               images: list[list[Image.Image]]) -> InterleavedBatchOutput:
        from transformers import LogitsProcessorList

        batch = self._encode(texts, images)
        prompt_length = batch["input_ids"].shape[1]
        spans = ImageSpanLogitsProcessor(
            prompt_length=prompt_length, boi=self.boi, eoi=self.eoi,
            code_tokens=self.code_tokens, codes_per_image=self.codes_per_image,
            max_new_tokens=self.max_new_tokens, max_images=self.max_images,
            banned=[self.placeholder])
        extra = {"tokenizer": self.tokenizer} if self.stop_strings else {}
        output = self.model.generate(**batch, generation_config=self.generation_config,
                                     logits_processor=LogitsProcessorList([spans]), **extra)
        new = output[:, prompt_length:].cpu()
        rows = [self._split(row.tolist()) for row in new]
        spans_tokens = [span for parts, _, _ in rows for span in parts
                        if isinstance(span, torch.Tensor)]
        decoded = iter(self.decoder.images(torch.stack(spans_tokens))) if spans_tokens else \
            iter(())
        all_parts, answers, incomplete, counts = [], [], [], []
        for raw_parts, cut, used in rows:
            parts: list[Part] = [ImagePart(next(decoded)) if isinstance(p, torch.Tensor)
                                 else TextPart(p) for p in raw_parts]
            parts = _tidy(parts)
            all_parts.append(parts)
            answers.append("".join(IMAGE_TOKEN if isinstance(p, ImagePart) else p.text
                                   for p in parts))
            incomplete.append(cut)
            counts.append(used)
        return InterleavedBatchOutput(indices, answers, counts, parts=all_parts,
                                      incomplete_images=incomplete)

    def _split(self, ids: list[int]) -> tuple[list[str | torch.Tensor], int, int]:
        """One row's new tokens -> (parts: text strings and code-token tensors, cut-off
        spans, tokens generated before the trailing padding)."""
        pad, eos = self.tokenizer.pad_token_id, self.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        used = len(ids)
        while used and ids[used - 1] == pad and pad not in eos_ids:
            used -= 1
        parts: list[str | torch.Tensor] = []
        text_ids: list[int] = []
        cut = 0
        stopped = False

        def flush() -> None:
            nonlocal stopped
            if not text_ids:
                return
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            trimmed = trim_at_stop(text, self.stop_strings)
            stopped = len(trimmed) < len(text)
            parts.append(trimmed)
            text_ids.clear()

        i = 0
        while i < used and not stopped:
            token = ids[i]
            if token in eos_ids:
                break
            if token != self.boi:
                text_ids.append(token)
                i += 1
                continue
            flush()
            if stopped:
                break
            span = ids[i + 1:i + 1 + self.codes_per_image]
            end = i + 1 + self.codes_per_image
            if len(span) == self.codes_per_image and end < used and ids[end] == self.eoi:
                parts.append(torch.tensor(span, dtype=torch.long))
                i = end + 1
            else:  # cut off by the length limit or an end-of-sequence: not an image
                cut += 1
                break
        if not stopped:
            flush()
        return parts, cut, used


def _tidy(parts: list[Part]) -> list[Part]:
    """Strip the answer's outer whitespace, drop empty text parts."""
    if parts and isinstance(parts[0], TextPart):
        parts[0] = TextPart(parts[0].text.lstrip())
    if parts and isinstance(parts[-1], TextPart):
        parts[-1] = TextPart(parts[-1].text.rstrip())
    return [p for p in parts if not (isinstance(p, TextPart) and not p.text)]


# --------------------------------------------------------------------------- predictions


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_name(item_id: str, index: int) -> str:
    """`images/<safe id>-<hash>-<index>.png` (the hash keeps ids that sanitise alike apart)."""
    safe = _UNSAFE.sub("_", item_id).strip("._")[:80] or "row"
    digest = hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:8]
    return f"{IMAGES_DIR}/{safe}-{digest}-{index}.png"


def output_fields(out: str, item_id: str, prompt_images: Sequence[str], parts: list[Part],
                  incomplete_images: int = 0) -> dict[str, Any]:
    """Write an answer's images as PNGs under `{out}/images/` and return its row fields
    (`parts`, `output_images`, `images`, `incomplete_images`; see the module docstring).

    The PNGs are written before the row is recorded, so a resumed run never finds a row whose
    images are missing.
    """
    paths = []
    for part in parts:
        if isinstance(part, ImagePart):
            part.path = image_name(item_id, len(paths))
            buffer = io.BytesIO()
            part.image.save(buffer, format="PNG")
            storage.write_bytes(storage.join(out, part.path), buffer.getvalue())
            paths.append(part.path)
    return {"parts": [p.to_json() for p in parts], "output_images": paths,
            "images": [*prompt_images, *paths], "incomplete_images": incomplete_images}


def copy_output_images(rows: Sequence[dict[str, Any]], out: str, scratch: Path) -> int:
    """Copy every row's `output_images` from `{out}` into the staging dir (so the committed
    output and its manifest include them); returns how many."""
    count = 0
    for row in rows:
        for rel in row.get("output_images") or ():
            target = scratch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.get_file(storage.join(out, rel), target)
            count += 1
    return count
