"""Stage `build-moe-connector` and the connector checkpoint format.

Aligned connectors are simulated by perturbing the tiny LLaVA's projector; the built model's
MoE connector, forced one-hot, must reproduce each source connector exactly inside the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.models.builder import (
    connector_module,
    export_model_dir,
    freeze,
    load_model,
    set_connector,
)
from mmjobs.models.connectors import (
    LinearConnector,
    MLP2xGeluConnector,
    MoEConnector,
    moe_aux_loss,
    save_moe_connector,
)
from mmjobs.stages.build_moe_connector import STAGE, BuildMoeConfig, main
from mmjobs.train.moe import (
    as_mmjobs_connector,
    load_connector,
    load_expert,
    moe_connector_from,
    save_connector,
)
from tests.fixtures_models import build_once
from tests.unit.train.test_merge import real_batch


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The session's tiny LLaVA (the same build as tests.fixtures_models.tiny_llava_dir)."""
    from mmjobs.models.tiny import build_tiny_llava

    return build_once(tmp_path_factory.getbasetemp(), "llava", build_tiny_llava)


def aligned(projector: torch.nn.Module, seed: int) -> MLP2xGeluConnector:
    """A stand-in for an align run's result: the projector with perturbed weights."""
    module = as_mmjobs_connector(projector)
    copy = MLP2xGeluConnector(module.linear_1.in_features, module.linear_2.out_features)
    copy.load_state_dict(module.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return copy


@pytest.fixture
def experts(llava_dir, tmp_path) -> dict[str, tuple[str, torch.nn.Module]]:
    """Three expert sources in the three accepted layouts: name -> (uri, connector)."""
    base = load_model(ModelConfig(name_or_path=str(llava_dir)), for_training=False)
    projector = connector_module(base.model)
    table, json_, code = (aligned(projector, seed) for seed in (1, 2, 3))
    # An align run's output: committed once at its root, the connector under connector/.
    save_connector(table, tmp_path / "align-table" / "connector", meta={"task": "chart2table"})
    (tmp_path / "align-table" / "trainer_state.json").write_text("{}")
    storage.commit_dir(tmp_path / "align-table")
    save_connector(json_, tmp_path / "align-json")  # a bare connector dir
    set_connector(base.model, code)  # a full model dir whose projector is the expert
    export_model_dir(base.model, tmp_path / "align-code", source_dir=llava_dir)
    return {"table": (str(tmp_path / "align-table"), table),
            "json": (str(tmp_path / "align-json"), json_),
            "code": (str(tmp_path / "align-code"), code)}


def projector_io(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input `[B, N, Dv]`, output `[B, N, Dt]`) of the connector during a real forward."""
    seen = {}
    hook = connector_module(model).register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen["x"], seen["y"]


def test_forced_experts_reproduce_their_sources_inside_the_model(llava_dir, experts,
                                                                 tmp_path):
    cfg = BuildMoeConfig(base=str(llava_dir), output=str(tmp_path / "moe"),
                         experts={name: uri for name, (uri, _) in experts.items()},
                         router_init="zeros", aux_loss_coef=0.01)
    result = main(cfg)
    assert result.expert_names == ["original", "table", "json", "code"]
    assert result.expert_max_abs_diff == 0.0 and not result.cached
    assert storage.verify_dir(result.output).meta["experts"]["table"].endswith("connector")

    built = load_model(ModelConfig(name_or_path=result.model), for_training=False)
    moe = connector_module(built.model)
    assert isinstance(moe, MoEConnector) and moe.top_k == 2 and moe.aux_loss_coef == 0.01
    original = connector_module(load_model(ModelConfig(name_or_path=str(llava_dir)),
                                           for_training=False).model)
    sources = [original] + [module for _, module in experts.values()]
    batch = real_batch(built.processor)
    for index, source in enumerate(sources):
        moe.force_expert(index)
        features, output = projector_io(built.model, batch)
        assert features.shape == (2, 16, 64) and output.shape == (2, 16, 128)
        assert torch.equal(output, source(features)), moe.expert_names[index]
    # The standalone copy next to the model is the same connector.
    alone = load_connector(Path(result.output) / "connector")
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(),
                                                 moe.state_dict().values(), strict=True))


def test_built_model_trains(llava_dir, experts, tmp_path):
    result = main(BuildMoeConfig(base=str(llava_dir), output=str(tmp_path / "moe"),
                                 experts={n: uri for n, (uri, _) in experts.items()},
                                 aux_loss_coef=0.01))
    loaded = load_model(ModelConfig(name_or_path=result.model))
    model = loaded.model
    summary = freeze(model, vision_tower=True, connector=False, language_model=False)
    assert summary["vision_tower"]["trainable"] == 0 and summary["connector"]["trainable"] > 0
    batch = real_batch(loaded.processor)
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    labels[batch["attention_mask"] == 0] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(4):
        out = model(**batch, labels=labels)
        aux = moe_aux_loss(model)
        loss = out.loss + aux
        optimizer.zero_grad()
        loss.backward()
        router = connector_module(model).router.weight
        assert router.grad is not None and router.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.loss.item())
    assert aux is not None and losses[-1] < losses[0] - 0.1, losses


def test_rerun_is_a_noop_and_cli_prints_the_result(llava_dir, experts, tmp_path, capsys):
    args = ["--set", f"base={llava_dir}", "--set", f"output={tmp_path / 'moe'}",
            "--set", "include_original=false", "--set", "top_k=1"]
    for name, (uri, _) in experts.items():
        args += ["--set", f"experts.{name}={uri}"]
    assert STAGE.cli(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["expert_names"] == ["table", "json", "code"] and not first["cached"]
    assert STAGE.cli(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] and again["model"] == first["model"]


def test_mismatched_experts_are_refused(llava_dir, tmp_path):
    narrow = MLP2xGeluConnector(64, 32)
    save_connector(narrow, tmp_path / "narrow")
    save_connector(LinearConnector(64, 128), tmp_path / "linear")
    save_connector(MLP2xGeluConnector(64, 128), tmp_path / "ok")
    base = str(llava_dir)
    with pytest.raises(ValueError, match="same connector type with the same vision/text dims"):
        main(BuildMoeConfig(base=base, experts={"a": str(tmp_path / "ok"),
                                                "b": str(tmp_path / "narrow")},
                            output=str(tmp_path / "o1")))
    with pytest.raises(ValueError, match="is linear"):
        main(BuildMoeConfig(base=base, experts={"a": str(tmp_path / "linear")},
                            output=str(tmp_path / "o2")))
    with pytest.raises(ValueError, match="do not fit the base model"):
        main(BuildMoeConfig(base=base, experts={"a": str(tmp_path / "narrow")}, top_k=1,
                            include_original=False, output=str(tmp_path / "o3")))
    with pytest.raises(ValidationError, match="top_k=5 exceeds the 2 experts"):
        BuildMoeConfig(base=base, experts={"a": "x"}, top_k=5)
    with pytest.raises(ValidationError, match="'original' is the base's connector"):
        BuildMoeConfig(base=base, experts={"original": "x"})
    with pytest.raises(storage.StoreNotFoundError, match="no connector checkpoint"):
        main(BuildMoeConfig(base=base, experts={"a": str(tmp_path)}, output=str(tmp_path / "o")))
    assert not any(storage.is_committed(tmp_path / f"o{i}") for i in (1, 2, 3))


def test_connector_checkpoints_round_trip(llava_dir, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    native = connector_module(load_model(ModelConfig(name_or_path=str(llava_dir))).model)
    moe = moe_connector_from({"a": MLP2xGeluConnector(64, 128), "b": native}, top_k=1)
    for name, module in {"linear": LinearConnector(64, 128, bias=False), "native": native,
                         "moe": moe}.items():
        restored = load_connector(save_connector(module, tmp_path / name))
        with torch.no_grad():
            assert torch.equal(restored(x), module(x)), name
    config = json.loads((tmp_path / "native" / "connector_config.json").read_text())
    assert config["kind"] == "mlp2x_gelu" and config["format"] == "mmjobs-connector"
    # connectors.save_moe_connector's layout is read too.
    legacy = load_connector(save_moe_connector(moe, tmp_path / "legacy"))
    assert isinstance(legacy, MoEConnector)
    assert isinstance(load_expert(str(tmp_path / "linear")), LinearConnector)
    with pytest.raises(ValueError, match="not a connector mmjobs can save"):
        save_connector(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "seq")


def test_bf16_base_keeps_its_dtype_and_experts_stay_exact(llava_dir, experts, tmp_path):
    bf16 = load_model(ModelConfig(name_or_path=str(llava_dir), dtype="bfloat16"))
    base = export_model_dir(bf16.model, tmp_path / "bf16", source_dir=llava_dir)
    result = main(BuildMoeConfig(base=str(base), output=str(tmp_path / "moe"),
                                 experts={"table": experts["table"][0]}, top_k=1))
    assert result.expert_max_abs_diff == 0.0
    built = load_model(ModelConfig(name_or_path=result.model, dtype="auto"))
    assert json.loads((Path(result.model) / "config.json").read_text())["dtype"] == "bfloat16"
    assert built.model.dtype == torch.float32  # dtype auto on CPU
