"""LaVIN's sequence layout (luogen1996/LaVIN), as its ScienceQA training and evaluation build it.

LaVIN has no chat turns. One sample is an instruction (for ScienceQA the QCM prompt ending
`Response:`, built by `mmjobs.data.converters.scienceqa` with `style: lavin`) and its answer
(`The answer is A. BECAUSE: ...`), tokenized with SentencePiece as:

    with an image:   BOS  sp("Image: ")    <6 visual tokens>  sp(prompt + answer)  EOS
    text only:       BOS  sp("Image: N/A")                    sp(prompt + answer)  EOS

(`util/datasets.py` `ScienceQADataSet.tokenize` encodes `prompt + answer` with BOS and EOS;
`engine.py` encodes the prefixes "Image: " / "Image: N/A" without BOS; `lavin/model.py`
`insert_image_embeds` splices prefix and image features in right after BOS). The prompt and
answer are concatenated as they are: LaVIN trains on `...Response:The answer is A.` (no space).
The modality token in front of all this is the model's (`mmjobs.models.lavin.modeling`), not
text.

Rendered text: `Image: <image>{prompt}{answer}</s>` or `Image: N/A` + `PIECE_BREAK` +
`{prompt}{answer}</s>`. Tokenized piece by piece (`image_chunks`, with `PIECE_BREAK` as a break
that contributes no token), so each piece gets its own SentencePiece word-start `▁` exactly as
LaVIN's separate `encode` calls give it. The user turn's `<image>` marker (the ScienceQA
converter puts `<image>\\n` first) is taken out and the rest stripped; LaVIN's prompt never
mentions the image, which always sits after "Image: ".

Labels: the answer and EOS (LaVIN masks BOS, the prefix, the image positions and the prompt).
LaVIN masks the first `len(encode(prompt))` positions of `encode(prompt + answer)`; here the
answer's characters are labelled, the same tokens unless SentencePiece merged the prompt's last
characters with the answer's first (`:` + `The` is two pieces in LLaMA's vocabulary).

Truncation (`truncate`): LaVIN never drops a long sample; it cuts the sequence, modality token
included, at `--max_seq_len` 512, so a sample keeps at most 511 ids and an answer past that loses
its tail and its EOS. `SampleEncoder` cuts LaVIN models at that budget. A sample whose answer
starts after the cut is rejected (`too_long`): LaVIN would train on it with no labelled
position, which adds nothing to the loss.

Generation prompt: the same text up to the prompt (`Image: <image>{prompt}`); LaVIN's
`LaVIN_Generator` builds exactly these ids and stops at EOS (`eval.py`: at most 64 new tokens).

Refused (`FormatMismatch`): a system turn, more than one user/assistant exchange, more than one
image (LaVIN's layout has one image slot), and text containing `PIECE_BREAK`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmjobs.data.conversation.base import ConversationFormat, FormatMismatch, Message, Rendered
from mmjobs.data.records import IMAGE_TOKEN

# A private-use character: "tokenize the text on either side on its own" (no token of its own).
PIECE_BREAK = "\ue000"
IMAGE_PREFIX = "Image: "  # engine.py: tokenizer.encode("Image: ", bos=False, eos=False)
NO_IMAGE_PREFIX = "Image: N/A"


@dataclass
class Lavin(ConversationFormat):
    """See the module docstring."""

    name: str = "lavin"
    image_chunks: bool = True
    piece_break: str | None = PIECE_BREAK
    truncate: bool = True

    def render(self, messages: Sequence[Message]) -> Rendered:
        """See the module docstring."""
        prompt, answer = self._split(messages, with_answer=True)
        start = len(prompt)
        text = prompt + answer + (self.tokens.eos or "")
        return Rendered(text, [(start, len(text))])

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """See the module docstring."""
        return self._split(messages, with_answer=False)[0]

    def _split(self, messages: Sequence[Message], *, with_answer: bool) -> tuple[str, str]:
        roles = [m["role"] for m in messages]
        want = ["user", "assistant"] if with_answer else ["user"]
        if roles != want:
            what = "and its answer" if with_answer else "(the generation prompt)"
            raise FormatMismatch(f"the lavin format takes one user turn {what}, no system "
                                 f"turn and no earlier exchanges; got roles {roles}")
        texts = [m["content"] for m in messages]
        if any(PIECE_BREAK in t for t in texts):
            raise FormatMismatch("the text contains U+E000, which the lavin format uses as its "
                                 "piece break; remove it from the data")
        question = texts[0]
        images = question.count(IMAGE_TOKEN)
        if images > 1:
            raise FormatMismatch(f"{images} images in the user turn; LaVIN's layout has one "
                                 "image slot (after 'Image: ')")
        question = question.replace(IMAGE_TOKEN, "").strip()
        head = IMAGE_PREFIX + self.tokens.image if images else NO_IMAGE_PREFIX + PIECE_BREAK
        return head + question, texts[1] if with_answer else ""
