"""Generation for the server: batches of jobs through `Generator`, or one job streamed.

`ServeGenerator` is `mmjobs.eval.generate.Generator` (chat template, left padding, decoding)
plus what a server needs: prompt token counts for `usage`; a cancel flag per row, so a client
that goes away stops its row of a batch; stop strings matched at a cost that does not depend on
the vocabulary (`RowStops`); and `stream`, which runs one prompt with a streamer. Text is
streamed so that the concatenated deltas equal the non-streaming answer: leading and trailing
whitespace are held back (answers are stripped), and so is any tail that could still become a
stop string (answers are cut before it).
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


_NEVER = threading.Event()  # the cancel flag of rows nobody can cancel; never set
_MAX_PENDING = 8  # tokens: a character is at most 4 UTF-8 bytes, each at most one token


class RowStops:
    """Stopping criterion, row by row: the row's client went away, or a stop string appeared.

    Each row's new tokens are decoded incrementally (a few tokens per step, as streaming
    detokenizers do) and each stop string is looked for in the new text plus the tail of the
    old text that could start it, so a step costs O(rows x longest stop string), whatever the
    vocabulary and answer length. (transformers' `StopStringCriteria` precomputes tables over
    the whole vocabulary for each new set of stop strings instead: seconds of the single
    worker's time for one long string, paid again for every request that sends a new one.)

    Args:
        prompt_len: where the new tokens start in `input_ids` (prompts are left-padded).
        cancelled: one flag per row; a set flag stops that row at the next token.
        stops: the stop strings.
        tokenizer: decodes new tokens (special tokens skipped, as answers are decoded).
    """

    def __init__(self, prompt_len: int, cancelled: Sequence[threading.Event],
                 stops: Sequence[str], tokenizer: Any) -> None:
        self.prompt_len, self.cancelled = prompt_len, list(cancelled)
        self.stops, self.tokenizer = [s for s in stops if s], tokenizer
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        rows = len(self.cancelled)
        self._ids: list[list[int]] = [[] for _ in range(rows)]
        # Per row: tokens [prefix, read) are decoded already; [read, ...) not yet.
        self._prefix, self._read = [0] * rows, [0] * rows
        self._tail = [""] * rows  # the last `_keep` characters of the decoded text

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = [flag.is_set() for flag in self.cancelled]
        if self.stops:
            seen = len(self._ids[0]) if self._ids else 0
            for row, new in zip(self._ids, input_ids[:, self.prompt_len + seen:].tolist(),
                                strict=True):
                row.extend(new)
            for i, (text, pending) in enumerate(self._new_text()):
                window = self._tail[i] + text
                done[i] = done[i] or any(s in window + pending for s in self.stops)
                self._tail[i] = window[-self._keep:] if self._keep else ""
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _new_text(self) -> list[tuple[str, str]]:
        """Per row, the text its tokens since the last call add, and text not final yet.

        The new text is decode(prefix..end) minus decode(prefix..read), so tokenizers that
        decode a token differently after others (SentencePiece spaces) still add up right.
        While it ends in half a character it is not final: the whole characters before are
        returned as pending (looked at, not kept), and the same tokens are decoded again next
        step."""
        rows = range(len(self._ids))
        before = self.tokenizer.batch_decode(
            [self._ids[i][self._prefix[i]:self._read[i]] for i in rows], skip_special_tokens=True)
        after = self.tokenizer.batch_decode(
            [self._ids[i][self._prefix[i]:] for i in rows], skip_special_tokens=True)
        texts = []
        for i in rows:
            # Half a character waits for its other bytes, but not forever: a model emitting
            # invalid UTF-8 must not make every step decode a growing slice.
            pending = len(self._ids[i]) - self._read[i]
            if len(after[i]) > len(before[i]) and (not after[i].endswith("\ufffd")
                                                   or pending > _MAX_PENDING):
                texts.append((after[i][len(before[i]):], ""))
                self._prefix[i], self._read[i] = self._read[i], len(self._ids[i])
            else:
                texts.append(("", after[i].rstrip("\ufffd")[len(before[i]):]))
        return texts


class ServeGenerator(Generator):
    """`Generator` with prompt-token counts, per-row cancel flags, vocabulary-independent stop
    strings and single-prompt streaming (see the module docstring).

    Args:
        stop_strings: as `Generator`'s, but matched by `RowStops` (transformers' own matching
            is not used); answers are still trimmed at them.
        *args, **kwargs: as `Generator`'s.
    """

    def __init__(self, *args: Any, stop_strings: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The conversation format's stops (vicuna_v1's "</s>", plain's "\n") stay: RowStops
        # matches them too. transformers' own matching is switched off, or generate() would
        # ask for a tokenizer argument and fail on every such format.
        format_stops = self.stop_strings
        self.stop_strings = list(dict.fromkeys([*(s for s in stop_strings if s), *format_stops]))
        self.generation_config.stop_strings = None
        self.max_new_tokens = int(self.generation_config.max_new_tokens)
        self._prompt_tokens: list[int] = []
        self._cancelled: Sequence[threading.Event] = ()  # per prompt of the current `run`
        self._row_flags: list[threading.Event] = []  # per row of the batch being encoded

    def _encode(self, texts: list[str], images: list[list[Any]]) -> Any:
        from transformers import StoppingCriteriaList

        batch = dict(super()._encode(texts, images))
        # Real tokens per row, image tokens included: the processor expands each <image>.
        self._prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        # The encoded batch is what Generator passes to model.generate(**batch): the stopping
        # criterion rides along with it.
        flags = self._row_flags if len(self._row_flags) == len(texts) else [_NEVER] * len(texts)
        batch["stopping_criteria"] = StoppingCriteriaList([RowStops(
            batch["input_ids"].shape[1], flags, self.stop_strings, self.tokenizer)])
        return batch

    def _batch(self, indices: list[int], texts: list[str], images: list[list[Any]]) -> Any:
        self._row_flags = [self._cancelled[i] if self._cancelled else _NEVER for i in indices]
        return super()._batch(indices, texts, images)

    def _finish_reason(self, new_tokens: int) -> str:
        return "length" if new_tokens >= self.max_new_tokens else "stop"

    def run(self, prompts: Sequence[PromptInput],
            cancelled: Sequence[threading.Event] = ()) -> list[GenerationResult]:
        """Answers for `prompts` (input order), as few `generate` calls as `batch_size` allows.

        Args:
            prompts: the prompts.
            cancelled: a flag per prompt (or none); setting one stops that prompt's row at the
                next token, and the others go on.
        """
        results: list[GenerationResult | None] = [None] * len(prompts)
        self._cancelled = cancelled
        try:
            for out in self.generate_batches(prompts):
                # generate_batches is lazy: the last _encode call was this batch's.
                for i, text, new, prompt_tokens in zip(out.indices, out.texts, out.new_tokens,
                                                       self._prompt_tokens, strict=True):
                    results[i] = GenerationResult(text, self._finish_reason(new), prompt_tokens,
                                                  new)
        finally:
            self._cancelled, self._row_flags = (), []
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def stream(self, prompt: PromptInput, on_delta: Callable[[str], None],
               cancelled: threading.Event) -> GenerationResult:
        """Generate one answer, calling `on_delta` with each new piece of text.

        The concatenated deltas equal the returned `text`, which equals what `run` returns for
        the same prompt and settings. Generation stops early once `cancelled` is set.
        """
        self._row_flags = [cancelled]
        try:
            batch = self._encode([self.render(prompt)], [prompt.images])
        finally:
            self._row_flags = []
        deltas = DeltaFilter(self.stop_strings)

        def on_text(full: str) -> None:
            if delta := deltas.update(full):
                on_delta(delta)

        streamer = _TokenStreamer(self.tokenizer, on_text)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            output = self.model.generate(**batch, generation_config=self.generation_config,
                                         streamer=streamer)
        new = output[0, batch["input_ids"].shape[1]:]
        text = trim_at_stop(self.tokenizer.decode(new, skip_special_tokens=True),
                            self.stop_strings).strip()
        if delta := deltas.finish(text):
            on_delta(delta)
        return GenerationResult(text, self._finish_reason(len(new)), self._prompt_tokens[0],
                                len(new))
