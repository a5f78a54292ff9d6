"""InternLM-XComposer2's turn format (ChartMoE's conv2text) and ChartMoE's eval prompt, on the
converted XComposer2 replica's processor (real turn-marker ids, 1225 image positions)."""

from __future__ import annotations

import pytest

from mmjobs.data.conversation import SpecialTokens, resolve_format
from mmjobs.data.sample_encoder import IGNORE_INDEX, SampleEncoder
from tests.unit.data.test_conversation_tokens import png, sample

TOKENS = SpecialTokens(bos="<s>", eos="</s>", image="<ImageHere>")


@pytest.fixture(scope="module")
def xcomposer2_dir(replica_dir, tmp_path_factory):
    from mmjobs.models.xcomposer2 import convert_xcomposer2

    out = tmp_path_factory.mktemp("xc2-format") / "native"
    convert_xcomposer2(replica_dir("internlm/internlm-xcomposer2-7b"), out,
                       vision_dir=replica_dir("openai/clip-vit-large-patch14-336"))
    return out


def test_training_text_is_chartmoes_conv2text():
    from mmjobs.data.conversation.xcomposer2 import InternLMXComposer2

    fmt = InternLMXComposer2(tokens=TOKENS)
    rendered = fmt.render([{"role": "user", "content": "<image> Convert the chart to a table. "},
                           {"role": "assistant", "content": " | year | sales |\n"}])
    assert rendered.text == ("[UNUSED_TOKEN_146]user\n<ImageHere> Convert the chart to a table."
                             "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n| year | sales |"
                             "[UNUSED_TOKEN_145]\n</s>")
    assert [rendered.text[a:b] for a, b in rendered.spans] == \
        ["| year | sales |[UNUSED_TOKEN_145]\n</s>"]
    assert fmt.stop_tokens == ("[UNUSED_TOKEN_145]",)


def test_chartmoe_eval_prompt_puts_the_image_right_after_bos():
    fmt = resolve_format("chartmoe_eval", None, image_token="<ImageHere>")
    question = "Answer the question using a single word or phrase.What is the peak?"
    prompt = fmt.render_prompt([{"role": "user", "content": "<image>\n" + question}])
    assert prompt == ("<ImageHere>[UNUSED_TOKEN_146]user\n" + question +
                      "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")


def test_chartmoe_eval_prompt_is_eval_chartqas_text_for_real_chartqa_items(tmp_path):
    """Every real ChartQA item, direct and PoT idx 1, renders exactly as ChartMoE's
    `self.prompt.format(query)` (no strip: a noisy human query keeps its spaces)."""
    import json

    from mmjobs.eval.benchmarks import load_benchmark
    from tests.real_data import REAL, placeholder_images

    root = REAL / "chartqa"
    rows = [r for split in ("human", "augmented")
            for r in json.loads((root / "test" / f"test_{split}.json").read_text("utf-8"))]
    pngs = placeholder_images(tmp_path / "png", {r["imgname"] for r in rows})
    fmt = resolve_format("chartmoe_eval", None, image_token="<ImageHere>")
    upstream = {  # eval_ChartQA.py: self.prompt and pot_prompts[1], verbatim
        False: "[UNUSED_TOKEN_146]user\nAnswer the question using a single word or phrase.{}"
               "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
        True: "[UNUSED_TOKEN_146]user\nPlease give the program of thought in python code. Use "
              "print function to output the answer in the end.{}[UNUSED_TOKEN_145]\n"
              "[UNUSED_TOKEN_146]assistant\n"}
    for pot, template in upstream.items():
        items = list(load_benchmark("chartqa", root, image_dir=str(pngs), pot=pot))
        assert len(items) == len(rows) == 66
        for item, row in zip(items, rows, strict=True):
            rendered = fmt.render_prompt([{"role": "user", "content": item.prompt}])
            assert rendered == "<ImageHere>" + template.format(row["query"])
    # a query with surrounding spaces keeps them, as ChartMoE's str.format does
    padded = fmt.render_prompt([{"role": "user", "content": "<image>\nQ.  Which year ? "}])
    assert padded == ("<ImageHere>[UNUSED_TOKEN_146]user\nQ.  Which year ? [UNUSED_TOKEN_145]\n"
                      "[UNUSED_TOKEN_146]assistant\n")


def test_multi_turn_labels_only_answers(xcomposer2_dir):
    from mmjobs.models.xcomposer2 import register

    register()
    encoder = SampleEncoder(xcomposer2_dir, max_length=4096,
                            conversation_format="internlm_xcomposer2")
    # ChartMoE-Data's own placeholder: the encoder counts the processor's image token.
    encoded = encoder.encode(sample("<ImageHere> What is the peak?", "2019", "2020"),
                             [png()])
    ids, labels = encoded.input_ids, encoded.labels
    assert ids[0] == 1 and ids.count(encoder.image_token_id) == 1225
    assert ids.count(92543) == 4 and ids.count(92542) == 4  # 2 rounds: 4 turn starts and ends
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert encoder.tokenizer.decode(learned) == \
        "2019[UNUSED_TOKEN_145]\n2020[UNUSED_TOKEN_145]\n</s>"
    assert learned[-1] == 2 and 92542 in learned
