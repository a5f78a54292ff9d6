"""Per-layer LoRA dropout schedules on a tiny peft Llama built in the test (no downloads)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mmjobs.train.dropout_schedules import (
    LAVIN_DROPOUT_PRESETS,
    apply_layer_dropout,
    layer_dropout_values,
)

NUM_LAYERS = 4


def tiny_lora_llama(lora_dropout: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout,
                      target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def dropout_by_layer(model: nn.Module) -> dict[int, set[float]]:
    found: dict[int, set[float]] = {}
    for name, module in model.named_modules():
        if ".lora_dropout." in name:
            assert isinstance(module, nn.Dropout), name
            layer = int(name.split(".layers.")[1].split(".")[0])
            found.setdefault(layer, set()).add(module.p)
    return found


def test_linear_kinds() -> None:
    assert layer_dropout_values("constant", 3, p=0.1) == [0.1, 0.1, 0.1]
    inc = layer_dropout_values("increasing", 4, p_min=0.1, p_max=0.4)
    assert inc == pytest.approx([0.1, 0.2, 0.3, 0.4])
    dec = layer_dropout_values("decreasing", 4, p_min=0.1, p_max=0.4)
    assert dec == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_lavin_geometric_presets_match_the_study() -> None:
    # LaVIN: p_i = p * factor**i, held at the limit once it would pass it (LLaMA-7B: 32 layers).
    kind, kwargs = LAVIN_DROPOUT_PRESETS["inc_v2"]
    inc = layer_dropout_values(kind, 32, **kwargs)
    assert inc[0] == 0.1
    assert inc[1] == pytest.approx(0.103)
    assert inc[23] == pytest.approx(0.1 * 1.03**23)  # 0.197: still below the ceiling
    assert inc[24:] == [0.2] * 8
    kind, kwargs = LAVIN_DROPOUT_PRESETS["dec_v2"]
    dec = layer_dropout_values(kind, 32, **kwargs)
    assert dec[22] == pytest.approx(0.2 * 0.97**22)  # 0.102: still above the floor
    assert dec[23:] == [0.1] * 9
    kind, kwargs = LAVIN_DROPOUT_PRESETS["dec"]
    assert layer_dropout_values(kind, 32, **kwargs)[-1] == pytest.approx(0.2 * 0.99**31)


def test_bad_schedules_name_the_fix() -> None:
    with pytest.raises(ValueError, match="needs p_min and p_max"):
        layer_dropout_values("increasing", 4, p=0.1)
    with pytest.raises(ValueError, match="factor >= 1"):
        layer_dropout_values("increasing_geometric", 4, p=0.1, factor=0.9, limit=0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layer_dropout_values("constant", 4, p=1.5)
    with pytest.raises(ValueError, match="use one of"):
        layer_dropout_values("random", 4, p=0.1)


def test_apply_sets_each_layers_lora_dropout() -> None:
    model = tiny_lora_llama()
    values = layer_dropout_values("increasing", NUM_LAYERS, p_min=0.1, p_max=0.4)
    applied = apply_layer_dropout(model, values)
    assert applied == pytest.approx({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4})
    assert dropout_by_layer(model) == {i: {values[i]} for i in range(NUM_LAYERS)}


def test_apply_replaces_identity_when_adapter_had_no_dropout() -> None:
    model = tiny_lora_llama(lora_dropout=0.0)  # peft stores nn.Identity then
    model.eval()
    applied = apply_layer_dropout(model, [0.3] * NUM_LAYERS)
    assert applied == {i: 0.3 for i in range(NUM_LAYERS)}
    assert dropout_by_layer(model) == {i: {0.3} for i in range(NUM_LAYERS)}
    # New modules follow the model's mode: eval stays deterministic.
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_apply_rejects_models_without_adapters_and_wrong_layer_counts() -> None:
    plain = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=128))
    with pytest.raises(ValueError, match="get_peft_model"):
        apply_layer_dropout(plain, [0.1, 0.1])
    model = tiny_lora_llama()
    with pytest.raises(ValueError, match="4 decoder layers"):
        apply_layer_dropout(model, [0.1] * 3)
    assert dropout_by_layer(model) == {i: {0.05} for i in range(NUM_LAYERS)}  # untouched
