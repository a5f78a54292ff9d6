"""Tiny models: built from configs, reloaded like any HF model, and they run."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmjobs.models import tiny


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tiny_tokenizer(tiny.chart_corpus(n=500), vocab_size=600)


def _image(size=(70, 50), colour=(200, 30, 30)) -> Image.Image:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


CHAT = [{"role": "system", "content": "You read charts."},
        {"role": "user", "content": "<image>\n가장 큰 값은?"},
        {"role": "assistant", "content": "The largest value is 42."},
        {"role": "user", "content": "And in 2021?"},
        {"role": "assistant", "content": "2021년에는 17입니다."}]


def test_tokenizer_special_ids_and_roundtrip(tokenizer):
    assert len(tokenizer) == 600
    assert [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS[:4]] == [0, 1, 2, 3]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>",
                                                                              "</s>")
    text = "매출 증가율 12.5% in 2021 — 처음 보는 글자도 OK: 鬱"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text
    assert tokenizer("<image><image>", add_special_tokens=False).input_ids == [3, 3]


def test_chat_template_marks_exactly_the_assistant_turns(tokenizer):
    out = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned == "The largest value is 42.</s>2021년에는 17입니다.</s>"
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<s><|system|>\nYou read charts.<|end|>\n<|user|>\n<image>\n")
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_tiny_llava_reloads_and_runs(tiny_llava_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (tiny_llava_dir / "model.safetensors").is_file()
    assert not list(tiny_llava_dir.glob("*.bin"))
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "값?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=[text, text], images=[_image(), _image((30, 90))],
                       return_tensors="pt", padding=True)
    # (56 / 14)^2 = 16 patches; CLIP's CLS is added (+1) and dropped by "default" (-1).
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(dim=1) == 16).all()
    assert inputs["pixel_values"].shape == (2, 3, 56, 56)
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(out.loss)


def test_tiny_chameleon_reloads_and_tokenizes_images(tiny_chameleon_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_chameleon_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_chameleon_dir)
    assert type(model).__name__ == "ChameleonForConditionalGeneration"
    vocab = processor.tokenizer.get_vocab()
    assert vocab[tiny.chameleon_code_token(12)] == model.config.vocabulary_map["IMGIMGBCZ"]

    inputs = processor(text=["<image>what is it?"], images=[_image()], return_tensors="pt",
                       return_for_text_completion=True)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens[0] == "<racm3:break>" and tokens[17] == "<eoss>"
    assert tokens[1:17] == ["<image>"] * 16  # (32 / 8)^2 VQ codes per image

    image_tokens = model.model.get_image_tokens(inputs["pixel_values"])
    assert image_tokens.shape == (1, 16)
    code_ids = set(model.model.vocabulary_mapping.image_tokens)
    assert len(code_ids) == 64 and set(image_tokens[0].tolist()) <= code_ids
    out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


def test_builds_are_deterministic_and_cli_works(tmp_path, tiny_llava_dir):
    assert tiny.main(["llava", str(tmp_path / "again")]) == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_llava_dir / name).read_bytes()


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny.build_tiny_llava(tmp_path, image_size=50, patch_size=14)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny.train_tiny_tokenizer(["abc"], vocab_size=100)


@pytest.mark.parametrize(("image_size", "strategy", "tokens"),
                         [(56, "default", 16), (112, "default", 64), (56, "full", 17)])
def test_llava_configs_state_the_image_tokens_they_use(image_size, strategy, tokens):
    """LlavaConfig says 576 (LLaVA-1.5's 336 px / 14 px) whatever the tower; ours say what the
    model really produces per image, and exports correct configs that still say 576."""
    from mmjobs.models.builder import set_image_seq_length

    config = tiny.tiny_llava_config(image_size=image_size)
    if strategy == "default":
        assert config.image_seq_length == tokens
    config.vision_feature_select_strategy = strategy
    config.image_seq_length = 576  # what older tiny models and merges wrote
    assert set_image_seq_length(config) == tokens == config.image_seq_length


def test_tiny_llava_expands_an_image_to_its_configured_tokens(tiny_llava_dir):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_llava_dir)
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    batch = processor(text=["<image>"], images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == \
        config.image_seq_length == 16
