"""Conversation formats: how canonical turns become the text a model trains on and answers.

    fmt = resolve_format("auto", processor, where="s3://models/llava")
    rendered = fmt.render(turns)          # text + character spans that carry labels
    prompt = fmt.render_prompt(turns)     # text ending with the generation prompt

Names (`model.conversation_format` in a recipe; `conversation_format` of the pretokenize,
infer and serve stages):

- `auto` (default): the model's chat template; an error naming the built-ins if it has none.
- `template`: the model's chat template (an error if it has none).
- `vicuna_v1`: LLaVA-1.5's `USER: ... ASSISTANT: ...</s>`, tokenized as LLaVA does
  (vicuna-7b-v1.5 / original LLaVA checkpoints).
- `plain`: LLaVA's projector pretraining, image + caption + "\\n".
- `anything_ti2ti`: Align-Anything's `USER: \\n...\\nASSISTANT:...` + EOS + SEP (Chameleon).

See `README.md` in this folder for the exact texts, labels and the decisions taken.
"""

from __future__ import annotations

from typing import Any, get_args

from mmjobs.config import ConversationFormatName
from mmjobs.data.conversation.base import (
    ConversationFormat,
    FormatMismatch,
    Message,
    Rendered,
    SpecialTokens,
)
from mmjobs.data.conversation.builtin import VICUNA_SYSTEM, AnythingTI2TI, Plain, VicunaV1
from mmjobs.data.conversation.template import TemplateFormat, to_parts
from mmjobs.data.records import IMAGE_TOKEN

__all__ = ["BUILTIN_FORMATS", "FORMAT_HELP", "FORMAT_NAMES", "VICUNA_SYSTEM", "ConversationFormat",
           "ConversationFormatName", "FormatMismatch", "Message", "NoChatTemplateError",
           "Rendered", "SpecialTokens", "TemplateFormat", "chat_template_of",
           "resolve_format", "to_parts"]

FORMAT_NAMES: tuple[str, ...] = get_args(ConversationFormatName)
BUILTIN_FORMATS: dict[str, type[ConversationFormat]] = {
    "vicuna_v1": VicunaV1, "plain": Plain, "anything_ti2ti": AnythingTI2TI}
# Shown in errors and config help: which built-in format fits which seed.
FORMAT_HELP = ("vicuna_v1 (LLaVA-1.5 fine-tuning on vicuna-7b-v1.5 or an original LLaVA "
               "checkpoint), plain (LLaVA projector pretraining), anything_ti2ti (Align-Anything "
               "on Chameleon)")


class NoChatTemplateError(ValueError):
    """`auto`/`template` asked for a model that ships no chat template."""


def chat_template_of(processor: Any) -> str | None:
    """The processor's chat template, else its tokenizer's (None if neither has one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template",
                                                                    None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template or None


def resolve_format(name: str, processor: Any, *, where: str = "the model",
                   image_token: str | None = None) -> ConversationFormat:
    """The conversation format `name` for a model's processor (or tokenizer).

    Args:
        name: one of `FORMAT_NAMES`.
        processor: the model's processor, or its tokenizer for text-only models.
        where: the model's location, for error messages.
        image_token: the processor's image token (default: `processor.image_token`, else
            `<image>`).

    Raises:
        ValueError: an unknown name, or a template that cannot be read (see TemplateFormat).
        NoChatTemplateError: `auto`/`template` and the model has no chat template.
    """
    if name not in FORMAT_NAMES:
        raise ValueError(f"conversation_format={name!r} is not a format; use one of "
                         f"{', '.join(FORMAT_NAMES)}")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = SpecialTokens.of(tokenizer, image_token or getattr(processor, "image_token", None)
                              or IMAGE_TOKEN)
    if name in BUILTIN_FORMATS:
        return BUILTIN_FORMATS[name](tokens=tokens)
    template = chat_template_of(processor)
    if template is None:
        raise NoChatTemplateError(
            f"{where}: the model ships no chat template, so conversation_format={name} has "
            f"nothing to render conversations with; set conversation_format "
            f"(model.conversation_format in a recipe) to {FORMAT_HELP}, or add "
            "chat_template.jinja to the model directory")
    try:
        return TemplateFormat(tokens=tokens, chat_template=template,
                              special_tokens_map=dict(tokenizer.special_tokens_map))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
