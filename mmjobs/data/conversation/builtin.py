"""The conversation formats the seed recipes train with, for base models that ship no template.

- `vicuna_v1`: LLaVA-1.5 fine-tuning (haotian-liu/LLaVA `conv_vicuna_v1`, `--version v1`).
- `plain`: LLaVA projector pretraining (`conv_llava_plain`, `--version plain`).
- `anything_ti2ti`: Align-Anything's `ANYTHING_TI2TI` template for Chameleon.

Each reproduces its seed's text exactly; the decisions where the seed is ambiguous or has a
quirk are in each class's docstring and in `mmjobs/data/conversation/README.md`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmjobs.data.conversation.base import (
    ConversationFormat,
    FormatMismatch,
    Message,
    Rendered,
    check_alternating,
    split_system,
)
from mmjobs.data.records import IMAGE_TOKEN

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")


@dataclass
class VicunaV1(ConversationFormat):
    """LLaVA-1.5's `vicuna_v1` (SeparatorStyle.TWO, sep " ", sep2 "</s>").

    Text: `{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...`; the generation
    prompt ends `ASSISTANT:` (no space). Labels: each answer and its `</s>`, from the space
    after `ASSISTANT:` (LLaVA's `preprocess_v1` masks the instruction up to and including the
    colon, so a lone `▁` token before an answer starting with a digit is learned too).

    As LLaVA does (`preprocess_multimodal`, and its eval scripts), a user turn holding images
    has its `<image>` markers removed and put in front, one `<image>\\n` each, and the rest of
    the text stripped. A leading system turn replaces the default system text (LLaVA's data has
    none). Tokenized like LLaVA's `tokenizer_image_token` (`image_chunks`): the text after an
    image is tokenized on its own, so it starts with SentencePiece's `▁` (one more token than
    tokenizing the whole text at once); the released LLaVA-1.5 weights were trained on that.
    """

    name: str = "vicuna_v1"
    image_chunks: bool = True
    stop_strings: tuple[str, ...] = ("</s>",)
    system: str = VICUNA_SYSTEM
    sep: str = " "
    sep2: str = "</s>"  # a literal in LLaVA's conv_vicuna_v1, not tokenizer.eos_token

    def render(self, messages: Sequence[Message]) -> Rendered:
        """See the class docstring."""
        system, turns = split_system(messages)
        check_alternating(turns, last="assistant")
        return self._render(system, turns)

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """See the class docstring."""
        system, turns = split_system(messages)
        check_alternating(turns, last="user")
        return self._render(system, turns).text + "ASSISTANT:"

    def _render(self, system: str | None, turns: list[Message]) -> Rendered:
        text = (self.system if system is None else system) + self.sep
        spans = []
        for turn in turns:
            content = turn["content"]
            if turn["role"] == "user":
                text += "USER: " + self._images_first(content) + self.sep
            elif content:
                text += "ASSISTANT:"
                start = len(text)
                text += " " + content + self.sep2
                spans.append((start, len(text)))
            else:  # LLaVA renders an empty message as the bare role (a generation prompt)
                text += "ASSISTANT:"
        return Rendered(text, spans)

    def _images_first(self, content: str) -> str:
        count = content.count(IMAGE_TOKEN)
        if not count:
            return content
        rest = content.replace(IMAGE_TOKEN, "").strip()
        return (self.tokens.image + "\n") * count + rest


@dataclass
class Plain(ConversationFormat):
    """LLaVA's `plain` format for projector pretraining (`preprocess_plain`).

    Text: the image(s), the caption, "\\n" (`<image>A cat.\\n`): no system text, no roles,
    and the user turn's text is dropped (LLaVA replaces it by the bare image token; pretraining
    data carries a random caption instruction there). Labels: the caption and its "\\n".
    The sample must be one user turn with at least one image and one assistant turn (the
    caption); anything else is a `format_mismatch` reject. Tokenized like LLaVA
    (`image_chunks`). The generation prompt is the image(s) alone; answers stop at "\\n".
    """

    name: str = "plain"
    image_chunks: bool = True
    stop_strings: tuple[str, ...] = ("\n",)

    def render(self, messages: Sequence[Message]) -> Rendered:
        """See the class docstring."""
        images = self._images(messages, last="assistant")
        text = images + messages[-1]["content"] + "\n"
        return Rendered(text, [(len(images), len(text))])

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """See the class docstring."""
        return self._images(messages, last="user")

    def _images(self, messages: Sequence[Message], *, last: str) -> str:
        system, turns = split_system(messages)
        want = ["user", "assistant"] if last == "assistant" else ["user"]
        if system is not None or [t["role"] for t in turns] != want:
            then = "one assistant turn (the caption)" if last == "assistant" else "no other turn"
            raise FormatMismatch(f"the plain format (projector pretraining) takes one user turn "
                                 f"with the image and {then}; got roles "
                                 f"{[t['role'] for t in messages]}")
        count = turns[0]["content"].count(IMAGE_TOKEN)
        if not count:
            raise FormatMismatch("the plain format needs an image in the user turn")
        return self.tokens.image * count


@dataclass
class AnythingTI2TI(ConversationFormat):
    """Align-Anything's `ANYTHING_TI2TI` (align_anything/configs/format_dataset.py).

    Text: `USER: \\n{question}\\nASSISTANT:{response}` (no space after the colon), then the
    tokenizer's EOS, then its SEP token (`<reserved08706>` for Chameleon), as Align-Anything's
    `processor(text + eos_token, images)` gives in the processor's chat mode. The canonical
    user turn is `{question}` as it is (the `align-anything-ti2ti` converter puts the input
    `<image>`s in front; set its `image_separator` to "" for Align-Anything's exact text);
    output images are `<image>` markers in the response. A system turn is prepended as it is
    (the template's system prompt is empty). Multi-turn conversations (the template has one
    turn) repeat `USER: ... ASSISTANT:...` with an EOS after each response.

    Labels: each response (its text and output images' tokens) and its EOS, plus the final SEP.
    Align-Anything meant this (it masks `len(prompt_ids)` positions) but its code takes
    `len()` of a `[1, L]` tensor, so it masks only the first token and trains on the prompt
    and the input image tokens too; mmjobs masks the prompt. The generation prompt ends
    `ASSISTANT:`; answers end at EOS or SEP.
    """

    name: str = "anything_ti2ti"

    def __post_init__(self) -> None:
        self.stop_tokens = tuple(t for t in (self.tokens.eos, self.tokens.sep) if t)

    def render(self, messages: Sequence[Message]) -> Rendered:
        """See the class docstring."""
        system, turns = split_system(messages)
        check_alternating(turns, last="assistant")
        text, spans = self._render(system or "", turns)
        if self.tokens.sep:
            text += self.tokens.sep
            spans[-1] = (spans[-1][0], len(text))
        return Rendered(text, spans)

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """See the class docstring."""
        system, turns = split_system(messages)
        check_alternating(turns, last="user")
        return self._render(system or "", turns)[0]

    def _render(self, text: str, turns: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        spans = []
        for turn in turns:
            if turn["role"] == "user":
                text += "USER: \n" + turn["content"] + "\nASSISTANT:"
            else:
                start = len(text)
                text += turn["content"] + (self.tokens.eos or "")
                spans.append((start, len(text)))
        return text, spans
