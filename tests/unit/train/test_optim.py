"""`train.adam_betas`, `no_decay` and `param_groups`: the AdamW the trainer builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmjobs.train.methods import train_config
from mmjobs.train.optim import build_optimizer, param_groups


class RMSNorm(nn.Module):  # named like InternLM2's / Llama's norms
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Tiny(nn.Module):
    """A frozen LLM part, a connector (`vision_proj`) and an MoE gate, as in ChartMoE's SFT."""

    def __init__(self) -> None:
        super().__init__()
        self.llm = nn.Linear(4, 4)
        self.llm.requires_grad_(False)
        self.vision_proj = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        self.gate = nn.Linear(4, 2, bias=False)
        self.norm = nn.LayerNorm(4)
        self.rms = RMSNorm(4)


def names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_defaults_keep_one_group_with_torch_betas():
    model = Tiny()
    opt = build_optimizer(model, train_config({"mode": "sft", "lr": 1e-3,
                                               "weight_decay": 0.1}))
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0.1 and group["lr"] == 1e-3
    assert "llm.weight" not in names(model, group)  # frozen parameters stay out


def test_chartmoe_settings_beta2_and_transformers_no_decay_rule():
    """ChartMoE's scripts: lr 5e-5, weight decay 0.1, adam_beta2 0.95, through transformers'
    Trainer (biases and norm weights not decayed)."""
    model = Tiny()
    cfg = train_config({"mode": "align", "lr": 5e-5, "weight_decay": 0.1,
                        "adam_betas": [0.9, 0.95], "no_decay": "bias_and_norm"})
    opt = build_optimizer(model, cfg)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95)] * 2
    decayed, exempt = opt.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    assert names(model, decayed) == {"vision_proj.0.weight", "vision_proj.2.weight",
                                     "gate.weight"}
    assert names(model, exempt) == {"vision_proj.0.bias", "vision_proj.2.bias", "norm.weight",
                                    "norm.bias", "rms.weight"}


def test_param_groups_take_their_own_lr_first_match_wins():
    model = Tiny()
    cfg = train_config({"mode": "sft", "lr": 5e-5, "weight_decay": 0.1,
                        "param_groups": [{"match": "gate", "lr": 1e-3},
                                         {"match": "vision_proj", "weight_decay": 0.0}]})
    groups = param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"default", "gate", "vision_proj"}
    assert (by_name["gate"]["lr"], by_name["gate"]["weight_decay"]) == (1e-3, 0.1)
    assert (by_name["vision_proj"]["lr"], by_name["vision_proj"]["weight_decay"]) == (5e-5, 0.0)
    assert names(model, by_name["default"]) == {"norm.weight", "norm.bias", "rms.weight"}
    # the schedule scales every group: a LambdaLR at half keeps the groups' ratio
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([2.5e-5, 2.5e-5, 5e-4])
    del sched


def test_bad_groups_and_betas_are_named():
    with pytest.raises(ValueError, match=r"match \['vison_proj'\] names no trainable parameter"):
        param_groups(Tiny(), train_config({"mode": "sft",
                                           "param_groups": [{"match": "vison_proj"}]}))
    with pytest.raises(ValueError, match=r"match \['llm'\] names no trainable"):  # frozen
        param_groups(Tiny(), train_config({"mode": "sft", "param_groups": [{"match": "llm"}]}))
    with pytest.raises(ValueError) as err:  # pydantic's ValidationError
        train_config({"mode": "sft", "adam_betas": [0.9, 1.5],
                      "param_groups": [{"match": "a"}, {"match": "a"}]})
    text = str(err.value)
    assert "adam_betas" in text and "[0, 1)" in text and "share a match" in text
