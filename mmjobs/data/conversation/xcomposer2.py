"""InternLM-XComposer2's turn format, as its fine-tuning code and ChartMoE train and evaluate.

`internlm_xcomposer2` (training; ChartMoE's `conv2text`):

    [UNUSED_TOKEN_146]user\\n{question.strip()}[UNUSED_TOKEN_145]\\n
    [UNUSED_TOKEN_146]assistant\\n{answer.strip()}[UNUSED_TOKEN_145]\\n ... </s>

(one line here per turn; the real text has no line break between them). Images stay where the
user turn has them (`<ImageHere>` in ChartMoE-Data, mmjobs' `<image>` in canonical rows, both
written as the processor's image token). A leading system turn becomes
`[UNUSED_TOKEN_146]system\\n{text}[UNUSED_TOKEN_145]\\n` (the remote code's `chat()`; the
fine-tuning data has none). Labels, as the hub's `mask_human_targets`: each answer with its
`[UNUSED_TOKEN_145]\\n`, and the final `</s>`; user turns and the
`[UNUSED_TOKEN_146]assistant\\n` headers are masked. Tokenized whole (no per-chunk
tokenization: the remote code embeds the text between images with one tokenizer call each,
which for InternLM2's tokenizer without a dummy prefix on chunks gives the same ids).
Generation stops at `[UNUSED_TOKEN_145]` or EOS.

`chartmoe_eval` (ChartMoE's `eval_ChartQA.py` / `ChartMoE_Robot`): the same turns, but every
image of the prompt goes first, right after BOS, and the question's text follows the turn header
as given, not stripped (`self.prompt.format(question)`; only the images and the line break
after each are taken out): `<image>[UNUSED_TOKEN_146]user\\n{prompt}[UNUSED_TOKEN_145]\\n
[UNUSED_TOKEN_146]assistant\\n`. The robot inserts the image embeddings at character 0 rather
than at a placeholder; this renders the same sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmjobs.data.conversation.base import (
    ConversationFormat,
    Message,
    Rendered,
    check_alternating,
    split_system,
)
from mmjobs.data.records import IMAGE_TOKEN

TURN_START, TURN_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"


@dataclass
class InternLMXComposer2(ConversationFormat):
    """See the module docstring (`internlm_xcomposer2`)."""

    name: str = "internlm_xcomposer2"
    stop_tokens: tuple[str, ...] = (TURN_END,)
    images_first: bool = False

    def render(self, messages: Sequence[Message]) -> Rendered:
        """See the module docstring."""
        system, turns = split_system(messages)
        check_alternating(turns, last="assistant")
        text, spans = self._render(system, turns)
        if self.tokens.eos:
            text += self.tokens.eos
            spans[-1] = (spans[-1][0], len(text))
        return Rendered(text, spans)

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """See the module docstring."""
        system, turns = split_system(messages)
        check_alternating(turns, last="user")
        return self._render(system, turns)[0] + f"{TURN_START}assistant\n"

    def _render(self, system: str | None, turns: list[Message]
                ) -> tuple[str, list[tuple[int, int]]]:
        text, spans, front = "", [], ""
        if system is not None:
            text += f"{TURN_START}system\n{system}{TURN_END}\n"
        for turn in turns:
            content = turn["content"].replace(IMAGE_TOKEN, self.tokens.image)
            if turn["role"] == "user":
                if self.images_first:
                    front += self.tokens.image * content.count(self.tokens.image)
                    # ChartMoE's robot formats the question as given (no strip): drop only the
                    # images and the line break a benchmark put after each.
                    content = content.replace(self.tokens.image + "\n", "").replace(
                        self.tokens.image, "")
                else:
                    content = content.strip()
                text += f"{TURN_START}user\n{content}{TURN_END}\n"
            else:
                text += f"{TURN_START}assistant\n"
                start = len(text)
                text += f"{content.strip()}{TURN_END}\n"
                spans.append((start, len(text)))
        return front + text, [(a + len(front), b + len(front)) for a, b in spans]


@dataclass
class ChartMoEEval(InternLMXComposer2):
    """See the module docstring (`chartmoe_eval`)."""

    name: str = "chartmoe_eval"
    images_first: bool = True
