"""The native InternLM-XComposer2 against hand-computed facts of its architecture.

Facts (shared/real-models/internlm--internlm-xcomposer2-7b/FACTS.md and the published
config.json): 490 px / patch 14 -> 35 x 35 = 1225 image positions (CLS dropped) and 1226 ViT
position embeddings; Partial-LoRA adds its low-rank branch only where `im_mask` is True; the
fused `wqkv` output is K groups of [H/K query heads, 1 key head, 1 value head] x D; the 7B
model is InternLM2-7B (about 7.7B with Partial-LoRA) plus CLIP ViT-L/14 (about 0.3B).
"""

from __future__ import annotations

import math

import pytest
import torch

from mmjobs.models.replicas._common import read_published
from mmjobs.models.xcomposer2.configuration import XComposer2Config
from mmjobs.models.xcomposer2.internlm2 import (
    InternLM2Attention,
    InternLM2RotaryEmbedding,
    PLoRALinear,
    apply_rotary,
    split_wqkv,
)
from mmjobs.models.xcomposer2.modeling import XComposer2ForCausalLM

PUBLISHED = "internlm--internlm-xcomposer2-7b"
TINY_TEXT = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2}


def tiny_config(**overrides) -> XComposer2Config:
    keys = {**TINY_TEXT, "img_size": 490, "vision_config": TINY_VISION, "plora_r": 8,
            "plora_alpha": 8, "plora_dropout": 0.0, **overrides}
    return XComposer2Config(**keys)


def randomise_plora(model: torch.nn.Module) -> None:
    """Partial-LoRA B starts at whatever init gives; make every branch clearly non-zero."""
    for name, p in model.named_parameters():
        if "Plora_" in name:
            torch.nn.init.normal_(p, std=0.2)


