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
- `mmjobs.models.vq_decoder.VQDecoder` is Chameleon's VQ-GAN decoder in the
  taming-transformers layout that Anole and Align-Anything checkpoints store under
  `model.vqmodel.decoder.*`; its `ImageDecoder` turns a span of image-code tokens back into a
  picture (where the decoder weights come from is said there).
- `ImageSpanLogitsProcessor` makes batched `generate` emit well-formed image spans:
  begin-image, exactly `image_seq_length` code tokens (the VQ grid, 16 for the tiny model,
  1024 for Chameleon-7B), end-image; outside a span, code tokens are never sampled.
- `InterleavedGenerator` is `mmjobs.eval.generate.Generator` with those constraints; each answer
  comes back as ordered parts (`TextPart`, `ImagePart` with a PIL image).

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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmjobs import storage
from mmjobs.data.records import IMAGE_TOKEN
from mmjobs.eval.generate import BatchOutput, Generator, trim_at_stop
from mmjobs.layout import IMAGES_DIR
from mmjobs.logs import get_logger
from mmjobs.models.image_tokens import (
    enable_image_generation,
    image_code_tokens,
)
from mmjobs.models.vq_decoder import ImageDecoder, VQDecoder, find_decoder_weights

if TYPE_CHECKING:
    from PIL import Image

    from mmjobs.models.builder import LoadedModel

__all__ = ["ImageDecoder", "ImagePart", "ImageSpanLogitsProcessor", "InterleavedBatchOutput",
           "InterleavedGenerator", "TextPart", "VQDecoder", "copy_output_images",
           "enable_image_generation", "find_decoder_weights", "output_fields"]

log = get_logger(__name__)



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
