"""Generation for the server: batches of jobs through `Generator`, or one job streamed.

`ServeGenerator` is `mmjobs.eval.generate.Generator` (chat template, left padding, stop strings,
decoding) plus what a server needs: prompt token counts for `usage`, and `stream`, which runs
one prompt with a streamer and a cancel flag. Text is streamed so that the concatenated deltas
equal the non-streaming answer: leading and trailing whitespace are held back (answers are
stripped), and so is any tail that could still become a stop string (answers are cut before
it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmjobs.eval.generate import Generator, PromptInput, trim_at_stop

__all__ = ["DeltaFilter", "GenerationResult", "ServeGenerator", "Settings"]


@dataclass(frozen=True)
class Settings:
    """Generation settings that must be equal for requests to share a `generate` call."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def make(cls, max_new_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> Settings:
        """Normalised, so greedy requests batch together whatever sampling fields they sent."""
        if temperature <= 0:
            return cls(max_new_tokens, tuple(stop))
        return cls(max_new_tokens, tuple(stop), temperature, top_p, seed)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass
class GenerationResult:
    """One answer: text, why it ended ("stop" or "length"), and token counts for `usage`."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class DeltaFilter:
    """Turns the growing decoded text of a stream into deltas that are safe to send.

    A delta, once sent, cannot be taken back, so text is held while it could still change the
    final answer: leading/trailing whitespace (the answer is stripped), a tail that might be
    the start of a stop string, and a trailing U+FFFD (half a UTF-8 character).
    """

    stop: Sequence[str] = ()
    sent: str = ""
    _hold: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def update(self, full: str) -> str:
        """The new delta given the whole decoded text so far ("" if nothing is safe yet)."""
        text = full.lstrip()
        cut = trim_at_stop(text, self.stop)
        if len(cut) < len(text):  # a stop string appeared: nothing after it is ever sent
            return self._advance(cut.rstrip())
        safe = text[:len(text) - self._hold] if self._hold else text
        return self._advance(safe.rstrip().rstrip("\ufffd").rstrip())

    def finish(self, final: str) -> str:
        """The last delta, given the final (trimmed, stripped) answer."""
        return self._advance(final)

    def _advance(self, safe: str) -> str:
        if len(safe) <= len(self.sent):
            return ""
        # Decoding a prefix of the tokens is a prefix of the full decode for byte-level and
        # SentencePiece tokenizers; if one ever is not, send what follows rather than lose it.
        delta = safe[len(self.sent):]
        self.sent += delta
        return delta


class _TokenStreamer:
    """A transformers streamer: decodes all new tokens after each step, reports the text."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        pass


class _Cancelled:
    """Stopping criterion: stop every row once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class ServeGenerator(Generator):
    """`Generator` with prompt-token counts and single-prompt streaming (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_new_tokens = int(self.generation_config.max_new_tokens)
        self._prompt_tokens: list[int] = []

    def _encode(self, texts: list[str], images: list[list[Any]]) -> Any:
        batch = super()._encode(texts, images)
        # Real tokens per row, image tokens included: the processor expands each <image>.
        self._prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return batch

    def _finish_reason(self, new_tokens: int) -> str:
        return "length" if new_tokens >= self.max_new_tokens else "stop"

    def run(self, prompts: Sequence[PromptInput]) -> list[GenerationResult]:
        """Answers for `prompts` (input order), as few `generate` calls as `batch_size` allows."""
        results: list[GenerationResult | None] = [None] * len(prompts)
        for out in self.generate_batches(prompts):
            # generate_batches is lazy: the last _encode call was this batch's.
            for i, text, new, prompt_tokens in zip(out.indices, out.texts, out.new_tokens,
                                                   self._prompt_tokens, strict=True):
                results[i] = GenerationResult(text, self._finish_reason(new), prompt_tokens, new)
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def stream(self, prompt: PromptInput, on_delta: Callable[[str], None],
               cancelled: threading.Event) -> GenerationResult:
        """Generate one answer, calling `on_delta` with each new piece of text.

        The concatenated deltas equal the returned `text`, which equals what `run` returns for
        the same prompt and settings. Generation stops early once `cancelled` is set.
        """
        batch = self._encode([self.render(prompt)], [prompt.images])
        deltas = DeltaFilter(self.stop_strings)

        def on_text(full: str) -> None:
            if delta := deltas.update(full):
                on_delta(delta)

        from transformers import StoppingCriteriaList

        streamer = _TokenStreamer(self.tokenizer, on_text)
        extra = {"tokenizer": self.tokenizer} if self.stop_strings else {}
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            output = self.model.generate(**batch, generation_config=self.generation_config,
                                         streamer=streamer, stopping_criteria=StoppingCriteriaList(
                                             [_Cancelled(cancelled)]), **extra)
        new = output[0, batch["input_ids"].shape[1]:]
        text = trim_at_stop(self.tokenizer.decode(new, skip_special_tokens=True),
                            self.stop_strings).strip()
        if delta := deltas.finish(text):
            on_delta(delta)
        return GenerationResult(text, self._finish_reason(len(new)), self._prompt_tokens[0],
                                len(new))
