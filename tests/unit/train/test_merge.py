"""Stage `merge`: LoRA (+ modules_to_save on the connector) merged into a tiny LLaVA gives the
same logits as base + adapter, reloads with load_model, and re-runs as a no-op."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.models.builder import connector_module, export_model_dir, load_model, set_connector
from mmjobs.models.connectors import MoEConnector
from mmjobs.models.model_dirs import locate_adapter
from mmjobs.stages.merge import MergeConfig, main
from mmjobs.train.merge import MergeError
from tests.fixtures_models import build_once


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The session's tiny LLaVA (the same build as tests.fixtures_models.tiny_llava_dir)."""
    from mmjobs.models.tiny import build_tiny_llava

    return build_once(tmp_path_factory.getbasetemp(), "llava", build_tiny_llava)


def real_batch(processor) -> dict:
    """Two chat prompts with images of different sizes, through the model's own processor."""
    images = []
    for size, colour in (((70, 50), (200, 30, 30)), ((40, 90), (10, 120, 200))):
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, format="PNG")
        images.append(Image.open(io.BytesIO(buf.getvalue())))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "값은?"}]}],
        add_generation_prompt=True)
    return processor(text=[text, text + " 12"], images=images, return_tensors="pt",
                     padding=True)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """A LoRA adapter with non-zero B and a changed connector copy; returns its logits + batch.

    LoRA targets the language model's attention (the regex keeps CLIP's q/k/v/o out);
    the connector is trained in full through modules_to_save.
    """
    from peft import LoraConfig, get_peft_model

    loaded = load_model(ModelConfig(name_or_path=str(base_dir)))
    peft_model = get_peft_model(loaded.model, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        modules_to_save=["multi_modal_projector"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.eval()
    batch = real_batch(loaded.processor)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(out_dir)
    return expected, batch


def moe_base(tiny_llava: Path, out: Path) -> Path:
    """The tiny LLaVA with a 2-expert MoE connector (both experts = its projector)."""
    loaded = load_model(ModelConfig(name_or_path=str(tiny_llava)))
    proj = connector_module(loaded.model)
    torch.manual_seed(0)
    set_connector(loaded.model, MoEConnector.from_experts([proj, proj], top_k=1))
    return export_model_dir(loaded.model, out, source_dir=tiny_llava)


@pytest.mark.parametrize("connector", ["native", "moe"])
def test_merged_model_matches_base_plus_adapter(connector, llava_dir, tmp_path):
    base = llava_dir if connector == "native" else moe_base(llava_dir, tmp_path / "b")
    expected, batch = make_adapter(base, tmp_path / "adapter")
    storage.commit_dir(tmp_path / "adapter")

    result = main(MergeConfig(base=str(base), adapter=str(tmp_path / "adapter"),
                              output=str(tmp_path / "merged")))
    assert not result.cached and result.probe == "image+text"
    assert result.max_logit_diff is not None and result.max_logit_diff < 1e-5
    assert storage.verify_dir(result.output).meta["adapter"] == str(tmp_path / "adapter")

    merged = load_model(ModelConfig(name_or_path=result.output), for_training=False)
    got = logits(merged.model, batch)
    assert (got - expected).abs().max().item() < 1e-5
    untouched = load_model(ModelConfig(name_or_path=str(base)), for_training=False)
    assert (logits(untouched.model, batch) - expected).abs().max().item() > 1e-3  # it mattered
    kind = "LlavaMultiModalProjector" if connector == "native" else "MoEConnector"
    assert type(connector_module(merged.model)).__name__ == kind
    out = Path(result.output)
    assert not list(out.glob("adapter_*")) and not list(out.glob("*.bin"))
    for name in ("tokenizer.json", "processor_config.json", "chat_template.jinja"):
        if (Path(base) / name).exists():
            assert (out / name).read_bytes() == (Path(base) / name).read_bytes()


def test_training_output_layout_and_rerun_is_a_noop(llava_dir, tmp_path):
    train_out = tmp_path / "train"
    make_adapter(llava_dir, train_out / "final" / "adapter", seed=1)
    (train_out / "checkpoints").mkdir()
    (train_out / "checkpoints" / "optimizer.pt").write_bytes(b"ignored")
    storage.commit_dir(train_out)
    assert locate_adapter(str(train_out)) == str(train_out / "final" / "adapter")

    cfg = MergeConfig(base=str(llava_dir), adapter=str(train_out),
                      output=str(tmp_path / "merged"), save_dtype="bfloat16")
    first = main(cfg)
    config = json.loads((Path(first.output) / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    again = main(cfg)
    assert again.cached and again.max_logit_diff == first.max_logit_diff
    assert again.mlflow_run_id != first.mlflow_run_id


def test_errors_name_the_problem(llava_dir, tmp_path):
    with pytest.raises(storage.StoreNotFoundError, match="final/adapter"):
        locate_adapter(str(tmp_path))
    adapter = tmp_path / "adapter"
    make_adapter(llava_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    bad = tmp_path / "prefix"
    shutil.copytree(adapter, bad)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="only LoRA adapters"):
        main(MergeConfig(base=str(llava_dir), adapter=str(bad),
                         output=str(tmp_path / "m")))
    assert not storage.is_committed(tmp_path / "m")
