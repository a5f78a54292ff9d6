"""What every conversation format provides: the rendered text and the character spans to learn.

A format turns canonical turns (`{"role": "system"|"user"|"assistant", "content": str}`, with
`<image>` marking each image) into the text a model reads. `render` returns the whole
conversation and the spans of it that carry labels (the assistant's output and the end-of-turn
marker the seed trains on); `render_prompt` returns the conversation so far followed by the
generation prompt (what the model continues at inference).

Tokenization is the encoder's job (`mmjobs.data.sample_encoder`, `mmjobs.eval.generate`): it
tokenizes the text (adding the tokenizer's BOS unless the text starts with it), maps token
character offsets onto the spans, and, for formats with `image_chunks`, tokenizes the text
between images on its own as LLaVA does (`mmjobs.data.conversation.chunks`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmjobs.data.records import IMAGE_TOKEN

Message = dict[str, Any]  # {"role": ..., "content": str}


class FormatMismatch(ValueError):
    """A conversation this format cannot render (e.g. `plain` needs exactly image + caption).

    The pretokenizer turns it into a `format_mismatch` reject for that row.
    """


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation.

    Attributes:
        text: what the model reads, `<image>` (the processor's image token) where images go.
        spans: `(start, end)` character ranges of `text` whose tokens get labels, in order.
    """

    text: str
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special token strings a format writes into the text."""

    bos: str | None = None
    eos: str | None = None
    sep: str | None = None
    image: str = IMAGE_TOKEN

    @classmethod
    def of(cls, tokenizer: Any, image_token: str = IMAGE_TOKEN) -> SpecialTokens:
        """The special tokens of a transformers tokenizer."""
        return cls(bos=getattr(tokenizer, "bos_token", None),
                   eos=getattr(tokenizer, "eos_token", None),
                   sep=getattr(tokenizer, "sep_token", None), image=image_token)


@dataclass
class ConversationFormat(ABC):
    """Base of the formats. Subclasses implement `render` and `render_prompt`.

    Attributes:
        name: the recipe name (`model.conversation_format`).
        tokens: the tokenizer's special tokens.
        image_chunks: tokenize the text between `<image>` markers one piece at a time, each
            as a fresh text (LLaVA's `tokenizer_image_token`), instead of the whole text at once.
        stop_strings: generation stops at these strings (the answer is cut before them).
        stop_tokens: token strings that end an answer, besides the model's EOS.
    """

    name: str = ""
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    image_chunks: bool = False
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()

    @abstractmethod
    def render(self, messages: Sequence[Message]) -> Rendered:
        """The whole conversation and the spans that carry labels.

        Raises:
            FormatMismatch: the conversation does not fit the format.
        """

    @abstractmethod
    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The conversation (ending with a user turn) followed by the generation prompt.

        Raises:
            FormatMismatch: the conversation does not fit the format.
        """

    def describe(self) -> dict[str, Any]:
        """What a reader of pre-tokenized shards needs to know about the format."""
        return {"name": self.name, "image_chunks": self.image_chunks,
                "stop_strings": list(self.stop_strings), "stop_tokens": list(self.stop_tokens)}


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """`(system text or None, the other turns)`; a system turn may only come first."""
    turns = list(messages)
    system = None
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    if any(t["role"] == "system" for t in turns):
        raise FormatMismatch("a system turn after the first turn")
    return system, turns


def check_alternating(turns: Sequence[Message], *, last: str | None) -> None:
    """Turns alternate user, assistant, user, ... (ending with `last` when given).

    Raises:
        FormatMismatch: naming the roles found.
    """
    roles = [t["role"] for t in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if not roles or roles != expected or (last is not None and roles[-1] != last):
        want = f", ending with {last}" if last else ""
        raise FormatMismatch(f"turns must alternate user/assistant from a user turn{want}; "
                             f"got {roles}")