def test_published_config_gives_1225_image_tokens_at_490px():
    raw = read_published(PUBLISHED, "config.json")
    assert raw["img_size"] == 224  # published; every recipe trains with --img_size 490
    config = XComposer2Config(**{**raw, "img_size": 490})
    assert config.image_tokens == (490 // 14) ** 2 == 1225
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    with torch.device("meta"):
        model = XComposer2ForCausalLM(config)
    embeddings = model.vit.vision_tower.vision_model.embeddings
    assert embeddings.position_embedding.weight.shape == (1226, 1024)  # 35 x 35 + CLS
    wqkv = model.model.layers[0].attention.wqkv
    assert wqkv.weight.shape == ((32 + 2 * 8) * 128, 4096) == (6144, 4096)
    assert wqkv.Plora_A.weight.shape == (256, 4096) and wqkv.Plora_B.weight.shape == (6144, 256)


def test_a_490px_image_becomes_1225_positions_of_the_llm_width():
    torch.manual_seed(0)
    model = XComposer2ForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        features = model.get_image_features(torch.randn(2, 3, 490, 490))
    assert features.shape == (2, 1225, TINY_TEXT["hidden_size"])


def test_published_size_parameter_count():
    """InternLM2-7B with Partial-LoRA on every decoder linear, plus CLIP ViT-L/14 and the MLP."""
    config = XComposer2Config(**{**read_published(PUBLISHED, "config.json"), "img_size": 490})
    with torch.device("meta"):
        model = XComposer2ForCausalLM(config)
    count = {part: sum(p.numel() for p in getattr(model, part).parameters())
             for part in ("model", "output", "vit", "vision_proj")}
    h, inter, layers, vocab, r = 4096, 14336, 32, 92544, 256
    qkv_out = (32 + 2 * 8) * 128
    linears = [(h, qkv_out), (h, h), (h, inter), (h, inter), (inter, h)]  # wqkv wo w1 w3 w2
    base = sum(i * o for i, o in linears)
    plora = sum(r * (i + o) for i, o in linears)
    assert count["model"] == vocab * h + layers * (base + plora + 2 * h) + h
    assert count["output"] == vocab * h
    llm_without_plora = count["model"] + count["output"] - layers * plora
    assert 7.7e9 < llm_without_plora < 7.8e9  # InternLM2-7B: 7.74B
    assert 0.30e9 < count["vit"] < 0.31e9  # CLIP ViT-L/14 vision tower, 1226 positions
    assert count["vision_proj"] == 1024 * h + h + h * h + h


def test_plora_branch_only_on_image_positions():
    torch.manual_seed(0)
    layer = PLoRALinear(16, 12, bias=False, r=4, alpha=8, dropout=0.0)
    torch.nn.init.normal_(layer.Plora_B.weight)
    x = torch.randn(2, 5, 16)
    im_mask = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    with torch.no_grad():
        plain = layer(x)
        masked = layer(x, im_mask)
        branch = layer.Plora_B(layer.Plora_A(x)) * (8 / 4)
    assert torch.equal(masked[~im_mask], plain[~im_mask])
    torch.testing.assert_close(masked[im_mask], plain[im_mask] + branch[im_mask])
    assert not torch.allclose(masked[im_mask], plain[im_mask])


def test_plora_weights_change_nothing_for_text_and_everything_after_an_image():
    torch.manual_seed(0)
    config = tiny_config(img_size=56)  # 4 x 4 = 16 image positions
    model = XComposer2ForCausalLM(config).eval()
    randomise_plora(model)
    text = torch.tensor([[1, 5, 6, 7, 8]])
    image_ids = torch.tensor([[1] + [config.image_token_id] * 16 + [5, 6, 7, 8]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = model(input_ids=text, use_cache=False).logits
        with_image = model(input_ids=image_ids, pixel_values=pixels, use_cache=False).logits
        for name, p in model.named_parameters():
            if "Plora_B" in name:
                p.zero_()
        after = model(input_ids=text, use_cache=False).logits
        without_branch = model(input_ids=image_ids, pixel_values=pixels, use_cache=False).logits
    assert torch.equal(before, after)  # text-only: Partial-LoRA never runs
    # BOS precedes the image: causal attention keeps it untouched; from the image on it differs.
    assert torch.equal(with_image[:, 0], without_branch[:, 0])
    assert not torch.allclose(with_image[:, 1:], without_branch[:, 1:])


def test_wqkv_layout_groups_query_heads_with_their_kv_head():
    heads, kv_heads, dim = 8, 2, 3
    per_group = heads // kv_heads + 2
    qkv = torch.arange((heads + 2 * kv_heads) * dim, dtype=torch.float32).view(1, 1, -1)
    query, key, value = split_wqkv(qkv, heads, kv_heads, dim)
    assert query.shape == (1, heads, 1, dim) and key.shape == value.shape == (1, kv_heads, 1, dim)
    for q in range(heads):  # query head q = slot g of group h
        h, g = divmod(q, heads // kv_heads)
        start = (h * per_group + g) * dim
        assert query[0, q, 0].tolist() == list(range(start, start + dim))
    for h in range(kv_heads):
        key_start = (h * per_group + per_group - 2) * dim
        assert key[0, h, 0].tolist() == list(range(key_start, key_start + dim))
        assert value[0, h, 0].tolist() == list(range(key_start + dim, key_start + 2 * dim))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_matches_a_per_head_reference(implementation):
    """Query head q reads key/value head q // (H/K), causal, scores / sqrt(D)."""
    torch.manual_seed(0)
    config = tiny_config(attn_implementation=implementation)
    attention = InternLM2Attention(config, 0).eval()
    x = torch.randn(1, 6, config.hidden_size)
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    positions = torch.arange(6)[None]
    cos_sin = InternLM2RotaryEmbedding(config)(x, positions, 6)
    with torch.no_grad():
        got = attention(x, cos_sin=cos_sin, attention_mask=None, im_mask=None)
        qkv = (x @ attention.wqkv.weight.T).view(1, 6, kv, heads // kv + 2, dim)
        outputs = []
        for q in range(heads):
            h, g = divmod(q, heads // kv)
            query, key = apply_rotary(qkv[:, :, h, g][:, None], qkv[:, :, h, -2][:, None],
                                      *cos_sin)
            scores = (query[0, 0] @ key[0, 0].T) / math.sqrt(dim)
            scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -torch.inf)
            outputs.append(scores.softmax(-1) @ qkv[0, :, h, -1])
        expected = torch.cat(outputs, dim=-1) @ attention.wo.weight.T
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-4)


def test_dynamic_rope_base_grows_only_past_max_positions():
    config = tiny_config(max_position_embeddings=16)
    rope = InternLM2RotaryEmbedding(config)
    x = torch.zeros(1)
    positions = torch.tensor([[3]])
    inside = rope(x.float(), positions, 16)
    beyond = rope(x.float(), positions, 32)
    plain = 1.0 / (1e6 ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    torch.testing.assert_close(inside[0][0, 0, : config.head_dim // 2], torch.cos(3 * plain))
    assert not torch.allclose(inside[0], beyond[0])
