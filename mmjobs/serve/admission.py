"""Admission: what a request must pass, and becomes, before it may wait for the model.

    admission = Admission(loaded, limits)        # once the model is loaded
    admitted = await admission.admit(chat)       # or raises APIError (4xx)
    Job(admitted.prompt, Settings.make(admitted.max_new_tokens, ...))

The generation worker is a single thread, so anything a request could make it do is bounded
here, in the request's own task, before the job is queued:

- Prompt tokens, text and image tokens together, counted as the model will see them (chat
  template, processor) against the model's context length minus the answer's `max_tokens`
  (and `max_prompt_tokens` if set): 400 naming the limit and the count. An over-long text is
  refused from its length alone, before it is tokenized or any image is decoded.
- Images: each header's pixels and the request's total (413) before anything is decoded; then
  each image is decoded once, `decode_workers` at a time, and scaled down right away to the
  size the processor resizes to (`processor_fit`), so what waits in the queue is small.

Counting uses a private copy of the processor under a lock: the worker thread uses the
model's own, and a fast tokenizer must not be used from two threads at once.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from mmjobs.eval.generate import Generator, PromptInput
from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel
from mmjobs.serve.images import EncodedImage, Fit, decode_image, read_image_ref
from mmjobs.serve.limits import Limits
from mmjobs.serve.protocol import APIError, ChatRequest

__all__ = ["Admission", "Admitted", "context_length", "processor_fit"]

log = get_logger(__name__)
# Used when the model config names no context length and max_prompt_tokens is unset.
FALLBACK_CONTEXT = 8192
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                   "seq_length", "max_seq_len")


@dataclass
class Admitted:
    """A request ready to queue: its prompt with decoded (scaled-down) images, the answer
    length it may have, and its prompt tokens (text and image tokens)."""

    prompt: PromptInput
    max_new_tokens: int
    prompt_tokens: int


def context_length(model: Any) -> int | None:
    """The model's context length from its (text) config, or None if it names none."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (text, config):
        for name in _CONTEXT_FIELDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def processor_fit(processor: Any) -> Fit | None:
    """The size an image can be scaled down to at once without changing what the model sees.

    Read from the image processor's resize settings: `shortest_edge` (CLIP, Chameleon: the
    shorter side goes to that length, as the processor computes it, so its own resize is then
    a no-op), `height` + `width` (a fixed size), `longest_edge` alone, or `max_pixels`
    (Qwen-style area caps). None when the processor does not resize or says none of these;
    images then stay full-size until the batch runs (the pixel limits still bound them).
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "do_resize", True) is False:
        return None
    size = getattr(image_processor, "size", None)

    def get(key: str) -> int | None:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return value if isinstance(value, int) and value > 0 else None

    max_pixels = getattr(image_processor, "max_pixels", None)
    shortest, longest = get("shortest_edge"), get("longest_edge")
    height, width = get("height"), get("width")
    if isinstance(max_pixels, int) and max_pixels > 0:
        return lambda w, h: _scaled(w, h, math.sqrt(max_pixels / (w * h)))
    if shortest and not longest:
        # As transformers computes it: the long side is int(size * long / short).
        return lambda w, h: (shortest, int(shortest * h / w)) if w <= h else (
            int(shortest * w / h), shortest)
    if height and width:
        return lambda w, h: (width, height)
    if longest and not shortest:
        return lambda w, h: _scaled(w, h, longest / max(w, h))
    return None


def _scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


class Admission:
    """Checks and prepares requests for one loaded model (see the module docstring).

    Args:
        loaded: the model and processor (only the processor is used, through a copy).
        limits: the request limits.
    """

    def __init__(self, loaded: LoadedModel, limits: Limits) -> None:
        self.limits = limits
        self.context = context_length(loaded.model)
        if self.context is None and limits.max_prompt_tokens is None:
            log.warning("the model config names no context length; prompts are limited to "
                        "%d tokens (set max_prompt_tokens)", FALLBACK_CONTEXT)
        self.max_prompt_tokens = limits.max_prompt_tokens or self.context or FALLBACK_CONTEXT
        self.fit = processor_fit(loaded.processor)
        private = dataclasses.replace(loaded, processor=copy.deepcopy(loaded.processor))
        self._counter = Generator(private, batch_size=1, max_new_tokens=1)
        self._lock = threading.Lock()
        vocab = self._counter.tokenizer.get_vocab()
        # A token decodes to at most this many characters, so a text of n characters has at
        # least n / this many tokens: a cheap first check before tokenizing anything.
        self._chars_per_token = max(max((len(t) for t in vocab), default=1), 1)
        self._decoding = asyncio.Semaphore(limits.decode_workers)

    def describe(self) -> dict[str, Any]:
        """The limits in force, for `GET /v1/models`."""
        return {**dataclasses.asdict(self.limits), "context_length": self.context,
                "max_prompt_tokens": self.max_prompt_tokens}

    async def admit(self, chat: ChatRequest) -> Admitted:
        """Check `chat` against the limits and decode its images (see the module docstring);
        `chat.image_refs` is emptied once they are decoded.

        Raises:
            APIError: 400 (prompt too long, bad image) or 413 (image sizes).
        """
        budget, why = self._budget(chat)
        prompt = PromptInput(chat.turns)
        try:
            text = self._counter.render(prompt)
        except Exception as e:  # jinja2's TemplateError: e.g. "roles must alternate"
            raise APIError(400, f"the model's chat template refused the conversation: "
                           f"{type(e).__name__}: {str(e)[:300]}", code="invalid_conversation",
                           param="messages") from None
        # Cheap lower bounds first, so an over-long prompt costs no tokenizing and no decoding.
        if len(text) > budget * self._chars_per_token:
            self._refuse(-(-len(text) // self._chars_per_token), budget, why, at_least=True)
        if chat.image_refs:
            lower = await run_in_threadpool(self._count_text, text)
            if lower > budget:  # refused before any image is decoded
                self._refuse(lower, budget, why, at_least=True)
            prompt.images = await self._images(chat.image_refs)
            # The data URLs (up to max_request_bytes) are not needed once decoded; the request
            # object lives until its answer is sent, so it must not keep them while queued.
            chat.image_refs = []
        tokens = await run_in_threadpool(self._count, text, prompt.images)
        if tokens > budget:
            self._refuse(tokens, budget, why)
        max_new = chat.max_new_tokens
        if chat.max_tokens_param is None and self.context is not None:
            max_new = max(1, min(max_new, self.context - tokens))  # the default shrinks to fit
        return Admitted(prompt, max_new, tokens)

    def _budget(self, chat: ChatRequest) -> tuple[int, str]:
        """The most prompt tokens `chat` may have, and why (for the error message)."""
        limit, why = self.max_prompt_tokens, f"max_prompt_tokens={self.max_prompt_tokens:,}"
        if self.context is None:
            return limit, why
        if chat.max_tokens_param is None:
            room, room_why = self.context - 1, (f"the model's context is {self.context:,} "
                                                "tokens and the answer needs at least 1")
        else:
            room = self.context - chat.max_new_tokens
            room_why = (f"the model's context is {self.context:,} tokens and "
                        f"{chat.max_tokens_param}={chat.max_new_tokens:,} leaves {room:,}")
            if room < 1:
                raise APIError(400, f"{chat.max_tokens_param}={chat.max_new_tokens:,} leaves no "
                               f"room for a prompt in the model's context of {self.context:,} "
                               f"tokens; ask for fewer", code="context_length_exceeded",
                               param=chat.max_tokens_param)
        return (room, room_why) if room < limit else (limit, why)

    @staticmethod
    def _refuse(count: int, budget: int, why: str, *, at_least: bool = False) -> None:
        raise APIError(400, f"the prompt is {'at least ' if at_least else ''}{count:,} tokens "
                       f"(text and image tokens); this server takes at most {budget:,} here: "
                       f"{why}. Shorten the conversation or send fewer images",
                       code="context_length_exceeded", param="messages")

    def _count_text(self, text: str) -> int:
        """Tokens of the rendered text alone: a lower bound (an image marker counts one)."""
        with self._lock:
            return len(self._counter.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _count(self, text: str, images: list[Any]) -> int:
        """Prompt tokens of a rendered text with its images, exactly as the worker encodes
        them (the processor expands each image marker)."""
        with self._lock:
            batch = self._counter._encode([text], [images])
            return int(batch["attention_mask"].sum())

    async def _images(self, refs: list[str]) -> list[Any]:
        """The request's images: read and size-checked all, then decoded one by one."""
        limits = self.limits
        encoded: list[EncodedImage | None] = list(await run_in_threadpool(
            lambda: [read_image_ref(url, i, limits) for i, url in enumerate(refs)]))
        total = sum(e.pixels for e in encoded if e is not None)
        if total > limits.max_request_pixels:
            sizes = ", ".join(f"{e.width}x{e.height}" for e in encoded if e is not None)
            raise APIError(413, f"the request's {len(refs)} images have {total:,} pixels in all "
                           f"({sizes}); the limit is {limits.max_request_pixels:,} "
                           "(max_request_pixels); send smaller or fewer images",
                           code="image_too_large")
        images = []
        for i, item in enumerate(encoded):
            assert item is not None
            async with self._decoding:
                images.append(await run_in_threadpool(decode_image, item, limits, self.fit))
            encoded[i] = None  # the encoded bytes are not needed any more
        return images
