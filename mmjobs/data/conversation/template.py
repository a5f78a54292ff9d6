"""The model's own chat template as a conversation format, in whichever form it takes.

Canonical turns hold string content with `<image>` markers. Chat templates come in two kinds:
ones that render `message['content']` as a string (mmjobs' tiny models, most text LLMs) and
ones that iterate content parts `{"type": "image"}` / `{"type": "text", "text": ...}`
(llava-hf's: a plain string renders as nothing there). Which one a template is, is found by
rendering a probe turn both ways, never from the model's name: string content first (it keeps
each `<image>` where the data put it), parts when the string does not show up.

For part templates each turn is split at its `<image>` markers into parts in order. What the
template writes between an image and the text after it (llava-hf: "\\n") is found by a second
probe and removed from the start of that text, so `"<image>\\nWhat is this?"` renders as
`<image>\\nWhat is this?` rather than with the newline twice. (A template that puts all images
first, as llava-hf's does, moves images that sat between texts: that is the template's choice.)

Label spans: the template's `{% generation %}` blocks when it has them; otherwise each
assistant turn is located by rendering the conversation up to it with
`add_generation_prompt=True` and up to its end (the span is the difference), as TRL and
LLaVA-style trainers do. Whitespace around a span is cut: it is formatting (llava-hf writes
"ASSISTANT: " but prompts with "ASSISTANT:", and ends every text part with a space), and a
label on trailing whitespace would also cover the space-prefixed first token of the next
turn (`▁USER`). Both ways give the same spans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmjobs.data.conversation.base import ConversationFormat, FormatMismatch, Message, Rendered
from mmjobs.data.records import IMAGE_TOKEN

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = "mmjobs probe 7f3a"


@dataclass
class TemplateFormat(ConversationFormat):
    """A Jinja chat template (the processor's or the tokenizer's).

    Attributes:
        chat_template: the template source.
        special_tokens_map: the tokenizer's special tokens, passed to the template as
            variables (`bos_token`, `eos_token`, ...).
        content_form: "string" or "parts" (set by probing; see the module docstring).
        image_separator: what a part template writes after an image part ("" for strings).
        has_generation_blocks: the template marks assistant output with `{% generation %}`.

    Raises:
        ValueError: the template renders a probe turn neither as a string nor as parts, or
            renders image parts without the processor's image token.
    """

    name: str = "template"
    chat_template: str = ""
    special_tokens_map: dict[str, Any] = field(default_factory=dict)
    content_form: str = field(init=False, default="string")
    image_separator: str = field(init=False, default="")
    has_generation_blocks: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.has_generation_blocks = bool(GENERATION_RE.search(self.chat_template))
        self.content_form = self._probe_form()
        if self.content_form == "parts":
            self.image_separator = self._probe_image_separator()

    # ----------------------------------------------------------------- public

    def render(self, messages: Sequence[Message]) -> Rendered:
        """The conversation and its assistant spans (see the module docstring).

        Raises:
            FormatMismatch: the template refused the conversation (e.g. its own
                `raise_exception` on roles that do not alternate).
            ValueError: the template has no generation blocks and its renderings of a prefix of
                the conversation are not prefixes of the whole (assistant turns cannot be
                located): a property of the template, not of the row.
        """
        converted = [self._message(m) for m in messages]
        if self.has_generation_blocks:
            text, spans = self._render(converted, return_assistant_tokens_mask=True)
            return Rendered(text, [_strip_span(text, int(s), int(e)) for s, e in spans])
        text, _ = self._render(converted)
        spans = []
        for k, message in enumerate(converted):
            if message["role"] != "assistant":
                continue
            prompt, _ = self._render(converted[:k], add_generation_prompt=True)
            upto, _ = self._render(converted[:k + 1])
            if not (text.startswith(upto) and upto.startswith(prompt)):
                raise ValueError(
                    "the chat template has no {% generation %} blocks and its renderings of a "
                    "conversation prefix are not prefixes of the whole, so assistant turns "
                    "cannot be located; add {% generation %}...{% endgeneration %} around the "
                    "assistant content in the template, or set conversation_format to a "
                    "built-in format")
            spans.append(_strip_span(text, len(prompt), len(upto)))
        return Rendered(text, spans)

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The conversation with the template's generation prompt.

        Raises:
            FormatMismatch: the template refused the conversation.
        """
        return self._render([self._message(m) for m in messages], add_generation_prompt=True)[0]

    def describe(self) -> dict[str, Any]:
        """The format's summary plus how the template was read."""
        return {**super().describe(), "content_form": self.content_form,
                "image_separator": self.image_separator,
                "has_generation_blocks": self.has_generation_blocks}

    # ----------------------------------------------------------------- internals

    def _message(self, message: Message) -> Message:
        content = message["content"]
        if self.content_form == "string":
            return {"role": message["role"],
                    "content": content.replace(IMAGE_TOKEN, self.tokens.image)}
        return {"role": message["role"], "content": to_parts(content, self.image_separator)}

    def _render(self, messages: list[Message], **kwargs: Any) -> tuple[str, list]:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[messages], chat_template=self.chat_template,
                **self.special_tokens_map, **kwargs)
        except TemplateError as e:
            raise FormatMismatch(f"the chat template refused the conversation: {e}") from None
        return texts[0], (indices[0] if indices else [])

    def _probe_form(self) -> str:
        problems, refused = [], 0
        for form, content in (("string", _PROBE), ("parts", [{"type": "text", "text": _PROBE}])):
            try:
                text, _ = self._render([{"role": "user", "content": content}],
                                       add_generation_prompt=True)
            except FormatMismatch:  # the template's own raise_exception
                refused += 1
                continue
            except Exception as e:  # any failure means "not this form"
                problems.append(f"{form}: {type(e).__name__}: {e}")
                continue
            if _PROBE in text:
                return form
            problems.append(f"{form}: the text is missing from {text!r}")
        if refused == 2:
            # It refuses a lone user turn either way, so the form cannot be told; strings are
            # the default, and each conversation it refuses is refused when rendered.
            return "string"
        raise ValueError("the chat template renders a user turn neither from string content "
                         "nor from content parts (" + "; ".join(problems) + "); fix the "
                         "template or set conversation_format to a built-in format")

    def _probe_image_separator(self) -> str:
        content = [{"type": "image"}, {"type": "text", "text": _PROBE}]
        text, _ = self._render([{"role": "user", "content": content}],
                               add_generation_prompt=True)
        at = text.find(_PROBE)
        image = text.rfind(self.tokens.image, 0, at)
        if image < 0:
            raise ValueError(f"the chat template renders an image part without the "
                             f"processor's image token {self.tokens.image!r} (got {text!r}); "
                             "the processor could not place the image")
        return text[image + len(self.tokens.image):at]


def to_parts(content: str, image_separator: str = "") -> list[dict[str, str]]:
    """`"<image>\\nWhat?"` -> `[{"type": "image"}, {"type": "text", "text": "What?"}]`.

    `image_separator` (what the template writes after an image) is removed from the start of
    the text that follows an image, so the template does not write it a second time.
    """
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(content.split(IMAGE_TOKEN)):
        if k:
            parts.append({"type": "image"})
            if image_separator and piece.startswith(image_separator):
                piece = piece[len(image_separator):]
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (see the module docstring)."""
    inner = text[start:end]
    start += len(inner) - len(inner.lstrip())
    return start, start + len(inner.strip())
