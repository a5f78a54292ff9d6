"""Batched generation on the tiny LLaVA: left padding, order, stop strings, sampling, adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmjobs.data.conversation import to_parts
from mmjobs.eval.generate import (
    Generator,
    PromptInput,
    load_for_inference,
    trim_at_stop,
)

QUESTIONS = [
    "What?",
    "What is the largest value in the chart shown here? Please answer with a number only.",
    "막대 그래프를 표로 바꾸세요.",
    "Describe the chart, then give the total of all the bars and the name of the largest.",
    "Which is larger?",
]


def chart(k: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.new("RGB", size, ((k * 70) % 256, 120, (200 - k * 30) % 256))


def prompts() -> list[PromptInput]:
    """Prompts of different lengths: one image, two images, and none."""
    items = [PromptInput(f"<image>\n{q}", [chart(k)]) for k, q in enumerate(QUESTIONS)]
    items.append(PromptInput("Compare <image> with <image>.", [chart(7), chart(8, (30, 60))]))
    items.append(PromptInput("No chart: what is 2 + 2?", []))
    return items


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir))


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time(loaded):
    items = prompts()
    batched = Generator(loaded, batch_size=4, max_new_tokens=12)
    one_by_one = Generator(loaded, batch_size=1, max_new_tokens=12)
    lengths = {len(batched.tokenizer(batched.render(p))["input_ids"]) for p in items}
    assert len(lengths) > 2, "prompts must differ in length, so batches are padded"
    expected = one_by_one.generate(items)
    assert batched.generate(items) == expected
    assert any(expected), "the tiny model should produce some text"
    # Input order is kept whatever order the batches ran in.
    assert batched.generate(items[::-1]) == expected[::-1]


def test_left_padding_and_new_token_counts(loaded):
    gen = Generator(loaded, batch_size=8, max_new_tokens=5)
    items = prompts()
    assert gen.tokenizer.padding_side == "left"
    batch = gen._encode([gen.render(p) for p in items[:2]], [p.images for p in items[:2]])
    # Shape [B, L]: the shorter prompt is padded at the start; both end on real tokens.
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][0, 0] == 0
    (out,) = list(gen.generate_batches(items))
    assert sorted(out.indices) == list(range(len(items)))
    assert all(0 <= n <= 5 for n in out.new_tokens) and sum(out.new_tokens) > 0


def test_stop_strings_stop_and_trim(loaded):
    items = prompts()[:4]
    free = Generator(loaded, batch_size=4, max_new_tokens=16).generate(items)
    text = next(t for t in free if len(t) > 4)
    stop = text[2:4]  # occurs in that answer, after a non-empty start
    stopped = Generator(loaded, batch_size=4, max_new_tokens=16,
                        stop_strings=[stop]).generate(items)
    for before, after in zip(free, stopped, strict=True):
        assert stop not in after
        assert after == before.split(stop)[0].strip()
    assert trim_at_stop("answer: 42\n\nQuestion", ["\n\n", "Question"]) == "answer: 42"
    assert trim_at_stop("no stop here", ["###", ""]) == "no stop here"


def test_sampling_is_reproducible_with_a_seed(loaded):
    items = prompts()[:4]

    def sample(seed: int) -> list[str]:
        return Generator(loaded, batch_size=2, max_new_tokens=12, do_sample=True,
                         temperature=1.5, seed=seed).generate(items)

    before = torch.random.get_rng_state()
    first = sample(1)
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG must be untouched"
    assert sample(1) == first
    assert sample(2) != first


def test_conversations_and_content_parts(loaded):
    gen = Generator(loaded, batch_size=2, max_new_tokens=4)
    turns = [{"role": "system", "content": "You read charts."},
             {"role": "user", "content": "<image>\nFirst?"},
             {"role": "assistant", "content": "3"},
             {"role": "user", "content": "And the <image> second?"}]
    text = gen.render(PromptInput(turns, [chart(1), chart(2)]))
    assert "You read charts." in text and text.count("<image>") == 2
    assert text.endswith("<|assistant|>\n")
    assert len(gen.generate([PromptInput(turns, [chart(1), chart(2)])])) == 1
    assert to_parts("a<image>b<image>") == [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"},
        {"type": "image"}]
    with pytest.raises(ValueError, match="must end with a user turn"):
        gen.render(PromptInput(turns[:3], [chart(1)]))


def test_bad_settings_are_reported_together(loaded):
    with pytest.raises(ValueError) as e:
        Generator(loaded, batch_size=0, do_sample=True, temperature=0, top_p=1.5)
    assert all(k in str(e.value) for k in ("batch_size=0", "temperature=0", "top_p=1.5"))


def make_lora(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> None:
    """A LoRA adapter with random (non-zero) B on the LM attention, and the merged model."""
    from peft import LoraConfig, get_peft_model

    from mmjobs.models.builder import export_model_dir

    base = load_for_inference(str(base_dir))
    peft_model = get_peft_model(base.model, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    with torch.no_grad():  # large enough to change greedy answers
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    peft_model.save_pretrained(adapter_dir)
    export_model_dir(peft_model.merge_and_unload(), merged_dir, source_dir=base_dir)


@pytest.mark.slow
def test_adapter_unmerged_and_merged_agree(tiny_llava_dir, tmp_path):
    make_lora(tiny_llava_dir, tmp_path / "adapter", tmp_path / "merged")
    items = prompts()

    def answers(model: Path, adapter: Path | None = None, merge: bool | None = None):
        loaded = load_for_inference(str(model), str(adapter) if adapter else None, merge=merge)
        return Generator(loaded, batch_size=4, max_new_tokens=10).generate(items)

    merged = answers(tmp_path / "merged")
    assert answers(tiny_llava_dir, tmp_path / "adapter", merge=False) == merged
    assert answers(tiny_llava_dir, tmp_path / "adapter") == merged  # float32: merged on load
    assert answers(tiny_llava_dir) != merged, "the adapter should change the answers"
