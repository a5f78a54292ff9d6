"""Turn one canonical sample into training tokens with a model's own processor.

`SampleEncoder(model_dir).encode(sample, image_bytes)` does, for one conversation:

1. Render the conversation with its conversation format (`mmjobs.data.conversation`: the
   model's chat template, or a seed's built-in format such as LLaVA's `vicuna_v1`) to text,
   with the character spans that carry labels (each assistant turn and its end-of-turn
   token).
2. Call the processor on that text and the images: it expands each `<image>` to the model's
   image-token count and tokenizes (with the tokenizer's BOS unless the text starts with it),
   returning character offsets. Formats that tokenize like LLaVA (`image_chunks`) tokenize
   the text between images piece by piece instead (`mmjobs.data.conversation.chunks`).
   More tokens than `max_length`: a `too_long` reject naming the image tokens, or, with
   `truncate`, the text after the last image is cut at `max_length` as LLaVA cuts at
   `model_max_length` (images are never cut).
3. Labels = input ids on tokens that overlap a labelled span, -100 elsewhere.
4. Image-token models (Chameleon): run the model's VQ encoder once and write the real image
   token ids over the `<image>` placeholders, in `input_ids` and, inside assistant turns, in
   `labels` (Align-Anything's pre-tokenization, so the model can learn to generate images).
   Only the VQ-VAE weights are loaded, never the language model (`mmjobs.data.vq_images`).

`encode_preference(pair, ...)` encodes a preference pair as two such sequences, prompt +
chosen response and prompt + rejected response, labelled on the response only.

A sample that cannot be encoded raises `SampleRejected(code, detail)` with a reason code from
`mmjobs.data.validate.REASONS` (`too_long`, `placeholder_mismatch`, `image_corrupt`,
`empty_assistant`, `format_mismatch`), the vocabulary the whole pipeline shares.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmjobs.data.conversation import FormatMismatch, chat_template_of, resolve_format
from mmjobs.data.conversation.chunks import image_expansions, tokenize_image_chunks
from mmjobs.data.conversation.template import GENERATION_RE
from mmjobs.data.records import IMAGE_TOKEN, PreferenceSample, Sample
from mmjobs.data.validate import TOO_LONG, reason
from mmjobs.data.vq_images import VQImageTokenizer, is_image_token_model
from mmjobs.image_backend import processor_kwargs
from mmjobs.logs import get_logger

log = get_logger(__name__)
IGNORE_INDEX = -100  # PyTorch cross-entropy's ignore_index: no loss on these positions


class SampleRejected(Exception):
    """A sample that cannot be encoded; `reason` is `"<code>: <detail>"` (validate.REASONS)."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.reason = reason(code, detail)  # raises on a code outside the shared vocabulary
        super().__init__(self.reason)


@dataclass
class EncodedSample:
    """One pre-tokenized sample (a row of a shard).

    `input_ids`, `labels`: length `length` each; labels are -100 outside assistant turns.
    `images`: the original encoded image bytes (placeholder models) or empty (image-token
    models, whose images are already tokens in `input_ids`).
    `num_image_tokens`: positions holding image tokens (placeholders or VQ codes).
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[bytes] = field(default_factory=list)
    num_image_tokens: int = 0

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodedPreference:
    """One pre-tokenized preference pair (a row of a preference shard).

    `chosen_*` / `rejected_*`: the two sequences `prompt + response`, each with labels on its
    response only (-100 elsewhere); they share the prompt's tokens. `images`: the prompt's
    encoded image bytes (placeholder models; empty for image-token models), used by both
    sides; `chosen_images` / `rejected_images`: images inside a response, after `images`.
    """

    id: str
    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]
    images: list[bytes] = field(default_factory=list)
    chosen_images: list[bytes] = field(default_factory=list)
    rejected_images: list[bytes] = field(default_factory=list)
    chosen_num_image_tokens: int = 0
    rejected_num_image_tokens: int = 0

    @property
    def chosen_length(self) -> int:
        return len(self.chosen_input_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.rejected_input_ids)

    @property
    def length(self) -> int:
        """The longer side's tokens: what a padded pair occupies, and what max_length bounds."""
        return max(self.chosen_length, self.rejected_length)

    @property
    def label_tokens(self) -> int:
        return sum(1 for lab in (*self.chosen_labels, *self.rejected_labels)
                   if lab != IGNORE_INDEX)

    @property
    def num_image_tokens(self) -> int:
        return self.chosen_num_image_tokens + self.rejected_num_image_tokens


@dataclass
class Tokens:
    """A tokenized text: ids, which of them carry labels, and how many are image tokens."""

    input_ids: list[int]
    mask: list[bool]
    num_image_tokens: int


