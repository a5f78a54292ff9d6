"""Connectors: MoE routing is exact, trains, saves/loads, and replaces Llava's projector."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmjobs.models.connectors import (
    MLP2xGeluConnector,
    MoEConnector,
    build_connector,
    load_balancing_loss,
    load_moe_connector,
    moe_aux_loss,
    save_moe_connector,
)

DV, DT = 16, 24


def features(seed: int = 0, shape: tuple[int, ...] = (2, 5)) -> torch.Tensor:
    return torch.randn(*shape, DV, generator=torch.Generator().manual_seed(seed))


def aligned_experts(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(1)
    return [MLP2xGeluConnector(DV, DT) for _ in range(n)]


def test_plain_connectors_map_dims() -> None:
    x = features()
    assert build_connector("linear", DV, DT)(x).shape == (2, 5, DT)
    assert build_connector("mlp2x_gelu", DV, DT)(x).shape == (2, 5, DT)
    with pytest.raises(ValueError, match="use one of"):
        build_connector("qformer", DV, DT)


@pytest.mark.parametrize("top_k", [1, 2])
def test_forced_expert_output_is_exactly_that_experts(top_k: int) -> None:
    experts = aligned_experts()
    moe = MoEConnector.from_experts(experts, top_k=top_k)
    x = features()
    for i, expert in enumerate(experts):
        moe.force_expert(i)
        assert torch.equal(moe(x), expert(x))
    moe.force_expert(None)
    assert not torch.equal(moe(x), experts[0](x))


def test_one_hot_router_override_routes_everything_to_one_expert() -> None:
    experts = aligned_experts()
    moe = MoEConnector.from_experts(experts, top_k=2)
    x = features()
    for i, expert in enumerate(experts):
        moe.router_override = F.one_hot(torch.tensor(i), 3).float()
        torch.testing.assert_close(moe(x), expert(x), rtol=0, atol=1e-6)


def test_top2_output_is_the_hand_computed_weighted_combination() -> None:
    experts = aligned_experts()
    moe = MoEConnector.from_experts(experts, top_k=2)
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)  # decisive routing that differs per token
    x = features(shape=(3, 4))
    out = moe(x)

    expected = torch.zeros(3, 4, DT)
    for b in range(3):
        for n in range(4):
            token = x[b, n]
            logits = moe.router.weight @ token  # [E]
            top_logits, top_idx = logits.topk(2)
            weights = torch.softmax(top_logits, dim=0)
            for w, e in zip(weights, top_idx.tolist(), strict=True):
                expected[b, n] += w * experts[e](token)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_aux_loss_is_positive_differentiable_and_balanced_at_one() -> None:
    moe = MoEConnector.from_experts(aligned_experts(), top_k=2, aux_loss_coef=0.1)
    moe(features())
    assert moe.aux_loss is not None
    assert moe.aux_loss.item() > 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None
    assert moe.router.weight.grad.abs().sum() > 0
    # Uniform router probabilities: E · Σ f_e / E = 1 whatever the assignment.
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([[0], [0], [1], [2], [2], [2]])).item() == (
        pytest.approx(1.0)
    )
    # Disabled by default; and the model-level helper finds it.
    plain = MoEConnector.from_experts(aligned_experts(), top_k=2)
    plain(features())
    assert plain.aux_loss is None
    assert moe_aux_loss(nn.Sequential(moe, plain)) == moe.aux_loss


@pytest.mark.slow
def test_it_trains_on_a_toy_regression() -> None:
    torch.manual_seed(0)
    moe = MoEConnector(DV, DT, num_experts=4, top_k=2, aux_loss_coef=0.01)
    target_map = torch.randn(DV, DT)
    x = features(shape=(8, 16))
    y = torch.tanh(x @ target_map)
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)

    def loss_now() -> torch.Tensor:
        return F.mse_loss(moe(x), y)

    initial = loss_now().item()
    for _ in range(60):
        loss = loss_now() + moe.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.5 * initial


def test_save_load_round_trip(tmp_path) -> None:
    moe = MoEConnector.from_experts({"table": aligned_experts()[0], "json": aligned_experts()[1]},
                                    top_k=1, add_original=aligned_experts()[2], aux_loss_coef=0.1)
    x = features()
    out_dir = save_moe_connector(moe, tmp_path / "moe")
    assert sorted(p.name for p in out_dir.iterdir()) == ["connector_config.json",
                                                         "model.safetensors"]
    config = json.loads((out_dir / "connector_config.json").read_text())
    assert config["num_experts"] == 3 and config["top_k"] == 1
    assert config["expert_names"] == ["original", "table", "json"]
    loaded = load_moe_connector(out_dir)
    assert torch.equal(loaded(x), moe(x))
    assert loaded.config_dict() == moe.config_dict()
    with pytest.raises(FileNotFoundError):
        load_moe_connector(tmp_path / "missing")


def test_from_experts_accepts_llava_and_sequential_checkpoints() -> None:
    # transformers' own projector and a LLaVA/ChartMoE-style nn.Sequential state dict.
    config = SimpleNamespace(vision_feature_layer=-2, vision_config=SimpleNamespace(hidden_size=DV),
                             text_config=SimpleNamespace(hidden_size=DT),
                             multimodal_projector_bias=True, projector_hidden_act="gelu")
    torch.manual_seed(2)
    hf_projector = LlavaMultiModalProjector(config)
    seq = nn.Sequential(nn.Linear(DV, DT), nn.GELU(), nn.Linear(DT, DT))
    seq_sd = {f"vision_proj.{k}": v for k, v in seq.state_dict().items()}
    moe = MoEConnector.from_experts([hf_projector, seq_sd], top_k=1)
    x = features()
    moe.force_expert(0)
    assert torch.equal(moe(x), hf_projector(x))
    moe.force_expert(1)
    assert torch.equal(moe(x), seq(x))
    # Copies, not shared storage: later edits to a source do not leak into the MoE.
    with torch.no_grad():
        seq[0].weight.zero_()
    assert not torch.equal(moe.experts[1].linear_1.weight, seq[0].weight)


def test_from_experts_rejects_mismatched_or_unknown_experts() -> None:
    with pytest.raises(ValueError, match="same connector type"):
        MoEConnector.from_experts([MLP2xGeluConnector(DV, DT), MLP2xGeluConnector(DV + 1, DT)])
    with pytest.raises(ValueError, match="same connector type"):
        MoEConnector.from_experts([MLP2xGeluConnector(DV, DT), build_connector("linear", DV, DT)])
    with pytest.raises(ValueError, match="cannot tell the connector type"):
        MoEConnector.from_experts([{"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2),
                                    "c.weight": torch.zeros(2, 2)}])
    with pytest.raises(ValueError, match="top_k"):
        MoEConnector.from_experts(aligned_experts(2), top_k=3)


def test_replaces_llava_multi_modal_projector() -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=DV, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=14)
    text = LlamaConfig(hidden_size=DT, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=127))
    original = model.model.multi_modal_projector
    moe = MoEConnector.from_experts([build_connector("mlp2x_gelu", DV, DT)], top_k=1,
                                    add_original=original, aux_loss_coef=0.1)
    model.model.multi_modal_projector = moe

    pixels = torch.randn(1, 3, 28, 28)
    ids = torch.tensor([[1, 127, 127, 127, 127, 5, 6]])  # 4 image tokens: (28 / 14) ** 2
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert torch.isfinite(out.loss)
    assert moe_aux_loss(model) is not None
    moe.force_expert(0)  # the original projector alone: the model's original image features
    image_features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    model.model.multi_modal_projector = original
    expected = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert torch.equal(image_features, expected)


def test_router_inits_zeros_normal_and_chartmoe_s_nn_linear_default() -> None:
    """`linear` is what ChartMoE's gate gets: nn.Linear's Kaiming-uniform, |w| <= 1/sqrt(in)."""
    torch.manual_seed(0)
    moe = MoEConnector(1024, 8, 4, router_init="linear")
    bound = 1 / math.sqrt(1024)
    weight = moe.router.weight
    assert moe.router.bias is None and weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound  # uniform over the whole range, not N(0, 0.02^2)
    moe.reset_router("zeros")
    assert not moe.router.weight.any()
    with pytest.raises(ValueError, match="'zeros', 'normal' or 'linear'"):
        moe.reset_router("uniform")
