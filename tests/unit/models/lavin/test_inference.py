"""LaVIN inference on the replicas (the Meta-format LLaMA imported, the 224 px CLIP): a few
adapter steps on two ScienceQA-style samples (one with an image, one text only) encoded by the
`lavin` format, the export `train.finetune: mma` writes, the base + adapters loaded back, and
greedy generation that gives the same tokens as the trained model in memory; the KV-cache
path gives what a step-by-step forward without cache gives, batched or alone.
"""

from __future__ import annotations

import io

import pytest
import torch

from mmjobs.data.converters.scienceqa import lavin_example
from mmjobs.data.sample_encoder import SampleEncoder
from mmjobs.eval.generate import PromptInput
from mmjobs.eval.lavin import MAX_NEW_TOKENS, lavin_generator, load_lavin
from mmjobs.models.builder import LoadedModel
from mmjobs.models.convert.checkpoints import ConversionError

pytestmark = pytest.mark.slow  # about a minute on 2 cores (six adapter steps, 3 models)

FIELDS = [
    {"question": "Which of these is a magnet?", "context": "N/A",
     "choice": "(A) iron nail (B) bar magnet", "answer": "B",
     "lecture": "Magnets attract iron.", "solution": "A bar magnet is a magnet."},
    {"question": "What is the color of the sky in the picture?", "context": "Look up.",
     "choice": "(A) blue (B) green", "answer": "A",
     "lecture": "Skies are blue by day.", "solution": ""},
]


def _image():
    from PIL import Image

    image = Image.new("RGB", (40, 30), (60, 120, 220))
    image.putpixel((3, 4), (250, 10, 10))
    return image


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _samples():
    """(prompt, answer, images) as the scienceqa converter (style lavin, QCM-ALE) writes them."""
    out = []
    for k, fields in enumerate(FIELDS):
        prompt, answer = lavin_example("QCM", "ALE", fields)
        images = [_image()] if k == 1 else []
        out.append(("<image>\n" + prompt if images else prompt, answer, images))
    return out