class SampleEncoder:
    """A model's processor + conversation format (+ VQ image tokenizer), loaded once per process.

    Args:
        model_dir: the model (processor files; VQ weights for image-token models).
        max_length: longest sequence, image tokens included.
        trust_remote_code: run processor code shipped with the model.
        conversation_format: a name from `mmjobs.data.conversation.FORMAT_NAMES`.
        truncate: cut text past `max_length` instead of rejecting the sample (never images).

    Raises:
        ValueError: not an image-text processor, or no way to render conversations (no chat
            template and `conversation_format` auto/template).
    """

    def __init__(self, model_dir: str | Path, *, max_length: int,
                 trust_remote_code: bool = False, conversation_format: str = "auto",
                 truncate: bool = False) -> None:
        from transformers import AutoConfig, AutoProcessor

        from mmjobs.models import register_native_models

        register_native_models()  # XComposer2, LaVIN: mmjobs' own classes, no remote code
        self.model_dir = Path(model_dir)
        self.max_length = max_length
        # local_files_only: pre-tokenization never reaches a model hub, even by accident.
        self.config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True,
                                                       trust_remote_code=trust_remote_code,
                                                       **processor_kwargs())
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise ValueError(f"{self.model_dir}: AutoProcessor gave {type(self.processor).__name__}"
                             ", not an image-text processor with a tokenizer; point `model` at a "
                             "vision-language model directory")
        self.chat_template = chat_template_of(self.processor)
        self.image_token = getattr(self.processor, "image_token", IMAGE_TOKEN)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.format = resolve_format(conversation_format, self.processor,
                                     where=str(self.model_dir), image_token=self.image_token)
        # LaVIN cuts every over-long sample (the format says so), at its max_seq_len.
        self.truncate = truncate or self.format.truncate
        self.max_length = _model_budget(self.config, max_length, self.model_dir)
        # An image's tokens end after its last placeholder, plus Chameleon's end-of-image.
        self._image_end_id = getattr(self.processor, "image_end_token_id", None)
        self.vq = VQImageTokenizer(self.model_dir, self.config) if is_image_token_model(
            self.config) else None
        # Chameleon's processor appends its separator token unless told the text is complete.
        self._call_kwargs: dict[str, Any] = {"return_for_text_completion": True} if hasattr(
            self.processor, "return_for_text_completion") else {}

    @property
    def image_mode(self) -> str:
        """`vq_tokens` (images are tokens in input_ids) or `placeholder` (bytes in `images`)."""
        return "vq_tokens" if self.vq else "placeholder"

    def describe(self) -> dict[str, Any]:
        """What a reader of the shards needs to know about how they were made."""
        import transformers

        return {
            "model_type": self.config.model_type,
            "processor_class": type(self.processor).__name__,
            "image_processor_class": type(self.processor.image_processor).__name__,
            "image_mode": self.image_mode,
            "image_token": self.image_token,
            "image_token_id": self.image_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "chat_template_has_generation_blocks": bool(
                self.chat_template and GENERATION_RE.search(self.chat_template)),
            "conversation_format": self.format.describe(),
            "truncate": self.truncate,
            "transformers_version": transformers.__version__,
        }

    # ------------------------------------------------------------------ encoding

    def encode(self, sample: Sample, images: Sequence[bytes]) -> EncodedSample:
        """Encode one conversation with its images (encoded bytes, in `<image>` order).

        Raises:
            SampleRejected: too long, wrong image count, undecodable image, no assistant text.
        """
        messages = [{"role": t.role, "content": t.content} for t in sample.conversations]
        return self.encode_messages(sample.id, messages, images)

    def encode_preference(self, sample: PreferenceSample, images: Sequence[bytes],
                          chosen_images: Sequence[bytes] = (),
                          rejected_images: Sequence[bytes] = ()) -> EncodedPreference:
        """Encode a preference pair as two sequences sharing the prompt (and its images).

        Each side is `prompt turns + one assistant turn` (the response), encoded like a
        conversation, but labelled on the response only: DPO and reward models compare the
        two responses, so earlier assistant turns of a multi-turn prompt are context.

        Args:
            images: the prompt's images, in `<image>` order.
            chosen_images, rejected_images: images inside each response (image-token models
                generate images); they follow the prompt's images in that side's sequence.

        Raises:
            SampleRejected: either side is too long, has the wrong image count, an undecodable
                image or an empty response.
        """
        prompt = [{"role": t.role, "content": t.content} for t in sample.prompt]
        sides = {}
        for side, response, extra in (("chosen", sample.chosen, chosen_images),
                                      ("rejected", sample.rejected, rejected_images)):
            try:
                sides[side] = self.encode_messages(
                    sample.id, [*prompt, {"role": "assistant", "content": response}],
                    [*images, *extra], last_turn_only=True)
            except SampleRejected as e:  # say which side, keep the shared reason code
                raise SampleRejected(e.code, f"{side}: {e.reason.split(': ', 1)[-1]}") from None
        chosen, rejected = sides["chosen"], sides["rejected"]
        keep = self.vq is None  # image-token models carry their images as tokens
        return EncodedPreference(
            id=sample.id, chosen_input_ids=chosen.input_ids, chosen_labels=chosen.labels,
            rejected_input_ids=rejected.input_ids, rejected_labels=rejected.labels,
            images=list(images) if keep else [],
            chosen_images=list(chosen_images) if keep else [],
            rejected_images=list(rejected_images) if keep else [],
            chosen_num_image_tokens=chosen.num_image_tokens,
            rejected_num_image_tokens=rejected.num_image_tokens)

    def check_placeholders(self, messages: Sequence[dict[str, Any]],
                           images: Sequence[bytes]) -> None:
        """One image placeholder per image, or `SampleRejected("placeholder_mismatch")`.

        Canonical rows mark images with `<image>`; the conversation formats write the
        processor's own token there (XComposer2's `<ImageHere>`), and a row that already has
        that token (ChartMoE-Data's text kept as it was) means the same, so both count.
        """
        markers = {IMAGE_TOKEN, self.image_token}
        placeholders = sum(m["content"].count(marker) for m in messages for marker in markers)
        if placeholders != len(images):
            raise SampleRejected("placeholder_mismatch",
                                 f"{placeholders} {' / '.join(sorted(markers))} markers but "
                                 f"{len(images)} images")

    def encode_messages(self, sample_id: str, messages: list[dict[str, Any]],
                        images: Sequence[bytes], *,
                        last_turn_only: bool = False) -> EncodedSample:
        """Encode chat `messages` (`{"role", "content"}` dicts) with their images.

        `last_turn_only`: label only the last assistant turn (a preference response).

        Raises:
            SampleRejected: see `encode`.
        """
        self.check_placeholders(messages, images)
        pil_images = [_open_image(b, i) for i, b in enumerate(images)]
        text, spans = self.render(messages)
        if last_turn_only:
            spans = spans[-1:]
        tokens = self.tokenize(sample_id, text, spans, pil_images, truncate=self.truncate)
        if not any(tokens.mask):
            raise SampleRejected("empty_assistant", "no assistant tokens to learn from")
        labels = [t if m else IGNORE_INDEX
                  for t, m in zip(tokens.input_ids, tokens.mask, strict=True)]
        return EncodedSample(id=sample_id, input_ids=tokens.input_ids, labels=labels,
                             images=[] if self.vq is not None else list(images),
                             num_image_tokens=tokens.num_image_tokens)

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the character spans that carry labels.

        Raises:
            SampleRejected: `format_mismatch`, the conversation does not fit the format.
        """
        try:
            rendered = self.format.render(messages)
        except FormatMismatch as e:
            raise SampleRejected("format_mismatch", f"{self.format.name}: {e}") from None
        return rendered.text, rendered.spans

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The conversation followed by the format's generation prompt.

        Raises:
            SampleRejected: `format_mismatch`.
        """
        try:
            return self.format.render_prompt(messages)
        except FormatMismatch as e:
            raise SampleRejected("format_mismatch", f"{self.format.name}: {e}") from None

    def tokenize(self, sample_id: str, text: str, spans: Sequence[tuple[int, int]],
                 pil_images: Sequence[Any], *, truncate: bool = False) -> Tokens:
        """Tokens of a rendered text with its (decoded) images; `mask` marks tokens overlapping
        `spans`. Image-token models get the images' VQ codes over the placeholders.

        Raises:
            SampleRejected: `too_long` (see `_fit`).
        """
        if self.format.image_chunks:
            expansions, image_inputs = image_expansions(self.processor, pil_images,
                                                        self.image_token, **self._call_kwargs)
            input_ids, offsets = tokenize_image_chunks(self.tokenizer, text, self.image_token,
                                                       expansions, self.format.piece_break)
            mask = assistant_token_mask(offsets, spans, [])
            pixel_values = image_inputs.get("pixel_values")
        else:
            bos = self.tokenizer.bos_token
            out = self.processor(
                text=[text], images=list(pil_images) or None,
                # A format or template that writes BOS itself must not get a second one.
                add_special_tokens=not (bos and text.startswith(bos)),
                return_offsets_mapping=True, return_text_replacement_offsets=True,
                **self._call_kwargs,
            )
            if pil_images and "text_replacement_offsets" not in out:
                raise RuntimeError(f"{type(self.processor).__name__} does not report "
                                   "text_replacement_offsets, so assistant spans cannot be "
                                   "mapped past the expanded image tokens; it is not supported "
                                   "yet")
            input_ids = [int(t) for t in out["input_ids"][0]]
            mask = assistant_token_mask(out["offset_mapping"][0], spans,
                                        (out.get("text_replacement_offsets") or [[]])[0])
            pixel_values = out.get("pixel_values")
        positions = [i for i, t in enumerate(input_ids) if t == self.image_token_id]
        input_ids, mask = self._fit(input_ids, mask, positions, len(pil_images), truncate)
        if self.vq is not None and pil_images:
            codes = self.vq.tokens(pixel_values)  # (num_images * codes_per_image,)
            if len(codes) != len(positions):
                raise RuntimeError(f"{sample_id}: the processor made {len(positions)} image "
                                   f"positions but the VQ encoder {len(codes)} codes; the "
                                   "processor's image_seq_length does not match the VQ model")
            for pos, code in zip(positions, codes, strict=True):
                input_ids[pos] = code
        return Tokens(input_ids, mask, len(positions))

    def _fit(self, input_ids: list[int], mask: list[bool], positions: list[int],
             num_images: int, truncate: bool) -> tuple[list[int], list[bool]]:
        """`input_ids`/`mask` within `max_length`: unchanged, cut after the last image
        (`truncate`), or a `too_long` reject that says what the images need."""
        limit = self.max_length
        if len(input_ids) <= limit:
            return input_ids, mask
        images_end = 0
        if positions:
            images_end = positions[-1] + 1
            if images_end < len(input_ids) and input_ids[images_end] == self._image_end_id:
                images_end += 1
        if truncate and images_end <= limit:
            if not any(mask[:limit]):
                raise SampleRejected(TOO_LONG, f"{len(input_ids)} tokens > max_length {limit}, "
                                     "and cut at max_length no assistant token is left")
            return input_ids[:limit], mask[:limit]
        detail = f"{len(input_ids)} tokens > max_length {limit}"
        if positions:
            detail = (f"{len(input_ids)} tokens ({len(positions)} of them image tokens for "
                      f"{num_images} image{'s' if num_images != 1 else ''}) > max_length "
                      f"{limit}")
        if images_end > limit:
            detail += (f"; the image tokens end at token {images_end}, and images are never "
                       "cut: raise max_length or use fewer images")
        elif not truncate:
            detail += "; truncate=true would cut the text after the images, as LLaVA does"
        raise SampleRejected(TOO_LONG, detail)


