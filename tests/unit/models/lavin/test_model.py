"""LaVIN's model (issue 16, first Done-when item): the adapters start as the identity, only
adapter parameters get gradients, the routers follow the modality token, and the depth-wise
dropout per layer is the seed fork's walk for every preset.

The model is built from the Meta-format LLaMA replica and the 24-block CLIP ViT-L/14 replica
(`build_lavin`, which imports the `.pth` through the safe converter).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmjobs.models.lavin import register
from mmjobs.models.lavin.adapters import depth_dropout, preset_dropouts
from mmjobs.models.lavin.compose import build_lavin


@pytest.fixture(scope="module")
def lavin_dir(replica_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lavin") / "model"
    build_lavin(replica_dir("meta/llama-7b"), replica_dir("openai/clip-vit-large-patch14"), out,
                seed=1, dtype="float32")
    return out


@pytest.fixture(scope="module")
def model(lavin_dir):
    from transformers import AutoModelForImageTextToText

    register()
    return AutoModelForImageTextToText.from_pretrained(lavin_dir).eval()


def _randomise_adapters(model, seed: int = 0):
    """A copy whose adapters are no longer the identity (as after training)."""
    trained = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "adapter" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return trained


def _image_batch(model):
    ids = torch.tensor([[1, 450, 4996, *[model.config.image_token_id] * 6, 17354, 1701]])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    return ids, pixels


def test_adapters_start_as_the_identity(model, replica_dir, tmp_path):
    """A fresh LaVIN's logits on a text sample equal the imported LLaMA's (the modality token
    is masked for later positions and RoPE is relative, so it shifts nothing); randomised
    adapters change them, so the comparison can fail."""
    from transformers import LlamaForCausalLM

    from mmjobs.models.convert.meta_llama import convert_meta_llama

    convert_meta_llama(replica_dir("meta/llama-7b"), tmp_path / "llama", dtype="float32")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432]])
    with torch.no_grad():
        base = llama(input_ids=ids).logits
        lavin = model(input_ids=ids).logits
        changed = _randomise_adapters(model)(input_ids=ids).logits
    assert lavin.shape == base.shape
    assert torch.allclose(lavin, base, atol=1e-4), (lavin - base).abs().max()
    assert (changed - base).abs().max() > 1e-2


def test_only_adapter_parameters_get_gradients(lavin_dir):
    from transformers import AutoModelForImageTextToText

    register()
    model = AutoModelForImageTextToText.from_pretrained(lavin_dir)
    trainable = model.train_adapters_only()
    model = _randomise_adapters(model)  # zero up-projections would leave conv_A without grads
    ids, pixels = _image_batch(model)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None
                 and p.grad.abs().sum() > 0}
    adapters = {n for n, _ in model.named_parameters() if "adapter" in n}
    assert with_grad == adapters  # every adapter (LLaMA, CLIP, proj, modality) and nothing else
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    assert any(n.startswith("vision_tower.") for n in with_grad)
    assert {"adapter_modality_embedding.weight", "adapter_proj.conv_A.weight"} <= with_grad


def test_routers_read_the_modality_token(model):
    """The LLaMA routers' weights are a function of the modality token: the same text with
    and without an image routes differently, other tokens do not change the routing (the
    modality token attends only to itself), and a changed modality embedding does."""
    trained = _randomise_adapters(model, seed=1)

    def routing(m, ids, pixels=None):
        with torch.no_grad():
            m(input_ids=ids, pixel_values=pixels)
        return torch.stack([a.cached_routing for a in m.text_adapters])  # [layers, B, 2]

    ids, pixels = _image_batch(trained)
    text = torch.tensor([[1, 450, 4996, 17354, 1701]])
    other_text = torch.tensor([[1, 278, 975, 29916, 432, 17204, 3]])
    with_image, text_only = routing(trained, ids, pixels), routing(trained, text)
    assert torch.allclose(text_only, routing(trained, other_text), atol=1e-6)
    assert (with_image - text_only).abs().max() > 1e-4
    assert torch.allclose(with_image.sum(-1), torch.ones(2, 1))  # a softmax over 2 experts
    with torch.no_grad():
        trained.adapter_modality_embedding.weight[0] += 1.0
    assert (routing(trained, text) - text_only).abs().max() > 1e-4


def _fork_walk(n: int, prob: float, var: float, lim: float) -> list[float]:
    """HyejunShin/LaVIN's set_MMAdapter walk over a ModuleList of n blocks, restated."""
    out, p = [], prob
    for i in range(n):
        if i:
            ok = p * var >= lim if var < 1 else p * var <= lim
            p = p * var if ok else lim
        out.append(p)
    return out