@pytest.fixture(scope="module")
def trained(lavin_model_dir, tmp_path_factory):
    """A few AdamW steps on the adapters (train.finetune: mma's setup), then the export."""
    from mmjobs.train.methods import train_config
    from mmjobs.train.model_setup import export_final, prepare_for_training

    base = load_lavin(lavin_model_dir, device="cpu")
    cfg = train_config(mode="sft", finetune="mma")
    model = prepare_for_training(base.model, cfg)
    model.train()
    encoder = SampleEncoder(lavin_model_dir, max_length=512, conversation_format="lavin")
    batches = []
    for prompt, answer, images in _samples():
        enc = encoder.encode_messages("s", [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": answer}],
                                      [_png(i) for i in images])
        pixels = (base.processor.image_processor(images=images, return_tensors="pt")
                  ["pixel_values"] if images else None)
        batches.append({"input_ids": torch.tensor([enc.input_ids]),
                        "labels": torch.tensor([enc.labels]), "pixel_values": pixels})
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(3):
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    model.eval()
    out = tmp_path_factory.mktemp("lavin-run")
    assert export_final(model, None, cfg, out, processor=None,
                        source_dir=lavin_model_dir) == {"adapter": "adapter"}
    return LoadedModel(model=model, processor=base.processor, model_dir=lavin_model_dir,
                       kind="lavin", info={"conversation_format": "lavin"}), out, losses


def _prompts():
    return [PromptInput(prompt, images) for prompt, _, images in _samples()]


def test_reloaded_adapters_generate_the_trained_model_s_tokens(trained, lavin_model_dir):
    in_memory, run, losses = trained
    assert losses[-2] < losses[0] and losses[-1] < losses[1]  # per sample, it learned
    assert any(p.abs().sum() > 0 for n, p in in_memory.model.named_parameters()
               if n.endswith("conv_B.weight"))  # no longer the identity
    reloaded = load_lavin(lavin_model_dir, run / "adapter", device="cpu")
    assert reloaded.info["adapter_tensors"] == sum(
        1 for n, _ in reloaded.model.named_parameters() if "adapter" in n)
    outputs = {}
    for name, loaded in (("memory", in_memory), ("reloaded", reloaded),
                         ("base", load_lavin(lavin_model_dir, device="cpu"))):
        config = lavin_generator(loaded).generation_config  # LaVIN's eval settings
        assert config.max_new_tokens == MAX_NEW_TOKENS and not config.do_sample
        gen = lavin_generator(loaded, batch_size=2, max_new_tokens=16)
        batches = list(gen.generate_batches(_prompts()))
        outputs[name] = sorted((i, text, n) for b in batches
                               for i, text, n in zip(b.indices, b.texts, b.new_tokens,
                                                     strict=True))
    assert outputs["reloaded"] == outputs["memory"]
    assert outputs["base"] != outputs["memory"]  # the adapters change what is generated

def _greedy_without_cache(model, ids, pixels, steps: int, eos: int) -> list[int]:
    """A full forward per new token (no KV cache, no reused routing)."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_cached_batched_generation_equals_stepwise_forward(trained):
    """Left-padded batch + KV cache + the routers' cached weights = LaVIN's step-by-step."""
    from mmjobs.data.conversation.chunks import encode_chunked_batch

    loaded, _, _ = trained
    gen = lavin_generator(loaded, batch_size=2, max_new_tokens=6)
    texts = [gen.render(p) for p in _prompts()]
    images = [p.images for p in _prompts()]
    batch = gen._encode(texts, images)
    eos = gen.tokenizer.eos_token_id
    with torch.no_grad():
        generated = loaded.model.generate(**batch, generation_config=gen.generation_config)
    new = generated[:, batch["input_ids"].shape[1]:].tolist()
    for row, (text, row_images) in enumerate(zip(texts, images, strict=True)):
        alone = encode_chunked_batch(gen.processor, [text], [row_images], "<image>",
                                     piece_break=gen.format.piece_break)
        expected = _greedy_without_cache(loaded.model, alone["input_ids"],
                                         alone.get("pixel_values"), 6, eos)
        got = new[row][:len(expected)]
        assert got == expected, row
    assert len(new[0]) == 6 or eos in new[0]


def test_refuses_what_is_not_lavin(lavin_model_dir, replica_dir, tmp_path):
    with pytest.raises(ConversionError, match="not a LaVIN config"):
        load_lavin(replica_dir("openai/clip-vit-large-patch14"))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ConversionError, match=r"no LaVIN adapter_config\.json"):
        load_lavin(lavin_model_dir, tmp_path)


def _tokens(loaded) -> list:
    gen = lavin_generator(loaded, batch_size=2, max_new_tokens=16)
    return sorted((i, text, n) for b in gen.generate_batches(_prompts())
                  for i, text, n in zip(b.indices, b.texts, b.new_tokens, strict=True))


def test_merge_stage_and_stage_loading_give_the_trained_model_s_tokens(trained,
                                                                       lavin_model_dir,
                                                                       tmp_path):
    """The merge stage on a train.finetune: mma output: the standalone LaVIN (reloaded and
    compared by the stage), and what infer and serve load (`load_for_inference`: the merged
    directory, or the base + the run's adapters) generate the trained model's tokens in
    LaVIN's layout."""
    from mmjobs.eval.generate import load_for_inference
    from mmjobs.stages.merge import MergeConfig, main

    in_memory, run, _ = trained
    result = main(MergeConfig(base=str(lavin_model_dir), adapter=str(run),
                              output=str(tmp_path / "merged")))
    assert result.max_logit_diff is not None and result.max_logit_diff < 1e-5
    assert result.probe in ("image+text", "text")
    merged = load_for_inference(result.model, device="cpu")
    over_base = load_for_inference(str(lavin_model_dir), str(run), device="cpu")
    assert merged.info["conversation_format"] == over_base.info["conversation_format"] == "lavin"
    expected = _tokens(in_memory)
    assert _tokens(merged) == expected
    assert _tokens(over_base) == expected


def test_a_prompt_alone_generates_what_it_does_in_a_batch(trained):
    """A batch of one (what a chat server sends): transformers' generate drops its all-ones
    attention mask, and the decode steps still attend to the whole prompt."""
    loaded, _, _ = trained
    alone = lavin_generator(loaded, batch_size=1, max_new_tokens=16)
    texts = sorted((i, text, n) for b in alone.generate_batches(_prompts())
                   for i, text, n in zip(b.indices, b.texts, b.new_tokens, strict=True))
    assert texts == _tokens(loaded)
