"""Conversation formats as text: the seeds' exact prompts, label spans, template probing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmjobs.data.conversation import (
    VICUNA_SYSTEM,
    FormatMismatch,
    NoChatTemplateError,
    SpecialTokens,
    TemplateFormat,
    resolve_format,
    to_parts,
)
from mmjobs.data.conversation.builtin import AnythingTI2TI, Plain, VicunaV1
from mmjobs.models.tiny import CHAT_TEMPLATE

PUBLISHED = Path(__file__).resolve().parents[3] / "mmjobs/models/replicas/published"
LLAVA_HF_TEMPLATE = (PUBLISHED / "llava-hf--llava-1.5-7b-hf/chat_template.jinja").read_text()
LLAMA_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "pad_token": "<pad>"}
ONE_TURN = [{"role": "user", "content": "<image>\nWhat is this?"},
            {"role": "assistant", "content": "A cat."}]
TWO_TURNS = [*ONE_TURN, {"role": "user", "content": "And?"},
             {"role": "assistant", "content": "3 dogs."}]


def labelled(rendered) -> list[str]:
    return [rendered.text[s:e] for s, e in rendered.spans]


def llava_hf(template: str = LLAVA_HF_TEMPLATE) -> TemplateFormat:
    return TemplateFormat(chat_template=template, special_tokens_map=LLAMA_TOKENS)


# --------------------------------------------------------------------------- vicuna_v1


def test_vicuna_v1_is_llavas_conversation():
    fmt = VicunaV1()
    one = fmt.render(ONE_TURN)
    assert one.text == f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    # From the space after "ASSISTANT:" (preprocess_v1 masks up to the colon) through </s>.
    assert labelled(one) == [" A cat.</s>"]
    two = fmt.render(TWO_TURNS)
    assert two.text == (f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                        "USER: And? ASSISTANT: 3 dogs.</s>")
    assert labelled(two) == [" A cat.</s>", " 3 dogs.</s>"]
    assert fmt.render_prompt(TWO_TURNS[:3]) == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: And? "
        "ASSISTANT:")
    assert fmt.image_chunks and fmt.stop_strings == ("</s>",)


def test_vicuna_v1_moves_images_first_and_takes_a_system_turn():
    fmt = VicunaV1()
    turns = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "  What is in <image> this picture? "}]
    # As LLaVA's preprocess_multimodal: markers removed, text stripped, "<image>\n" in front.
    assert fmt.render_prompt(turns) == "Be brief. USER: <image>\nWhat is in  this picture? " \
                                       "ASSISTANT:"
    assert fmt.render_prompt([{"role": "user", "content": "Hi"}]).endswith(" USER: Hi ASSISTANT:")
    with pytest.raises(FormatMismatch, match="alternate"):
        fmt.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(FormatMismatch, match="ending with assistant"):
        fmt.render(TWO_TURNS[:3])


# --------------------------------------------------------------------------- plain


def test_plain_is_image_caption_newline():
    fmt = Plain(tokens=SpecialTokens(image="<image>"))
    turns = [{"role": "user", "content": "Render a clear and concise summary.\n<image>"},
             {"role": "assistant", "content": "A cat on a mat."}]
    rendered = fmt.render(turns)
    assert rendered.text == "<image>A cat on a mat.\n"  # the instruction is dropped, as LLaVA
    assert labelled(rendered) == ["A cat on a mat.\n"]
    assert fmt.render_prompt(turns[:1]) == "<image>"
    assert fmt.stop_strings == ("\n",)
    for bad, why in ((TWO_TURNS, "one user turn"),
                     ([{"role": "user", "content": "no image"}, turns[1]], "needs an image"),
                     ([{"role": "system", "content": "s"}, *turns], "one user turn")):
        with pytest.raises(FormatMismatch, match=why):
            fmt.render(bad)


# --------------------------------------------------------------------------- anything_ti2ti


def test_anything_ti2ti_is_align_anythings_template():
    fmt = AnythingTI2TI(tokens=SpecialTokens(bos="<s>", eos="</s>", sep="<reserved08706>"))
    turns = [{"role": "user", "content": "<image>Draw a cat."},
             {"role": "assistant", "content": "Here it is:<image>"}]
    rendered = fmt.render(turns)
    # ANYTHING_TI2TI text + eos_token, and the separator Chameleon's processor appends.
    assert rendered.text == "USER: \n<image>Draw a cat.\nASSISTANT:Here it is:<image></s>" \
                            "<reserved08706>"
    assert labelled(rendered) == ["Here it is:<image></s><reserved08706>"]
    assert fmt.render_prompt(turns[:1]) == "USER: \n<image>Draw a cat.\nASSISTANT:"
    assert fmt.stop_tokens == ("</s>", "<reserved08706>")
    two = fmt.render(TWO_TURNS)
    assert two.text == "USER: \n<image>\nWhat is this?\nASSISTANT:A cat.</s>USER: \nAnd?\n" \
                       "ASSISTANT:3 dogs.</s><reserved08706>"
    assert labelled(two) == ["A cat.</s>", "3 dogs.</s><reserved08706>"]
    no_sep = AnythingTI2TI(tokens=SpecialTokens(eos="</s>"))  # a tokenizer without SEP
    assert no_sep.render(ONE_TURN).text.endswith("ASSISTANT:A cat.</s>")
    assert no_sep.stop_tokens == ("</s>",)


# --------------------------------------------------------------------------- templates


def test_llava_hf_template_gets_content_parts():
    fmt = llava_hf()
    assert (fmt.content_form, fmt.image_separator, fmt.has_generation_blocks) == (
        "parts", "\n", True)
    rendered = fmt.render(ONE_TURN)
    # llava-hf's documented example (FACTS.md), not "<image>\n\nWhat" with the newline twice.
    assert rendered.text == "USER: <image>\nWhat is this? ASSISTANT: A cat. "
    assert labelled(rendered) == ["A cat."]  # the template's trailing space is formatting
    assert fmt.render_prompt(ONE_TURN[:1]) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert labelled(fmt.render(TWO_TURNS)) == ["A cat.", "3 dogs."]
    # A plain string renders as nothing in this template: what the pretokenizer used to hit.
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template(conversations=[[{"role": "user", "content": "hi"}]],
                                     chat_template=LLAVA_HF_TEMPLATE)
    assert texts[0] == "USER: "


def test_spans_without_generation_blocks_are_the_same():
    stripped = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", LLAVA_HF_TEMPLATE)
    with_blocks, without = llava_hf(), llava_hf(stripped)
    assert not without.has_generation_blocks
    for turns in (ONE_TURN, TWO_TURNS):
        assert without.render(turns) == with_blocks.render(turns)


def test_string_templates_keep_images_in_place():
    fmt = TemplateFormat(chat_template=CHAT_TEMPLATE, special_tokens_map=LLAMA_TOKENS)
    assert fmt.content_form == "string" and fmt.image_separator == ""
    turns = [{"role": "user", "content": "Compare <image> with <image>."},
             {"role": "assistant", "content": "Same."}]
    rendered = fmt.render(turns)
    assert "Compare <image> with <image>." in rendered.text
    assert labelled(rendered) == ["Same.</s>"]


def test_unreadable_templates_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="neither from string content nor from content parts"):
        TemplateFormat(chat_template="{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    parts_without_images = ("{% for m in messages %}{% for p in m['content'] %}"
                            "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
                            "{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="without the processor's image token"):
        TemplateFormat(chat_template="{% if messages[0]['content'] is string %}{% else %}"
                                     + parts_without_images + "{% endif %}")
    refusing = TemplateFormat(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(FormatMismatch, match="roles must alternate"):
        refusing.render(ONE_TURN)


def test_to_parts_strips_only_the_templates_separator():
    assert to_parts("<image>\nWhat?", "\n") == [{"type": "image"},
                                                {"type": "text", "text": "What?"}]
    assert to_parts("<image>\n<image>\nWhat?", "\n") == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "What?"}]
    assert to_parts("a<image>b<image>") == [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"},
        {"type": "image"}]


# --------------------------------------------------------------------------- names


class _Tokenizer:
    bos_token, eos_token, sep_token = "<s>", "</s>", None
    special_tokens_map = LLAMA_TOKENS

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template


def test_resolve_format_by_name():
    assert isinstance(resolve_format("vicuna_v1", _Tokenizer()), VicunaV1)
    assert resolve_format("auto", _Tokenizer(CHAT_TEMPLATE)).content_form == "string"
    with pytest.raises(NoChatTemplateError) as e:
        resolve_format("auto", _Tokenizer(), where="s3://models/vicuna")
    assert "s3://models/vicuna: the model ships no chat template" in str(e.value)
    assert all(n in str(e.value) for n in ("vicuna_v1", "plain", "anything_ti2ti"))
    with pytest.raises(NoChatTemplateError):
        resolve_format("template", _Tokenizer())
    with pytest.raises(ValueError, match="'vicuna' is not a format; use one of auto, template"):
        resolve_format("vicuna", _Tokenizer())