@pytest.mark.parametrize("preset, flags", [
    ("base", (0.1, 1.0, 0.2)), ("inc", (0.1, 1.01, 0.2)), ("dec", (0.2, 0.99, 0.1)),
    ("inc_v2", (0.1, 1.03, 0.2)), ("dec_v2", (0.2, 0.97, 0.1))])
def test_depth_dropout_is_the_fork_s_walk_per_preset(model, preset, flags):
    for n in (32, 24):  # LLaMA-7B's blocks, CLIP ViT-L/14's blocks
        assert preset_dropouts(preset, n) == _fork_walk(n, *flags)
    values = copy.deepcopy(model).apply_dropout_preset(preset)
    assert values == {"text": _fork_walk(2, *flags), "vision": _fork_walk(24, *flags)}


def test_v2_presets_reach_their_limit_within_7b_depth():
    inc, dec = preset_dropouts("inc_v2", 32), preset_dropouts("dec_v2", 32)
    assert inc[23] < 0.2 and inc[24:] == [0.2] * 8  # 0.1 * 1.03**24 > 0.2: held at the ceiling
    assert dec[22] > 0.1 and dec[23:] == [0.1] * 9
    assert max(preset_dropouts("inc", 32)) < 0.2  # 1.01**31 < 2: never capped in 32 layers
    with pytest.raises(ValueError, match="preset 'inc3'"):
        preset_dropouts("inc3", 32)
    with pytest.raises(ValueError, match="var"):
        depth_dropout(4, 0.1, 0.0, 0.2)


def test_no_later_position_attends_to_the_modality_token(model):
    """With identity adapters the modality token can only act through attention: changing
    its embedding must leave every logit unchanged (LaVIN masks column 0 for rows >= 1)."""
    fresh = copy.deepcopy(model)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701]])
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
        fresh.adapter_modality_embedding.weight.mul_(-3.0).add_(2.0)
        assert torch.equal(fresh(input_ids=ids).logits, before)
    mask = fresh.attention_mask_4d(torch.ones(1, 4), 4, torch.float32)[0, 0]
    assert (mask[1:, 0] < -1e30).all() and mask[0, 0] == 0 and (mask.diagonal() == 0).all()


def test_visual_tokens_are_the_cls_after_every_4th_clip_block(model):
    """Six tokens: the CLS state after CLIP blocks 4, 8, ..., 24 (adapters included, no
    post-layernorm), through adapter_proj."""
    trained = _randomise_adapters(model, seed=2)
    _, pixels = _image_batch(trained)
    with torch.no_grad():
        states = trained.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        expected = trained.adapter_proj(torch.stack([states[4 * k][:, 0] for k in range(1, 7)], 1))
        got = trained.image_features(pixels)
    assert got.shape == (1, 6, trained.config.text_config.hidden_size)
    assert torch.allclose(got, expected, atol=1e-5)


def test_processor_normalises_with_imagenet_statistics_at_224(lavin_dir):
    from PIL import Image
    from transformers import AutoProcessor

    register()
    processor = AutoProcessor.from_pretrained(lavin_dir)
    image = Image.new("RGB", (300, 120), (255, 128, 0))  # not square: resized, not cropped
    batch = processor(images=[image], text=["Image: <image>\nQuestion"], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([255, 128, 0]) / 255 - mean) / std
    assert torch.allclose(batch["pixel_values"][0, :, 100, 100], expected, atol=1e-3)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 6


def test_finetune_mma_trains_lavin_s_adapters_and_exports_them(model, lavin_dir, tmp_path):
    """`train.finetune: mma`: the trainer's setup freezes all but the adapters, sets the row's
    dropout walk, and the final export holds exactly the adapter tensors, which load back."""
    from mmjobs.models.lavin.compose import load_adapters
    from mmjobs.train.methods import train_config
    from mmjobs.train.model_setup import export_final, prepare_for_training

    cfg = train_config(mode="sft", finetune="mma", layer_dropout={"preset": "dec_v2"})
    trained = prepare_for_training(_randomise_adapters(model), cfg)
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == {
        n for n, _ in trained.named_parameters() if "adapter" in n}
    assert trained.adapter_dropouts()["vision"] == preset_dropouts("dec_v2", 24)
    parts = export_final(trained, None, cfg, tmp_path, processor=None, source_dir=lavin_dir)
    assert parts == {"adapter": "adapter"}
    fresh = copy.deepcopy(model)
    assert load_adapters(fresh, tmp_path / "adapter") == sum(
        1 for n, _ in model.named_parameters() if "adapter" in n)
    ids = torch.tensor([[1, 450, 4996, 17354]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
    with pytest.raises(ValueError, match="finetune: mma trains LaVIN"):
        prepare_for_training(torch.nn.Linear(2, 2), cfg)