def _model_budget(config: Any, max_length: int, model_dir: Path) -> int:
    """`max_length`, lowered to what the model's fixed layout allows: a LaVIN sequence is at
    most `max_seq_len` positions with the modality token, so at most `max_seq_len - 1` ids."""
    if getattr(config, "model_type", None) != "lavin":
        return max_length
    budget = int(config.max_seq_len) - 1
    if max_length > budget:
        log.info("%s: LaVIN sequences hold max_seq_len=%d positions with the modality token; "
                 "max_length %d lowered to %d ids", model_dir, budget + 1, max_length, budget)
    return min(max_length, budget)


def assistant_token_mask(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                         replacements: Sequence[dict[str, Any]]) -> list[bool]:
    """True for tokens overlapping an assistant span.

    `spans` are char offsets in the rendered text; `offsets` are the tokens' char offsets in the
    processor's expanded text (each `<image>` replaced by its expansion), so spans are shifted
    by what the expansions before them added (`replacements` = the processor's
    `text_replacement_offsets`). Zero-width tokens never match.
    """
    ends = [r["span"][1] for r in replacements]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
    shifted = [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]
    mask = []
    for start, end in offsets:
        mask.append(any(start < s_end and end > s_start for s_start, s_end in shifted))
    return mask


def _open_image(data: bytes, index: int):
    """Decoded now (a truncated file is a reject, not a crash later), as 8-bit RGB through
    `mmjobs.data.images` (the loader's and inference's conversion)."""
    from PIL import UnidentifiedImageError

    from mmjobs.data.images import ImageModeError, decode_rgb

    try:
        return decode_rgb(data)
    except ImageModeError as e:
        raise SampleRejected("image_unsupported_mode", f"image {index}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SampleRejected("image_corrupt", f"image {index}: {e}") from None
